"""Imports into the store and exports of preference pairs.

Imports (each returns an :class:`ImportReport`):
  * ``folder``: every image under a directory (recursively); ``name.txt`` beside ``name.jpg``
    becomes the reference answer; the prompt defaults to ``DEFAULT_PROMPT``.
  * ``coco``: COCO captions and/or instances JSON; captions become references (the first one;
    all in ``meta.captions``), instance category names become the image's ground-truth objects.
  * ``jsonl``: one object per line: ``image`` (path relative to the file), ``prompt``, optional
    ``reference``, ``objects``, and ``chosen`` + ``rejected`` (+ ``method``) for a pair.
  * ``hf``/``trl``: a local ``datasets.save_to_disk`` directory (Dataset or DatasetDict) with an
    ``image`` (PIL or path) or ``images`` column, ``prompt`` (text or conversational), optional
    ``reference``, ``objects``, ``chosen``/``rejected`` (text or conversational). A TRL export
    re-imports as items *and* pairs.
  * ``llava``: the LLaVA DPO JSON the CSR/POVID code reads (``image``, ``conversations``,
    ``rejected_conversations``); a record without ``rejected_conversations`` (LLaVA-Instruct) is
    an item whose reference is the answer to its first question; ``llamafactory``: the
    LLaMA-Factory ranking export.

Every record is validated on its own: a bad one is reported (file + reason) and skipped, good ones
land. A record's image row, item and pairs are written in one transaction, and an image file
written for a record that then fails to land is removed again. Paths inside import files are
resolved against the import root; absolute paths, URLs and ``..`` escapes (symlinks included)
are refused. A prompt, an answer, a reference or a caption is at most ``TEXT_MAX_CHARS`` characters
and never holds the image placeholder ``<image>`` (the exports add their own); a method, dataset,
split or object name is at most ``NAME_MAX_CHARS``: a record over a limit is refused alone.

Exports (only pairs with a human effective label, unless ``include_auto``; 'reject_both' never):
  * ``trl``: ``Dataset.save_to_disk`` with ``images`` (list of one image), conversational
    ``prompt`` / ``chosen`` / ``rejected``, plus provenance columns (pair_id, method, round, margin,
    status, reviewer, dataset, split, reference, objects, meta, item_meta, item_prompt) that TRL
    ignores. Importing an export back restores the items (meta included) and the pairs with their
    human decisions (an "accept" of the effective texts), and adds nothing already there.
  * ``llava``: ``llava_dpo.json`` + ``images/`` (the JSON's ``image`` paths are relative to the
    export directory: pass it as the reference code's ``--image_folder``).
  * ``llamafactory``: ``lvlm_studio_dpo.json`` (sharegpt ranking) + ``images/`` +
    ``dataset_info.json``.
Exports are written to a temporary sibling directory and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sqlite3
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lvlm_studio.config import Settings
from lvlm_studio.media import IMAGE_SUFFIXES, ImageRejected, discard, ingest_image
from lvlm_studio.store import REVIEWER_MAX_CHARS, Store, StoreError

DEFAULT_PROMPT = "Describe the image."
IMPORT_FORMATS = ("auto", "folder", "coco", "jsonl", "hf", "trl", "llava", "llamafactory")
EXPORT_FORMATS = ("trl", "llava", "llamafactory")
IMPORTED_SOURCE = "imported"  # candidates.source of answers that came from a file
DEFAULT_METHOD = "imported"  # pairs.method when the file does not say
REVIEWED_STATUSES = ("accept", "swap", "edit")  # an exported pair's status that a person decided
IMPORT_REVIEWER = "import"  # the reviewer of an imported decision whose file names none
LLAVA_FILE = "llava_dpo.json"
LLAMAFACTORY_FILE = "lvlm_studio_dpo.json"
LLAMAFACTORY_NAME = "lvlm_studio_dpo"
META_KEY = "lvlm_studio"  # provenance block inside exported JSON records
# Imported texts are bounded as the app bounds an edited answer (service.EDIT_MAX_CHARS; service
# imports this module, so the number is repeated here and a test keeps the two equal): a 20-million
# character prompt bloated the database and made the Review page tens of megabytes. A prompt, an
# answer, a reference or a caption over it refuses its record. Names (method, dataset, split, an
# object) are shorter; a reviewer name is at most REVIEWER_MAX_CHARS (64), as in the app.
TEXT_MAX_CHARS = 20_000
NAME_MAX_CHARS = 200
# A .txt caption beside an image is read no further than TEXT_MAX_CHARS characters can take in
# UTF-8 (4 bytes each at most, plus a byte order mark): a larger file is refused unread.
CAPTION_FILE_MAX_BYTES = 4 * TEXT_MAX_CHARS + 3
# An imported item's or pair's meta, as JSON: room for a COCO image's captions (each up to
# TEXT_MAX_CHARS) and what the studio's own exports carry, and no room for a 30 MB blob in a row.
META_MAX_CHARS = 200_000
# A JSONL line is read no further than this: the longest record the studio keeps (texts, two meta
# objects, all JSON-escaped) is far shorter, and a multi-GB line must not be loaded whole.
JSONL_LINE_MAX_BYTES = 16 * 1024 * 1024


class DataImportError(ValueError):
    """The import as a whole cannot run (missing path, unknown layout)."""


class DataExportError(ValueError):
    """The export cannot run (nothing to export, output exists)."""


class UnsafePathError(ValueError):
    """A path inside an import file that points outside the import root."""


# ============================================================================================
# Reports and records
# ============================================================================================
@dataclass
class ImportReport:
    source: str
    format: str
    imported: int = 0  # records landed (new or already present)
    new_items: int = 0  # items the store did not hold before (a re-import adds none)
    pairs: int = 0  # new pairs written
    skipped: int = 0  # bad records
    ignored: int = 0  # files that are not images (folder import)
    errors: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        if not self.errors:
            return "ok"
        return "partial" if self.imported else "failed"

    def fail(self, message: str) -> None:
        self.errors.append(message)
        self.skipped += 1

    def merge(self, other: ImportReport) -> None:
        self.imported += other.imported
        self.new_items += other.new_items
        self.pairs += other.pairs
        self.skipped += other.skipped
        self.ignored += other.ignored
        self.errors.extend(other.errors)

    def to_dict(self) -> dict:
        return {**asdict(self), "status": self.status}


@dataclass
class ExportReport:
    format: str
    path: str
    pairs: int
    images: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Record:
    label: str  # names the record in error messages
    image: Path | bytes
    image_name: str
    prompt: str
    reference: str | None = None
    objects: list[str] | None = None
    dataset: str = "default"
    split: str = "train"
    meta: dict | None = None
    pairs: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Every reader builds a _Record inside its per-record try: a wrong type here refuses this
        # record with a message instead of failing in SQLite half-way through the import.
        for name in ("prompt", "dataset", "split"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"'{name}' must be text, not {type(getattr(self, name)).__name__}")
        if self.reference is not None and not isinstance(self.reference, str):
            raise ValueError(f"'reference' must be text, not {type(self.reference).__name__}")
        # The prompt and the reference reach the exports (POVID takes a reference as its chosen
        # answer), and object names the answers POVID writes: each is bounded and free of the
        # image placeholder, whichever reader (and field: item_prompt, a caption) it came from.
        check_text(self.prompt, "the prompt")
        if self.reference is not None:
            check_text(self.reference, "the reference")
        for name in ("dataset", "split"):
            check_name(getattr(self, name), f"'{name}'")
        for obj in self.objects or ():
            check_name(obj, "an object name")
            refuse_image_token(obj, f"the object name {obj[:40]!r}")
        _check_meta(self.meta, "item meta")


# Keys the studio itself reads back from item / pair meta, and the types it expects of them.
_META_TYPES: dict[str, tuple[type, ...]] = {
    "kind": (str,), "sft": (bool,), "chosen_min_reward": (int, float), "scene_index": (int,),
}


def _check_meta(meta: dict | None, what: str) -> None:
    """Refuse meta the studio could not store or read back: not JSON (NaN / infinity included) or
    a reserved key of the wrong type."""
    if meta is None:
        return
    for key, types in _META_TYPES.items():
        value = meta.get(key)
        if value is not None and (not isinstance(value, types) or (bool in types) != isinstance(value, bool)):
            raise ValueError(f"{what} {key!r} must be {' or '.join(t.__name__ for t in types)}, "
                             f"not {type(value).__name__}")
    try:
        size = len(json.dumps(meta, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not storable as JSON ({exc})") from exc
    except RecursionError:  # json.loads accepted it a few stack frames higher up
        raise ValueError(f"{what} is not storable as JSON (nested too deeply)") from None
    if size > META_MAX_CHARS:
        raise ValueError(f"{what} is {size:,} characters as JSON, over the limit of {META_MAX_CHARS:,}")
    # The values the Review tab shows are bounded as the texts and names beside them are; a pair's
    # own prompt is what its round trains with, so it is checked as a prompt.
    if isinstance(meta.get("pair_prompt"), str):
        check_text(meta["pair_prompt"], f"{what} 'pair_prompt'")
    if isinstance(meta.get("kind"), str):
        check_name(meta["kind"], f"{what} 'kind'")


@dataclass
class _Bad:
    label: str
    reason: str


# ============================================================================================
# Path safety and small parsers
# ============================================================================================
def safe_join(root: Path, relative: Any) -> Path:
    """``root / relative``, refusing absolute paths, URLs and anything resolving outside root."""
    if relative is not None and not isinstance(relative, str):
        raise UnsafePathError(f"the image path must be text, not {type(relative).__name__} ({repr(relative)[:40]})")
    if not relative or not relative.strip():
        raise UnsafePathError("missing image path")
    if (
        relative.startswith(("/", "\\", "~"))
        or re.match(r"^[A-Za-z]:", relative)
        or "://" in relative
        or Path(relative).is_absolute()
    ):
        raise UnsafePathError(  # a record names its image relative to the import root, never absolutely
            f"image path {relative!r} is absolute (or a URL); give it relative to the import root {root.resolve()}"
        )
    base = root.resolve()
    target = _resolved_or_refused(base / relative, f"image path {relative!r}")
    if not target.is_relative_to(base):
        raise UnsafePathError(f"image path {relative!r} escapes the import root {base}")
    return target


def _resolved_or_refused(path: Path, what: str) -> Path:
    """``path`` with its links resolved, or an UnsafePathError naming ``what`` when they cannot be
    (a link loop: Python 3.11 raises RuntimeError, later versions OSError)."""
    try:
        return path.resolve()
    except RuntimeError:
        raise UnsafePathError(f"{what} cannot be resolved (a symlink loop)") from None
    except OSError as exc:
        raise UnsafePathError(f"{what} cannot be resolved ({exc.strerror or exc})") from None


def _json_loads(text: str) -> Any:
    """``json.loads`` whose every refusal is a ValueError: nesting deeper than Python's recursion
    limit raises RecursionError there, which must refuse a record, not end the import."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _read_json(path: Path) -> Any:
    """A JSON file; a UTF-8 byte order mark (Windows editors write one) is allowed."""
    return _json_loads(path.read_text(encoding="utf-8-sig"))


