"""The tabs' handlers called directly on a built app (no server, no model): the user's fields reach
the service, decisions land under the signed-in user, the review queue moves on (skip, decide,
undo), what a user typed is escaped wherever it is shown as HTML, and the JSON API exposes every
documented endpoint. The same handlers over HTTP: tests/test_app.py."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
from conftest import image_bytes, write_image  # noqa: E402

from lvlm_studio.config import Settings  # noqa: E402
from lvlm_studio.service import Studio, parse_users  # noqa: E402
from lvlm_studio.ui.app import build_app  # noqa: E402

HOSTILE = "<img src=x onerror=alert(1)>"


def signed_in(name: str | None, oauth: dict | None = None, expires_at: float | None = None) -> SimpleNamespace:
    """A stand-in for gr.Request: a password-auth user name and/or an HF OAuth session."""
    info = {"userinfo": oauth, **({} if expires_at is None else {"expires_at": expires_at})}
    return SimpleNamespace(username=name, session={"oauth_info": info} if oauth else {})


def handler(demo: gr.Blocks, name: str):
    """A handler of the built app by its api_name (or its function's name when it has none)."""
    fns = list(demo.fns.values())
    found = [f for f in fns if f.api_name == name] or [f for f in fns if f.fn and f.fn.__name__ == name]
    distinct = list({id(f.fn): f.fn for f in found}.values())  # one function may serve several events
    assert len(distinct) == 1, (name, len(distinct))
    return distinct[0]


def add_pairs(studio: Studio, margins: list[float], method: str = "csr", round: int = 0) -> list[int]:
    """One new item (own image) and pair per margin; lower margins come first in the queue."""
    from lvlm_studio.media import ingest_image

    ids = []
    for margin in margins:
        seed = 500 + studio.store.count_items()
        rec = ingest_image(studio.settings, image_bytes(seed, "PNG"), name=f"{seed}.png")
        studio.store.add_image(rec.id, rec.path, rec.width, rec.height, "test")
        item = studio.store.add_item(rec.id, "Describe the image.")
        chosen, rejected = f"There is a red circle {seed}.", f"There is a blue star {seed}."
        studio.store.write_generation(
            item, [{"text": chosen, "source": method, "round": round}, {"text": rejected, "source": method, "round": round}],
            [{"chosen": 0, "rejected": 1, "method": method, "margin": margin, "round": round}])
        ids.append(studio.store.find_pair(item, chosen, rejected, method))
    return ids


@pytest.fixture
def open_studio(home):
    studio = Studio(Settings(home=home), users={}, admins=())
    yield studio
    studio.store.close()


@pytest.fixture
def accounts_studio(home):
    studio = Studio(Settings(home=home), users=parse_users("alice:pw:admin,bob:pw:reviewer"), admins=())
    yield studio
    studio.store.close()


# ---- identity and errors ------------------------------------------------------------------------


def test_user_errors_become_messages_and_other_errors_stay_errors():
    """user_errors: a missing role, an unknown id, and the project's own errors (subclasses too:
    RoundBusyError is a JobError) are messages; a bug is not hidden behind one."""
    from lvlm_studio.jobs import RoundBusyError
    from lvlm_studio.ui.common import user_errors

    def raising(exc: BaseException):
        def fn():
            raise exc
        return user_errors(fn)

    with pytest.raises(gr.Error, match="Not allowed: training needs the admin role"):
        raising(PermissionError("training needs the admin role"))()
    with pytest.raises(gr.Error, match="pair 9 does not exist"):
        raising(LookupError("pair 9 does not exist"))()
    with pytest.raises(gr.Error, match="round 3 is already running"):
        raising(RoundBusyError("round 3 is already running"))()
    with pytest.raises(RuntimeError, match="a bug"):
        raising(RuntimeError("a bug"))()


def test_who_a_request_acts_as(open_studio, accounts_studio, home):
    """HF OAuth names a user by their Hub handle (what an admin list holds), not their display
    name; a password account wins; the header names the signed-in user and their role, escaped;
    the password prompt is on only with accounts (an admin list alone signs in with Hugging Face)."""
    from lvlm_studio.ui.app import launch_kwargs
    from lvlm_studio.ui.auth import acting_user, launch_auth, request_user

    hub = {"preferred_username": "alice", "name": "Alice Liddell"}
    assert request_user(signed_in(None, hub)) == "alice"
    assert request_user(signed_in("bob", hub)) == "bob"
    # A Hub sign-in past its expiry is signed out (as Gradio's LoginButton shows it); a profile
    # without its handle names nobody (a display name is anyone's to choose).
    assert request_user(signed_in(None, hub, expires_at=time.time() + 3600)) == "alice"
    assert request_user(signed_in(None, hub, expires_at=time.time() - 1)) is None
    assert request_user(signed_in(None, {"name": "alice"})) is None
    assert request_user(None) is None
    # Open mode: an empty typed name is nobody in particular, not an error.
    assert acting_user(open_studio, None, "") == ""
    assert acting_user(open_studio, None, " ann ") == "ann"

    header = handler(build_app(accounts_studio), "on_header")
    assert "signed in as alice (admin)" in header(signed_in("alice"))
    shown = header(signed_in(HOSTILE))
    assert HOSTILE not in shown and "signed in as &lt;img src=x onerror=alert(1)&gt; (reviewer)" in shown
    assert launch_auth(accounts_studio) == accounts_studio.check_password
    assert launch_kwargs(accounts_studio)["auth"] == accounts_studio.check_password

    space = Studio(Settings(home=home), users={}, admins={"alice"})
    try:
        assert launch_auth(space) is None and "auth" not in launch_kwargs(space)
        assert "signed in as alice (admin)" in handler(build_app(space), "on_header")(signed_in(None, hub))
    finally:
        space.store.close()


def test_round_lists_and_typed_rounds(open_studio):
    """Generate's round box offers finished rounds only (an adapter to generate with); Review's
    filter has "all rounds"; a typed round is a number or a message naming the field's problem."""
    from lvlm_studio.ui.common import parse_round, round_choices

    studio = open_studio
    done = studio.store.create_round(0, "m", {}, status="done")
    failed = studio.store.create_round(0, "m", {}, status="failed")
    assert round_choices(studio, done_only=True) == [("round 0 (base model)", "0"), (f"round {done} (done)", str(done))]
    assert round_choices(studio, with_all=True)[0] == ("all rounds", "all")
    assert (f"round {failed} (failed)", str(failed)) in round_choices(studio)
    assert parse_round("all") is None and parse_round("") is None and parse_round(" 2 ") == 2
    with pytest.raises(ValueError, match="no round 'two'"):
        parse_round("two")


def test_json_api_exposes_every_documented_endpoint(open_studio):
    """The endpoints the app's docstring promises scripts are there, each the function of its name;
    generation runs one at a time."""
    demo = build_app(open_studio)
    by_name = {f.api_name: f for f in demo.fns.values()}
    for name in ("next_pair", "get_pair", "decide", "undo", "progress", "generate", "start_round",
                 "cancel_round", "rounds", "round_status", "compare", "agreement", "stats"):
        assert by_name[name].fn.__name__ == name
    assert by_name["generate"].concurrency_limit == 1
    assert by_name["agreement"].fn()["reviewers"] == []


# ---- the JSON API -------------------------------------------------------------------------------


def test_json_review_api_passes_filters_and_identity(accounts_studio):
    """/next_pair applies the method, round and queue filters; /get_pair and /progress answer for
    the caller; /decide records under the signed-in user whatever name is sent."""
    studio = accounts_studio
    demo = build_app(studio)
    next_pair, get_pair, decide, progress = (handler(demo, n) for n in ("next_pair", "get_pair", "decide", "progress"))
    r1 = studio.store.create_round(0, "m", {}, status="done")
    csr, povid = add_pairs(studio, [0.1])[0], add_pairs(studio, [0.2], method="povid")[0]
    later = add_pairs(studio, [0.3], round=r1)[0]
    bob = signed_in("bob")
    assert next_pair("", "", "", "pending", request=bob)["pair_id"] == csr  # lowest margin first
    assert next_pair("", "povid", "", "pending", request=bob)["pair_id"] == povid
    assert next_pair("", "", str(r1), "pending", request=bob)["pair_id"] == later
    decide(csr, "alice", "accept", "", "looks right", request=bob)
    assert studio.store.reviewer_decision(csr, "bob")["note"] == "looks right"
    assert studio.store.reviewer_decision(csr, "alice") is None
    assert next_pair("", "", "", "decided", request=bob)["pair_id"] == csr
    assert get_pair(csr, "", request=bob)["my_decision"] == "accept"
    assert get_pair(csr, "", request=signed_in("alice"))["my_decision"] is None
    assert progress("", request=bob)["reviewer_done"] == 1
    with pytest.raises(gr.Error, match="sign in first"):
        decide(povid, "bob", "accept", "", "", request=None)


def test_json_compare_and_generate_pass_their_arguments(open_studio, monkeypatch):
    """/compare's only_diff keeps the rows where the rounds differ; /generate hands every field
    (items, seed, ...) to the service."""
    studio = open_studio
    def item(k: int) -> int:
        with studio._ingested(image_bytes(k, "PNG"), f"{k}.png", "test") as image_id:
            return studio.store.add_item(image_id, "Describe.")

    item_a, item_b = item(1), item(2)
    r1 = studio.store.create_round(0, "m", {}, status="done")
    for rid, first in ((0, "A red circle."), (r1, "A blue star.")):
        studio.store.add_eval_outputs(rid, [{"item_id": item_a, "answer": first, "objects": [], "hallucinated": []},
                                            {"item_id": item_b, "answer": "Same.", "objects": [], "hallucinated": []}])
    demo = build_app(studio)
    compare = handler(demo, "compare")
    assert len(compare(0, r1, False)["rows"]) == 2
    assert [r["a"]["answer"] for r in compare(0, r1, True)["rows"]] == ["A red circle."]

    calls = []
    monkeypatch.setattr(studio, "generate", lambda method, **kw: calls.append((method, kw)) or {})
    handler(demo, "generate")("stic", "demo", 0, [item_b], "", "", 0, {"max_new_tokens": 4}, 7)
    method, kw = calls[-1]
    assert method == "stic" and kw["item_ids"] == [item_b] and kw["seed"] == 7 and not kw["round"]
    assert kw["params"] == {"max_new_tokens": 4}


# ---- the Review tab -----------------------------------------------------------------------------


def _review(demo):
    load = handler(demo, "review_load")
    act = {d: handler(demo, f"review_{d}") for d in ("accept", "swap", "reject_both", "skip", "undo", "edit")}
    return load, act


def test_review_buttons_record_their_decision_for_the_signed_in_user(accounts_studio):
    """Each button saves its own decision with the note, under the signed-in user (the name box is
    hidden with accounts on; whatever it holds is ignored), and the next pair comes up."""
    studio = accounts_studio
    p0, p1, p2 = add_pairs(studio, [0.1, 0.2, 0.3])
    load, act = _review(build_app(studio))
    bob = signed_in("bob")
    out = load("", "all", "all", "pending", bob)
    assert out[0] == p0
    out = act["swap"](out[0], out[1], "alice", "all", "all", "pending", "", "wrong way round", bob)
    rec = studio.store.reviewer_decision(p0, "bob")
    assert (rec["decision"], rec["note"]) == ("swap", "wrong way round")
    assert studio.store.reviewer_decision(p0, "alice") is None
    assert out[0] == p1 and f"pair #{p0}" in out[10]
    out = act["reject_both"](out[0], out[1], "", "all", "all", "pending", "", "", bob)
    assert studio.store.reviewer_decision(p1, "bob")["decision"] == "reject_both" and out[0] == p2
    out = act["accept"](out[0], out[1], "", "all", "all", "pending", "", "", bob)
    assert studio.store.reviewer_decision(p2, "bob")["decision"] == "accept" and out[0] is None
    # The note is read back where the pair is shown again (the decided queue), escaped.
    studio.decide(p0, "carol", "accept", note=HOSTILE)
    info = load("", "all", "all", "decided", bob)[3]
    assert "bob (swap): wrong way round" in info and "carol (accept): &lt;img" in info and "<img" not in info
    from lvlm_studio.ui.review import _info_html

    assert "review-notes" not in _info_html(studio.get_pair(p1, "bob"))  # decided without a note
    # An undone decision's note is still shown (it is history), marked undone; a new decision's is not.
    studio.undo("bob", p0)
    studio.decide(p0, "bob", "accept", note="right after all")
    info = _info_html(studio.get_pair(p0, "bob"))
    assert "bob (swap, undone): wrong way round" in info and "bob (accept): right after all" in info
    assert "carol (accept): &lt;img" in info


def test_review_queue_moves_on_after_skip_and_decide_and_undo_brings_pairs_back(open_studio):
    """Skip and decide keep the pair out of this session's queue (in the "all" queue a decided pair
    is still eligible); undo puts it back, so a pair undone is offered again."""
    studio = open_studio
    p0, p1, p2 = add_pairs(studio, [0.1, 0.2, 0.3])
    load, act = _review(build_app(studio))
    args = ("ann", "all", "all", "all", "", "")
    out = load(*args[:4], None)
    assert out[0] == p0
    out = act["skip"](out[0], out[1], *args, None)
    assert out[0] == p1 and studio.store.reviewer_decision(p0, "ann") is None
    out = load(*args[:4], None)  # a reload brings skipped pairs back
    out = act["accept"](out[0], out[1], *args, None)
    assert out[0] == p1  # not p0 again, though the "all" queue holds it
    out = act["accept"](out[0], out[1], *args, None)
    assert out[0] == p2 and out[1] == [p0, p1]
    out = act["undo"](out[0], out[1], *args, None)
    assert out[0] == p1 and f"Undid your decision on pair #{p1}" in out[10]
    out = act["undo"](out[0], out[1], *args, None)
    assert out[0] == p0 and out[1] == []
    out = act["accept"](out[0], out[1], *args, None)
    assert out[0] == p1  # undone, so offered again (not jumped over to p2)


def test_review_panels_show_each_answer_under_its_title(open_studio):
    """The chosen panel holds the chosen answer and the rejected panel the rejected one; after a swap
    the titles say which now trains as which, and no "edited answer" block appears for a non-edit."""
    from lvlm_studio.ui.review import panel_labels

    studio = open_studio
    pid = add_pairs(studio, [0.1])[0]
    load, act = _review(build_app(studio))
    out = load("ann", "all", "all", "pending", None)
    view = studio.get_pair(pid)
    assert "".join(t["token"] for t in out[4].value) == view["chosen"]["text"]
    assert "".join(t["token"] for t in out[5].value) == view["rejected"]["text"]
    assert "Edited chosen answer" not in out[3]  # every label has a chosen text; only an edit's is shown
    out = act["swap"](out[0], out[1], "ann", "all", "all", "all", "", "", None)
    out = load("ann", "all", "all", "decided", None)
    assert out[0] == pid and "swap by ann" in out[3] and "Edited chosen answer" not in out[3]
    chosen_title, rejected_title = panel_labels({"status": "swap", "reviewer": "ann"})
    assert chosen_title.endswith("trains as REJECTED") and rejected_title.endswith("trains as CHOSEN")


def test_review_filters_offer_every_method_the_store_holds(open_studio):
    """An imported dataset's pairs carry their own method: the Method filter offers it (refreshed
    on page load), and picking it reaches those pairs without skipping through the others."""
    studio = open_studio
    add_pairs(studio, [0.1, 0.2])
    imported = add_pairs(studio, [0.9], method="imported")[0]
    demo = build_app(studio)
    _, method_box = handler(demo, "refresh_filters")()
    assert method_box.choices[:4] == [("all methods", "all"), ("CSR", "csr"), ("POVID", "povid"), ("STIC", "stic")]
    assert ("imported", "imported") in method_box.choices
    load, _ = _review(demo)
    assert load("ann", "imported", "all", "pending", None)[0] == imported


def test_a_refused_review_action_leaves_the_panel_on_screen(open_studio):
    """Gradio swaps every output of a failed event for an "Error" badge unless the event hides its
    progress: an empty edit used to blank the image and both answers. The actions hide it, and
    the refusal itself is still an error with its message (a toast; the JSON API's error)."""
    studio = open_studio
    pid = add_pairs(studio, [0.1])[0]
    demo = build_app(studio)
    actions = [f for f in demo.fns.values() if (f.api_name or "").startswith("review_") and f.api_name not in (
        "review_load", "review_open_edit")]
    assert {f.api_name for f in actions} >= {"review_accept", "review_swap", "review_reject_both", "review_skip",
                                             "review_undo", "review_edit"}
    assert {f.show_progress for f in actions} == {"hidden"}
    load, act = _review(demo)
    out = load("ann", "all", "all", "pending", None)
    with pytest.raises(gr.Error, match="an edit needs the edited text") as refused:
        act["edit"](out[0], out[1], "ann", "all", "all", "pending", "   ", "", None)
    assert refused.value.print_exception is False  # a user's mistake prints no traceback in the server log
    assert studio.store.reviewer_decision(pid, "ann") is None


def test_an_edit_opened_for_one_pair_is_not_saved_on_the_next(open_studio):
    """Pressing e then a fast a sends both with the same pair; when Edit's answer comes back last the
    box holds the first pair's text while the next pair is shown. Saving it is refused, not stored on
    the pair shown; an edit opened for the pair shown saves."""
    studio = open_studio
    p0, p1 = add_pairs(studio, [0.1, 0.2])
    demo = build_app(studio)
    load, act = _review(demo)
    open_edit = handler(demo, "review_open_edit")
    out = load("ann", "all", "all", "pending", None)
    box, _, opened_for = open_edit(out[0])
    assert opened_for == p0 and box.value == studio.get_pair(p0)["chosen"]["text"]
    out = act["accept"](out[0], out[1], "ann", "all", "all", "pending", "", "", None)
    assert out[0] == p1 and out[11] is None  # the next pair clears the box's owner
    with pytest.raises(gr.Error, match=f"holds pair #{p0}'s text, but pair #{p1} is shown"):
        act["edit"](out[0], out[1], "ann", "all", "all", "pending", box.value + " Edited.", "", None, opened_for)
    assert studio.store.reviewer_decision(p1, "ann") is None
    _, _, opened_for = open_edit(out[0])
    act["edit"](out[0], out[1], "ann", "all", "all", "pending", "There is a green square.", "", None, opened_for)
    assert studio.store.effective_label(p1)["chosen_text"] == "There is a green square."


def test_a_bad_round_filter_is_refused_before_the_decision_is_stored(open_studio):
    """A typed Round filter that names no round used to fail after the decision was saved: the toast
    said the action failed, and pressing again stored a second decision."""
    studio = open_studio
    pid = add_pairs(studio, [0.1])[0]
    load, act = _review(build_app(studio))
    out = load("ann", "all", "all", "pending", None)
    with pytest.raises(gr.Error, match="abc"):
        act["accept"](out[0], out[1], "ann", "all", "abc", "pending", "", "", None)
    assert studio.store.reviewer_decision(pid, "ann") is None


def test_review_info_and_progress_escape_what_users_typed():
    """Prompts, imported metadata and reviewer names (typed freely in open mode) are text in the
    Review tab's HTML, never markup."""
    from lvlm_studio.ui.review import _info_html, _progress_html

    view = {"pair_id": 4, "method": "csr", "round": 0, "margin": 0.5, "prompt": f"prompt {HOSTILE}",
            "label": {"status": "swap", "reviewer": f"eve {HOSTILE}"}, "my_decision": "swap",
            "meta": {"pair_prompt": f"written for {HOSTILE}", "kind": f"kind {HOSTILE}"}}
    html = _info_html(view)
    assert "<img" not in html and html.count("&lt;img src=x onerror=alert(1)&gt;") == 4
    assert "swap by eve &lt;img" in html
    progress = _progress_html({"total": 4, "done": 3, "per_reviewer": {HOSTILE: {"done": 2}, "ann": {"done": 1}}},
                              HOSTILE)
    assert "<img" not in progress and "&lt;img src=x onerror=alert(1)&gt;: 2" in progress
    assert "3 / 4 pairs reviewed (75%) · you: 2" in progress


# ---- the Data tab -------------------------------------------------------------------------------


def test_data_tab_escapes_reviewer_names_and_report_values():
    """Reviewer names in the agreement panel and file names / import errors in the reports are shown
    as text; the upload report counts added and refused images the right way round."""
    from lvlm_studio.ui.common import report_markdown
    from lvlm_studio.ui.data import agreement_html

    html = agreement_html({"reviewers": [HOSTILE, "ann"], "fleiss_kappa": None, "items_multi_rated": 0,
                           "override_rate": 0.5, "override_pairs": 4,
                           "override_by_method": {"csr": {"n": 3, "override_rate": 2 / 3}, HOSTILE: {"n": 1, "override_rate": 0.0}},
                           "cohen": [{"a": HOSTILE, "b": f"b{HOSTILE}", "kappa": 0.5, "n": 3}]})
    assert "<img" not in html and html.count("&lt;img") == 4  # an imported file names its own methods
    assert "0.500 over 4 reviewed pairs; csr 0.667 (3); &lt;img" in html
    from markdown_it import MarkdownIt

    render = MarkdownIt().render
    imp = render(report_markdown({"imported": 1, "status": "partial", "format": "jsonl", "pairs": 0, "skipped": 1,
                                  "ignored": 0, "errors": [f"line 2: {HOSTILE}"]}))
    assert "<img" not in imp and "<li>line 2: &lt;img" in imp
    # ten errors are listed; the eleventh is counted, not dropped without a word
    eleven = render(report_markdown({"imported": 0, "errors": [f"line {k}: bad" for k in range(11)]}))
    assert eleven.count("<li>line") == 10 and "and 1 more" in eleven
    up = render(report_markdown({"items": [1], "rejected": [{"file": f"{HOSTILE}.png", "reason": "not an image"},
                                                            {"file": "b.png", "reason": "too large"}]}))
    assert "<img" not in up and "<strong>1 image added</strong>, 2 refused" in up and "<li>b.png: too large" in up
    assert "**2 images added**, 0 refused" in report_markdown({"items": [1, 2], "rejected": []})


def test_data_tab_clears_its_summary_when_a_run_starts(open_studio):
    """A refused upload, import or export raises (a toast) and never reaches the summary step, so
    each button also clears the summary at once: it used to keep the previous import's result."""
    demo = build_app(open_studio)
    summary = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "data-summary")
    buttons = {b.elem_id: b._id for b in demo.blocks.values()
               if getattr(b, "elem_id", None) in ("data-upload-run", "data-import-run", "data-export-run")}
    assert len(buttons) == 3
    clears = [f for f in demo.fns.values() if [o._id for o in f.outputs] == [summary._id] and not f.inputs
              and f.fn is not None and f.fn() == ""]
    cleared = {target[0] for f in clears for target in f.targets}
    assert set(buttons.values()) <= cleared


