"""One factory for model backends and CLIP scorers.

A model reference is "demo" (the ShapesWorld VLM in ``lvlm_studio/world/artifacts/vlm``), a local
directory with a saved transformers model + processor, or a Hugging Face Hub id ("org/name").
Hub ids load from the local cache first (``local_files_only``); the network is tried only when
neither ``HF_HUB_OFFLINE`` nor ``TRANSFORMERS_OFFLINE`` is set and the Hub's host answers. Anything that cannot load raises
`ModelLoadError` with one message: what was tried, why it failed, what to do.
"""

from __future__ import annotations

import collections
import gc
import os
import re
import sys
import threading
from pathlib import Path

from ..config import BACKENDS, resolve_device
from .base import MissingDependencyError, ModelLoadError, VLMBackend
from .clip import ClipScorer, _one_line
from .hf import quantization_config, resolve_dtype
from .lora import as_chain

DEMO_VLM_DIR = Path(__file__).resolve().parent.parent / "world" / "artifacts" / "vlm"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")

# Loaded backends, least recently used first. A long-running app loads a model per round it
# generates or evaluates with (round t is the merged parent plus its adapter): without a bound
# every round's copy stayed in memory. Two cover the usual back and forth (base and a round).
MAX_LOADED_BACKENDS = 2
_backends: collections.OrderedDict[tuple, VLMBackend] = collections.OrderedDict()
_clips: dict[tuple, ClipScorer] = {}
_lock = threading.Lock()


def is_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


HUB_QUERY_TIMEOUT = 10.0  # seconds check_model_ref waits, in all, for the Hub's answer about an id


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hub's host cannot be reached (None: it can, or a proxy decides). One TCP connect
    with a short timeout: without it an unknown id on an offline machine took ~46 s of the Hub
    client's retries to fail."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in _PROXY_VARIABLES):
        return None  # only the proxy can tell
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or type(exc).__name__}"
    return None


def resolve_model_ref(ref: str) -> tuple[str, bool]:
    """(path or Hub id, is_local). Raises ModelLoadError for a missing demo or local path."""
    if ref == "demo":
        if not (DEMO_VLM_DIR / "config.json").is_file():
            raise ModelLoadError(
                f"The demo model is not built yet (no {DEMO_VLM_DIR / 'config.json'}). "
                "Build it with: lvlm-studio demo build"
            )
        return str(DEMO_VLM_DIR), True
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{ref!r} exists but is not a saved transformers model (no config.json in it). "
                "Point to a directory written by model.save_pretrained + processor.save_pretrained."
            )
        return str(path), True
    if ref.startswith(("/", "./", "../", "~", ".\\")) or not _HUB_ID.match(ref):
        raise ModelLoadError(f"No model directory at {ref!r} (and it is not a Hugging Face Hub id like 'org/name').")
    return ref, False


def _no_download_reason() -> str | None:
    """Why a Hub id the cache lacks cannot be downloaded now (offline, or the Hub unreachable: one
    probe), or None when it can."""
    if is_offline():
        return "downloading is off (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set)"
    unreachable = hub_unreachable()
    return None if unreachable is None else f"the Hub cannot be reached ({unreachable})"


def _not_cached_message(ref: str, cause: str, why: str) -> str:
    return (f"Could not load model {ref!r}: it is not a local directory, and it is not in the Hugging Face "
            f"cache{cause}; {why}. Download it on a connected machine (huggingface-cli download {ref}) or use "
            "'demo' or a local directory.")


def check_model_ref(ref: str) -> None:
    """Refuse a model that cannot load, without loading it: a missing demo or local directory, a
    malformed id, a Hub id the cache lacks while downloading is off or the Hub cannot be reached
    (what ``load_backend`` would say), or one the Hub says it does not hold. For runs that end
    before any model is needed."""
    _, local = resolve_model_ref(ref)
    if local:
        return
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        if isinstance(try_to_load_from_cache(ref, "config.json"), str):
            return
    except HFValidationError as exc:  # 'org/a--b', 'x.git', ...: the Hub's own rules
        raise ModelLoadError(f"{ref!r} is not a valid Hugging Face model id ({exc})") from exc
    if (why := _no_download_reason()) is not None:
        raise ModelLoadError(_not_cached_message(ref, "", why))
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    answer: dict[str, BaseException | None] = {}

    def ask() -> None:
        try:
            HfApi().repo_info(ref, timeout=HUB_QUERY_TIMEOUT)
            answer["error"] = None
        except Exception as exc:  # classified below
            answer["error"] = exc

    # A deadline for the whole query, not only each read: a proxy or portal that accepts the
    # connection and then never answers, or trickles bytes, would otherwise hold the run forever
    # (the client's default timeout is none). A query past it is left to finish in the background.
    asker = threading.Thread(target=ask, name="hub-repo-info", daemon=True)
    asker.start()
    asker.join(HUB_QUERY_TIMEOUT)
    error = answer.get("error")
    if isinstance(error, GatedRepoError):  # it exists; access is the load's question
        return
    if isinstance(error, RepositoryNotFoundError):
        raise ModelLoadError(
            f"Could not load model {ref!r}: the Hugging Face Hub has no such model (or it is private and "
            "this machine's token has no access to it). Check the id, or log in (hf auth login)."
        )
    # otherwise it exists, or no answer in time, or a proxy / rate-limit error: the Hub did not say
    # no, and the load will tell