IMAGE_TOKEN = "<image>"  # LLaVA's and LLaMA-Factory's placeholder; a chat template's image slot in TRL


def refuse_image_token(text: str | None, what: str) -> None:
    """A text the studio stores as a prompt or an answer must not hold the image placeholder: the
    exports put one before the prompt, and every tool that trains on them (LLaMA-Factory, TRL, LLaVA)
    would count a second image, refusing the dataset or failing on the first batch."""
    if text and IMAGE_TOKEN in text:
        raise ValueError(f"{what} contains the image placeholder {IMAGE_TOKEN!r}, which the exports' training tools "
                         "would read as a second image; remove it")


def check_text(text: str, what: str, limit: int = TEXT_MAX_CHARS) -> None:
    """Refuse an imported prompt, answer or reference longer than ``limit`` characters or holding
    the image placeholder (:func:`refuse_image_token`)."""
    check_length(text, what, limit)
    refuse_image_token(text, what)


def check_length(text: str, what: str, limit: int = TEXT_MAX_CHARS) -> None:
    """Refuse an imported text longer than ``limit`` characters."""
    if len(text) > limit:
        raise ValueError(f"{what} is {len(text):,} characters long, over the limit of {limit:,} "
                         "for an imported text; shorten it")


def check_name(name: str, what: str, limit: int = NAME_MAX_CHARS) -> None:
    """Refuse an imported name (a method, a dataset, a split, an object) over ``limit`` characters."""
    if len(name) > limit:
        raise ValueError(f"{what} is {len(name):,} characters long, over the limit of {limit} for a name "
                         f"(it begins {name[:40]!r})")


def safe_name(name: str) -> str:
    """A file name as text that can be stored and shown: bytes that are not UTF-8 (which Python
    carries as lone surrogates, ``caf\\udce9.png``, and SQLite and JSON refuse) as ``\\xe9``."""
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def _strip_image_token(text: str) -> str:
    """The prompt without its one image placeholder (LLaVA writes "<image>\\n" before it, some
    datasets after it or inside it). A prompt with several placeholders asks about several images;
    an item holds one, and dropping the placeholders would leave "as in  the same as in ?"."""
    if text.count(IMAGE_TOKEN) > 1:
        raise ValueError(f"the prompt holds {text.count(IMAGE_TOKEN)} image placeholders {IMAGE_TOKEN!r}; an item "
                         "has one image (multi-image prompts are not supported)")
    if text.startswith("<image>\n"):
        return text[len("<image>\n") :]
    if text.endswith("\n<image>"):
        return text[: -len("\n<image>")]
    return text.replace("<image>", "").strip()


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                text = part.get("text")
                if text is not None and not isinstance(text, str):
                    raise ValueError(f"a message's text part must hold text, not {type(text).__name__} "
                                     f"({repr(text)[:40]})")
                texts.append(text or "")
        return "".join(texts)
    if content is None:
        raise ValueError("a message has no 'content' (nor 'value')")
    raise ValueError(f"a message's content is text or a list of parts, not {type(content).__name__}")


def _prompt_text(value: Any, *, single_turn: bool = True) -> str:
    """A prompt from plain text or conversational messages (the first user turn).

    A pair is one question and its answers, so a preference record whose conversation asks several
    questions is refused (``single_turn``): its answers reply to the last question, in the context
    of the earlier ones, and no single prompt would train them honestly. An instruction record
    (items only) keeps its first question, whose answer becomes the reference."""
    if isinstance(value, str):
        return _strip_image_token(value)
    if isinstance(value, list):
        questions = _questions(value)
        if not questions:
            raise ValueError("no user prompt found")
        if single_turn:
            _one_question(questions)
        return _strip_image_token(_turn_text(questions[0]))
    raise ValueError(f"a prompt is text or a list of messages, not {type(value).__name__}")


# A turn is a TRL message ({role, content}) or a LLaVA / ShareGPT one ({from, value}).
_USER_ROLES, _ASSISTANT_ROLES = ("user", "human"), ("assistant", "gpt")


def _turn_role(turn: Any) -> str | None:
    return turn.get("role", turn.get("from")) if isinstance(turn, dict) else None


def _turn_text(turn: dict) -> str:
    return _content_text(turn.get("content", turn.get("value")))


def _questions(turns: list) -> list[dict]:
    return [m for m in turns if _turn_role(m) in _USER_ROLES]


def _one_question(questions: list) -> None:
    if len(questions) > 1:
        raise ValueError(f"a conversation of {len(questions)} questions: a preference pair is one "
                         "question and its answers; split it into single-turn records")


def _record_prompt(row: dict, default: str, preference: bool) -> str:
    """A JSONL / HF record's prompt: its 'prompt' (text or messages); else, for a preference record
    in TRL's implicit-prompt form (chosen and rejected hold the whole conversation), the question
    its sides ask (they must ask the same one); else the import's default prompt. Messages whose
    question is the image alone ({"type": "image"}, "<image>") take the default prompt too."""
    if row.get("prompt") is not None:
        text = _prompt_text(row["prompt"], single_turn=preference)
        return text if text.strip() or isinstance(row["prompt"], str) else default
    if not preference:
        return default
    asked = {_prompt_text(side).strip() for side in (row.get("chosen"), row.get("rejected"))
             if isinstance(side, list) and _questions(side)}
    asked.discard("")
    if len(asked) > 1:
        raise ValueError("chosen and rejected answer different questions: " + " / ".join(sorted(asked))[:200])
    return asked.pop() if asked else default


