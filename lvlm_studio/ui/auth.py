"""Who is using the app: password accounts (Gradio auth), HF OAuth on a Space, or a typed name.

Roles are enforced in ``service.Studio``; this module only works out the user name of a request.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from lvlm_studio.service import Studio


def on_space() -> bool:
    """Running as a Hugging Face Space (Gradio's OAuth login works there)."""
    return bool(os.environ.get("SPACE_ID"))


def launch_auth(studio: Studio) -> Callable[[str, str], bool] | None:
    """The ``auth=`` argument of ``demo.launch``: None in open mode."""
    if not studio.auth_enabled:
        return None
    return studio.check_password


def request_user(request: Any) -> str | None:
    """The signed-in user of a Gradio request: password auth, else the HF OAuth session."""
    if request is None:
        return None
    name = getattr(request, "username", None)
    if name:
        return str(name)
    try:  # gr.LoginButton (HF OAuth) keeps the profile in the session
        session = request.session
        info = session.get("oauth_info") if session is not None else None
        # A sign-in past its expiry (about 8 h) counts no more, as Gradio's LoginButton shows it
        # signed out; the session cookie itself lives two weeks.
        if info and not (info.get("expires_at") is not None and info["expires_at"] < time.time()):
            # The Hub handle (what an admin list names); the display name is anyone's to choose.
            return info.get("userinfo", {}).get("preferred_username") or None
    except (AssertionError, AttributeError, KeyError, TypeError):
        pass
    return None


def claimed_user(studio: Studio, request: Any, typed: str | None) -> str | None:
    """Who a request acts as: the signed-in user (password account or HF OAuth). A typed name counts
    only in open mode, where nobody signs in and everyone has every role. With an admin list but
    no accounts (a Space whose admins sign in with Hugging Face), a typed name is ignored: anyone
    could otherwise type an admin's name and train, cancel, or decide and undo as that admin."""
    user = request_user(request)
    if user:
        return user
    if typed is not None and not isinstance(typed, str):  # a JSON client's number or list
        raise ValueError(f"a user name is text, not {type(typed).__name__}")
    typed = (typed or "").strip()
    return typed or None if studio.open_mode else None


def acting_user(studio: Studio, request: Any, typed: str | None) -> str:
    """The name decisions are recorded under (``claimed_user``); signing in is required unless the
    studio runs in open mode."""
    user = claimed_user(studio, request, typed)
    if user is None and not studio.open_mode:
        raise PermissionError("sign in first" + (" (Sign in with Hugging Face)" if on_space() else ""))
    return user or ""


def header_text(studio: Studio, request: Any = None) -> str:
    user = request_user(request)
    mode = studio.auth_summary()
    who = f"signed in as {user} ({studio.role(user)})" if user else ""
    return " · ".join(x for x in (mode, who) if x)
