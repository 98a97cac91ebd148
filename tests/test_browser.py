"""The app in headless Chromium (Debian's /usr/bin/chromium via the playwright package; never
`playwright install`): the keyboard shortcut accepts a pair, hostile candidate text is shown as
text and runs nothing (Review and Compare), and a screenshot of the Review tab is saved to
test-artifacts/review.png."""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from conftest import image_bytes  # noqa: E402
from playwright.sync_api import expect, sync_playwright  # noqa: E402

from lvlm_studio.config import Settings  # noqa: E402
from lvlm_studio.service import Studio  # noqa: E402
from lvlm_studio.ui import launch  # noqa: E402

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--headless=new"]
# Where the review screenshot goes: a folder named by LVLM_STUDIO_TEST_ARTIFACTS, else the test's
# temporary folder (never the working tree).
ARTIFACTS_ENV = "LVLM_STUDIO_TEST_ARTIFACTS"
IMG_XSS = "<img src=x onerror=alert(1)>"
SCRIPT_XSS = "<script>alert('pwned')</script>"


@contextmanager
def open_page(url: str):
    """A headless Chromium page on ``url``; yields (page, dialogs fired so far)."""
    dialogs: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1360, "height": 1000})
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(url, wait_until="domcontentloaded")
        try:
            yield page, dialogs
        finally:
            browser.close()


@pytest.fixture
def served(home):
    studio = Studio(Settings(home=home), users={}, admins=())
    studio.seed_demo(n_train=4, n_test=2, pairs_per_method=0)
    ids = [it["id"] for it in studio._describe_items(split="train")]
    studio.generate("povid", item_ids=ids, params={"make_image_rejected": False})
    # a hostile pair with the lowest margin: first in the queue
    from lvlm_studio.media import ingest_image

    rec = ingest_image(studio.settings, image_bytes(7, "PNG", size=(64, 64)), name="x.png")
    studio.store.add_image(rec.id, rec.path, rec.width, rec.height, "test", objects=["red circle"])
    item = studio.store.add_item(rec.id, "Describe <b>this</b> image.", dataset="shapesworld", split="test")
    studio.store.write_generation(
        item,
        [{"text": f"There is a red circle. {SCRIPT_XSS}", "source": "csr",
          "sentences": [{"start": 0, "end": 22, "text": "There is a red circle.", "reward": 21.5}]},
         {"text": f"There is a green triangle. {IMG_XSS}", "source": "csr",
          "sentences": [{"start": 0, "end": 26, "text": "There is a green triangle.", "reward": 3.25}]}],
        [{"chosen": 0, "rejected": 1, "method": "csr", "margin": -1.0}],
    )
    hostile = studio.store.find_pair(item, f"There is a red circle. {SCRIPT_XSS}",
                                     f"There is a green triangle. {IMG_XSS}", "csr")
    r1 = studio.store.create_round(0, "demo", {}, status="done")
    studio.store.add_eval_outputs(0, [{"item_id": item, "answer": f"A red circle {SCRIPT_XSS}",
                                       "objects": ["red circle"], "hallucinated": []}])
    studio.store.add_eval_outputs(r1, [{"item_id": item, "answer": f"A blue square {IMG_XSS}",
                                        "objects": ["blue square"], "hallucinated": ["blue square"]}])
    demo, url = launch(studio, prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    yield studio, url, hostile, r1
    demo.close()
    studio.store.close()


def test_review_keyboard_accept_escaping_and_screenshot(served, tmp_path):
    studio, url, hostile, r1 = served
    with open_page(url) as (page, dialogs):
        info = page.locator("#review-info")
        expect(info).to_contain_text(f"pair #{hostile}", timeout=30_000)
        # model text is shown literally, in both candidates
        expect(page.locator("#review-chosen")).to_contain_text(SCRIPT_XSS)
        expect(page.locator("#review-rejected")).to_contain_text(IMG_XSS)
        expect(info).to_contain_text("Describe <b>this</b> image.")
        expect(page.locator("#auth-mode")).to_contain_text("open mode: no accounts configured")
        # typing "a" in a text field must not decide anything
        reviews_before = studio.store.stats()["tables"]["reviews"]
        page.locator("#review-note textarea, #review-note input").first.fill("a")
        page.locator("#review-note textarea, #review-note input").first.press("a")
        assert studio.store.reviewer_decision(hostile, "guest") is None
        # the shortcut: focus the page body, press "a"
        page.locator("#review-legend").click()
        page.keyboard.press("a")
        expect(page.locator("#review-message")).to_contain_text(f"pair #{hostile}", timeout=15_000)
        decision = studio.store.reviewer_decision(hostile, "guest")
        assert decision is not None and decision["decision"] == "accept"
        assert decision["note"] == "aa"
        # one decision in all, checked once the next pair is up: had the typed "a" decided, there would be two
        expect(page.locator("#review-rejected")).to_contain_text("⚠", timeout=15_000)
        assert studio.store.stats()["tables"]["reviews"] == reviews_before + 1
        # the next pair (a ShapesWorld POVID pair with injected hallucinations) is up: screenshot it
        assert page.locator("#review-note textarea, #review-note input").first.input_value() == ""
        page.wait_for_timeout(700)
        shots = Path(os.environ.get(ARTIFACTS_ENV) or tmp_path)
        shots.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shots / "review.png"), full_page=True)
        assert (shots / "review.png").stat().st_size > 10_000
        # "u" undoes it and brings the pair back
        page.keyboard.press("u")
        expect(page.locator("#review-message")).to_contain_text("Undid", timeout=15_000)
        assert studio.store.reviewer_decision(hostile, "guest") is None
        # a filter just clicked keeps the focus on its radio button: shortcuts still work ("k" skips)
        page.locator("#review-status input[type=radio]:checked").focus()
        page.keyboard.press("k")
        expect(page.locator("#review-message")).to_contain_text("Skipped pair #", timeout=15_000)

        # Compare: both hostile answers shown as text, nothing runs
        page.get_by_role("tab", name="Compare").click()
        page.locator("#compare-b input").fill(str(r1))
        page.locator("#compare-b input").press("Enter")
        page.locator("#compare-run").click()
        table = page.locator("#compare-table")
        expect(table).to_contain_text(SCRIPT_XSS, timeout=15_000)
        expect(table).to_contain_text(IMG_XSS)
        expect(table.locator("mark.hallu")).to_contain_text("blue square")
        assert table.locator("img").count() == 0 and table.locator("script").count() == 0
        page.wait_for_timeout(500)

        # The reviewer name typed in open mode survives a reload (it used to fall back to "guest").
        page.get_by_role("tab", name="Review").click()
        stored = page.evaluate("() => localStorage.getItem('lvlm-studio-reviewer') || ''")
        page.locator("#reviewer-name input, #reviewer-name textarea").first.fill("ann")
        # the name is in the browser's storage (encrypted: its entry changes) before the reload
        page.wait_for_function("(before) => (localStorage.getItem('lvlm-studio-reviewer') || '') !== before",
                               arg=stored, timeout=15_000)
        page.reload(wait_until="domcontentloaded")
        expect(page.locator("#reviewer-name input, #reviewer-name textarea").first).to_have_value("ann", timeout=30_000)
        expect(page.locator("#review-info")).to_contain_text("pair #", timeout=30_000)
        page.locator("#review-legend").click()
        page.keyboard.press("a")  # and the decision is ann's
        expect(page.locator("#review-message")).to_contain_text("accept saved for pair #", timeout=15_000)
        pid = int(page.locator("#review-message").inner_text().rsplit("#", 1)[1].rstrip(". \n"))
        assert studio.store.reviewer_decision(pid, "ann")["decision"] == "accept"
    assert dialogs == [], f"a page dialog fired: {dialogs}"


