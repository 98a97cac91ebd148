"""load_backend / load_clip: refs, caching, and one clear ModelLoadError per failure."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lvlm_studio.models import registry
from lvlm_studio.models.base import MissingDependencyError, ModelLoadError
from lvlm_studio.models.hf import HFBackend
from lvlm_studio.models.tiny import build_tiny_llava


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("reg_llava"))


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("LVLM_STUDIO_HOME", str(tmp_path / "home"))
    registry.clear_cache()
    yield
    registry.clear_cache()


def test_local_path_loads_and_is_cached(model_dir):
    a = registry.load_backend(str(model_dir), device="cpu")
    assert isinstance(a, HFBackend)
    assert registry.load_backend(str(model_dir), device="cpu") is a
    b = registry.load_backend(str(model_dir), device="cpu", dtype="bfloat16")
    assert b is not a and b.dtype.is_floating_point and str(b.dtype) == "torch.bfloat16"


def test_the_cache_keeps_the_most_recently_used_models_only(model_dir):
    """A long-running app loads a model per round: the cache drops the least recently used one
    beyond MAX_LOADED_BACKENDS instead of keeping every round's copy in memory."""
    import weakref

    assert registry.MAX_LOADED_BACKENDS == 2
    a = registry.load_backend(str(model_dir), device="cpu")
    b = registry.load_backend(str(model_dir), device="cpu", dtype="bfloat16")
    assert registry.load_backend(str(model_dir), device="cpu") is a  # a used again: b is the oldest now
    gone = weakref.ref(b)
    del b
    real_load, held_while_loading = registry._load_hf, []

    def load(*args):
        held_while_loading.append(len(registry._backends))
        return real_load(*args)

    registry._load_hf = load
    try:
        c = registry.load_backend(str(model_dir), device="cpu", dtype="float16")
    finally:
        registry._load_hf = real_load
    assert len(registry._backends) == 2 and gone() is None  # dropped and its memory freed
    assert held_while_loading == [1]  # b left before c loaded: the peak is two models, not three
    assert registry.load_backend(str(model_dir), device="cpu") is a
    assert registry.load_backend(str(model_dir), device="cpu", dtype="float16") is c


def test_demo_missing_says_how_to_build(monkeypatch, tmp_path, model_dir):
    monkeypatch.setattr(registry, "DEMO_VLM_DIR", tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="lvlm-studio demo build"):
        registry.load_backend("demo", device="cpu")
    monkeypatch.setattr(registry, "DEMO_VLM_DIR", model_dir)
    assert registry.load_backend("demo", device="cpu").model_id == str(model_dir)


def test_bad_paths(tmp_path):
    with pytest.raises(ModelLoadError, match="No model directory"):
        registry.load_backend("./does/not/exist", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        registry.load_backend(str(tmp_path / "empty"), device="cpu")
    with pytest.raises(ValueError):
        registry.load_backend(str(tmp_path / "empty"), device="cpu", dtype="int3")


def test_unknown_hub_id_offline_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError) as err:
        registry.load_backend("some-org/not-a-real-vlm", device="cpu")
    msg = str(err.value)
    assert "some-org/not-a-real-vlm" in msg and "HF_HUB_OFFLINE" in msg and "demo" in msg
    assert "Traceback" not in msg and len(msg) < 800


