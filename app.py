"""LVLM Studio: the Gradio app (also the Hugging Face Spaces ``app_file``).

``python app.py`` starts in seconds on the embedded ShapesWorld default, seeding the store on the
first start. Environment: ``LVLM_STUDIO_HOME`` (data root), ``PORT`` / ``GRADIO_SERVER_PORT``
(default 7860), ``GRADIO_SERVER_NAME`` (default 127.0.0.1; 0.0.0.0 on a Space),
``LVLM_STUDIO_USERS`` (accounts, see lvlm_studio/service.py).
"""

from __future__ import annotations

from lvlm_studio.config import listen_address
from lvlm_studio.service import Studio, seed_announcement
from lvlm_studio.ui import build_app, launch_kwargs


def main() -> None:
    try:
        studio = Studio()
        host, port = listen_address()
    except ValueError as exc:  # a bad setting in the environment: one line, not a traceback
        raise SystemExit(f"LVLM Studio cannot start: {exc}") from None
    if line := seed_announcement(studio.seed_demo()):
        print(line)
    try:
        studio.reattach()  # rounds whose subprocess died while the app was down are marked failed
    except ImportError:
        pass
    demo = build_app(studio)
    demo.queue(default_concurrency_limit=None)
    demo.launch(server_name=host, server_port=port, **launch_kwargs(studio))


if __name__ == "__main__":
    main()
