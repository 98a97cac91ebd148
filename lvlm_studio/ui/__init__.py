"""The Gradio UI: one module per tab, thin handlers over ``lvlm_studio.service``."""

from lvlm_studio.ui.app import build_app, launch, launch_kwargs

__all__ = ["build_app", "launch", "launch_kwargs"]