def test_a_cached_model_that_fails_to_load_is_not_reported_as_missing(monkeypatch):
    """Offline, a cached model that fails for its own reason (not an image-text-to-text model, out
    of memory) says that reason, once, not "not in the cache"; a file the cache lacks (OSError)
    says that. Online, any cache failure is tried again with downloads."""
    calls = []

    def from_pretrained(path, local_files_only, **kwargs):
        calls.append(local_files_only)
        if path == "org/text-only":
            raise ValueError("Unrecognized configuration class Qwen2Config for AutoModelForImageTextToText")
        raise OSError(f"{path} does not appear to have a file named config.json")

    monkeypatch.setattr(HFBackend, "from_pretrained", staticmethod(from_pretrained))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="Unrecognized configuration class") as err:
        registry.load_backend("org/text-only", device="cpu")
    assert "not in the Hugging Face cache" not in str(err.value) and calls == [True]
    calls.clear()
    with pytest.raises(ModelLoadError, match="not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        registry.load_backend("org/absent", device="cpu")
    assert calls == [True]
    # Online, any cache failure retries with downloads (a half-written cache is completed that way).
    calls.clear()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(registry, "hub_unreachable", lambda: None)
    with pytest.raises(ModelLoadError, match="Unrecognized configuration class"):
        registry.load_backend("org/text-only", device="cpu")
    assert calls == [True, False]


def test_adapter_missing(model_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="Adapter directory"):
        registry.load_backend(str(model_dir), device="cpu", adapter=str(tmp_path / "no_adapter"))
    bad = tmp_path / "bad_adapter"
    bad.mkdir()
    with pytest.raises(ModelLoadError, match="LoRA adapter"):
        registry.load_backend(str(model_dir), device="cpu", adapter=str(bad))


def test_vllm_missing_names_package_and_command(model_dir):
    # vllm is not installed on these machines: the clear error IS the behaviour under test
    assert "vllm" not in sys.modules
    with pytest.raises(MissingDependencyError) as err:
        registry.load_backend(str(model_dir), backend="vllm")
    assert "vllm" in str(err.value) and "pip install -r requirements-gpu.txt" in str(err.value)
    with pytest.raises(ValueError):
        registry.load_backend(str(model_dir), backend="tgi")


def test_the_backend_setting_reaches_generation_and_fails_clearly(model_dir, monkeypatch, tmp_path):
    """LVLM_STUDIO_BACKEND picks the library the service generates with: 'vllm' reaches the vLLM
    loader (here: its missing-package error, before anything is written); a typo is refused."""
    from gradio import Error as GradioError

    from lvlm_studio.config import Settings
    from lvlm_studio.service import Studio
    from lvlm_studio.ui.common import user_errors

    monkeypatch.setenv("LVLM_STUDIO_BACKEND", "tgi")
    with pytest.raises(ValueError, match="LVLM_STUDIO_BACKEND must be one of hf, vllm, not 'tgi'"):
        Settings()
    monkeypatch.setenv("LVLM_STUDIO_BACKEND", "vllm")
    studio = Studio(Settings(home=tmp_path / "h", model=str(model_dir), device="cpu"), users={}, admins=())
    try:
        assert studio.settings.backend == "vllm"
        studio.seed_demo(n_train=2, n_test=0, pairs_per_method=0)
        with pytest.raises(MissingDependencyError, match="needs the 'vllm' package"):
            studio.generate("stic", model=str(model_dir), split="train", params={"max_new_tokens": 4})
        assert studio.store.count_pairs() == 0 and "vllm" not in sys.modules
        # The app's handlers show it as a message, not a generic failure.
        with pytest.raises(GradioError, match="needs the 'vllm' package"):
            user_errors(lambda: studio.generate("stic", model=str(model_dir), split="train"))()
        # The default backend generates with transformers.
        studio.settings.backend = "hf"
        report = studio.generate("stic", model=str(model_dir), split="train", params={"max_new_tokens": 4})
        assert report["items"] == 2 and studio.store.count_pairs() == report["pairs"]
    finally:
        studio.store.close()


def test_a_bad_quantization_fails_before_loading(model_dir, monkeypatch):
    with pytest.raises(ValueError, match="not '2bit'"):
        registry.load_backend(str(model_dir), device="cpu", quantization="2bit")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match="needs the 'bitsandbytes' package"):
        registry.load_backend(str(model_dir), device="cpu", quantization="4bit")
    with pytest.raises(ValueError, match="applies to the hf backend"):
        registry.load_backend(str(model_dir), backend="vllm", quantization="4bit")
    assert registry._backends == {}


