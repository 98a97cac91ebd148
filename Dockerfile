# GPU image: the project with the vLLM backend (requirements-gpu.txt), the app on port 7860.
# Build: docker build -t lvlm-studio .   Run: docker run --gpus all -p 7860:7860 -v lvlm-data:/app/storage lvlm-studio
# (a named volume; a bind-mounted folder must be writable by uid 1000, the user the app runs as)
# A plain Ubuntu base: torch's wheel carries its own CUDA runtime, and the host's driver comes in
# through the NVIDIA container toolkit (--gpus all); a CUDA base image would add a second,
# unused toolkit. Python is Ubuntu 24.04's 3.12 (the test suite runs on 3.11).
FROM ubuntu:24.04

# The Hub cache lives in the data root (the volume): a model downloads once, not on every start.
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    GRADIO_ANALYTICS_ENABLED=False GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=7860 \
    LVLM_STUDIO_HOME=/app/storage HF_HOME=/app/storage/hf-cache
# A C compiler and Python's headers: Triton (vLLM's kernels) compiles a small helper at run time.
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    python3-dev build-essential git \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY requirements-gpu.txt pyproject.toml README.md ./
# requirements-gpu.txt holds every runtime requirement at vLLM's pins; the project then installs
# without its own (requirements.txt's torch and transformers pins cannot sit beside vLLM's).
RUN pip install -r requirements-gpu.txt
COPY lvlm_studio ./lvlm_studio
COPY app.py ./
RUN pip install --no-deps -e .
# Hugging Face Docker Spaces run the container as uid 1000 (the base image's user "ubuntu"): the
# data root must be its own (one written by an older image, which ran as root, needs
# `docker run --user 0 -v <volume>:/app/storage lvlm-studio chown -R 1000:1000 /app/storage` first). On a Space with persistent storage set LVLM_STUDIO_HOME=/data and
# HF_HOME=/data/hf-cache.
RUN mkdir -p /app/storage && chown -R 1000:1000 /app/storage
USER 1000

EXPOSE 7860
VOLUME ["/app/storage"]
# The port the app listens on (PORT first, as app.py reads it).
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/' % (os.environ.get('PORT') or os.environ.get('GRADIO_SERVER_PORT') or '7860'), timeout=5)"
# LVLM_STUDIO_MODEL selects the model (demo, a local path, or a Hub id). vLLM is installed:
# LVLM_STUDIO_BACKEND=vllm makes the app generate with it; round jobs train and evaluate with
# transformers.
CMD ["python", "app.py"]