def _answer_text(value: Any) -> str:
    """An answer from plain text, a {from, value} turn, or conversational messages (last
    assistant turn; messages that ask several questions are refused, as a prompt that does)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return _turn_text(value)
    if isinstance(value, list):
        _one_question(_questions(value))
        for message in reversed(value):
            if _turn_role(message) in _ASSISTANT_ROLES:
                return _turn_text(message)
        raise ValueError("no assistant answer found")
    raise ValueError(f"an answer is text, a turn or a list of messages, not {type(value).__name__}")


def _objects(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("'objects' must be a list of strings")
    return sorted(set(value))


def _meta_json(value: Any, name: str) -> dict | None:
    if value is None or value == "":
        return None
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            parsed = _json_loads(value)
        except ValueError as exc:
            raise ValueError(f"'{name}' is text that is not valid JSON ({exc})") from exc
        return parsed if isinstance(parsed, dict) else {"value": parsed}
    return {"value": value}


def _pair_from(chosen: Any, rejected: Any, info: dict, method: str | None) -> dict:
    chosen_text, rejected_text = _answer_text(chosen), _answer_text(rejected)
    if not chosen_text.strip() or not rejected_text.strip():
        raise ValueError("chosen and rejected answers must not be empty")
    check_text(chosen_text, "the chosen answer")
    check_text(rejected_text, "the rejected answer")
    if chosen_text == rejected_text:
        raise ValueError("chosen and rejected answers are identical")
    meta = _meta_json(info.get("meta"), "meta")
    _check_meta(meta, "pair meta")
    pair_method = info.get("method") or method or DEFAULT_METHOD
    if not isinstance(pair_method, str):
        raise ValueError(f"'method' must be text, not {type(pair_method).__name__}")
    check_name(pair_method, "'method'")
    # An export's pair that a person accepted, swapped or edited carries its effective texts and
    # its status: it lands reviewed (an "accept" of those texts), not as an automatic label again.
    status, reviewer = info.get("status"), info.get("reviewer")
    if reviewer is not None and not isinstance(reviewer, str):  # a name, not a number or an object made text
        raise ValueError(f"'reviewer' must be a name (text), not {type(reviewer).__name__}")
    reviewed_by = None
    if status in REVIEWED_STATUSES:
        reviewed_by = IMPORT_REVIEWER
        if reviewer is not None and reviewer.strip():
            reviewed_by = reviewer.strip()
            # a name the app would accept (service._reviewer), and printable
            if len(reviewed_by) > REVIEWER_MAX_CHARS or any(not ch.isprintable() for ch in reviewed_by):
                raise ValueError(f"'reviewer' must be a name of at most {REVIEWER_MAX_CHARS} printable "
                                 f"characters, not {reviewed_by[:40]!r}")
    stored = info.get("stored")
    if isinstance(stored, dict) and all(isinstance(stored.get(k), str) and stored[k].strip() for k in ("chosen", "rejected")):
        stored = (stored["chosen"], stored["rejected"])
    else:  # not an export of this project's (or not one naming its pair): matched by the texts alone
        stored = None
    return {
        "chosen": chosen_text,
        "rejected": rejected_text,
        "stored": stored,
        "method": pair_method,
        "round": _round_number(info.get("round")),
        "margin": _finite_number(info.get("margin"), "margin"),
        "meta": meta,
        "reviewed_by": reviewed_by,
        "status": status if reviewed_by else None,
    }


MAX_ROUND = 2**31 - 1  # round ids are SQLite integers; anything near 2**63 cannot be one


def _round_number(value: Any) -> int:
    if value is None:
        return 0
    try:
        number = float(value) if isinstance(value, str) else value
        if isinstance(number, bool) or not isinstance(number, int | float) or number != int(number):
            raise ValueError
        number = int(number)
    except (ValueError, OverflowError) as exc:
        raise ValueError(f"'round' must be a whole number, not {str(value)[:40]!r}") from exc
    if not 0 <= number <= MAX_ROUND:
        raise ValueError(f"'round' must be between 0 and {MAX_ROUND}, not {str(value)[:40]}")
    return number


def _finite_number(value: Any, name: str) -> float | None:
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"{name!r} must be a number, not {str(value)[:40]!r}") from exc
    if not math.isfinite(number):
        raise ValueError(f"{name!r} must be a finite number, not {str(value)[:40]}")
    return number


# ============================================================================================
# Landing records
# ============================================================================================
def _find_or_add_candidate(store: Store, item_id: int, text: str) -> int:
    existing = store.find_candidate(item_id, text)
    return existing if existing is not None else store.add_candidate(item_id, text, IMPORTED_SOURCE)


def _merge_into_existing(store: Store, item_id: int, p: dict) -> bool:
    """Whether the incoming pair ``p`` is a version of one already on the item; if so, its human
    decision (if any) is recorded on that pair instead of adding a pair. The same texts are the
    same pair (an accept), the texts swapped are that pair swapped, the same rejected side with
    status "edit" is that pair edited; a pair whose effective label already says ``p`` (an export of
    this store coming back) takes nothing new. A reviewer's live decision is never overwritten."""
    chosen, rejected, named = p["chosen"], p["rejected"], p.get("stored")
    # Only pairs of the same round: each round's pairs are its own, even with the same texts.
    rows = store.related_pairs(item_id, p["method"], chosen, rejected, round=p["round"])
    labels = {row["id"]: store.effective_label(row["id"]) for row in rows}

    def already(row: dict) -> bool:
        label = labels[row["id"]]
        return (label["chosen_text"], label["rejected_text"]) == (chosen, rejected)

    # The pair the record names, then one whose label already says it, then the same texts, then
    # the swap, then an edit.
    rows.sort(key=lambda r: ((r["chosen_text"], r["rejected_text"]) != named, not already(r),
                             (r["chosen_text"], r["rejected_text"]) != (chosen, rejected)))
    for row in rows:
        stored = (row["chosen_text"], row["rejected_text"])
        if named is not None and stored not in (named, (chosen, rejected)):
            continue  # the record names its pair: another one that shares the rejected side is not it
        is_named = stored == named
        if stored == (chosen, rejected):
            decision = {"decision": "accept"}
        elif stored == (rejected, chosen) and (p["reviewed_by"] or already(row) or is_named):
            decision = {"decision": "swap"}
        elif stored[1] == rejected and (p["status"] == "edit" or already(row) or is_named):
            decision = {"decision": "edit", "edited_text": chosen}
        else:
            continue  # an unreviewed reversed pair, or another pair that shares the rejected side
        label = labels[row["id"]]
        reviewer = p["reviewed_by"]
        if reviewer and store.live_decision(row["id"], reviewer) is None and not (already(row) and label["status"] != "auto"):
            store.add_review(row["id"], reviewer, note=f"imported ({p['status']})", **decision)
        return True
    return False


@contextlib.contextmanager
def stored_image(store: Store, settings: Settings, source: Path | str | bytes, *, name: str | None,
                 source_label: str, objects: list[str] | None = None) -> Iterator[str]:
    """Store an image file (validated and decoded outside the write lock), then its row and whatever
    the body adds (items, pairs) in one transaction; yields the image id. A failed body leaves
    neither the row nor a file this call wrote.

    Two processes may store the same picture at once, and the file is shared. So the file is checked
    under the write lock before its row is written (written again if a failed import removed it),
    and a failed call removes its file only under the write lock and only while no row names it:
    a committed row never points at a missing file."""
    image = ingest_image(settings, source, name=name, source_label=source_label)
    try:
        with store.transaction():
            if not image.path.is_file():
                image = ingest_image(settings, source, name=name, source_label=source_label)
            store.add_image(image.id, image.path, image.width, image.height, source_label, objects,
                            replaces=image.replaces)
            yield image.id
    except BaseException:
        if image.created:
            try:
                with store.transaction():
                    if not _row_names(store, image):
                        discard(image)
            except Exception:  # noqa: BLE001 - the store is busy or gone: an orphan file is harmless
                pass
        raise
    if image.replaces is not None:
        # The damaged file this one replaced goes once a committed row names the new file.
        with contextlib.suppress(Exception), store.transaction():
            if _row_names(store, image):
                image.replaces.unlink(missing_ok=True)


def _row_names(store: Store, image: Any) -> bool:
    """Does the image's committed row name this file (``image.path``)?"""
    row = store.get_image(image.id)
    return row is not None and Path(row["path"]).resolve() == image.path.resolve()