def test_imports_are_lazy():
    code = (
        "import sys, lvlm_studio.models as m, lvlm_studio.models.vllm_backend as v;"
        "assert 'vllm' not in sys.modules, 'vllm imported';"
        "assert 'torch' not in sys.modules, 'torch imported by the protocol';"
        "assert m.GenerationParams().max_new_tokens > 0;"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_load_clip_cached(tmp_path):
    from test_clip import save_tiny_clip

    d = save_tiny_clip(tmp_path / "clip")
    a = registry.load_clip(str(d), device="cpu")
    assert registry.load_clip(str(d), device="cpu") is a
    registry.clear_cache()  # e.g. after a new CLIP replaced the files: loaded again
    assert registry.load_clip(str(d), device="cpu") is not a
    with pytest.raises(ModelLoadError):
        registry.load_clip("definitely-not-a-clip")


# --- Gaps found by a mutation audit of lvlm_studio/models/registry.py ---------------------------


def test_refs_are_told_apart(tmp_path, model_dir):
    assert registry.resolve_model_ref("org/some-vlm_1.5") == ("org/some-vlm_1.5", False)
    assert registry.resolve_model_ref("gpt2") == ("gpt2", False)
    assert registry.resolve_model_ref(str(model_dir)) == (str(model_dir), True)
    # neither a directory nor a Hub id: refused now, not tried on the Hub
    for ref in ("some/nested/path", "org/name/", "-org/name", "org name", str(tmp_path / "missing")):
        with pytest.raises(ModelLoadError, match="No model directory"):
            registry.resolve_model_ref(ref)


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_flags(monkeypatch, variable):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert registry.is_offline() is False
    for value in ("1", "true", " TRUE ", "yes", "On"):
        monkeypatch.setenv(variable, value)
        assert registry.is_offline() is True, value
    for value in ("0", "false", "", "no"):
        monkeypatch.setenv(variable, value)
        assert registry.is_offline() is False, value


@pytest.fixture
def fake_loads(monkeypatch):
    """HFBackend.from_pretrained replaced: records each call's local_files_only and answers with
    ``outcomes[local_files_only]`` (an exception to raise, or anything else to return a new object)."""
    calls, outcomes = [], {True: None, False: None}

    def fake(path, **kwargs):
        calls.append(kwargs["local_files_only"])
        outcome = outcomes[kwargs["local_files_only"]]
        if isinstance(outcome, BaseException):
            raise outcome
        return object()

    monkeypatch.setattr(HFBackend, "from_pretrained", fake)
    monkeypatch.setattr(registry, "hub_unreachable", lambda: None)  # the fake "network" answers
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return calls, outcomes


def test_a_hub_id_loads_from_the_cache_first_then_the_network_unless_offline(fake_loads, monkeypatch):
    calls, outcomes = fake_loads
    registry.load_backend("org/cached", device="cpu")
    assert calls == [True]  # in the cache: no network
    calls.clear()
    outcomes[True] = OSError("not in the cache")
    registry.load_backend("org/downloaded", device="cpu")
    assert calls == [True, False]
    calls.clear()
    outcomes[False] = OSError("404 not found")
    with pytest.raises(ModelLoadError, match="from the Hugging Face cache and the Hub: OSError"):
        registry.load_backend("org/missing", device="cpu")
    calls.clear()
    # an error that is already a clear one (e.g. a bad adapter) is not retried over the network
    outcomes[True] = ModelLoadError("Could not load the LoRA adapter")
    with pytest.raises(ModelLoadError, match="LoRA adapter"):
        registry.load_backend("org/bad-adapter", device="cpu")
    assert calls == [True]
    calls.clear()
    outcomes[True] = OSError("not in the cache")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="downloading is off"):
        registry.load_backend("org/offline", device="cpu")
    assert calls == [True]


def test_an_unreachable_hub_fails_at_once_without_trying_it(fake_loads, monkeypatch):
    calls, outcomes = fake_loads
    outcomes[True] = OSError("not in the cache")
    monkeypatch.setattr(registry, "hub_unreachable", lambda: "huggingface.co:443: Network is unreachable")
    with pytest.raises(ModelLoadError, match="the Hub cannot be reached \\(huggingface.co:443: Network is unreachable\\)"):
        registry.load_backend("org/unreachable", device="cpu")
    assert calls == [True]  # the cache only: no download attempt to wait for


def test_hub_unreachable_probes_the_endpoint_unless_a_proxy_decides(monkeypatch):
    import socket

    for var in registry._PROXY_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    port = listening.getsockname()[1]
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        assert registry.hub_unreachable() is None
    finally:
        listening.close()
    why = registry.hub_unreachable()  # the same port, now closed
    assert why is not None and why.startswith(f"127.0.0.1:{port}: ")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert registry.hub_unreachable() is None


