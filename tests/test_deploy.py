"""Deployment files checked statically (no Docker engine or Hub access on the test machines): the
README front matter makes the repo a Gradio Space whose app file and SDK match this checkout, and
the Dockerfile only copies files that exist and starts the same app."""

from __future__ import annotations

import re
from pathlib import Path

import gradio
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def front_matter() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    assert text.startswith("---\n"), "a Space needs YAML front matter at the top of README.md"
    block = text[4 : text.index("\n---\n", 4)]
    out = {}
    for line in block.splitlines():
        key, _, value = line.partition(":")
        out[key.strip()] = value.strip().strip('"')
    return out


def test_space_front_matter_matches_the_checkout():
    meta = front_matter()
    assert meta["sdk"] == "gradio"
    assert (ROOT / meta["app_file"]).is_file()
    # the Space installs requirements.txt and this gradio version: keep it the tested one
    assert meta["sdk_version"] == gradio.__version__
    specs = [Requirement(ln) for ln in (ROOT / "requirements.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith(("#", "-"))]
    [spec] = [r for r in specs if r.name == "gradio"]
    assert spec.specifier.contains(meta["sdk_version"]), (spec, meta["sdk_version"])
    assert meta["python_version"] == "3.11"
    assert len(meta["short_description"]) <= 60  # the Hub refuses a longer one
    # the app shows HF's sign-in button on a Space (SPACE_ID): the Space must enable OAuth for it
    assert meta["hf_oauth"] == "true"


def test_dockerfile_copies_existing_files_and_starts_the_app():
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines()]
    instructions = [ln for ln in lines if ln and not ln.startswith("#")]
    assert instructions[0].startswith("FROM "), instructions[0]
    # torch's wheel brings its CUDA runtime; the NVIDIA toolkit brings the driver when asked to
    assert any("NVIDIA_DRIVER_CAPABILITIES=compute" in ln for ln in instructions)
    copies = [ln.split()[1:-1] for ln in instructions if ln.startswith("COPY ")]
    assert copies, "the image must copy the project"
    for sources in copies:
        for src in sources:
            assert (ROOT / src).exists(), f"Dockerfile copies {src!r}, which is not in the repo"
    # requirements-gpu.txt is every runtime requirement at vLLM's pins (not -r requirements.txt,
    # whose torch pin cannot sit beside vLLM's), then the project installs without its own pins
    assert [ln for ln in instructions if ln.startswith("RUN pip")] == [
        "RUN pip install -r requirements-gpu.txt", "RUN pip install --no-deps -e ."]

    def requirements(name: str) -> dict[str, Requirement]:
        lines = (ROOT / name).read_text().splitlines()
        assert not any(ln.startswith("-r") for ln in lines), name
        return {r.name.lower(): r for r in (Requirement(ln) for ln in lines if ln.strip() and not ln.startswith("#"))}

    runtime, gpu = requirements("requirements.txt"), requirements("requirements-gpu.txt")
    assert set(gpu) - set(runtime) == {"vllm", "bitsandbytes"} and set(runtime) <= set(gpu)
    assert str(gpu["vllm"].specifier).startswith("==") and str(gpu["torch"].specifier).startswith("==")
    assert instructions[-1] == 'CMD ["python", "app.py"]'
    assert "EXPOSE 7860" in instructions
    # A Docker Space runs the image as uid 1000, which must own the data root (and the Hub cache in it).
    env = " ".join(ln for ln in instructions if ln.startswith(("ENV", "LVLM", "GRADIO", "HF_")))
    home = re.search(r"LVLM_STUDIO_HOME=(\S+)", env)[1]
    assert re.search(rf"HF_HOME={re.escape(home)}/", env), env
    user = instructions.index("USER 1000")
    assert any(f"chown -R 1000:1000 {home}" in ln for ln in instructions[:user]), "the data root must be uid 1000's"
    # the build context leaves out a local data root (user data) and the git history
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "storage/" in ignored and ".git" in ignored


def test_relative_links_in_readme_and_docs_point_to_files_in_the_repo():
    """The README (also the Space's page) and docs/ link to each other and to plots: a moved or
    renamed file must not leave a dead link."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

    def heading_ids(path: Path) -> set[str]:
        """GitHub's heading ids: lowercase, punctuation dropped, spaces to hyphens, a repeated
        heading suffixed -1, -2, ...; lines inside fenced code blocks are no headings."""
        text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
        ids, seen = set(), {}
        for heading in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE):
            slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            ids.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
        return ids

    checked = 0
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # a URL
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            assert path.is_file(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"
            if anchor:
                assert anchor in heading_ids(path), f"{page.relative_to(ROOT)} links to {target}: no such heading"
            checked += 1
    assert checked >= 2  # the README's experiments page and its plot at least