def _refuse_conflict(store: Store, image_id: str, rec: _Record) -> dict | None:
    """A record for an item the store already holds (the same picture, prompt and dataset) lands
    as that item, with its pairs; one that says otherwise about the item's split, reference or the
    image's ground-truth objects is refused, since keeping either side silently would lose the
    other (a test item turned train, CHAIR's ground truth replaced). Returns the item held, or None."""
    image = store.get_image(image_id)
    if rec.objects is not None and image is not None and image.get("objects") is not None \
            and sorted(image["objects"]) != sorted(rec.objects):
        raise ValueError(f"the store holds this picture with the ground-truth objects {_short(image['objects'])}, "
                         f"and this record says {_short(rec.objects)} (a picture has one ground truth, whichever "
                         "dataset lists it)")
    item = store.find_item(image_id, rec.prompt, rec.dataset)
    if item is None:
        return None
    if item["split"] != rec.split:
        raise ValueError(f"the store holds this image and prompt in dataset {rec.dataset!r} as split "
                         f"{item['split']!r}, and this record says {rec.split!r}")
    if rec.reference is not None and item.get("reference") is not None and item["reference"] != rec.reference:
        raise ValueError(f"the store holds this image and prompt with another reference answer "
                         f"({item['reference'][:60]!r}, this record: {rec.reference[:60]!r})")
    return item


def _short(objects: Sequence[str]) -> str:
    names = sorted(objects)
    return repr(names[:8])[:-1] + (f", … {len(names) - 8} more]" if len(names) > 8 else "]")


def _land(store: Store, settings: Settings, rec: _Record, report: ImportReport, source_label: str) -> None:
    new_pairs = 0
    try:
        with stored_image(store, settings, rec.image, name=rec.image_name, source_label=source_label,
                          objects=rec.objects) as image_id:
            new_item = _refuse_conflict(store, image_id, rec) is None
            item_id = store.add_item(image_id, rec.prompt, rec.reference, rec.dataset, rec.split, rec.meta)
            for p in rec.pairs:
                if _merge_into_existing(store, item_id, p):
                    continue
                pair_id = store.add_pair(
                    item_id,
                    _find_or_add_candidate(store, item_id, p["chosen"]),
                    _find_or_add_candidate(store, item_id, p["rejected"]),
                    p["method"],
                    margin=p["margin"],
                    round=p["round"],
                    meta=p["meta"],
                )
                if p["reviewed_by"]:
                    store.add_review(pair_id, p["reviewed_by"], "accept", note=f"imported ({p['status']})")
                new_pairs += 1
    except ImageRejected as exc:
        report.fail(str(exc) if rec.label == rec.image_name else f"{rec.label}: {exc}")
        return
    except (StoreError, sqlite3.Error, ValueError, TypeError, OverflowError, RecursionError) as exc:
        report.fail(f"{rec.label}: not stored ({exc})")
        return
    report.imported += 1
    report.new_items += new_item
    report.pairs += new_pairs


def _land_all(
    store: Store,
    settings: Settings,
    records: Iterable[_Record | _Bad],
    report: ImportReport,
    source_label: str,
    limit: int | None = None,
    progress: Callable[[], None] | None = None,
) -> ImportReport:
    for rec in records:
        if limit is not None and report.imported >= limit:
            break
        if isinstance(rec, _Bad):
            report.fail(f"{rec.label}: {rec.reason}")
        else:
            _land(store, settings, rec, report, source_label)
        if progress is not None:
            progress()
    if report.imported == 0 and not report.errors:
        report.errors.append(f"{report.source}: nothing to import")
    return report


# ============================================================================================
# Readers
# ============================================================================================
def _read_folder(
    root: Path, dataset: str, split: str, prompt: str, report: ImportReport
) -> Iterator[_Record | _Bad]:
    base = root.resolve()
    for path in sorted(root.rglob("*")):
        rel = safe_name(path.relative_to(root).as_posix())  # a name that is not UTF-8 is stored escaped
        if any(part.startswith(".") for part in path.relative_to(root).parts) or path.is_dir():
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            if path.suffix.lower() != ".txt":
                report.ignored += 1
            continue
        try:
            if not _resolved_or_refused(path, "the link").is_relative_to(base):
                yield _Bad(rel, "symlink points outside the import folder")
                continue
        except UnsafePathError as exc:
            yield _Bad(rel, str(exc))
            continue
        reference = None
        sidecar = path.with_suffix(".txt")
        if sidecar.is_file():  # False for a link loop
            sidecar_name = safe_name(sidecar.relative_to(root).as_posix())
            if not sidecar.resolve().is_relative_to(base):  # a link must not read files from elsewhere
                yield _Bad(sidecar_name, "caption file points outside the import folder")
                continue
            try:
                reference = _read_caption(sidecar)
            except (OSError, UnicodeDecodeError) as exc:
                yield _Bad(sidecar_name, f"caption file unreadable ({exc})")
                continue
            except ValueError as exc:  # over the limit
                yield _Bad(sidecar_name, str(exc))
                continue
        try:
            yield _Record(rel, path, rel, prompt, reference, None, dataset, split, {"file": rel})
        except ValueError as exc:  # a caption over the limit or holding the image placeholder
            yield _Bad(rel, str(exc))


def _read_caption(path: Path) -> str | None:
    """A .txt caption's text (None when blank), read no further than CAPTION_FILE_MAX_BYTES: a
    larger file is refused before it is read into memory."""
    with path.open("rb") as fh:
        raw = fh.read(CAPTION_FILE_MAX_BYTES + 1)
    if len(raw) > CAPTION_FILE_MAX_BYTES:
        raise ValueError(f"the caption file is {path.stat().st_size:,} bytes, more than {TEXT_MAX_CHARS:,} "
                         "characters can take (the limit for an imported text); shorten it")
    text = raw.decode("utf-8-sig").strip()
    check_length(text, "the caption")
    return text or None


def _coco_value(entry: Any, key: str, kind: type) -> Any:
    """``entry[key]`` of a COCO entry as an integer id or non-empty text, or a ValueError naming
    what is wrong."""
    if not isinstance(entry, dict):
        raise ValueError(f"an entry is a JSON object, not {type(entry).__name__}")
    value = entry.get(key)
    if value is None:
        raise ValueError(f"missing {key!r}")
    if kind is int:
        try:
            if isinstance(value, float) and value.is_integer():  # 1.0, as pandas writes ids
                return int(value)
            if isinstance(value, bool) or not isinstance(value, int | str):
                raise ValueError
            return int(value)
        except ValueError:
            raise ValueError(f"{key!r} must be an integer id, not {repr(value)[:40]}") from None
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be text, not {repr(value)[:40]}")
    return value.strip()


def _coco_split(name: str) -> str | None:
    match = re.search(r"(train|val|test)\d*", name)
    return match.group(1) if match else None


def _find_coco_images_dir(anchor: Path, split_name: str | None, samples: Sequence[str]) -> Path:
    """The folder beside the annotations that holds the first of ``samples`` (image file names)."""
    bases = [anchor.parent, anchor.parent.parent]
    names = ([split_name] if split_name else []) + ["images", ""]
    candidates = [b / n if n else b for b in bases for n in names]
    for sample in samples:
        for candidate in candidates:
            try:
                if sample and (candidate / sample).is_file():
                    return candidate
            except (OSError, ValueError):  # a name too long for the file system, or holding a NUL
                break  # that name is refused with its image; the next one may find the folder
    return anchor.parent