def test_data_tab_passes_its_fields_to_the_service(open_studio, tmp_path):
    """Upload and import file items under the dataset typed; export writes only the methods ticked;
    the statistics' refresh keeps the user's ticks and ticks a method that appeared since."""
    studio = open_studio
    demo = build_app(studio)
    photo = write_image(tmp_path / "photo.png", seed=3)
    handler(demo, "upload_images")([str(photo)], "What is here?", "mine")
    [item] = studio.store.list_items(dataset="mine")
    assert item["prompt"] == "What is here?"
    write_image(tmp_path / "folder" / "a.png", seed=4)
    report = handler(demo, "import_path")(str(tmp_path / "folder"), "folder", "imported-set", None)
    assert report["imported"] == 1 and len(studio.store.list_items(dataset="imported-set")) == 1

    add_pairs(studio, [0.1, 0.2])
    add_pairs(studio, [0.3], method="povid")
    shown, _zip = handler(demo, "export")("trl", ["povid"], True)
    assert shown["pairs"] == 1
    add_pairs(studio, [0.4], method="my-file")
    stats = handler(demo, "data_stats")(["csr"], ["csr", "povid", "stic"])
    assert stats[3].value == ["csr", "my-file"] and stats[4] == ["csr", "povid", "stic", "my-file"]


