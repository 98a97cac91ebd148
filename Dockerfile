# GPU image: CUDA runtime, the project with its gpu extra (vLLM), the app on port 7860.
# Build: docker build -t lvlm-studio .   Run: docker run --gpus all -p 7860:7860 -v $PWD/storage:/app/storage lvlm-studio
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    GRADIO_ANALYTICS_ENABLED=False GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=7860 \
    LVLM_STUDIO_HOME=/app/storage
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip git \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY requirements.txt requirements-gpu.txt pyproject.toml README.md ./
RUN pip install -r requirements-gpu.txt
COPY lvlm_studio ./lvlm_studio
COPY app.py ./
RUN pip install --no-deps -e .

EXPOSE 7860
VOLUME ["/app/storage"]
# LVLM_STUDIO_MODEL selects the model (demo, a local path, or a Hub id). vLLM is installed:
# LVLM_STUDIO_BACKEND=vllm makes the app generate with it; round jobs train and evaluate with
# transformers.
CMD ["python", "app.py"]