def _read_coco(
    captions: Path | None,
    instances: Path | None,
    images_dir: Path | None,
    dataset: str,
    split: str | None,
    prompt: str,
) -> Iterator[_Record | _Bad]:
    images: dict[int, dict] = {}
    refs: dict[int, list[str]] = {}
    objects: dict[int, set[str]] = {}
    refused: dict[int, str] = {}  # image id -> why that image alone is refused
    for path, kind in ((captions, "captions"), (instances, "instances")):
        if path is None:
            continue
        try:
            data = _read_json(path)
            if not isinstance(data, dict):
                raise ValueError(f"a COCO annotation file is a JSON object, not {type(data).__name__}")
            entries = {key: data.get(key, []) for key in ("images", "annotations", "categories")}
            for key, value in entries.items():
                if not isinstance(value, list):
                    raise ValueError(f"{key!r} must be a list, not {type(value).__name__}")
        except (OSError, ValueError) as exc:
            yield _Bad(path.name, f"not a readable COCO {kind} file ({exc})")
            return
        # One malformed entry refuses itself (or the image it is about), never the whole file.
        usable: dict[str, list] = {}  # entries with the fields this kind of file needs: (index, entry, values)
        needs = {"images": [("id", int)], "annotations": [("image_id", int), ("caption", str)]}
        if kind == "instances":
            needs = {"images": [("id", int)], "categories": [("id", int)], "annotations": [("image_id", int)]}
        for key, fields in needs.items():
            usable[key] = []
            for index, entry in enumerate(entries[key]):
                try:
                    usable[key].append((index, entry, [_coco_value(entry, name, t) for name, t in fields]))
                except ValueError as exc:
                    yield _Bad(f"{path.name} {key}[{index}]", str(exc))
        for _, im, (image_id,) in usable["images"]:
            known = images.setdefault(image_id, im)
            if known.get("file_name") != im.get("file_name"):
                refused[image_id] = (f"image id {image_id} is listed twice, as {known.get('file_name')!r} "
                                     f"and {im.get('file_name')!r}")
        if kind == "captions":
            for _, _, (image_id, caption) in usable["annotations"]:
                if caption:  # an empty caption says nothing: skipped, not a refusal
                    refs.setdefault(image_id, []).append(caption)
            continue
        names: dict[int, str] = {}
        unnamed: dict[int, str] = {}
        for _, category, (category_id,) in usable["categories"]:
            try:
                names[category_id] = _coco_value(category, "name", str)
                if not names[category_id]:
                    raise ValueError("an empty 'name'")
            except ValueError as exc:
                names.pop(category_id, None)
                unnamed[category_id] = str(exc)
        for index, ann, (image_id,) in usable["annotations"]:
            # An annotation that names no usable object would leave the image's ground truth
            # incomplete: refuse that image alone.
            try:
                category_id = _coco_value(ann, "category_id", int)
            except ValueError as exc:
                refused.setdefault(image_id, f"annotations[{index}]: {exc}")
                continue
            if category_id in unnamed:
                refused.setdefault(image_id, f"category_id {category_id} has no usable name ({unnamed[category_id]})")
            elif category_id not in names:
                refused.setdefault(image_id, f"annotation with unknown category_id {category_id}")
            else:
                objects.setdefault(image_id, set()).add(names[category_id])
    anchor = captions or instances
    split_name = _coco_split(anchor.stem.split("_", 1)[-1]) if anchor else None
    if images_dir is None:
        # Found from the first few names that are text (a bad name refuses its image alone, later).
        samples = [name for im in images.values() if isinstance(name := im.get("file_name"), str)][:10]
        images_dir = _find_coco_images_dir(anchor, anchor.stem.split("_", 1)[-1], samples)
    for image_id in sorted(images):
        im = images[image_id]
        label = f"{anchor.name} image {image_id}"
        if image_id in refused:
            yield _Bad(label, refused[image_id])
            continue
        captions_here = refs.get(image_id, [])
        try:
            for number, caption in enumerate(captions_here, start=1):  # all of them are stored (item meta)
                check_length(caption, f"caption {number}")
            yield _Record(
                label,
                safe_join(images_dir, im.get("file_name")),
                str(im.get("file_name")),
                prompt,
                reference=captions_here[0] if captions_here else None,
                # an image listed in instances without annotations has a known, empty ground truth
                objects=sorted(objects.get(image_id, ())) if instances is not None else None,
                dataset=dataset,
                split=split or split_name or "train",
                meta={"coco_id": image_id, "captions": captions_here} if captions_here else {"coco_id": image_id},
            )
        except (UnsafePathError, ValueError) as exc:
            yield _Bad(label, str(exc))


def _coco_files(path: Path) -> list[tuple[Path | None, Path | None]]:
    """(captions, instances) pairs found at a COCO path (a JSON file or a directory)."""
    if path.is_file():
        other = None
        stem = path.stem
        if stem.startswith("captions_"):
            other = path.with_name("instances_" + stem[len("captions_") :] + path.suffix)
            return [(path, other if other.is_file() else None)]
        if stem.startswith("instances_"):
            other = path.with_name("captions_" + stem[len("instances_") :] + path.suffix)
            return [(other if other.is_file() else None, path)]
        try:
            data = _read_json(path)
        except (OSError, ValueError) as exc:
            raise DataImportError(f"{path.name}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise DataImportError(f"{path.name}: a COCO annotation file is a JSON object, not {type(data).__name__}")
        is_instances = bool(data.get("categories"))
        return [(None, path)] if is_instances else [(path, None)]
    found: dict[str, list[Path | None]] = {}
    for directory in (path, path / "annotations"):
        for kind, index in (("captions", 0), ("instances", 1)):
            for f in sorted(directory.glob(f"{kind}_*.json")):
                found.setdefault(f.stem.split("_", 1)[1], [None, None])[index] = f
    return [tuple(v) for _, v in sorted(found.items())]  # type: ignore[misc]


def _read_jsonl(
    path: Path, images_root: Path, dataset: str | None, split: str | None, prompt: str, method: str | None
):
    with path.open("rb") as fh:
        for number, raw in enumerate(_bounded_lines(fh, JSONL_LINE_MAX_BYTES), start=1):
            label = f"{path.name} line {number}"
            if raw is None:
                yield _Bad(label, f"longer than {JSONL_LINE_MAX_BYTES:,} bytes, far more than a record holds "
                                  "(images are given by path); skipped unread")
                continue
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a byte order mark may open the file
            except UnicodeDecodeError as exc:
                yield _Bad(label, f"not UTF-8 text ({exc.reason} at byte {exc.start})")
                continue
            if not line.strip():
                continue
            try:
                try:
                    row = _json_loads(line)
                except json.JSONDecodeError as exc:  # its "line 2" would be the line's own end, not the file's
                    where = ("the line ends before the record does" if exc.pos >= len(line.rstrip())
                             else f"{exc.msg} at character {exc.pos + 1} of the line")
                    raise ValueError(f"invalid JSON ({where})") from None
                except ValueError as exc:
                    raise ValueError(f"invalid JSON ({exc})") from exc
                if not isinstance(row, dict):
                    raise ValueError("each line must be a JSON object")
                yield _record_from_mapping(row, label, images_root, dataset, split, prompt, method)
            except (ValueError, UnsafePathError, TypeError, AttributeError) as exc:
                yield _Bad(label, str(exc))


def _bounded_lines(fh, limit: int):
    """The lines of a binary file, each read no further than ``limit`` bytes: a longer line is
    skipped in chunks and yields None."""
    while raw := fh.readline(limit + 1):
        if len(raw) > limit and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):
                raw = fh.readline(limit + 1)
            yield None
        else:
            yield raw


def _record_from_mapping(
    row: dict, label: str, images_root: Path, dataset: str | None, split: str | None, prompt: str, method: str | None
) -> _Record:
    image = row.get("image")
    if image is None:
        raise ValueError("missing 'image'")
    path = safe_join(images_root, image)
    preference = row.get("chosen") is not None or row.get("rejected") is not None
    prompt_text = _record_prompt(row, prompt, preference)
    if not prompt_text.strip():
        raise ValueError("empty 'prompt'")
    pairs = []
    if preference:
        if row.get("chosen") is None or row.get("rejected") is None:
            raise ValueError("a pair needs both 'chosen' and 'rejected'")
        pairs.append(_pair_from(row.get("chosen"), row.get("rejected"), row, method))
    return _Record(
        label,
        path,
        str(image),
        prompt_text,
        reference=row.get("reference"),
        objects=_objects(row.get("objects")),
        dataset=dataset or row.get("dataset") or "default",
        split=split or row.get("split") or "train",
        meta=_meta_json(row.get("item_meta"), "item_meta"),
        pairs=pairs,
    )