# ---- the Compare tab ---------------------------------------------------------------------------


def test_compare_tab_load_offers_rounds_made_since_and_picks_the_newest_finished(open_studio):
    """On page load Compare offers every round, including those made after the app started; round B
    is the newest finished one (a failed round has no answers), as are the Evaluate box's rounds."""
    studio = open_studio
    r1 = studio.store.create_round(0, "m", {}, status="done")
    demo = build_app(studio)
    on_load = next(f.fn for f in demo.fns.values()
                   if [getattr(c, "elem_id", None) for c in f.outputs][:2] == ["compare-a", "compare-b"])
    r2 = studio.store.create_round(r1, "m", {}, status="done")
    r3 = studio.store.create_round(r2, "m", {}, status="failed")
    a, b, _plot, _note, plot_set, evaluate_round, eval_set = on_load()
    assert b.value == str(r2) and [v for _, v in a.choices] == ["0", str(r1), str(r2), str(r3)]
    assert [v for _, v in evaluate_round.choices] == ["0", str(r1), str(r2)]  # finished rounds only
    assert [v for _, v in eval_set.choices] == ["shapesworld/test"]  # no imported set with ground truth yet
    assert plot_set.choices == [] and plot_set.visible is False  # nothing evaluated: no set to pick
    # Rounds evaluated on two sets: the plot's box offers both (the set most rounds have first, and
    # drawn), the comparison's box the default and both.
    from lvlm_studio.evaluation import with_evaluation

    for rid, sets in ((0, ("coco/val", "shapesworld/test")), (r1, ("shapesworld/test",)), (r2, ("coco/val",))):
        metrics = None
        for label in sets:
            metrics = with_evaluation(metrics, {"chair_s": 0.1 * rid, "set": label})
        studio.store.update_round(rid, metrics=metrics)
    _a, _b, plot, note, plot_set, _r, _s = on_load()
    assert [v for _, v in plot_set.choices] == ["coco/val", "shapesworld/test"] and plot_set.visible is True
    assert plot_set.value == "coco/val" and note.startswith("On coco/val")  # tie: the newest round's set
    assert {row[0] for row in plot.value["data"]} == {"round 0", f"round {r2}"}
    # The comparison's set box follows the rounds picked: only the sets both share are offered, and
    # a set picked that the new pair lacks falls back to the default.
    pair_sets = next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "pair_sets")
    box = pair_sets("0", str(r1), "latest both share")
    assert [v for _, v in box.choices] == ["latest both share", "shapesworld/test"]
    assert pair_sets("0", str(r2), "shapesworld/test").value == "latest both share"
    assert [v for _, v in pair_sets("0", str(r2), None).choices] == ["latest both share", "coco/val"]
    assert [v for _, v in pair_sets(str(r1), str(r2), None).choices] == ["latest both share"]  # none shared
    assert pair_sets("0", "nonsense", None) == gr.skip()  # a round typed wrong: no update, no error