def test_check_model_ref_asks_the_hub_whether_an_uncached_id_exists(monkeypatch, tmp_path):
    """Online, an id the cache lacks is looked up on the Hub (here a local server speaking the
    Hub's API): one it does not hold is refused with the reason; one it holds, or holds gated,
    passes; a Hub that answers with a server error, or not within the timeout, refuses nothing
    (the load itself will say what failed) and holds nothing up."""
    import http.server
    import threading

    import huggingface_hub.constants

    asked, silent, finished = [], threading.Event(), set()

    class FakeHub(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the stdlib's name)
            asked.append(self.path)
            if self.path.startswith("/api/models/org/present"):
                body, status, headers = b'{"id": "org/present", "sha": "0" }', 200, {}
            elif self.path.startswith("/api/models/org/broken"):
                body, status, headers = b"{}", 500, {}
            elif self.path.startswith("/api/models/org/gated"):
                body, status, headers = b'{"error": "gated"}', 403, {"X-Error-Code": "GatedRepo"}
            elif self.path.startswith("/api/models/org/silent"):  # accepts, never answers in time
                silent.wait(120)
                finished.add("silent")
                return
            elif self.path.startswith("/api/models/org/trickle"):  # answers a byte at a time, slowly
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "100")
                self.end_headers()
                for _ in range(400):
                    if silent.wait(0.3):
                        return
                    self.wfile.write(b" ")
                    self.wfile.flush()
                finished.add("trickle")
                return
            else:
                body, status, headers = b'{"error": "Repository not found"}', 404, {"X-Error-Code": "RepoNotFound"}
            self.send_response(status)
            for key, value in {"Content-Type": "application/json", **headers}.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *registry._PROXY_VARIABLES):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read once, at import (CI sets it)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
        with pytest.raises(ModelLoadError, match="the Hugging Face Hub has no such model"):
            registry.check_model_ref("org/missing")
        registry.check_model_ref("org/present")
        registry.check_model_ref("org/broken")
        registry.check_model_ref("org/gated")  # it exists; whether this token may read it is the load's
        monkeypatch.setattr(registry, "HUB_QUERY_TIMEOUT", 0.5)
        # The server holds both answers for two minutes: the checks return while it still holds them.
        registry.check_model_ref("org/silent")  # the Hub did not say no: nothing refused, and no hang
        registry.check_model_ref("org/trickle")  # each read in time, the whole answer not: no hang either
        assert not finished
    finally:
        silent.set()
        server.shutdown()
    # (the client also asks other routes of its own, such as /api/agent-harnesses)
    assert [path.split("?")[0] for path in asked if path.startswith("/api/models/")] == [
        "/api/models/org/missing", "/api/models/org/present", "/api/models/org/broken", "/api/models/org/gated",
        "/api/models/org/silent", "/api/models/org/trickle"]


def test_a_local_directory_never_goes_to_the_network(fake_loads, model_dir):
    calls, outcomes = fake_loads
    outcomes[True] = OSError("broken weights")
    with pytest.raises(ModelLoadError, match="from the local directory: OSError: broken weights"):
        registry.load_backend(str(model_dir), device="cpu")
    assert calls == [True]


def test_the_cache_key_holds_the_adapter_and_the_quantization(fake_loads, model_dir, tmp_path):
    (tmp_path / "a1").mkdir()
    (tmp_path / "a2").mkdir()
    plain = registry.load_backend(str(model_dir), device="cpu")
    one = registry.load_backend(str(model_dir), device="cpu", adapter=str(tmp_path / "a1"))
    two = registry.load_backend(str(model_dir), device="cpu", adapter=str(tmp_path / "a2"))
    assert len({id(plain), id(one), id(two)}) == 3
    assert registry.load_backend(str(model_dir), device="cpu", adapter=str(tmp_path / "a1")) is one
    assert registry.load_backend(str(model_dir), device="cpu", quantization="8bit") is not plain
    registry.clear_cache()
    assert registry.load_backend(str(model_dir), device="cpu") is not plain