def _read_conversation_json(path: Path, images_root: Path, dataset: str | None, split: str | None,
                            parse: Callable[[dict, dict], tuple[Any, str, str | None, list[dict]]]):
    """The frame the LLaVA and LLaMA-Factory readers share: a JSON list of records, each with the
    studio's info block and a list of conversation turns. ``parse(row, info)`` gives a record's
    image path, prompt, reference and pairs; a bad record is refused alone."""
    try:
        data = _read_json(path)
    except (OSError, ValueError) as exc:
        yield _Bad(path.name, f"not valid JSON ({exc})")
        return
    if not isinstance(data, list):
        yield _Bad(path.name, "expected a JSON list of records")
        return
    for index, row in enumerate(data):
        label = f"{path.name} record {index}"
        try:
            if not isinstance(row, dict):
                raise ValueError("record is not an object")
            info = _info_block(row)
            if not isinstance(row.get("conversations"), list):
                raise ValueError("'conversations' must be a list of turns")
            image, prompt, reference, pairs = parse(row, info)
            yield _Record(
                label,
                safe_join(images_root, image),
                str(image),
                _item_prompt(info, prompt),
                reference=reference,
                objects=_objects(info.get("objects")),
                dataset=dataset or info.get("dataset") or "default",
                split=split or info.get("split") or "train",
                meta=_meta_json(info.get("item_meta"), "item_meta"),
                pairs=pairs,
            )
        except KeyError as exc:
            yield _Bad(label, f"missing field {exc}")
        except (ValueError, UnsafePathError, TypeError, AttributeError) as exc:
            yield _Bad(label, str(exc))


def _read_llava(path: Path, images_root: Path, dataset: str | None, split: str | None, method: str | None):
    def parse(row: dict, info: dict):
        preference = row.get("rejected_conversations") is not None
        prompt = _prompt_text(row["conversations"], single_turn=preference)
        reference = info.get("reference")
        if preference:
            return row.get("image"), prompt, reference, [
                _pair_from(_answer_text(row["conversations"]), row["rejected_conversations"], info, method)]
        if reference is None:
            # A LLaVA instruction record (no rejected side): its answer to the first question is
            # the item's reference, which POVID takes as the chosen answer (as its paper does
            # with LLaVA-Instruct).
            reference = _first_answer(row["conversations"])
        return row.get("image"), prompt, reference, []

    return _read_conversation_json(path, images_root, dataset, split, parse)


def _first_answer(turns: list) -> str:
    """The assistant turn that answers the first user turn of a conversation."""
    roles = [_turn_role(t) for t in turns]
    first_user = next(i for i, role in enumerate(roles) if role in _USER_ROLES)
    for turn, role in zip(turns[first_user + 1:], roles[first_user + 1:], strict=True):
        if role in _ASSISTANT_ROLES:
            answer = _turn_text(turn).strip()
            if answer:
                return answer
            break
        if role in _USER_ROLES:
            break
    raise ValueError("the first question has no answer")


def _item_prompt(info: dict, record_prompt: str) -> str:
    """The item's prompt: a record exported by the studio names it (``item_prompt``) when the pair
    trained with another one; else the record's own prompt."""
    item_prompt = info.get("item_prompt")
    return item_prompt if isinstance(item_prompt, str) and item_prompt.strip() else record_prompt


def _info_block(row: dict) -> dict:
    """The record's ``lvlm_studio`` provenance block (exports write one), {} when absent."""
    info = row.get(META_KEY)
    if info is None:
        return {}
    if not isinstance(info, dict):
        raise ValueError(f"'{META_KEY}' must be an object, not {type(info).__name__}")
    return info


def _read_llamafactory(path: Path, images_root: Path, dataset: str | None, split: str | None, method: str | None):
    def parse(row: dict, info: dict):
        images = row.get("images") or []
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list) or len(images) != 1:
            raise ValueError(f"expected exactly one image, found {len(images) if isinstance(images, list) else images!r}")
        missing = [repr(side) for side in ("chosen", "rejected") if row.get(side) is None]
        if missing:
            raise ValueError(f"a LLaMA-Factory ranking record needs 'chosen' and 'rejected'; "
                             f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing")
        return images[0], _prompt_text(row["conversations"]), info.get("reference"), [
            _pair_from(row["chosen"], row["rejected"], info, method)]

    return _read_conversation_json(path, images_root, dataset, split, parse)


def _no_decode(feature: Any) -> Any | None:
    import datasets

    if isinstance(feature, datasets.Image):
        return datasets.Image(decode=False)
    inner = getattr(feature, "feature", None)
    if isinstance(feature, (datasets.List, datasets.Sequence)) and isinstance(inner, datasets.Image):
        return datasets.List(datasets.Image(decode=False))
    return None


def _hf_image(value: Any, root: Path, label: str) -> tuple[Path | bytes, str]:
    if isinstance(value, list):
        if len(value) != 1:
            raise ValueError(f"expected exactly one image, found {len(value)}")
        value = value[0]
    if isinstance(value, dict):
        data = value.get("bytes")
        if data:
            # Only bytes are an image's content: a string there would be opened as a path, past
            # safe_join, reading any file the server can (datasets.Image writes bytes or None).
            if not isinstance(data, bytes | bytearray | memoryview):
                raise ValueError(f"the image's 'bytes' holds {type(data).__name__}, not bytes")
            name = value.get("path")
            return bytes(data), name if isinstance(name, str) and name else label
        value = value.get("path")
    if isinstance(value, str):
        return safe_join(root, value), value
    raise ValueError("no image in this row")


def _read_hf(path: Path, dataset: str | None, split: str | None, prompt: str, method: str | None):
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError, FileNotFoundError) as exc:
        yield _Bad(path.name, f"not a dataset saved with save_to_disk ({exc})")
        return
    except (TypeError, KeyError, AttributeError, IndexError) as exc:  # datasets reads its JSON unchecked
        detail = f"missing {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        yield _Bad(path.name, "not a dataset saved with save_to_disk (its state.json or dataset_dict.json "
                              f"is malformed: {detail})")
        return
    parts = list(loaded.items()) if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    for part_name, ds in parts:
        image_column = (
            "images" if "images" in ds.column_names else "image" if "image" in ds.column_names else None
        )
        if image_column is None:
            yield _Bad(path.name, "the dataset has no 'image' or 'images' column")
            return
        if "prompt" not in ds.column_names and not {"chosen", "rejected"} <= set(ds.column_names):
            # (TRL's implicit-prompt preference data asks its question inside chosen / rejected)
            yield _Bad(path.name, "the dataset has no 'prompt' column (nor 'chosen' and 'rejected' columns)")
            return
        plain = _no_decode(ds.features[image_column])
        if plain is not None:
            ds = ds.cast_column(image_column, plain)
        for index, row in enumerate(ds):
            label = f"{path.name}[{part_name + '/' if part_name else ''}{index}]"
            try:
                image, image_name = _hf_image(row[image_column], path, label)
                preference = row.get("chosen") is not None and row.get("rejected") is not None
                prompt_text = _record_prompt(row, prompt, preference)
                pairs = []
                if preference:
                    pairs.append(_pair_from(row["chosen"], row["rejected"], row, method))
                yield _Record(
                    label,
                    image,
                    image_name if isinstance(image, Path) else label,
                    _item_prompt(row, prompt_text),
                    reference=row.get("reference"),
                    objects=_objects(row.get("objects")),
                    dataset=dataset or row.get("dataset") or "default",
                    split=split or row.get("split") or part_name or "train",
                    meta=_meta_json(row.get("item_meta"), "item_meta"),
                    pairs=pairs,
                )
            except KeyError as exc:
                yield _Bad(label, f"missing field {exc}")
            except (ValueError, UnsafePathError, TypeError, AttributeError) as exc:
                yield _Bad(label, str(exc))


# ============================================================================================
# Import entry points
# ============================================================================================
def detect_format(path: Path) -> str:
    """Guess an import format from a path (see module docstring)."""
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return "hf"
        if (path / LLAVA_FILE).is_file():
            return "llava"
        if (path / "dataset_info.json").is_file() and (path / LLAMAFACTORY_FILE).is_file():
            return "llamafactory"
        if _coco_files(path):
            return "coco"
        return "folder"
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".json":
        try:
            data = _read_json(path)
        except (OSError, ValueError) as exc:
            raise DataImportError(f"{path.name}: not valid JSON ({exc})") from exc
        if isinstance(data, dict) and "images" in data and "annotations" in data:
            return "coco"
        # The first record of a known layout decides: one malformed record at the top is then
        # refused alone by the reader, as it would be further down, not the whole file.
        for record in data if isinstance(data, list) else ():
            if not isinstance(record, dict):
                continue
            if "rejected_conversations" in record:
                return "llava"
            if "chosen" in record and "conversations" in record:
                return "llamafactory"
            if "conversations" in record and "image" in record:  # LLaVA-Instruct: items only
                return "llava"
        raise DataImportError(
            f"{path.name}: JSON layout not recognised (expected COCO, LLaVA or LLaMA-Factory)"
        )
    if path.suffix.lower() in IMAGE_SUFFIXES:  # no format takes one image file: its folder does
        raise DataImportError(f"{path.name} is an image file: put the images in a folder and import the folder "
                              "(each with an optional .txt caption beside it)")
    raise DataImportError(f"{path.name}: cannot guess the format; choose one (CLI: --format)")