# ---- the Generate and Train tabs ----------------------------------------------------------------


def test_generate_shows_its_progress_on_the_summary_and_clears_it_at_the_click(open_studio):
    """The run fills the JSON report in a closed accordion: its progress bar belongs on the
    summary, which each click also clears (a refused run must not show the last result)."""
    demo = build_app(open_studio)
    run = next(f for f in demo.fns.values() if f.api_name == "generate_run")
    summary = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "gen-summary")
    assert [c._id for c in run.show_progress_on] == [summary._id]
    clears = [f for f in demo.fns.values() if [o._id for o in f.outputs] == [summary._id] and not f.inputs
              and f.fn is not None and f.fn() == "" and f.targets == run.targets]
    assert len(clears) == 1


def test_generate_tab_passes_its_fields(open_studio, monkeypatch):
    """The Generate button: the split "all" means every split, and the round, seed and item count
    typed go to the service."""
    studio = open_studio
    calls = []
    monkeypatch.setattr(studio, "generate", lambda method, **kw: calls.append((method, kw)) or {})
    run = handler(build_app(studio), "generate_run")
    run("csr", "demo", "2", "shapesworld", "all", 3, 7, '{"num_candidates": 4}', progress=lambda *a, **k: None)
    method, kw = calls[-1]
    assert method == "csr" and kw["split"] is None and kw["seed"] == 7 and kw["n"] == 3 and kw["round"] == 2
    assert kw["dataset"] == "shapesworld" and kw["params"] == {"num_candidates": 4}
    run("csr", "demo", "0", "shapesworld", "test", 3, 0, "{}", progress=lambda *a, **k: None)
    assert calls[-1][1]["split"] == "test"