def load_backend(
    ref: str,
    *,
    backend: str = "hf",
    device: str = "auto",
    dtype: str = "auto",
    adapter: str | list[str] | tuple[str, ...] | None = None,
    quantization: str | None = None,
) -> VLMBackend:
    """A loaded backend, cached per (ref, backend, adapter, device, dtype, quantization). ``adapter``
    is one LoRA adapter folder or, for the hf backend, a round's chain of them (oldest first)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    device = resolve_device(device)
    resolve_dtype(dtype, device)  # a bad dtype is a caller error (ValueError), checked before loading
    if quantization is not None:
        if backend == "vllm":
            raise ValueError("quantization applies to the hf backend; vLLM takes a pre-quantized checkpoint instead")
        quantization_config(quantization, resolve_dtype(dtype, device))  # bad value or no bitsandbytes: now
    chain = tuple(as_chain(adapter))
    if backend == "vllm" and len(chain) > 1:
        raise ValueError("the vllm backend serves one LoRA adapter: merge the parent chain into the model first")
    key = (ref, backend, chain or None, device, dtype, quantization)
    with _lock:
        if key in _backends:
            _backends.move_to_end(key)
            return _backends[key]
        path, local = resolve_model_ref(ref)
        for folder in chain:
            if not Path(folder).is_dir():
                raise ModelLoadError(f"Adapter directory {folder!r} does not exist.")
        # Room first: the least recently used models go before the new one loads, so the peak is
        # MAX_LOADED_BACKENDS models, not one more (a 7B round beside two cached ones would not fit).
        if len(_backends) >= MAX_LOADED_BACKENDS:
            while len(_backends) >= MAX_LOADED_BACKENDS:
                _backends.popitem(last=False)
            _release_memory()
        if backend == "vllm":
            loaded = _load_vllm(ref, path, dtype, chain[0] if chain else None)
        else:
            loaded = _load_hf(ref, path, local, device, dtype, list(chain) or None, quantization)
        _backends[key] = loaded
        return loaded


def _release_memory() -> None:
    """Give the memory of dropped models back (a caller still holding one keeps it alive)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _load_hf(ref, path, local, device, dtype, adapter, quantization):
    from .hf import HFBackend

    def attempt(local_files_only: bool):
        return HFBackend.from_pretrained(
            path, device=device, dtype=dtype, adapter=adapter, quantization=quantization,
            local_files_only=local_files_only,
        )

    try:
        if local:
            return attempt(local_files_only=True)
        try:
            return attempt(local_files_only=True)  # the Hub cache first: no network needed
        except (ModelLoadError, MissingDependencyError):
            raise
        except Exception as cache_exc:
            # A file the cache lacks is an OSError; another failure (not an image-text-to-text model,
            # out of memory) is the model's own, and offline it is said as it is. Online, any failure
            # retries with downloads: a cache left half-written (a tokenizer config without its
            # tokenizer file fails with a ValueError) is completed that way.
            if (no_download := _no_download_reason()) is not None:
                if not isinstance(cache_exc, OSError):
                    raise ModelLoadError(
                        f"Could not load model {ref!r} from the Hugging Face cache: {_one_line(cache_exc)}. Check "
                        "that it is an image-text-to-text model with a processor, or use 'demo' or a local "
                        "directory."
                    ) from cache_exc
                raise ModelLoadError(_not_cached_message(ref, f" ({_one_line(cache_exc)})", no_download)) from cache_exc
        # Outside the handler: the cache attempt's frames (and whatever it had loaded) are freed
        # before the download loads the model again.
        return attempt(local_files_only=False)
    except (ModelLoadError, MissingDependencyError):
        raise
    except Exception as exc:
        where = "the local directory" if local else "the Hugging Face cache and the Hub"
        raise ModelLoadError(
            f"Could not load model {ref!r} from {where}: {_one_line(exc)}. "
            "Check the id or path (it must be an image-text-to-text model with a processor), the "
            "network if it is a Hub id, or use 'demo' or a local directory."
        ) from exc


def _load_vllm(ref, path, dtype, adapter):
    from .vllm_backend import VLLMBackend

    try:
        return VLLMBackend(path, dtype=dtype, adapter=adapter)
    except MissingDependencyError:
        raise
    except Exception as exc:
        import torch

        # On a machine without a GPU, vLLM's own message (a platform or device error deep in its
        # engine) rarely says so.
        why = "" if torch.cuda.is_available() else (
            " The vLLM backend runs on a CUDA GPU and torch sees none here: use the hf backend "
            "(LVLM_STUDIO_BACKEND=hf).")
        raise ModelLoadError(f"vLLM could not load model {ref!r}: {_one_line(exc)}.{why}") from exc


def load_clip(ref: str, device: str = "auto") -> ClipScorer:
    """A CLIP scorer (see `ClipScorer.from_ref` for the refs), cached per (ref, device)."""
    device = resolve_device(device)
    key = (ref, device)
    with _lock:
        if key not in _clips:
            _clips[key] = ClipScorer.from_ref(ref, device=device)
        return _clips[key]


def clear_cache() -> None:
    """Forget loaded backends and scorers (tests; after a new adapter replaces an old one)."""
    with _lock:
        _backends.clear()
        _clips.clear()