def _json_in_dir(path: Path, name: str) -> Path:
    if path.is_file():
        return path
    candidate = path / name
    if not candidate.is_file():
        raise DataImportError(f"{path}: no {name} in this directory")
    return candidate


def import_path(
    store: Store,
    settings: Settings,
    path: str | Path,
    format: str = "auto",
    *,
    dataset: str | None = None,
    split: str | None = None,
    prompt: str = DEFAULT_PROMPT,
    images_dir: str | Path | None = None,
    method: str | None = None,
    limit: int | None = None,
    progress: Callable[[int, int | None, str], None] | None = None,
) -> ImportReport:
    """Import ``path`` in ``format`` (or detect it). ``dataset``/``split`` override what the file
    says (defaults 'default'/'train'); ``images_dir`` is the root image paths are resolved against
    (default: the file's directory); ``method`` names pairs whose file does not say. ``progress``
    is called after each record with (records read, None: the total is not known ahead, message)."""
    path = Path(path)
    if not path.exists():
        raise DataImportError(f"{path}: no such file or directory")
    if format not in IMPORT_FORMATS:
        raise DataImportError(
            f"unknown import format {format!r}; expected one of {', '.join(IMPORT_FORMATS)}"
        )
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataImportError(f"limit must be a whole number of records, 1 or more, not {limit!r}")
    try:
        check_text(prompt, "the prompt")  # given for images without one (folders, COCO)
        for name, value in (("dataset", dataset), ("split", split), ("method", method)):
            if isinstance(value, str):
                check_name(value, f"the {name} name")
    except ValueError as exc:
        raise DataImportError(str(exc)) from None
    fmt = detect_format(path) if format == "auto" else format
    settings.ensure_dirs()
    read = [0]

    def tick() -> None:
        read[0] += 1
        if progress is not None:
            progress(read[0], None, f"{read[0]} records read")

    report = ImportReport(source=str(path), format=fmt)
    root = Path(images_dir) if images_dir is not None else (path if path.is_dir() else path.parent)
    if fmt == "folder":
        if not path.is_dir():
            raise DataImportError(f"{path}: a folder import needs a directory")
        records = _read_folder(path, dataset or "default", split or "train", prompt, report)
        return _land_all(store, settings, records, report, "folder", limit, tick)
    if fmt == "coco":
        sources = _coco_files(path)
        if not sources:
            raise DataImportError(f"{path}: no captions_*.json or instances_*.json found")
        for captions, instances in sources:
            part = ImportReport(source=str(captions or instances), format="coco")
            records = _read_coco(
                captions,
                instances,
                Path(images_dir) if images_dir else None,
                dataset or "coco",
                split,
                prompt,
            )
            left = None if limit is None else limit - report.imported  # the limit counts the whole import
            if left is not None and left <= 0:
                break
            _land_all(store, settings, records, part, "coco", left, tick)
            report.merge(part)
        return report
    if fmt == "jsonl":
        if not path.is_file():
            raise DataImportError(f"{path}: a JSONL import needs a file")
        records = _read_jsonl(path, root, dataset, split, prompt, method)
        return _land_all(store, settings, records, report, "jsonl", limit, tick)
    if fmt in ("hf", "trl"):
        if not path.is_dir():
            raise DataImportError(f"{path}: an HF dataset is a directory written by save_to_disk")
        return _land_all(store, settings, _read_hf(path, dataset, split, prompt, method), report, fmt, limit, tick)
    if fmt == "llava":
        file = _json_in_dir(path, LLAVA_FILE)
        root = Path(images_dir) if images_dir is not None else file.parent
        records = _read_llava(file, root, dataset, split, method)
        return _land_all(store, settings, records, report, "llava", limit, tick)
    file = _json_in_dir(path, LLAMAFACTORY_FILE)
    root = Path(images_dir) if images_dir is not None else file.parent
    records = _read_llamafactory(file, root, dataset, split, method)
    return _land_all(store, settings, records, report, "llamafactory", limit, tick)


# ============================================================================================
# Exports
# ============================================================================================
def _export_rows(store: Store, methods, include_auto: bool, round: int | None) -> list[dict]:
    rows = store.training_pairs(methods=methods, include_auto=include_auto, round=round)
    if not rows:
        total = store.count_pairs()
        filters = ([f"of method {', '.join(methods)}"] if methods else []) + ([f"of round {round}"] if round is not None else [])
        named = " and ".join(filters)
        scope = (sum(store.count_pairs(m, round=round) for m in methods) if methods
                 else store.count_pairs(round=round))
        if scope == 0:  # the filter alone left nothing: say so, not "no reviewed pairs"
            raise DataExportError(f"nothing to export: 0 of {total} pairs qualify" + (f" (none is {named})" if named else ""))
        why = ("each was rejected on both sides by its reviewer" if include_auto else
               "none is reviewed; include unreviewed pairs to export automatic labels: CLI --include-auto")
        of = f"of the {scope} pairs {named}" if named else f"of {total} pairs"
        raise DataExportError(f"nothing to export: 0 {of} qualify ({why})")
    return rows


@dataclass
class _Out:
    final: Path
    tmp: Path