def test_with_accounts_generate_upload_export_and_evaluate_need_a_signed_in_user(accounts_studio, tmp_path):
    """They were open to anyone who had the page, and the Model box let a reviewer probe which server
    paths exist ("exists but is not a saved transformers model" / "No model directory") or make the
    server download any Hub model: another model than the studio's own is an admin's choice."""
    from conftest import write_image

    studio = accounts_studio
    studio.seed_demo(n_train=2, n_test=1, pairs_per_method=0)
    demo = build_app(studio)
    bob, alice = signed_in("bob"), signed_in("alice")
    gen = handler(demo, "generate_run")
    text_only = '{"make_image_rejected": false}'
    write_image(tmp_path / "a.png", seed=81)
    anonymous = [lambda: gen("povid", "demo", "0", "shapesworld", "train", 1, 0, text_only, request=None),
                 lambda: handler(demo, "generate")("povid", "demo", params={"make_image_rejected": False}),
                 lambda: handler(demo, "upload_images")([str(tmp_path / "a.png")], "Describe.", "mine"),
                 lambda: handler(demo, "export")("trl", ["povid"], True),
                 lambda: handler(demo, "evaluate_round")("0", 1)]
    for call in anonymous:
        with pytest.raises(gr.Error, match="sign in first"):
            call()
    assert studio.store.count_pairs() == 0 and studio.store.count_items(dataset="mine") == 0
    for model in ("/etc", "/no/such/dir", "org/any-model"):
        with pytest.raises(gr.Error, match="needs the admin role; 'bob' has the reviewer role"):
            gen("povid", model, "0", "shapesworld", "train", 1, 0, text_only, request=bob)
        with pytest.raises(gr.Error, match="needs the admin role"):
            handler(demo, "generate")("povid", model, params={"make_image_rejected": False}, request=bob)
    assert gen("povid", "demo", "0", "shapesworld", "train", 1, 0, text_only, request=bob)["pairs"] == 1
    with pytest.raises(gr.Error, match="'/etc' exists but is not a saved transformers model"):  # an admin may
        gen("stic", "/etc", "0", "shapesworld", "train", 1, 0, "{}", request=alice)
    assert handler(demo, "upload_images")([str(tmp_path / "a.png")], "Describe.", "mine", request=bob)["items"]
    # the Data tab's upload and import draw a bar (they showed nothing, however long they ran)
    shown = []

    def progress(value, desc=None):
        shown.append((value, desc))

    write_image(tmp_path / "b.png", seed=82)
    handler(demo, "upload_images")([str(tmp_path / "b.png")], "Describe.", "mine", request=bob, progress=progress)
    write_image(tmp_path / "imp" / "c.png", seed=83)
    write_image(tmp_path / "imp" / "d.png", seed=84)
    handler(demo, "import_path")(str(tmp_path / "imp"), "folder", "", alice, progress=progress)
    assert shown == [((1, 1), "1/1 images"), ((1, None), "1 records read"), ((2, None), "2 records read")]