@pytest.fixture
def fresh(home):
    studio = Studio(Settings(home=home), users={}, admins=())
    studio.seed_demo(n_train=3, n_test=1, pairs_per_method=0)
    demo, url = launch(studio, prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    yield studio, url
    demo.close()
    studio.store.close()


def test_generate_and_upload_from_the_browser(fresh, tmp_path):
    studio, url = fresh
    good = tmp_path / "photo.png"
    good.write_bytes(image_bytes(3, "PNG", size=(48, 40)))
    # A name Markdown would render as emphasis, a link and an automatic link (Gradio keeps these
    # characters in upload names): the summary must show it as typed.
    bad = tmp_path / "_notes_ [l](y) www.evil.example.png"
    bad.write_text("this is not an image")
    assert studio.store.count_pairs("povid") == 0
    with open_page(url) as (page, dialogs):

        # Generate tab: POVID with the shipped demo model (the noisy-image branch runs the model)
        page.get_by_role("tab", name="Generate").click()
        page.locator("#gen-run").click()
        expect(page.locator("#gen-summary")).to_contain_text("pairs from", timeout=120_000)
        made = studio.store.count_pairs("povid")
        assert made >= 3  # 3 train items: text-injection and noisy-image pairs
        expect(page.locator("#gen-summary")).to_contain_text(f"POVID from round 0: {made} pairs from")
        view = studio.next_pair("guest", method="povid")  # what Review will show
        assert studio.store.get_candidate(view["rejected"]["id"])["params"]["method"] == "povid"

        # Data tab: one image is added, the text file named .png is refused by name, nothing else changes
        items_before = studio.store.count_items()
        page.get_by_role("tab", name="Data").click()
        page.locator("#data-upload input[type=file]").set_input_files([str(good), str(bad)])
        # the upload has finished (the box lists the files; Gradio may render a name's stem and
        # extension apart: "photo .png") before the button reads them
        expect(page.locator("#data-upload")).to_contain_text(re.compile(r"photo\s*\.png"), timeout=30_000)
        expect(page.locator("#data-upload")).not_to_contain_text("Uploading", timeout=30_000)
        page.locator("#data-upload-run").click()
        result = page.locator("#data-summary")  # the readable report (the JSON is folded away)
        expect(result).to_contain_text("1 image added, 1 refused", timeout=30_000)
        expect(result).to_contain_text(bad.name)
        assert result.locator("a, em, img").count() == 0
        assert studio.store.count_items() == items_before + 1
        uploaded = studio.store.list_items(dataset="uploads")
        assert len(uploaded) == 1 and uploaded[0]["prompt"] == "Describe the image."
    assert dialogs == []