def _resolved(path: Path) -> Path:
    """``path`` with links resolved, or as given where they cannot be (a link loop)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # Python 3.11 raises RuntimeError on a symlink loop
        return path


def _lies_in(inner: Path, outer: Path) -> bool:
    """Whether ``outer`` is ``inner`` or one of its parents, comparing paths as given and with links
    resolved, and by device and inode, so a link, a bind mount or a case-insensitive disk naming
    the same folder another way is caught. Paths that do not exist compare by path only."""
    try:
        outer_stat = os.stat(outer)
    except OSError:
        outer_stat = None
    outer_paths = {outer, _resolved(outer)}
    for start in {inner, _resolved(inner)}:
        for here in (start, *start.parents):
            if here in outer_paths:
                return True
            try:
                if outer_stat is not None and os.path.samestat(outer_stat, os.stat(here)):
                    return True
            except OSError:
                continue
    return False


def _refuse_enclosing(out: Path | str) -> Path:
    """The export folder as an absolute path, refusing a folder the export cannot replace safely:
    an empty path, a filesystem root, or one that is the current directory or holds it (``.``,
    ``..``, where ``--overwrite`` would delete the files the user is working in)."""
    if not str(out).strip():
        raise DataExportError("an export needs a folder path")
    target = Path(os.path.abspath(out))
    if not target.name:
        raise DataExportError(f"{out} is a filesystem root; name a new folder for the export")
    try:
        cwd = Path.cwd()
    except FileNotFoundError:  # the working directory was deleted: nothing there to protect
        return target
    if _lies_in(cwd, target):
        raise DataExportError(f"{out} holds the current directory {cwd}; an export replaces its folder: "
                              "name a new folder (e.g. ./export)")
    return target


def _begin_out(out: Path, overwrite: bool) -> _Out:
    if out.exists() and not out.is_dir():  # --overwrite would replace a file with a folder
        raise DataExportError(f"{out} exists and is a file, not a folder: an export is a folder; "
                              "choose another path")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DataExportError(f"{out} exists and is not empty; choose another path or allow replacing it (CLI: --overwrite)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except (FileExistsError, NotADirectoryError) as exc:  # a part of the path is a file
        raise DataExportError(f"cannot write an export at {out}: {exc.filename} is not a directory") from exc
    return _Out(out, tmp)


def _commit_out(o: _Out) -> None:
    """Put the finished export in place. An existing folder is first renamed aside and deleted only
    once the new one is in place: a rename that fails (a mount point, a busy folder) loses nothing."""
    old = None
    try:
        if o.final.exists() or o.final.is_symlink():
            old = o.final.parent / f".{o.final.name}.old-{uuid.uuid4().hex[:8]}"
            o.final.rename(old)
        o.tmp.rename(o.final)
    except OSError as exc:
        if old is not None and not o.final.exists():
            old.rename(o.final)  # put the previous export back
        raise DataExportError(f"cannot replace {o.final}: {exc.strerror or exc}") from exc
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()


# What a data root holds besides its database that an export must never replace (an export folder
# elsewhere inside it is fine).
_DATA_ROOT_PARTS = ("images", "adapters", "runs", "merged", "chains", ".jobs.lock", ".seed.lock")


def _refuse_data_root(store: Store, out: Path) -> None:
    """An export replaces its folder when it finishes: refuse a folder that is the data root, holds
    it, or is one of its parts or lies in one (``--overwrite`` there would delete the store)."""
    db = Path(os.path.abspath(store.path))
    home = db.parent
    parts = [home / name for name in (db.name, f"{db.name}-wal", f"{db.name}-shm", *_DATA_ROOT_PARTS)]
    target = Path(os.path.abspath(out))
    if _lies_in(home, target) or any(_lies_in(part, target) or _lies_in(target, part) for part in parts):
        raise DataExportError(f"{out} is, holds or lies in a part of the data root {home}; an export "
                              "there would replace it: choose another folder")


@contextlib.contextmanager
def _staged_out(store: Store, out: str | Path, overwrite: bool):
    """Write an export into a temporary sibling directory that replaces ``out`` only when the
    body finishes, so a failed export never leaves a half-written folder."""
    out = _refuse_enclosing(out)
    _refuse_data_root(store, out)
    o = _begin_out(out, overwrite)
    try:
        yield o
        _commit_out(o)
    except BaseException:
        shutil.rmtree(o.tmp, ignore_errors=True)
        raise


def _provenance(row: dict) -> dict:
    return {
        "pair_id": row["pair_id"],
        "method": row["method"],
        "round": row["round"],
        "margin": row["margin"],
        "status": row["status"],
        "reviewer": row.get("reviewer"),
        # The pair's own texts before a swap or an edit: a re-import finds exactly this pair, not
        # another of the item that shares the rejected side (an edit's original chosen text is
        # nowhere else in the record).
        "stored": {"chosen": row["stored_chosen"], "rejected": row["stored_rejected"]},
        "dataset": row["dataset"],
        "split": row["split"],
        "reference": row["reference"],
        "objects": row["objects"],
        "meta": row["meta"],
        "item_meta": row.get("item_meta"),
        # The record's prompt is the one the pair trains with (STIC's step-by-step prompt); the
        # item's own prompt travels here so a re-import lands on the same item.
        "item_prompt": row.get("item_prompt", row["prompt"]),
    }


def _copy_images(rows: list[dict], out_dir: Path) -> dict[str, str]:
    """Copy each distinct image once to ``out_dir/images``; image_id → relative path."""
    (out_dir / "images").mkdir(exist_ok=True)
    mapping: dict[str, str] = {}
    for row in rows:
        if row["image_id"] in mapping:
            continue
        src = Path(row["image_path"])
        rel = f"images/{row['image_id']}{src.suffix}"
        shutil.copyfile(src, out_dir / rel)
        mapping[row["image_id"]] = rel
    return mapping


def trl_features():
    """The ``datasets.Features`` of a TRL export."""
    import datasets

    string = datasets.Value("string")
    turns = datasets.List({"role": string, "content": datasets.List({"type": string, "text": string})})
    return datasets.Features(
        {
            "images": datasets.List(datasets.Image()),
            "prompt": turns,
            "chosen": turns,
            "rejected": turns,
            "pair_id": datasets.Value("int64"),
            "method": string,
            "round": datasets.Value("int64"),
            "margin": datasets.Value("float64"),
            "status": string,
            "reviewer": string,
            "stored": {"chosen": string, "rejected": string},
            "dataset": string,
            "split": string,
            "reference": string,
            "objects": datasets.List(string),
            "meta": string,
            "item_meta": string,
            "item_prompt": string,
        }
    )


def trl_example(row: dict, image: dict | Any) -> dict:
    """One TRL conversational preference example (the image block has no payload: TRL fills it)."""
    return {
        "images": [image],
        "prompt": [
            {
                "role": "user",
                "content": [{"type": "image", "text": None}, {"type": "text", "text": row["prompt"]}],
            }
        ],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": row["chosen"]}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": row["rejected"]}]}],
        **{k: v for k, v in _provenance(row).items() if k not in ("meta", "item_meta")},
        # JSON text: an Arrow column needs one type, and meta dicts differ per method
        "meta": json.dumps(row["meta"]) if row["meta"] is not None else None,
        "item_meta": json.dumps(row["item_meta"]) if row.get("item_meta") is not None else None,
    }


def export_trl(
    store: Store,
    out: str | Path,
    *,
    methods=None,
    include_auto: bool = False,
    round: int | None = None,
    overwrite: bool = False,
) -> ExportReport:
    from datasets import Dataset
    from datasets.arrow_writer import ArrowWriter

    rows = _export_rows(store, methods, include_auto, round)
    features = trl_features()
    with _staged_out(store, out, overwrite) as o:
        arrow = o.tmp / "_build.arrow"
        # Stream to an Arrow file so the images of 100k pairs never sit in memory at once (the
        # rows, texts and provenance, do).
        with ArrowWriter(features=features, path=str(arrow)) as writer:
            for row in rows:
                image = {"bytes": Path(row["image_path"]).read_bytes(), "path": None}
                writer.write(features.encode_example(trl_example(row, image)))
            writer.finalize()
        ds = Dataset.from_file(str(arrow))
        ds.save_to_disk(str(o.tmp / "data"))
        del ds
        arrow.unlink()
        data = o.tmp / "data"
        for f in data.iterdir():
            f.rename(o.tmp / f.name)
        data.rmdir()
    return ExportReport("trl", str(o.final), len(rows), len({r["image_id"] for r in rows}))


def export_llava(
    store: Store,
    out: str | Path,
    *,
    methods=None,
    include_auto: bool = False,
    round: int | None = None,
    overwrite: bool = False,
) -> ExportReport:
    rows = _export_rows(store, methods, include_auto, round)
    with _staged_out(store, out, overwrite) as o:
        images = _copy_images(rows, o.tmp)
        records = []
        for row in rows:
            human = {"from": "human", "value": "<image>\n" + row["prompt"]}
            records.append(
                {
                    "id": f"pair-{row['pair_id']}",
                    "image": images[row["image_id"]],
                    "conversations": [human, {"from": "gpt", "value": row["chosen"]}],
                    "rejected_conversations": [human, {"from": "gpt", "value": row["rejected"]}],
                    META_KEY: _provenance(row),
                }
            )
        (o.tmp / LLAVA_FILE).write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return ExportReport("llava", str(o.final), len(rows), len(images))


def export_llamafactory(
    store: Store,
    out: str | Path,
    *,
    methods=None,
    include_auto: bool = False,
    round: int | None = None,
    overwrite: bool = False,
) -> ExportReport:
    rows = _export_rows(store, methods, include_auto, round)
    with _staged_out(store, out, overwrite) as o:
        images = _copy_images(rows, o.tmp)
        records = [
            {
                "conversations": [{"from": "human", "value": "<image>\n" + row["prompt"]}],
                "chosen": {"from": "gpt", "value": row["chosen"]},
                "rejected": {"from": "gpt", "value": row["rejected"]},
                "images": [images[row["image_id"]]],
                META_KEY: _provenance(row),
            }
            for row in rows
        ]
        (o.tmp / LLAMAFACTORY_FILE).write_text(
            json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8"
        )
        info = {
            LLAMAFACTORY_NAME: {
                "file_name": LLAMAFACTORY_FILE,
                "formatting": "sharegpt",
                "ranking": True,
                "columns": {
                    "messages": "conversations",
                    "chosen": "chosen",
                    "rejected": "rejected",
                    "images": "images",
                },
            }
        }
        (o.tmp / "dataset_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return ExportReport("llamafactory", str(o.final), len(rows), len(images))


def export_pairs(
    store: Store,
    format: str,
    out: str | Path,
    *,
    methods=None,
    include_auto: bool = False,
    round: int | None = None,
    overwrite: bool = False,
) -> ExportReport:
    exporters = {"trl": export_trl, "llava": export_llava, "llamafactory": export_llamafactory}
    if format not in exporters:
        raise DataExportError(
            f"unknown export format {format!r}; expected one of {', '.join(EXPORT_FORMATS)}"
        )
    return exporters[format](
        store, out, methods=methods, include_auto=include_auto, round=round, overwrite=overwrite
    )