def test_train_tab_start_and_cancel_pass_the_fields_and_the_signed_in_user(accounts_studio, monkeypatch):
    """Start with the default parent ("the current round") and a fractional epoch count; start and
    cancel act as the signed-in admin; a client that sends no LoRA α gets the config's default."""
    studio = accounts_studio
    started, cancelled = [], []
    monkeypatch.setattr(studio, "start_round", lambda config, user: started.append((config, user)) or 0)
    monkeypatch.setattr(studio, "cancel_round", lambda rid, user: cancelled.append((rid, user)))
    demo = build_app(studio)
    alice = signed_in("alice")
    # Cancelling a round that is not running says so, and asks the service for nothing.
    with pytest.raises(gr.Error, match="round 0 is done, not queued or running: nothing to cancel"):
        handler(demo, "train_cancel")("0", alice)
    with pytest.raises(gr.Error, match="round 7 does not exist"):
        handler(demo, "train_cancel")("7", alice)
    assert cancelled == []
    monkeypatch.setattr(studio, "get_round", lambda rid: {"id": rid, "status": "running"})
    handler(demo, "train_start")(["povid"], "current", True, 1e-4, 0.5, 0.2, 8, 0.5, 2, True, "dpo", 3, None,
                                 request=alice)
    config, user = started[-1]
    assert user == "alice" and config["parent_id"] is None and config["num_epochs"] == 0.5
    assert config["include_auto"] is True and config["povid_stage1_epochs"] == 3 and "lora_alpha" not in config
    handler(demo, "train_cancel")("0", alice)
    # The JSON API acts as the signed-in user too (a typed name counts only in open mode).
    handler(demo, "start_round")({"methods": ["povid"]}, "bob", request=alice)
    handler(demo, "cancel_round")(0, "bob", request=alice)
    assert started[-1] == ({"methods": ["povid"]}, "alice") and cancelled == [(0, "alice"), (0, "alice")]


def test_opening_a_tab_again_offers_the_rounds_and_methods_made_since(open_studio):
    """The Generate, Review and Compare dropdowns were filled on page load only: a round that
    finished while the page was open (or an import's new method) was not offered until a reload."""
    studio = open_studio
    demo = build_app(studio)
    selects = [f for f in demo.fns.values() if any(t[1] == "select" for t in f.targets)]
    on_show = {f.fn.__name__: f.fn for f in selects}
    assert sorted(on_show) == ["compare_rounds", "generate_rounds", "refresh_filters"]
    r1 = studio.store.create_round(0, "m", {}, status="done")
    add_pairs(studio, [0.5], method="imported-dpo")

    def values(dropdown) -> list[str]:
        return [value for _, value in dropdown.choices]

    assert str(r1) in values(on_show["generate_rounds"]())
    rounds, methods = on_show["refresh_filters"]()
    assert str(r1) in values(rounds) and "imported-dpo" in values(methods)
    from conftest import write_coco

    studio.import_path(write_coco(studio.settings.home.parent / "coco-since", [["dog", "cat", "cup"]]))
    a, b, _plot, _note, _plot_set, evaluated, sets = on_show["compare_rounds"]()
    assert all(str(r1) in values(d) for d in (a, b, evaluated))
    assert all("value" not in d._constructor_args[0] for d in (a, b))  # choices only: A and B stay as picked
    assert values(sets) == ["shapesworld/test", "coco/val"]  # a set imported since is offered to Evaluate
    # Then the comparison's set box follows A and B as they are (no change event fires when they
    # stay as picked): after the tab is opened again and after a page load.
    ids = {i: f for i, f in demo.fns.items()}
    follows = {ids[f.trigger_after].fn.__name__ for f in demo.fns.values()
               if getattr(f.fn, "__name__", "") == "pair_sets" and f.trigger_after is not None}
    assert follows == {"compare_rounds", "refresh"}


def test_train_tab_polls_the_newest_round_and_keeps_the_users_ticks(open_studio):
    """With no round picked the status shows the newest trained round; a round's curve reaches the
    plots and /round_status; the methods poll reads the box's ticks and the known methods in that order."""
    studio = open_studio
    r1 = studio.store.create_round(0, "m", {}, status="done")
    r2 = studio.store.create_round(r1, "m", {}, status="failed")
    studio.store.log_round_step(r1, 1, {"loss": 0.69})
    demo = build_app(studio)
    refreshed = handler(demo, "train_refresh")(None)
    assert f"<b>Round {r2}</b>" in refreshed[2] and refreshed[3].empty  # the newest round, no curve yet
    loss = handler(demo, "train_refresh")(str(r1))[3]
    assert loss["value"].tolist() == [0.69]
    # a page loaded later shows the newest round, not the one that was newest when the app started
    r3 = studio.store.create_round(r1, "m", {}, status="running")
    on_load = handler(demo, "refresh_newest")()
    assert f"<b>Round {r3}</b>" in on_load[2] and on_load[6].value == str(r3)
    # one poll reads the rounds once: each read checks the active rounds' processes under the write lock
    reads = []
    real_rounds = studio.rounds
    studio.rounds = lambda: reads.append(1) or real_rounds()
    try:
        polled = handler(demo, "train_refresh")(str(r3))
    finally:
        studio.rounds = real_rounds
    assert len(reads) == 1 and f"<b>Round {r3}</b>" in polled[2]
    # The timer's poll refreshes the Round box's choices and never its value: a tick answering after
    # the user picked another round would put the old one back.
    ticked = handler(demo, "poll_rounds")(str(r1))
    assert f"<b>Round {r1}</b>" in ticked[2] and str(r3) in [c[1] for c in ticked[6].choices]
    assert "value" not in ticked[6].constructor_args and polled[6].constructor_args["value"] == str(r3)
    # an empty box (no round when the page loaded; one started elsewhere since) is filled, so Cancel has a round
    assert handler(demo, "poll_rounds")(None)[6].constructor_args["value"] == str(r3)
    tick = next(f for f in demo.fns.values() if f.fn and f.fn.__name__ == "poll_rounds")
    assert any(t[1] == "tick" for t in tick.targets) and not any(
        f.fn and f.fn.__name__ == "refresh" and any(t[1] == "tick" for t in f.targets) for f in demo.fns.values())
    status = handler(demo, "round_status")(r1)
    assert status["round"]["id"] == r1 and [p["loss"] for p in status["curve"]] == [0.69]
    with pytest.raises(gr.Error, match="round 999 does not exist"):  # not a null round
        handler(demo, "round_status")(999)
    poll = next(f for f in demo.fns.values() if f.fn and f.fn.__name__ == "update_methods")
    assert poll.inputs[0].elem_id == "train-methods" and poll.inputs[1] is poll.outputs[1]


def test_train_status_and_rounds_table_read_as_people_need(open_studio):
    """One logged step draws no line in Gradio's LinePlot, so the status says so; the rounds table
    rounds its figures and says how many captions each round was evaluated on."""
    from lvlm_studio.ui.train import rounds_frame, status_html

    one = [{"step": 1, "loss": 0.6931471, "learning_rate": 2e-4}]
    done = {"id": 1, "status": "done", "metrics": {"eval": {"chair_s": 2 / 7, "recall": 0.9, "n_captions": 7,
                                                            "set": "coco/val"}}}
    html = status_html(done, one)
    assert "One logged training step (loss 0.6931)" in html and "CHAIR_s 0.286" in html
    assert "(on 7 captions of coco/val)" in html  # which set the figures are on
    assert "One logged" not in status_html(done, one + [{"step": 2, "loss": 0.5}])
    assert "One logged" not in status_html(done, [{"step": 1, "learning_rate": 0.0}])  # no loss logged yet
    studio = open_studio
    rid = studio.store.create_round(0, "demo", {"methods": ["csr"]}, status="done")
    studio.store.update_round(rid, progress=1 / 3, metrics={"eval": {"chair_s": 2 / 7, "recall": 0.4266666666,
                                                                      "n_captions": 7}})
    row = rounds_frame(studio).set_index("round").loc[rid]
    assert (row["CHAIR_s"], row["recall"], row["progress"], row["captions"]) == (0.2857, 0.4267, "33%", 7)
    assert row["evaluated on"] == "set not recorded"  # metrics stored before sets were recorded
    assert row["methods"] == "csr" and row["reason"] is None
    failed = studio.store.create_round(0, "demo", {}, status="failed")
    studio.store.update_round(failed, error="JobError: training diverged (final loss nan)")
    assert rounds_frame(studio).set_index("round").loc[failed, "reason"] == "JobError: training diverged (final loss nan)"


def test_running_out_of_memory_is_a_message_not_a_generic_failure(open_studio, monkeypatch):
    """torch's CPU allocator raises a plain RuntimeError; the page (and the JSON API) get one
    sentence instead of "the upstream app has raised an exception"."""
    studio = open_studio

    def exhausted(method, **kw):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 3788800000000 bytes.")

    monkeypatch.setattr(studio, "generate", exhausted)
    run = handler(build_app(studio), "generate_run")
    with pytest.raises(gr.Error, match="out of memory: DefaultCPUAllocator") as err:
        run("csr", "demo", "0", "shapesworld", "train", 1, 0, '{"num_candidates": 100000000}',
            progress=lambda *a, **k: None)
    assert "fewer candidates" in err.value.message
    monkeypatch.setattr(studio, "generate", lambda method, **kw: (_ for _ in ()).throw(RuntimeError("a real bug")))
    with pytest.raises(RuntimeError, match="a real bug"):  # any other error stays an error (a bug to see)
        run("csr", "demo", "0", "shapesworld", "train", 1, 0, "{}", progress=lambda *a, **k: None)


def test_huge_and_mistyped_values_from_json_clients_get_clear_refusals(open_studio):
    """A 20-digit id overflowed SQLite (a generic "upstream error", and the Train tab's 2-second
    poll failing forever); a number where a name belongs raised AttributeError; item_ids "12"
    meant items 1 and 2."""
    studio = open_studio
    [pid] = add_pairs(studio, [0.5])
    demo = build_app(studio)
    huge = "9223372036854775808"
    refreshed = handler(demo, "train_refresh")(huge)  # never raises: says so in the status
    assert f"No round {huge}" in refreshed[2]
    for name, args, message in (
        ("get_pair", (huge,), "pair id must be at most"),
        ("get_pair", ("abc",), "pair id must be a whole number, not 'abc'"),
        ("decide", (pid, 123, "accept"), "a user name is text, not int"),
        ("decide", (pid, "ann", "edit", 123), "the edited answer is text, not int"),
        ("next_pair", ("ann", "", "1.5"), "round must be a whole number, not '1.5'"),
        ("generate", ("povid", "demo", 0, "12"), "item ids are a list of whole numbers, not str"),
        ("generate", ("povid", "demo", 0, []), "item_ids is empty"),
        ("generate", ("povid", "demo", 0, None, "", "", 0, None, 2**70), "seed must be at most"),
        ("start_round", ("abc",), "round options are a JSON object"),
    ):
        with pytest.raises(gr.Error, match=message):
            handler(demo, name)(*args)
    assert studio.store.pair_reviews(pid) == [] and studio.store.count_pairs() == 1


def test_refusal_messages_show_what_the_user_typed_as_text_not_html(open_studio):
    """gr.Error renders its message as HTML: a refusal quoting a typed id, a path or a file's text
    showed markup (an <img onerror> ran in the toast). Escaped, it reads as typed; quotes stay."""
    from lvlm_studio.ui.common import user_errors

    def refuse():
        raise ValueError(f"no pair {HOSTILE} & 'bob' <b>here</b>")

    with pytest.raises(gr.Error) as refused:
        user_errors(refuse)()
    assert refused.value.message == "no pair &lt;img src=x onerror=alert(1)&gt; &amp; 'bob' &lt;b&gt;here&lt;/b&gt;"
    with pytest.raises(gr.Error) as refused:  # through a real handler: a typed pair id
        handler(build_app(open_studio), "get_pair")(HOSTILE)
    assert "<" not in refused.value.message and "&lt;img src=x onerror=alert(1)&gt;" in refused.value.message
    assert refused.value.message.startswith("pair id must be a whole number, not '")


def test_each_review_shortcut_key_clicks_the_button_of_its_action(open_studio):
    """The page's key handler clicks the button SHORTCUTS names for a key: each of those buttons
    runs that key's action (the browser test presses a, u and k; this covers every key)."""
    from lvlm_studio.ui.review import SHORTCUTS

    demo = build_app(open_studio)
    action = {"a": "review_accept", "s": "review_swap", "r": "review_reject_both", "e": "review_open_edit",
              "k": "review_skip", "u": "review_undo"}
    assert set(SHORTCUTS) == set(action)
    blocks = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    for key, (elem_id, label) in SHORTCUTS.items():
        button = blocks[elem_id]
        assert f"[{key}]" in button.value and label in button.value
        clicks = {f.api_name for f in demo.fns.values() if (button._id, "click") in f.targets}
        assert action[key] in clicks, (key, clicks)
    from lvlm_studio.ui.app import shortcut_script

    script = shortcut_script()
    for key, (elem_id, _) in SHORTCUTS.items():
        assert f'"{key}": "{elem_id}"' in script  # the page's key handler: key -> that button


def test_accounts_and_admins_come_from_the_environment(home, monkeypatch, tmp_path):
    """LVLM_STUDIO_USERS (inline or a JSON file's path), LVLM_STUDIO_USERS_FILE as its fallback,
    and LVLM_STUDIO_ADMINS (names, spaces and empty entries ignored) reach a Studio built plainly."""
    import json

    accounts = tmp_path / "users.json"
    accounts.write_text(json.dumps({"alice": {"password": "pw", "role": "admin"}, "bob": "secret"}))
    for var, value in (("LVLM_STUDIO_USERS", str(accounts)), ("LVLM_STUDIO_USERS_FILE", str(accounts))):
        monkeypatch.delenv("LVLM_STUDIO_USERS", raising=False)
        monkeypatch.delenv("LVLM_STUDIO_ADMINS", raising=False)
        monkeypatch.setenv(var, value)
        studio = Studio(Settings(home=home))
        try:
            assert studio.role("alice") == "admin" and studio.role("bob") == "reviewer" and not studio.open_mode
            assert studio.check_password("bob", "secret") and not studio.check_password("bob", "pw")
        finally:
            studio.store.close()
    monkeypatch.delenv("LVLM_STUDIO_USERS_FILE")
    monkeypatch.setenv("LVLM_STUDIO_ADMINS", " carol , dan ,")
    studio = Studio(Settings(home=home))
    try:
        assert studio.admins == {"carol", "dan"} and studio.role("carol") == "admin" and not studio.open_mode
        assert studio.role("erin") != "admin"
    finally:
        studio.store.close()
