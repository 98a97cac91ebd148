"""What the UI and the CLI both call: import, generate, review, train, evaluate, compare, export.

``Studio`` owns one ``Store`` (thread-safe: one SQLite connection per thread) and loads models
lazily (torch is imported only when a method actually runs), so the app starts in seconds.
No SQL here (store.py speaks SQL) and no Gradio (ui/ renders what this returns).

Roles: accounts come from ``LVLM_STUDIO_USERS`` ("alice:pw:admin,bob:pw:reviewer", or a path to a
JSON file) and optionally ``LVLM_STUDIO_ADMINS`` (user names, e.g. Hugging Face accounts signed in
with OAuth on a Space). With no accounts configured the studio runs in *open mode*: everyone may do
everything (a local single-user tool). With accounts, admin-only actions (starting or cancelling a
training round, importing from a path on the server) raise ``PermissionError`` for anyone else;
the check lives here, not in the UI, so the HTTP API and the CLI's ``train`` and ``cancel`` obey it
too (the CLI's ``import`` and ``export`` call io.py directly: it trusts its shell there).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import operator
import os
import random
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lvlm_studio.config import MAX_ID, MAX_SEED, MAX_WORLD_SCENES, Settings, check_option_types, round_dirname
from lvlm_studio.evaluation import (
    POPE_STRATEGIES,
    evaluation_pairs,
    evaluation_set_label,
    no_mentions_note,
    round_evaluations,
)
from lvlm_studio.io import (
    DEFAULT_PROMPT,
    EXPORT_FORMATS,
    IMPORT_FORMATS,
    check_name,
    check_text,
    refuse_image_token,
    stored_image,
)
from lvlm_studio.store import BASE_ROUND_ID, REVIEWER_MAX_CHARS, NotFoundError, Store, live_decisions

METHODS = ("csr", "povid", "stic")
REVIEW_DECISIONS = ("accept", "swap", "reject_both", "edit")
ROLES = ("admin", "reviewer")
WORLD_DATASET = "shapesworld"
# Decisions that overrule the automatic label (an edit rewrites the chosen answer: the automatic
# chosen was not good enough as it stood).
OVERRIDES = ("swap", "reject_both", "edit")

ProgressFn = Callable[[int, int, str], None]

# STIC's step-by-step prompt asks about mood, weather and people: words a ShapesWorld model has never
# seen (its tokenizer is word-level over the world's words). For world items the studio uses prompts
# in the world's own words: the chosen side is the plain describe prompt on the clean image, the
# misleading side invites objects that are not drawn ("next to it"), the corrupted-image side is
# STIC's branch (b) unchanged. Overridable through ``params``.
WORLD_STIC_PROMPTS: dict[str, Any] = {
    "good_prompt": "Describe the image.",
    "plain_prompt": "Describe the image.",
    "misleading_prompts": (
        "Describe the image and the objects next to it.",
        "Describe the image and what objects can be next to it.",
    ),
}

# CSR on world items scored by the demo CLIP (the setting benchmarks/demo_loop.py measures; every
# key is overridable through ``params``; other CLIPs and non-world items get CSRConfig's defaults):
# - a ceiling on the answer score's centring point, in that CLIP's scale (CSRConfig.baseline_cap:
#   without it the chosen side names fewer objects each round; 3 seeds: recall drops at most 0.6
#   points by round 3 with today's defaults (README), 3.3-13.1 points without the cap (docs/EXPERIMENTS.md));
# - the yes/no questions each CSR pair implies, the "no" side filled with objects the winner never
#   names (existence_pairs, existence_unnamed: the world's describe prompt asks for every object, so
#   an unnamed object is absent; the captions-only prompt set otherwise lets yes/no answers drift:
#   POPE F1 0.003-0.019 below the base by round 3 without them (docs/EXPERIMENTS.md), with them
#   0.021-0.044 above it in every round on all three seeds (README));
# - no SFT term on chosen answers with a sentence rewarded below 33 (sft_min_reward, in that CLIP's
#   scale: later rounds' chosen captions hallucinate more than the model's greedy ones, and
#   imitating them made round 3 rise on seeds 0 and 2; docs/EXPERIMENTS.md).
WORLD_CSR_PARAMS: dict[str, Any] = {"baseline_cap": 27.5, "existence_pairs": True, "existence_unnamed": True,
                                    "sft_min_reward": 33.0}
DEMO_SEED_KEY = "demo_seed"  # studio_meta: seed_demo's plan ({seed, splits, pairs_per_method, items, done})


# ---- method names ------------------------------------------------------------------------------
class UnknownMethodError(ValueError):
    """A method name no generator has and no pair carries: a typo, not "nothing to train"."""


def seed_announcement(report: dict) -> str | None:
    """The line ``app.py`` and ``serve`` print after ``Studio.seed_demo`` on start-up; None when
    the start seeded nothing (every start but the first)."""
    if not (report["items"] or any(report["pairs"].values())):
        return None
    return f"LVLM Studio: {report['message']} ({report['items']} items, pairs {report['pairs']})"


def check_methods(store: Any, names: Iterable[str] | None) -> None:
    """Refuse method names the store does not know, naming those it does: the three generators,
    then every other method its pairs carry (an import names its own)."""
    if names is None:
        return
    if isinstance(names, str) or not isinstance(names, Iterable):  # "csr" would be 'c', 's', 'r'
        raise ValueError(f"methods are a list of names, not {type(names).__name__}")
    names = list(names)
    if not names:  # an explicit empty list used to mean every method
        raise ValueError("no method named: name at least one, or leave methods unset for every method")
    known = list(dict.fromkeys([*METHODS, *store.method_names()]))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UnknownMethodError(f"unknown method {', '.join(map(repr, unknown))}; "
                                 f"the store's methods: {', '.join(known)}")


# ---- users and roles ---------------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    name: str
    password: str | None
    role: str


def parse_users(spec: str | None) -> dict[str, User]:
    """Accounts from ``"alice:pw:admin,bob:pw:reviewer"``, a JSON string, or a path to a JSON file.

    JSON: ``{"alice": {"password": "pw", "role": "admin"}}`` or
    ``[{"name": "alice", "password": "pw", "role": "admin"}]``. The role defaults to reviewer.
    """
    if spec is None or not str(spec).strip():
        return {}
    spec = str(spec).strip()
    data: Any = None
    if spec[0] in "[{":
        data = json.loads(spec)
    elif spec.endswith(".json") or Path(spec).is_file():
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"users file {spec!r} does not exist")
        data = json.loads(path.read_text(encoding="utf-8"))
    users: dict[str, User] = {}
    if data is None:
        for entry in spec.split(","):
            entry = entry.strip()
            if not entry:
                continue
            parts = entry.split(":")
            if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
                raise ValueError(f"bad user entry {entry!r}: expected name:password[:role]")
            role = parts[2] if len(parts) == 3 and parts[2] else "reviewer"
            users[parts[0]] = User(parts[0], parts[1], role)
    else:
        if isinstance(data, dict):
            data = [{"name": k, **(v if isinstance(v, dict) else {"password": v})} for k, v in data.items()]
        if not isinstance(data, list):
            raise ValueError(f"users JSON is an object or a list of accounts, not {type(data).__name__}")
        for rec in data:
            if not isinstance(rec, dict):
                raise ValueError(f"a user entry is an object with name, password and role, not {rec!r}")
            name = rec.get("name") or rec.get("username")
            if not name:
                raise ValueError(f"user entry without a name: {rec!r}")
            for key in ("name", "username", "password", "role"):
                if rec.get(key) is not None and not isinstance(rec[key], str):
                    raise ValueError(f"user {name!r}: {key} is text, not {type(rec[key]).__name__}")
            users[name] = User(name, rec.get("password"), rec.get("role") or "reviewer")
    for user in users.values():
        if user.role not in ROLES:
            raise ValueError(f"user {user.name!r}: unknown role {user.role!r}; expected one of {ROLES}")
        try:  # an account name is the reviewer name its decisions are stored under
            _reviewer(user.name)
        except ValueError as exc:
            raise ValueError(f"user {str(user.name)[:40]!r}: {exc}") from None
    return users


def users_from_env() -> dict[str, User]:
    return parse_users(os.environ.get("LVLM_STUDIO_USERS") or os.environ.get("LVLM_STUDIO_USERS_FILE"))


def admins_from_env() -> set[str]:
    return {a.strip() for a in os.environ.get("LVLM_STUDIO_ADMINS", "").split(",") if a.strip()}


# ---- agreement statistics ----------------------------------------------------------------------


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float | None:
    """Cohen's κ of two raters' labels on the same items. None without items; 1.0 when both
    raters use one and the same category throughout (perfect, chance agreement undefined)."""
    if len(a) != len(b):
        raise ValueError("both raters need a label for every item")
    n = len(a)
    if n == 0:
        return None
    po = sum(x == y for x, y in zip(a, b, strict=True)) / n
    ca, cb = Counter(a), Counter(b)
    pe = sum(ca[k] * cb[k] for k in set(ca) | set(cb)) / (n * n)
    if pe >= 1.0:
        return 1.0 if po >= 1.0 else 0.0
    return (po - pe) / (1 - pe)


def fleiss_kappa(ratings: Iterable[Sequence[str]]) -> float | None:
    """Fleiss' κ over items each rated by ≥ 2 raters (the number of raters may vary per item:
    P_i uses each item's own n_i; p_j pools all ratings). None when no item has 2 ratings."""
    rows = [list(r) for r in ratings if len(r) >= 2]
    if not rows:
        return None
    total = sum(len(r) for r in rows)
    pooled = Counter(x for r in rows for x in r)
    p_bar = 0.0
    for r in rows:
        n_i = len(r)
        counts = Counter(r)
        p_bar += (sum(c * c for c in counts.values()) - n_i) / (n_i * (n_i - 1))
    p_bar /= len(rows)
    pe = sum((c / total) ** 2 for c in pooled.values())
    if pe >= 1.0:
        return 1.0 if p_bar >= 1.0 else 0.0
    return (p_bar - pe) / (1 - pe)


def margin_buckets(margins: Sequence[float], k: int = 4) -> list[list[float]]:
    """Split the finite margins, sorted, into up to ``k`` equal-count buckets (margin scales differ
    per method and reward mode, so fixed edges would put everything in one bucket). Equal margins
    stay in one bucket (CSR's yes/no pairs share their caption pair's margin): a cut that would
    split them moves past them, so there can be fewer than ``k`` buckets."""
    vals = sorted(m for m in margins if m is not None and math.isfinite(m))
    n = len(vals)
    k = max(1, min(k, n))
    cuts: list[int] = []
    for i in range(1, k):
        c = i * n // k
        while 0 < c < n and vals[c - 1] == vals[c]:
            c += 1
        if 0 < c < n and (not cuts or c > cuts[-1]):
            cuts.append(c)
    bounds = [0, *cuts, n]
    return [vals[lo:hi] for lo, hi in zip(bounds, bounds[1:], strict=False)] if n else []


# ---- the studio --------------------------------------------------------------------------------


class Studio:
    """One data root: store, models, jobs. Safe to share between Gradio handler threads."""

    def __init__(
        self,
        settings: Settings | None = None,
        users: dict[str, User] | None = None,
        admins: Iterable[str] | None = None,
    ):
        self.settings = (settings or Settings()).ensure_dirs()
        self.store = Store(self.settings.db_path)
        self.store.ensure_base_round(self.settings.model)
        self.users = users_from_env() if users is None else dict(users)
        self.admins = admins_from_env() if admins is None else set(admins)
        self._extractors: dict[str, Any] = {}  # object extractors by name, built on first use
        self._vllm_rounds: dict[tuple[str, int], tuple[str, str]] = {}  # (model, adapter) per (base, round)

    # ---------------------------------------------------------------- roles
    @property
    def auth_enabled(self) -> bool:
        return bool(self.users)

    @property
    def open_mode(self) -> bool:
        """No accounts and no admin list: everyone may do everything."""
        return not self.users and not self.admins

    def check_password(self, username: str, password: str) -> bool:
        import hmac

        user = self.users.get(username)
        if user is None or user.password is None:
            return False
        return hmac.compare_digest(user.password.encode(), (password or "").encode())

    def role(self, user: str | None) -> str:
        if self.open_mode:
            return "admin"
        if user and user in self.admins:
            return "admin"
        if user and user in self.users:
            return self.users[user].role
        return "reviewer" if user else "anonymous"

    def require_admin(self, user: str | None, action: str) -> None:
        role = self.role(user)
        if role != "admin":
            if not user:
                raise PermissionError(f"{action} needs the admin role: sign in as an admin (no user was given)")
            raise PermissionError(f"{action} needs the admin role; {user!r} has the {role} role")

    def require_model_choice(self, model: str | None, user: str | None) -> None:
        """In the app, a model other than the studio's own (``demo``, ``LVLM_STUDIO_MODEL``) is an
        admin's choice: a typed path would let anyone probe which paths exist on the server (as an
        import from a path would), a Hub id make the server download any model. The CLI trusts its
        shell and does not ask."""
        if model and model.strip() not in ("demo", self.settings.model):
            self.require_admin(user, f"generating with a model other than {self.settings.model!r}")

    def auth_summary(self) -> str:
        if self.open_mode:
            return "open mode: no accounts configured"
        # Counts, not names: the header is shown before anyone signs in.
        admins = sum(u.role == "admin" for u in self.users.values()) + len(self.admins - set(self.users))
        if not self.users:
            return f"sign-in required (Hugging Face); {admins} admin(s) by name"
        return f"accounts on: {len(self.users)} ({admins} admin)"

    # ---------------------------------------------------------------- data in/out
    def _ingested(self, source: Any, name: str | None, source_label: str,
                  objects: list | None = None) -> contextlib.AbstractContextManager[str]:
        """``io.stored_image`` on this studio's store: the image's file, row and whatever the body
        adds, or none of them. Yields the image id."""
        return stored_image(self.store, self.settings, source, name=name, source_label=source_label,
                            objects=objects)

    def upload_images(
        self, paths: Sequence[str | Path], prompt: str = DEFAULT_PROMPT,
        dataset: str = "uploads", split: str = "train", progress: ProgressFn | None = None,
    ) -> dict:
        """Ingest image files (validated by media.py) and make one item per image."""
        from lvlm_studio.media import ImageRejected

        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("a prompt is needed for the uploaded images' items")  # before any image is stored
        check_text(prompt, "the prompt")  # the import's bounds: a page-long prompt bloats every view of it
        for name, value in (("dataset", dataset), ("split", split)):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"the uploaded images' items need a {name} name, not {value!r}")
            check_name(value, f"the {name} name")
        added, rejected = [], []
        for done, path in enumerate(paths, 1):
            try:
                with self._ingested(path, Path(path).name, "upload") as image_id:  # the image with its item, or neither
                    added.append(self.store.add_item(image_id, prompt, dataset=dataset, split=split))
            except ImageRejected as exc:
                rejected.append({"file": Path(path).name, "reason": exc.reason})  # the file is named beside
            if progress is not None:
                progress(done, len(paths), f"{done}/{len(paths)} images")
        return {"items": added, "rejected": rejected}

    def import_path(self, path: str | Path, kind: str = "auto", dataset: str | None = None,
                    split: str | None = None, user: str | None = None, **kw: Any) -> dict:
        """Import an image folder, COCO JSON, JSONL, LLaVA / LLaMA-Factory JSON or a saved HF
        dataset (io.py) from a path on the server; admin only (``user``), since it reads any file
        the server can (in open mode everyone is an admin). ``kw`` go to ``io.import_path``
        (``progress`` included). Returns the ImportReport as a dict."""
        from lvlm_studio import io

        self.require_admin(user, "importing from a path on the server")
        report = io.import_path(self.store, self.settings, path, kind or "auto", dataset=dataset or None,
                                split=split or None, **kw)
        return report.to_dict()

    def export(self, fmt: str, out: str | Path | None = None, methods: Sequence[str] | None = None,
               include_auto: bool = False, round: int | None = None, zip_: bool = False) -> dict:
        """Export training pairs (effective labels applied) as TRL, LLaVA JSON or LLaMA-Factory.
        ``zip_``: also pack the export folder into one .zip (for a browser download)."""
        from lvlm_studio import io

        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")
        check_methods(self.store, methods)
        if out is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            # Two exports in one second from one worker thread must not collide: a random suffix.
            out = self.settings.home / "exports" / f"{fmt}-{stamp}-{uuid.uuid4().hex[:8]}"
        report = io.export_pairs(self.store, fmt, out, methods=list(methods) if methods else None,
                                 include_auto=include_auto, round=round).to_dict()
        if zip_:
            import shutil

            report["zip"] = shutil.make_archive(str(report["path"]), "zip", root_dir=report["path"])
        return report

    def stats(self) -> dict:
        return self.store.stats()

    # ---------------------------------------------------------------- the demo world
    @staticmethod
    def demo_artifacts_present() -> bool:
        root = Path(__file__).parent / "world" / "artifacts"
        return (root / "vlm" / "config.json").is_file() and any((root / "clip").glob("*"))

    def seed_demo(
        self, n_train: int = 24, n_test: int = 24, pairs_per_method: int = 2, seed: int = 0,
        progress: ProgressFn | None = None, top_up: bool = False,
    ) -> dict:
        """The demo world for a newcomer: ShapesWorld items (train/test, describe + POPE probes)
        and, when the demo models ship, a few pairs per method, so the Review tab has real pairs
        at once. Cheap once done: ``app.py`` and ``serve`` call it on every start.

        The first call on a data root records a plan in the store (``studio_meta``): scenes for
        each split that holds no world items yet (an earlier ``eval`` may have filled the test
        split) and pairs when the store holds none; a data root that already holds world items
        and pairs (seeded before plans were recorded) gets an empty plan. A call interrupted
        half-way (Ctrl-C, a crash) leaves the plan open and the next call carries it out, items
        and pairs already made being skipped; once it ran through, later calls do nothing.
        ``top_up`` (the CLI's ``demo seed``): also add the missing scenes ``0..n-1`` of ``seed`` to
        each split, and demo pairs to a store that holds none although an earlier seeding asked
        for none. One process seeds at a time (a lock file in the data root)."""
        from lvlm_studio.config import data_root_lock

        counts = {name: whole_number(value, name, high=high) for name, value, high in
                  (("n_train", n_train, MAX_WORLD_SCENES), ("n_test", n_test, MAX_WORLD_SCENES),
                   ("pairs_per_method", pairs_per_method, MAX_ID))}
        seed = whole_number(seed, "seed", high=MAX_SEED)
        report: dict[str, Any] = {"items": 0, "pairs": {}, "message": ""}
        with data_root_lock(self.settings, ".seed.lock"):
            recorded = self.store.get_meta(DEMO_SEED_KEY)
            if (top_up and recorded and recorded["done"] and not any((recorded.get("items") or {}).values())
                    and counts["pairs_per_method"] and self.store.count_pairs() == 0):
                # the first seeding paired no item (`--pairs 0`, or no train scenes yet) and the
                # store still holds no pair: `demo seed --pairs N` plans them now
                recorded = None
            plan = recorded or self._demo_plan(counts, seed)
            if top_up:
                for split in ("train", "test"):
                    if counts[f"n_{split}"]:
                        report["items"] += self.ensure_world_items(split, counts[f"n_{split}"], seed,
                                                                   progress=progress)["added"]
            if plan["done"]:
                report["message"] = ("the demo world was seeded before" if recorded else
                                     f"nothing to seed ({plan['no_pairs_because']})")
                return report
            self._carry_out(plan, report, progress)
        if not any((plan.get("items") or {}).values()):
            why = ("no train-split scene to pair: a later `demo seed --train N` pairs some" if plan["pairs_per_method"]
                   else plan.get("no_pairs_because", "no pairs planned"))
            report["message"] = f"seeded demo items only ({why})"
        elif not self.demo_artifacts_present():
            report["message"] = ("demo model artifacts are missing: seeded items and POVID text pairs only "
                                 "(run `lvlm-studio demo build` for CSR, STIC and POVID noisy-image pairs)")
        else:
            report["message"] = "seeded demo items and pairs"
        return report

    def _demo_plan(self, counts: dict[str, int], seed: int) -> dict:
        """seed_demo's plan for this data root, recorded before any work so an interruption resumes it."""
        has_pairs = self.store.count_pairs() > 0
        if has_pairs and self.store.count_items(dataset=WORLD_DATASET) > 0:
            plan = {"seed": seed, "splits": {}, "pairs_per_method": 0, "done": True,
                    "no_pairs_because": "the store already held world items and pairs"}
        else:
            plan = {"seed": seed, "done": False,
                    "splits": {split: counts[f"n_{split}"] for split in ("train", "test") if counts[f"n_{split}"]
                               and self.store.count_items(dataset=WORLD_DATASET, split=split) == 0},
                    "pairs_per_method": 0 if has_pairs else counts["pairs_per_method"],
                    "no_pairs_because": "the store already held pairs" if has_pairs else "no pairs asked for"}
        self.store.set_meta(DEMO_SEED_KEY, plan)
        return plan

    def _carry_out(self, plan: dict, report: dict, progress: ProgressFn | None) -> None:
        """Do what the plan says, skipping what an interrupted call already did; then mark it done."""
        for split, n in plan["splits"].items():
            report["items"] += self.ensure_world_items(split, n, plan["seed"], progress=progress)["added"]
        present = self.demo_artifacts_present()
        if plan["pairs_per_method"] and "items" not in plan:  # which items each method pairs, fixed once
            ppm = plan["pairs_per_method"]
            describe = [it["id"] for it in self._describe_items(split="train")]
            # POVID's text side needs no model: without the demo models a newcomer still sees real pairs.
            plan["items"] = ({m: describe[k * ppm:(k + 1) * ppm] for k, m in enumerate(METHODS)} if present
                             else {"povid": describe[:3 * ppm]})
            self.store.set_meta(DEMO_SEED_KEY, plan)
        for method, ids in (plan.get("items") or {}).items():
            if not ids:
                continue
            params = _DEMO_SEED_PARAMS.get(method) if present else {"make_image_rejected": False}
            res = self.generate(method, model="demo", item_ids=ids, seed=plan["seed"], params=params,
                                progress=progress)
            report["pairs"][method] = res["pairs"]
            if res.get("existence_pairs"):  # CSR's yes/no pairs, on their own question items
                report["existence_pairs"] = res["existence_pairs"]
        plan["done"] = True
        self.store.set_meta(DEMO_SEED_KEY, plan)

    def _describe_items(self, dataset: str | None = WORLD_DATASET, split: str | None = None) -> list[dict]:
        return [it for it in self.store.list_items(dataset=dataset, split=split)
                if ((it.get("meta") or {}).get("kind") or "describe") == "describe"]

    # ---------------------------------------------------------------- models
    def _round_adapter(self, round_id: int | None) -> str | None:
        if not round_id:
            return None
        rnd = self.store.get_round(whole_number(round_id, "round"))
        if rnd is None:
            raise ValueError(f"round {round_id} does not exist")
        if rnd.get("status") != "done" or not rnd.get("adapter_path"):
            raise ValueError(f"round {round_id} has no finished adapter (status {rnd.get('status')})")
        return rnd["adapter_path"]

    def backend(self, model: str = "demo", round_id: int | None = None) -> Any:
        """A loaded backend (models/registry caches it per ref + adapters). A round's model is the
        base + every adapter of its lineage, in order: the hf backend takes the whole chain (merged
        into float32 weights, stacked beside bf16 or quantized ones, as training holds a round's
        parents); vLLM takes one adapter (``_vllm_round``)."""
        from lvlm_studio import jobs
        from lvlm_studio.models.registry import load_backend

        adapter: str | list[str] | None = self._round_adapter(round_id)
        if adapter is not None:
            # the chain, checked to be trained on this model (a changed LVLM_STUDIO_MODEL is refused)
            adapter = jobs.adapter_lineage(self.store, int(round_id), model)
            if self.settings.backend == "vllm":
                model, adapter = self._vllm_round(model, int(round_id))
        return load_backend(model, backend=self.settings.backend, device=self.settings.device, adapter=adapter)

    def _vllm_round(self, model: str, round_id: int) -> tuple[str, str]:
        """(model, adapter) vLLM serves for a round; it applies one LoRA adapter, unmerged. From round
        2 on that adapter is the round's whole chain concatenated into one (``chains/round-N``, built
        once: exactly the sum of the updates, so vLLM adds them as training and the hf backend do).
        A chain that cannot be one adapter (its rounds adapt different modules, or its summed rank is
        above vLLM's largest) falls back to the parent chain merged into a saved model, which vLLM
        loads in its dtype, and the round's own adapter on top."""
        from lvlm_studio import jobs
        from lvlm_studio.models.lora import lora_rank
        from lvlm_studio.models.vllm_backend import vllm_lora_rank
        from lvlm_studio.training import chain_adapter

        if (model, round_id) in self._vllm_rounds:  # decided once (a refused chain is read whole)
            return self._vllm_rounds[model, round_id]
        chain = jobs.adapter_lineage(self.store, round_id)
        if len(chain) == 1:
            return model, chain[0]
        try:
            vllm_lora_rank(sum(lora_rank(a) for a in chain))
            served = model, str(chain_adapter(chain, self.settings.home / "chains" / round_dirname(round_id)))
        except ValueError as exc:
            warnings.warn(f"round {round_id}'s adapters cannot be served as one ({exc}): vLLM gets its parent "
                          "rounds merged into a saved model", stacklevel=2)
            served = self._merged_parent(model, round_id), chain[-1]
        self._vllm_rounds[model, round_id] = served
        return served

    def _merged_parent(self, model: str, round_id: int) -> str:
        """``model`` when the round's parent is the base model, else a saved directory holding the
        base with the parent chain merged (written once, atomically, by training.py)."""
        from lvlm_studio import jobs

        rnd = self.store.get_round(round_id)
        chain = jobs.adapter_lineage(self.store, rnd["parent_id"]) if rnd and rnd.get("parent_id") else []
        if not chain:
            return model
        out = self.settings.home / "merged" / round_dirname(rnd["parent_id"])
        if not (out / "config.json").is_file():
            from lvlm_studio.training import materialize_round_model

            out.parent.mkdir(parents=True, exist_ok=True)
            materialize_round_model(jobs.resolve_model_path(model), chain, out_dir=out, device="cpu")
        return str(out)

    def clip(self) -> Any:
        from lvlm_studio.models.registry import load_clip

        return load_clip(self.settings.clip, device=self.settings.device)

    # ---------------------------------------------------------------- generation
    def generate(
        self,
        method: str,
        model: str = "demo",
        round: int | None = None,
        item_ids: Sequence[int] | None = None,
        dataset: str | None = None,
        split: str | None = None,
        n: int | None = None,
        params: dict | None = None,
        seed: int = 0,
        progress: ProgressFn | None = None,
    ) -> dict:
        """Build pairs with ``method`` for the chosen items and store them with provenance.

        Resumable: items that already have pairs for (method, round) are skipped, also those another
        run stores while this one generates (checked again under the write lock). Each item's
        candidates and pairs are written in one transaction (``store.write_generation``), so an
        interrupted run leaves whole items only. ``round``: the trained round whose adapter
        generates (None/0 = the base model); it is also the round the pairs belong to.
        """
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
        params = _checked_params(method, params)
        _check_names(model=model, dataset=dataset, split=split)
        if not model or not model.strip():
            raise ValueError("model is needed: demo, a local folder or a Hugging Face model id")
        round_id = whole_number(round or 0, "round")
        seed = whole_number(seed, "seed", high=MAX_SEED)
        if n is not None:
            n = whole_number(n, "n", low=-MAX_ID)
            if n < 1:
                raise ValueError(f"n must be at least 1 (or unset for every item), not {n}")
        # Checked before any item: a method that loads no model (POVID's text pairs) would otherwise
        # tag its pairs with a round that does not exist or never finished.
        self._round_adapter(round_id)
        if item_ids is not None:
            items = self._items_by_id(item_ids)
            if not items:  # an explicit empty list is not "every item"
                raise ValueError("item_ids is empty: name at least one item, or leave it unset for a dataset/split")
        else:
            items = self._describe_items(dataset=dataset, split=split)
            if not items:
                raise ValueError(f"no items to generate for: dataset {dataset or 'any'!r}, split {split or 'any'!r} "
                                 "holds no describe items (import or seed some first)")
        done = self.store.items_with_pairs(method, round_id)
        todo = [it for it in items if it["id"] not in done]
        if n is not None:
            todo = todo[:n]
        skipped = len(items) - len(todo) if n is None else len([it for it in items if it["id"] in done])
        report = {"method": method, "round": round_id, "items": len(todo), "skipped": skipped,
                  "pairs": 0, "no_pair": 0, "seconds": 0.0}
        if not todo:
            if method != "povid" or params.get("make_image_rejected", True):  # a run that would load it
                from lvlm_studio.models.registry import check_model_ref

                check_model_ref(model)  # a bogus id used to 'succeed' with nothing to do
            return report
        t0 = time.perf_counter()
        runner = {"csr": self._gen_csr, "povid": self._gen_povid, "stic": self._gen_stic}[method]
        runner(model, round_id, todo, dict(params or {}), seed, report, progress)
        report["seconds"] = round_(time.perf_counter() - t0)
        if report.get("unreadable_items"):
            ids = report["unreadable_items"]
            _add_note(report, f"{len(ids)} item(s) skipped because their stored image can no longer be read (changed or "
                              f"damaged on disk since the import; items {', '.join(map(str, ids[:10]))}"
                              f"{', …' if len(ids) > 10 else ''}): they are not marked done")
        if report["no_pair"]:
            _add_note(report, f"{report['no_pair']} item(s) gave no pair ({_NO_PAIR_WHY[method]}); they are not marked "
                              "done, so the next run tries them again: another seed or other parameters may pair them")
        return report

    def _prov(self, method: str, model: str, round_id: int, params: dict, seed: int) -> dict:
        return {"model": model, "round": round_id, "params": {"method": method, **params}, "seed": seed}

    @staticmethod
    def _readable(chunk: list[dict], report: dict) -> list[tuple[dict, Any]]:
        """The chunk's items with their images, read as training reads them (``media.load_image``:
        transparency over white). An item whose stored image can no longer be read (changed or
        damaged on disk since its import) is counted in the report and left for a later run, instead
        of ending the run with it."""
        from lvlm_studio.media import ImageRejected, load_image

        readable = []
        for it in chunk:
            try:
                readable.append((it, load_image(it["image_path"])))
            except ImageRejected:
                report.setdefault("unreadable_items", []).append(it["id"])
        return readable

    def _world_defaults(self, items: list[dict], params: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
        """``params`` plus the ``defaults`` it does not set, when every item is a world item."""
        if items and all(self._is_world(it) for it in items):
            return {**defaults, **params}
        return dict(params)

    def _is_world(self, item: dict) -> bool:
        return item.get("dataset") == WORLD_DATASET or (item.get("image_source") == WORLD_DATASET)

    def _write(self, item: dict, candidates: list[dict], pairs: list[dict], report: dict) -> bool:
        """Store an item's result; False when it gave no pair, or when another run (the app and the
        CLI, two app workers) paired the item for this method and round while this one generated:
        the check is made under the store's write lock, so an item never gets its pairs twice."""
        if not pairs:
            report["no_pair"] += 1
            return False
        if self.store.write_generation(item["id"], _asked_under(candidates), pairs, only_if_unpaired=True) is None:
            report["skipped"] += 1
            report["items"] -= 1
            return False
        report["pairs"] += len(pairs)
        return True

    def _gen_csr(self, model, round_id, items, params, seed, report, progress) -> None:
        from lvlm_studio.methods.csr import (
            CSRConfig,
            csr_generation_record,
            fit_for_sft,
            min_sentence_reward,
            run_csr,
        )

        world = WORLD_CSR_PARAMS if self.settings.clip == "demo" else {}
        config = CSRConfig(**{"seed": seed, **self._world_defaults(items, params, world)})
        backend, scorer = self.backend(model, round_id), self.clip()
        prov = self._prov("csr", model, round_id, csr_generation_record(config), seed)
        step = max(1, config.item_batch)
        for lo in range(0, len(items), step):
            readable = self._readable(items[lo:lo + step], report)
            chunk = [it for it, _ in readable]
            inputs = [(image, it["prompt"], it["image_id"], item_seed(seed, it)) for it, image in readable]
            results = run_csr(backend, scorer, inputs, config) if inputs else []
            for it, res in zip(chunk, results, strict=True):
                if not res.has_pair:
                    report["no_pair"] += 1
                    continue
                cands = []
                for idx in (res.chosen, res.rejected):
                    c = res.candidates[idx]
                    cands.append({"text": c.text, "source": "csr", "sentences": c.sentences,
                                  "score": c.score, **prov,
                                  "params": {**prov["params"], "finish_reason": c.finish_reason}})
                best = res.candidates[res.chosen]
                meta = {"n_candidates": len(res.candidates), "model": model, "seed": seed,
                        "stats": _jsonable(res.stats), "chosen_min_reward": min_sentence_reward(best)}
                fit = fit_for_sft(best, config)
                if fit is not None:
                    meta["sft"] = fit
                pair = {"chosen": 0, "rejected": 1, "method": "csr", "margin": res.margin,
                        "round": round_id, "meta": meta}
                # The caption pair and the yes/no pairs it implies land together: a resumed run
                # skips an item that has its pair, so they must not be split by an interruption.
                with self.store.transaction():
                    if self._write(it, cands, [pair], report) and config.existence_pairs:
                        self._write_existence_pairs(it, res, config, prov, round_id, seed, report)
            if progress:
                progress(min(lo + step, len(items)), len(items), f"CSR: {min(lo + step, len(items))}/{len(items)} items")
        if report.get("existence_on_probes"):
            _add_note(report, f"{report['existence_on_probes']} yes/no pair(s) left out: their question is an "
                              "evaluation probe of the item's set (lvlm-studio pope)")

    def _write_existence_pairs(self, item, res, config, prov, round_id, seed, report) -> None:
        """Store the yes/no pairs a CSR pair implies (``CSRConfig.existence_pairs``), each on a
        question item of the same image; resumable like the caption pairs (one item each)."""
        from lvlm_studio.methods.csr import existence_pairs

        extractor = self._extractor(item)
        derived = existence_pairs(res.candidates[res.chosen], res.candidates[res.rejected], extractor.extract,
                                  config, seed=seed + int(item["id"]), threshold=res.stats.get("reward_baseline"),
                                  vocabulary=extractor.vocabulary)
        done = self.store.items_with_pairs("csr", round_id) if derived else set()
        for ep in derived:
            held = self.store.find_item(item["image_id"], ep.question, item.get("dataset") or "default")
            if held is not None and (held.get("meta") or {}).get("pope_seed") is not None:
                # An evaluation probe `pope` added (same question, same image): never a training pair.
                report["existence_on_probes"] = report.get("existence_on_probes", 0) + 1
                continue
            qid = self.store.add_item(item["image_id"], ep.question, dataset=item.get("dataset") or "default",
                                      split=item.get("split") or "train",
                                      meta={"kind": "csr_existence", "object": ep.object, "from_item": item["id"]})
            if qid in done:
                continue
            cands = [{"text": text, "source": "csr_existence", **prov} for text in (ep.chosen, ep.rejected)]
            pair = {"chosen": 0, "rejected": 1, "method": "csr", "margin": res.margin, "round": round_id,
                    "meta": {"derived": "existence", "object": ep.object, "from_item": item["id"], "seed": seed}}
            self.store.write_generation(qid, _asked_under(cands), [pair])
            report["existence_pairs"] = report.get("existence_pairs", 0) + 1

    def _extractor(self, item: dict) -> Any:
        """The object extractor for an item's answers: ShapesWorld for world items, else COCO."""
        from lvlm_studio.evaluation import get_extractor

        name = "shapesworld" if self._is_world(item) else "coco"
        if name not in self._extractors:
            self._extractors[name] = get_extractor(name)
        return self._extractors[name]

    def _gen_povid(self, model, round_id, items, params, seed, report, progress) -> None:
        from lvlm_studio.methods import povid

        config = povid.POVIDConfig(**{"seed": seed, **params})
        usable = [it for it in items if (it.get("reference") or "").strip()]
        report["no_pair"] += len(items) - len(usable)
        backend = self.backend(model, round_id) if config.make_image_rejected else None
        vocabularies: dict[str | None, Any] = {}  # None: the world's; else a dataset's, built once
        sources: dict[str, str] = {}  # dataset -> where its co-occurrence came from

        def vocabulary(it: dict) -> Any:
            key = None if self._is_world(it) else (it.get("dataset") or "default")
            if key not in vocabularies:
                if key is None:
                    vocabularies[key] = self._world_vocabulary(povid)
                else:
                    vocabularies[key], sources[key] = self._dataset_vocabulary(povid, key)
            return vocabularies[key]

        step = max(1, config.batch_size)
        for lo in range(0, len(usable), step):
            chunk = usable[lo:lo + step]
            groups = [vocabulary(it) for it in chunk]
            # one call per vocabulary (world items use the world's words and co-occurrence prior)
            for vocab in {id(v): v for v in groups}.values():
                readable = self._readable([it for it, v in zip(chunk, groups, strict=True) if v is vocab], report)
                sub = [it for it, _ in readable]
                inputs = [povid.POVIDItem(image, it["prompt"], it["reference"], it["image_id"],
                                          list(it.get("objects") or []) or None, item_seed(seed, it))
                          for it, image in readable]
                results = povid.build_povid_pairs(backend, inputs, config, vocabulary=vocab) if inputs else []
                for it, res in zip(sub, results, strict=True):
                    cands, pairs = _povid_rows(res, model, round_id, seed, config)
                    self._write(it, cands, pairs, report)
            if progress:
                k = min(lo + step, len(usable))
                progress(k, len(usable), f"POVID: {k}/{len(usable)} items")
        if "object" in config.categories:
            report["povid_cooccurrence"] = dict(sorted(sources.items()))
            if uniform := [d for d, source in sorted(sources.items()) if source == "none"]:
                _add_note(report, f"POVID drew injected objects uniformly for dataset(s) {', '.join(uniform)}: no "
                                  "annotated image and no reference names two COCO objects, so there is no "
                                  "co-occurrence to pick a plausible absent object from (import object "
                                  "annotations, e.g. COCO instances, for the paper's co-occurring objects)")

    def _dataset_vocabulary(self, povid: Any, dataset: str) -> tuple[Any, str]:
        """POVID's vocabulary for an imported dataset and where its co-occurrence comes from: the
        default (COCO) words plus the dataset's own objects, with co-occurrence counted over its
        annotated images ("annotations"), so an injected object is one that co-occurs with the
        answer's objects (the paper's "co-occurring absent objects") rather than a uniform draw.
        A dataset without annotations counts the COCO objects its references name together
        ("references": a caption names fewer objects than an image holds, but the pairs it names
        are real co-occurrences). (None, "none") when neither gives a pair of objects: the
        injector then draws an absent object uniformly, and the run's report says so."""
        items = self.store.list_items(dataset=dataset)
        per_image = {it["image_id"]: set(map(str, it["objects"]))  # once per image, not per prompt
                     for it in items if it.get("objects")}
        source = "annotations"
        if not per_image:
            for it in items:  # COCO's extractor: the dataset is not the world's (vocabulary())
                if named := set(self._extractor(it).extract(it.get("reference") or "")):
                    per_image.setdefault(it["image_id"], set()).update(named)
            source = "references"
        sets = list(per_image.values())
        paired = any(len(objects) > 1 for objects in sets)
        if not paired and source == "references":
            return None, "none"
        vocab = povid.Vocabulary.from_object_sets(sets, objects=sorted(set(povid.COCO_OBJECTS).union(*sets)))
        return vocab, source if paired else "none"

    @staticmethod
    def _world_vocabulary(povid: Any) -> Any:
        """ShapesWorld words for POVID's injector: its 12 object categories, colours, sizes,
        positions (swapped for their opposites), and the train split's co-occurrence prior, so the
        injected object is the prior partner first, as the paper's "co-occurring absent objects"."""
        from lvlm_studio.world import vocab as wv

        cooc: dict[str, dict[str, int]] = {}
        for a, b in wv.PRIOR_PARTNERS.items():
            cooc.setdefault(a, {})[b] = 10
            cooc.setdefault(b, {})[a] = 10
        opposites = {"left": "right", "right": "left", "top": "bottom", "bottom": "top",
                     "small": "large", "large": "small"}
        return povid.Vocabulary(objects=list(wv.CATEGORIES), colours=list(wv.COLOURS), sizes=list(wv.SIZES),
                                counts=list(wv.COUNT_WORDS), relations=list(wv.POSITIONS),
                                opposites=opposites, cooccurrence=cooc, synonyms={})

    def _gen_stic(self, model, round_id, items, params, seed, report, progress) -> None:
        from lvlm_studio.methods import stic

        config = stic.STICConfig(**{"seed": seed, **self._world_defaults(items, params, WORLD_STIC_PROMPTS)})
        backend = self.backend(model, round_id)
        step = max(1, config.batch_size)
        for lo in range(0, len(items), step):
            readable = self._readable(items[lo:lo + step], report)
            chunk = [it for it, _ in readable]
            inputs = [(image, it["image_id"], item_seed(seed, it)) for it, image in readable]
            results = stic.build_stic_pairs(backend, inputs, config) if inputs else []
            for it, res in zip(chunk, results, strict=True):
                if not res.has_pair:
                    report["no_pair"] += 1
                    continue
                prov = {"model": model, "round": round_id, "score": None}
                cands = [
                    {"text": c.text, "source": c.source, "sentences": c.sentences, "seed": c.seed,
                     "params": _jsonable({**c.params, "config": dataclasses.asdict(config)}), **prov}
                    for c in (res.chosen, res.rejected)
                ]
                pair = {"chosen": 0, "rejected": 1, "method": "stic", "margin": None, "round": round_id,
                        "meta": {"kind": res.draw.get("branch"), "draw": _jsonable(res.draw), "model": model,
                                 "seed": seed, "pair_prompt": res.prompt}}
                self._write(it, cands, [pair], report)
            if progress:
                k = min(lo + step, len(items))
                progress(k, len(items), f"STIC: {k}/{len(items)} items")

    # ---------------------------------------------------------------- review
    def next_pair(self, reviewer: str, method: str | None = None, round: int | None = None,
                  status: str = "pending", exclude: Iterable[int] = ()) -> dict | None:
        """The next pair for ``reviewer`` (lowest automatic margin first), as a review view."""
        round_id = None if round in (None, "") else whole_number(round, "round")
        _check_names(method=method)
        reviewer = _reviewer(reviewer)
        pair = self.store.next_pair(reviewer, method=method or None, round=round_id,
                                    status=status, exclude=exclude)
        if pair is None and method:  # a misspelt method is an error, not an empty queue
            check_methods(self.store, [method])
        return None if pair is None else self._view(pair, reviewer)

    def get_pair(self, pair_id: int, reviewer: str | None = None) -> dict:
        pair = self.store.get_pair(whole_number(pair_id, "pair id"))
        if pair is None:
            raise NotFoundError(f"pair {pair_id} does not exist")
        return self._view(pair, _optional_reviewer(reviewer))

    def _view(self, pair: dict, reviewer: str | None) -> dict:
        """A pair ready for the Review tab: both candidates with their stored sentence/span
        records, the automatic label and margin, this reviewer's live decision."""
        mine = self.store.reviewer_decision(pair["id"], reviewer) if reviewer else None
        return {
            "pair_id": pair["id"], "item_id": pair["item_id"], "method": pair["method"],
            "round": pair["round"], "margin": pair["margin"], "prompt": pair["prompt"],
            "reference": pair.get("reference"), "image_path": pair["image_path"],
            "objects": pair.get("objects"), "meta": pair.get("meta") or {},
            "chosen": _cand_view(pair["chosen"]), "rejected": _cand_view(pair["rejected"]),
            "label": pair["label"], "my_decision": mine["decision"] if mine else None,
            "notes": self._notes(pair["id"]),
        }

    def _notes(self, pair_id: int) -> list[dict]:
        """Reviewers' notes on a pair, oldest first; a note is saved with its decision, so one whose
        decision was undone says so (it no longer explains the pair's label)."""
        reviews = self.store.pair_reviews(pair_id)
        live = {r["id"] for name in {r["reviewer"] for r in reviews}
                for r in live_decisions(r for r in reviews if r["reviewer"] == name)}
        return [{"reviewer": r["reviewer"], "decision": r["decision"], "note": r["note"], "undone": r["id"] not in live}
                for r in reviews if r.get("note")]

    def decide(self, pair_id: int, reviewer: str, decision: str, edited_text: str | None = None,
               note: str | None = None, marked_spans: list[dict] | None = None) -> dict:
        """Append one review decision (accept | swap | reject_both | edit)."""
        if not isinstance(decision, str) or decision not in REVIEW_DECISIONS:
            raise ValueError(f"unknown decision {str(decision)[:40]!r}; expected one of {', '.join(REVIEW_DECISIONS)}")
        pair_id = whole_number(pair_id, "pair id")
        reviewer = _reviewer(reviewer)
        edited_text = _text(edited_text, "the edited answer", EDIT_MAX_CHARS)
        note = _text(note, "a note", NOTE_MAX_CHARS)
        if decision == "edit" and not (edited_text or "").strip():
            raise ValueError("an edit needs the edited text")
        if decision == "edit":
            refuse_image_token(edited_text, "the edited answer")
            pair = self.store.get_pair(pair_id)
            # An edit keeps the pair's rejected side; training reads both without trailing whitespace.
            if pair is not None and edited_text.strip() == pair["rejected"]["text"].strip():
                raise ValueError("the edited answer is the rejected answer: the pair would teach nothing "
                                 "(reject both instead, or write the better answer)")
        review_id = self.store.add_review(pair_id, reviewer, decision,
                                          edited_text=edited_text if decision == "edit" else None,
                                          marked_spans=marked_spans, note=(note or None))
        return {"review_id": review_id, "pair_id": pair_id, "decision": decision,
                "label": self.store.effective_label(pair_id)}

    def undo(self, reviewer: str, pair_id: int | None = None) -> dict | None:
        """Cancel ``reviewer``'s latest live decision (on ``pair_id`` when given). None when there
        is nothing to undo."""
        reviewer = _reviewer(reviewer)
        if pair_id is not None:
            pair_id = whole_number(pair_id, "pair id")
        # Found and undone under one write lock: a decision the same reviewer makes in another tab
        # meanwhile is either the one undone or made after the undo, never skipped over.
        with self.store.transaction():
            if pair_id is None:
                pair_id = self.store.latest_decided_pair(reviewer)
                if pair_id is None:
                    return None
            elif self.store.reviewer_decision(pair_id, reviewer) is None:
                if self.store.get_pair(pair_id) is None:
                    raise NotFoundError(f"pair {pair_id} does not exist")
                return None
            review_id = self.store.add_review(pair_id, reviewer, "undo")
            return {"review_id": review_id, "pair_id": pair_id, "label": self.store.effective_label(pair_id)}

    def progress(self, reviewer: str | None = None, method: str | None = None) -> dict:
        _check_names(method=method)
        result = self.store.progress(_optional_reviewer(reviewer), method=method or None)
        if method and not result["total"]:  # a misspelt method is an error, not an empty count
            check_methods(self.store, [method])
        return result

    # ---------------------------------------------------------------- agreement
    def agreement(self, buckets: int = 4) -> dict:
        """Inter-reviewer agreement over live decisions and how often people overrule the
        automatic label, by automatic-margin bucket (low margin should be overruled more)."""
        matrix = self.store.decisions_matrix()
        by_reviewer: dict[str, dict[int, str]] = {}
        for pid, by in matrix.items():
            for reviewer, decision in by.items():
                by_reviewer.setdefault(reviewer, {})[pid] = decision
        reviewers = sorted(by_reviewer)
        pairwise = []
        for i, a in enumerate(reviewers):
            for b in reviewers[i + 1:]:
                shared = sorted(by_reviewer[a].keys() & by_reviewer[b].keys())
                if shared:
                    pairwise.append({"a": a, "b": b, "n": len(shared),
                                     "kappa": cohen_kappa([by_reviewer[a][p] for p in shared],
                                                          [by_reviewer[b][p] for p in shared])})
        multi = [list(by.values()) for by in matrix.values() if len(by) >= 2]
        # Override rate: the effective (latest live) decision of each reviewed pair, over every
        # method; by margin bucket over the pairs that have an automatic margin (CSR's; POVID's and
        # STIC's labels come from how the pair was made, with no margin).
        rows, by_method = [], {}
        for pair in self.store.reviewed_pair_labels():
            overruled = pair["decision"] in OVERRIDES
            by_method.setdefault(pair["method"], []).append(overruled)
            if pair["margin"] is not None:
                rows.append((pair["method"], float(pair["margin"]), overruled))
        decided = [o for outcomes in by_method.values() for o in outcomes]
        by_bucket = []
        rows.sort(key=lambda r: r[1])
        start = 0
        for bucket in margin_buckets([m for _, m, _ in rows], buckets):
            chunk = rows[start:start + len(bucket)]
            start += len(bucket)
            name = f"{bucket[0]:.3g}" if bucket[0] == bucket[-1] else f"{bucket[0]:.3g} – {bucket[-1]:.3g}"
            by_bucket.append({"bucket": name, "lo": bucket[0], "hi": bucket[-1],
                              "n": len(chunk), "override_rate": sum(o for _, _, o in chunk) / len(chunk)})
        return {
            "reviewers": reviewers,
            "cohen": pairwise,
            "cohen_kappa": pairwise[0]["kappa"] if len(reviewers) == 2 and pairwise else None,
            "fleiss_kappa": fleiss_kappa(multi),
            "items_multi_rated": len(multi),
            "override_by_margin": by_bucket,
            "override_rate": (sum(decided) / len(decided)) if decided else None,
            "override_pairs": len(decided),
            "override_by_method": {m: {"n": len(o), "override_rate": sum(o) / len(o)} for m, o in sorted(by_method.items())},
        }

    # ---------------------------------------------------------------- training rounds
    def reviewed_counts(self) -> dict[str, dict[str, int]]:
        """Per method: pairs, human-labelled pairs, and those usable for DPO (all but rejected-both);
        the three generators first, with zeros when the store holds none, then every other method
        the store's pairs carry (an import names its own). One grouped query: the Train tab polls
        it for its table and its methods box."""
        zero = {"pairs": 0, "reviewed": 0, "usable": 0}
        return {**{m: dict(zero) for m in METHODS}, **self.store.review_counts()}

    def method_names(self) -> list[str]:
        """The three generators, then every other method the store's pairs carry (an import names
        its own): ``reviewed_counts``' keys, without counting anything."""
        return list(dict.fromkeys([*METHODS, *self.store.method_names()]))

    def start_round(self, config: dict | None, user: str | None, parent_id: int | None = None) -> int:
        """Start a DPO round in a subprocess (jobs.py); admin only. ``config``: fields of
        ``training.DPORoundConfig`` (unknown keys raise); ``parent_id`` (or ``config["parent_id"]``):
        the round to continue from, default the current round. Returns the new round id."""
        self.require_admin(user, "starting a training round")
        from lvlm_studio import jobs

        cfg, parent = self._round_options(config)
        parent = parent_id if parent is None else parent
        parent = None if parent in (None, "") else whole_number(parent, "parent_id")
        return int(jobs.start_round(self.settings, cfg, parent_id=parent))

    def training_material_count(self, config: dict | None) -> int:
        """How many pairs (for a STIC stage-2 round: instruction items) a round with this config
        would train on, before balancing; ``jobs.JobError`` when there are none."""
        from lvlm_studio import jobs
        from lvlm_studio.training import DPORoundConfig

        cfg, _ = self._round_options(config)
        return len(jobs.training_material(self.store, DPORoundConfig.from_dict(cfg)))

    def _round_options(self, config: dict | None) -> tuple[dict, Any]:
        """(a round's options, its ``parent_id`` if the config names one). The options are checked
        against DPORoundConfig's field types, as the CLI's ``--config`` is: a JSON client's
        ``"num_epochs": "3"`` or ``"include_auto": "false"`` fails here with its name instead of
        training on what a truthy string happens to mean; a misspelt method is named here too."""
        from lvlm_studio.training import DPORoundConfig

        if config is not None and not isinstance(config, dict):
            raise ValueError(f"round options are a JSON object of name: value, not {type(config).__name__}")
        cfg = dict(config or {})
        parent = cfg.pop("parent_id", None)
        cfg = check_option_types(DPORoundConfig, cfg, "round option")
        check_methods(self.store, cfg.get("methods"))
        return cfg, parent

    def cancel_round(self, round_id: int, user: str | None, timeout: float = 30.0) -> dict | None:
        self.require_admin(user, "cancelling a training round")
        from lvlm_studio import jobs

        return jobs.cancel_round(self.settings, whole_number(round_id, "round"), timeout=timeout)

    def wait_round(self, round_id: int, timeout: float = 600.0) -> dict:
        from lvlm_studio import jobs

        return jobs.wait(whole_number(round_id, "round"), timeout=timeout, settings=self.settings)

    def reattach(self) -> Any:
        """After an app restart: mark rounds whose process died as failed, keep watching live ones."""
        from lvlm_studio import jobs

        return jobs.reattach(self.settings)

    def rounds(self) -> list[dict]:
        """Every round; an active round whose process is gone is marked failed on the way (as
        ``get_round`` does), so the app's tables and the CLI's ``rounds`` agree."""
        rows = self.store.list_rounds()
        if any(r["status"] in ("queued", "running") for r in rows):
            from lvlm_studio import jobs

            rows = jobs.refresh(self.settings)
        return rows

    def get_round(self, round_id: int) -> dict | None:
        """The round row; an active round whose process is gone is marked failed on the way."""
        round_id = whole_number(round_id, "round")
        row = self.store.get_round(round_id)
        if row is not None and row["status"] in ("queued", "running"):
            from lvlm_studio import jobs

            row = jobs.status(self.settings, round_id)
        return row

    def round_curve(self, round_id: int) -> list[dict]:
        return self.store.round_curve(whole_number(round_id, "round"))

    # ---------------------------------------------------------------- evaluation and compare
    def eval_items(self, n: int | None = None, kinds: Sequence[str] = ("describe", "pope"),
                   dataset: str = WORLD_DATASET, split: str = "test") -> list[dict]:
        items = [it for it in self.store.list_items(dataset=dataset, split=split)
                 if ((it.get("meta") or {}).get("kind") or "describe") in kinds]
        items = items[: int(n)] if n else items
        return [_eval_item(it) for it in items]

    def evaluate(self, round_id: int = BASE_ROUND_ID, n: int | None = None, model: str | None = None,
                 progress: ProgressFn | None = None, item_ids: Sequence[int] | None = None,
                 max_new_tokens: int | None = None, meta: dict | None = None) -> dict:
        """Answer the test split with a round's model; store answers (eval_outputs) and the
        metrics (CHAIR_s/CHAIR_i/recall, POPE) under the round's ``metrics["eval"]``.

        ``item_ids``: evaluate exactly these items (else the first ``n`` of the world's test
        split); ``max_new_tokens``: answer length (greedy either way); ``meta``: recorded beside
        the metrics (with the model reference) so a reader knows what was evaluated."""
        from lvlm_studio import evaluation

        round_id = whole_number(round_id, "round")
        if n is not None:
            n = whole_number(n, "the number of evaluation items") or None  # 0: every item, as eval_items reads it
        rnd = self.store.get_round(round_id)
        if rnd is None:
            raise NotFoundError(f"round {round_id} does not exist")
        items = self._eval_items_by_id(item_ids) if item_ids is not None else self.eval_items(n)
        if not items:  # an empty evaluation would replace the round's metrics with nothing
            raise ValueError("no items to evaluate" + ("" if item_ids is not None else
                             " (the world's test split holds none: lvlm-studio eval adds them)"))
        ref = self._evaluation_model(rnd, model)
        backend = self.backend(ref, round_id or None)
        # A round evaluated describe-then-respond by its job (STIC's stage 2) is evaluated so again:
        # its answers and metrics are replaced, and must stay comparable with the job's.
        describe_prompt = self._describe_prompt(rnd)
        from lvlm_studio.models.base import GenerationParams

        params = None
        # Unless given, a round is answered at the length its own job evaluated it with: a round
        # evaluated at 512 tokens re-evaluated at the default 64 would have its later
        # hallucinations cut off, and its stored figures replaced by those.
        own = (rnd.get("config") or {}).get("eval_max_new_tokens")
        max_new_tokens = max_new_tokens or (own if isinstance(own, int) and not isinstance(own, bool) else None)
        if max_new_tokens:
            params = GenerationParams(max_new_tokens=int(max_new_tokens), temperature=0.0)
        # the round's extractor (its job's; 'auto': the world's vocabulary, else CHAIR's COCO table)
        extractor, items, note = _evaluation_plan(_round_extractor(rnd), items)
        metrics, rows = evaluation.evaluate_backend(
            backend, items, extractor, params,
            progress=(lambda d, t: progress(d, t, f"evaluating: {d}/{t}")) if progress else None,
            describe_prompt=describe_prompt)
        metrics["describe_first"] = describe_prompt is not None
        metrics["max_new_tokens"] = (params or GenerationParams()).max_new_tokens
        if note:
            metrics["eval_note"] = note
        if meta is not None:
            metrics = {**metrics, "model": ref, **meta}
        with self.store.transaction():  # the answers and their metrics land together or not at all
            self.store.add_eval_outputs(round_id, rows)
            # Read again under the write lock: an evaluation of this round on another set that ended
            # meanwhile (a round job evaluating its parent) keeps its figures.
            now = self.store.get_round(round_id)["metrics"]
            self.store.update_round(round_id, metrics=evaluation.with_evaluation(now, metrics))
        return metrics

    def _evaluable_round(self, round_id: int, model: str | None) -> dict:
        """Round ``round_id``'s row, once it is known that it can be evaluated with ``model`` (its
        base by default): a finished adapter, a model reference that loads, and an adapter chain
        trained on that model. Checked before any scene is rendered or item answered: a mistyped
        path or id used to fail only after n scenes were added to the store."""
        from lvlm_studio import jobs
        from lvlm_studio.models.registry import check_model_ref

        rnd = self.store.get_round(round_id)
        if rnd is None:
            raise NotFoundError(f"round {round_id} does not exist")
        adapter = self._round_adapter(round_id)  # a round without a finished adapter is refused here too
        ref = self._evaluation_model(rnd, model)
        check_model_ref(ref)
        if adapter is not None:
            jobs.adapter_lineage(self.store, round_id, ref)
        return rnd

    def evaluate_on(self, round_id: int, dataset: str = WORLD_DATASET, split: str = "test", n: int | None = None,
                    seed: int = 0, model: str | None = None, max_new_tokens: int | None = None,
                    progress: ProgressFn | None = None) -> dict:
        """``evaluate_world`` for the world's scenes (``n`` scenes, 500 by default), else
        ``evaluate_set`` on an imported set (its first ``n`` images, all by default): what the
        CLI's ``eval`` and the Compare tab's Evaluate box run."""
        if dataset == WORLD_DATASET:
            return self.evaluate_world(round_id, split=split, n=500 if n is None else n, seed=seed, model=model,
                                       max_new_tokens=max_new_tokens, progress=progress)
        return self.evaluate_set(round_id, dataset=dataset, split=split, images=n, model=model,
                                 max_new_tokens=max_new_tokens, progress=progress)

    def _evaluation_model(self, rnd: dict, model: str | None) -> str:
        """The model a round is evaluated with: ``model`` when given, else the base it trained on."""
        return model or rnd.get("base_model") or self.settings.model

    @staticmethod
    def _describe_prompt(rnd: dict) -> str | None:
        """The prompt a round describes the image with before each question when evaluated (its
        config's ``describes_first``: STIC's stage-2 rounds), else None."""
        from lvlm_studio.training import DPORoundConfig

        return DPORoundConfig.describe_prompt_of(rnd.get("config"))

    def _eval_items_by_id(self, item_ids: Sequence[int]) -> list[dict]:
        return [_eval_item(it) for it in self._items_by_id(item_ids)]

    def _items_by_id(self, item_ids: Sequence[int]) -> list[dict]:
        """The items ``item_ids`` names (a list of whole numbers, not a string: "12" would be items 1
        and 2), or a ValueError naming the ids that do not exist."""
        if isinstance(item_ids, str | bytes | dict) or not isinstance(item_ids, Iterable):
            raise ValueError(f"item ids are a list of whole numbers, not {type(item_ids).__name__}")
        # Each item once, in the order first named: a repeated id would be generated for or
        # evaluated twice (two pairs, two answers for one round and item).
        ids = list(dict.fromkeys(whole_number(i, "an item id") for i in item_ids))
        items = [self.store.get_item(i) for i in ids]
        missing = [i for i, it in zip(ids, items, strict=True) if it is None]
        if missing:
            raise ValueError(f"unknown item id(s): {missing}")
        return items

    def ensure_world_items(self, split: str = "test", n: int = 24, seed: int = 0,
                           kinds: Sequence[str] = ("describe", "pope"),
                           progress: ProgressFn | None = None) -> dict:
        """Scenes ``0 .. n-1`` of the world's ``split`` (world seed ``seed``) as items: one describe
        item per scene plus its POPE probes, made as ``seed_demo`` makes them (so the two agree).
        Idempotent: scenes already stored are not rendered again. Returns ``{"item_ids": [...],
        "added": k, "scenes": n}``, the ids in scene order."""
        from lvlm_studio import world

        n = whole_number(n, "the number of scenes", high=MAX_WORLD_SCENES)
        seed = whole_number(seed, "the world seed", high=MAX_SEED)
        kinds = tuple(kinds)
        by_scene: dict[int, list[int]] = {}
        kinds_of: dict[int, set[str]] = {}
        for it in self.store.list_items(dataset=WORLD_DATASET, split=split):
            meta = it.get("meta") or {}
            index = meta.get("scene_index")
            if (meta.get("scene") or {}).get("seed") != seed or index is None or meta.get("kind") not in kinds:
                continue
            by_scene.setdefault(int(index), []).append(it["id"])
            kinds_of.setdefault(int(index), set()).add(meta["kind"])
        added = 0
        missing = [i for i in range(int(n)) if not set(kinds) <= kinds_of.get(i, set())]
        for k, index in enumerate(missing):
            recs = list(world.world_items(split, 1, seed, kinds=kinds, start=index))  # one scene's items
            with self._ingested(_png(recs[0]["image"]), f"{split}-{index}.png", WORLD_DATASET,
                                objects=list(recs[0].get("objects") or []) or None) as image_id:
                ids = [self.store.add_item(image_id, rec["prompt"], reference=rec.get("reference"),
                                           dataset=WORLD_DATASET, split=split, meta=rec.get("meta"))
                       for rec in recs]
            added += len(set(ids) - set(by_scene.get(index, [])))
            by_scene[index] = ids
            if progress:
                progress(k + 1, len(missing), f"world {split} scenes: {k + 1}/{len(missing)}")
        return {"item_ids": [i for s in range(int(n)) for i in by_scene.get(s, [])], "added": added,
                "scenes": int(n)}

    def add_pope_probes(self, dataset: str, split: str, strategy: str = "adversarial", per_image: int = 3,
                        images: int | None = 500, seed: int = 0, min_objects: int = 3,
                        user: str | None = None) -> dict:
        """POPE's probes for an imported set with ground-truth objects (COCO's instances, or any
        import that gives ``objects``), stored as items of kind "pope" beside the set's images so
        that a round's evaluation (``eval_kinds`` holds "pope") scores POPE on them, as it does on
        the world's test scenes. POPE (Li et al., 2023): ``images`` images with at least
        ``min_objects`` objects (500 and 3), ``per_image`` present objects asked "yes" and as many
        absent ones "no" (3 + 3), the absent ones drawn at random, by frequency ("popular") or by
        co-occurrence with the present ones ("adversarial"), counted over the whole set.
        Idempotent: a probe already stored is not added again. Admin only: it changes what every
        later round is evaluated on."""
        from lvlm_studio.evaluation import build_pope_questions, pope_label

        self.require_admin(user, "adding POPE probes to an evaluation set")
        if strategy not in POPE_STRATEGIES:
            raise ValueError(f"unknown POPE strategy {str(strategy)[:40]!r}; choose one of {', '.join(POPE_STRATEGIES)}")
        per_image = whole_number(per_image, "probes per image", low=1, high=100)
        min_objects = whole_number(min_objects, "the fewest objects an image needs", low=1, high=1000)
        seed = whole_number(seed, "the seed", high=MAX_SEED)
        images = None if images is None else whole_number(images, "the number of images", low=1)
        by_image: dict[str, dict] = {}  # image id -> one non-probe item of it (its ground truth)
        stored = self.store.list_items(dataset=dataset, split=split)
        for it in stored:
            if it.get("objects") is not None and pope_label(it) is None:
                by_image.setdefault(it["image_id"], it)

        if not by_image:
            raise ValueError(f"no item of dataset {dataset!r}, split {split!r} has ground-truth objects to ask "
                             "about (import COCO with its instances file, or records with 'objects')")
        extractor, parsed, note = _evaluation_plan("auto", list(by_image.values()))
        truth = {it["image_id"]: sorted(extractor.ground_truth(it["objects"])) for it in parsed}
        eligible = [image for image, objects in truth.items() if len(objects) >= min_objects]
        if not eligible:
            raise ValueError(f"no image of dataset {dataset!r}, split {split!r} has {min_objects} or more objects "
                             "(POPE asks about images with at least 3; lower min_objects)")
        chosen = eligible
        if images is not None and images < len(eligible):
            picked = set(random.Random(seed).sample(eligible, images))
            chosen = [image for image in eligible if image in picked]  # in the set's own order
        probes = build_pope_questions({image: truth[image] for image in chosen}, extractor.vocabulary, strategy,
                                      n=per_image, seed=seed, statistics=truth)
        with self.store.transaction():  # all of them or none, the strategy checked under the write lock
            stored = self.store.list_items(dataset=dataset, split=split)
            other_modes = Counter(mode for it in stored if (it.get("meta") or {}).get("kind") == "pope"
                                  and (mode := it["meta"].get("pope_mode")) and mode != strategy)
            if other_modes:
                held = ", ".join(f"{n} {mode}" for mode, n in sorted(other_modes.items()))
                raise ValueError(f"{dataset}/{split} already holds POPE probes of another strategy ({held}): one "
                                 f"POPE figure over two strategies matches neither. Add {strategy} probes to a copy "
                                 "of the set (import it again with another --dataset name)")
            # An image that has probes keeps them (another seed or size would mix two draws and
            # unbalance its yes and no), and one of whose questions an item of another kind already
            # asks (CSR's yes/no items) gets none: leaving that one out would unbalance it too.
            probed = {it["image_id"] for it in stored if (it.get("meta") or {}).get("kind") == "pope"}
            taken_images = {p["image_id"] for p in probes if p["image_id"] not in probed
                            and (held := self.store.find_item(p["image_id"], p["question"], dataset)) is not None
                            and ((held.get("meta") or {}).get("kind") != "pope" or held["split"] != split)}
            # Every kept probe is a new item: its image has none, and no item asks its question.
            kept = [p for p in probes if p["image_id"] not in taken_images | probed]
            for probe in kept:
                self.store.add_item(probe["image_id"], probe["question"],
                                    reference="Yes." if probe["label"] == "yes" else "No.", dataset=dataset,
                                    split=split, meta={"kind": "pope", "probe": probe["object"],
                                                       "label": probe["label"], "pope_mode": strategy,
                                                       "pope_seed": seed})
        if taken_images:
            note = "; ".join(filter(None, [note, (
                f"{len(taken_images)} image(s) got no probes: one of their questions is already an item of another "
                "kind (CSR's yes/no questions) or split, and leaving it out would unbalance yes and no")]))
        # The probes the drawn images hold now, those an image probed before keeps and the new
        # ones: the same call again reports the same probes, none added.
        on_images = set(chosen) - taken_images
        labels = [pope_label(it) for it in stored
                  if (it.get("meta") or {}).get("kind") == "pope" and it["image_id"] in on_images]
        labels += [p["label"] for p in kept]
        return {"dataset": dataset, "split": split, "strategy": strategy, "extractor": extractor.name,
                "images": len(on_images), "already_probed": len(set(chosen) & probed),
                "eligible_images": len(eligible), "probes": len(labels), "added": len(kept),
                "yes": labels.count("yes"), "note": note}

    def evaluate_world(self, round_id: int = BASE_ROUND_ID, split: str = "test", n: int = 500, seed: int = 0,
                       model: str | None = None, max_new_tokens: int | None = None,
                       progress: ProgressFn | None = None) -> dict:
        """Make sure the world's ``split`` holds ``n`` scenes (describe + POPE probes), answer them
        greedily with round ``round_id``'s model (0 = the base model), store answers and metrics.
        Returns ``{"round", "metrics", "items", "added"}``."""
        if whole_number(n, "the number of evaluation scenes", high=MAX_WORLD_SCENES) < 1:  # an empty evaluation would replace the metrics
            raise ValueError(f"the number of evaluation scenes must be at least 1, not {n}")
        round_id = whole_number(round_id, "round")
        self._evaluable_round(round_id, model)  # before thousands of scenes are rendered and stored
        ensured = self.ensure_world_items(split, n, seed, progress=progress)
        metrics = self.evaluate(round_id, model=model, progress=progress, item_ids=ensured["item_ids"],
                                max_new_tokens=max_new_tokens,
                                meta={"dataset": WORLD_DATASET, "split": split, "scenes": int(n), "seed": seed})
        return {"round": int(round_id), "metrics": metrics, "items": len(ensured["item_ids"]),
                "added": ensured["added"]}

    def evaluation_sets(self) -> dict[str, tuple[str, str]]:
        """What a round can be evaluated on, by label: the world's test scenes ("shapesworld/test",
        made as needed) first, then every imported (dataset, split) with ground-truth objects."""
        imported = [(d, s) for d, s in self.store.ground_truth_sets() if d != WORLD_DATASET]
        return {evaluation_set_label([pair]): pair for pair in [(WORLD_DATASET, "test"), *imported]}

    def evaluate_set(self, round_id: int = BASE_ROUND_ID, dataset: str = WORLD_DATASET, split: str = "test",
                     images: int | None = None, model: str | None = None, max_new_tokens: int | None = None,
                     progress: ProgressFn | None = None) -> dict:
        """Answer an imported evaluation set (its caption items and POPE probes, as a round's job
        picks them: ``jobs.eval_items_for``) with round ``round_id``'s model, the first ``images``
        images (None: all), and store answers and metrics, as ``evaluate_world`` does for the
        world's scenes. Returns ``{"round", "metrics", "items", "images"}``."""
        from lvlm_studio.jobs import eval_items_for
        from lvlm_studio.training import DPORoundConfig

        round_id = whole_number(round_id, "round")
        if images is not None:
            images = whole_number(images, "the number of images", low=1)
        rnd = self._evaluable_round(round_id, model)
        items = eval_items_for(self.store, DPORoundConfig(eval_dataset=dataset, eval_split=split, eval_limit=None))
        if images is not None:
            keep = set(list(dict.fromkeys(it["image_id"] for it in items))[:images])
            items = [it for it in items if it["image_id"] in keep]
        if not items:
            sets = [label for label, (d, _) in self.evaluation_sets().items() if d != WORLD_DATASET]
            raise ValueError(f"no item of dataset {dataset!r}, split {split!r} has ground-truth objects to evaluate on "
                             f"(imported sets that have: {', '.join(sets) or 'none'})")
        # what will be scored (a set mixing vocabularies is scored on its larger part)
        _, items, note = _evaluation_plan(_round_extractor(rnd), items)
        n_images = len({it["image_id"] for it in items})
        meta = {"dataset": dataset, "split": split, "images": n_images, **({"eval_note": note} if note else {})}
        metrics = self.evaluate(round_id, model=model, progress=progress, item_ids=[it["item_id"] for it in items],
                                max_new_tokens=max_new_tokens, meta=meta)
        return {"round": int(round_id), "metrics": metrics, "items": len(items), "images": n_images}

    def evaluated_sets(self) -> list[str]:
        """The sets some round was evaluated on, by label: the one most rounds were evaluated on
        first (on a tie, the one the newest round's latest evaluation used), then the rest."""
        counts: Counter[str] = Counter()
        newest = None
        for rnd in self.store.list_rounds():  # by id: the last one evaluated is the newest
            evals = round_evaluations(rnd.get("metrics"))
            counts.update(evals.keys())  # a mapping would be added as counts
            newest = list(evals)[-1] if evals else newest
        return sorted(counts, key=lambda label: (-counts[label], label != newest, label))

    def shared_sets(self, a: int, b: int) -> list[str]:
        """The evaluation sets both rounds were evaluated on (round B's order): what ``compare`` can
        be asked to read them on."""
        evals = [round_evaluations((self.store.get_round(whole_number(r, "round")) or {}).get("metrics"))
                 for r in (a, b)]
        return _shared(*evals)

    def round_metrics(self, evaluation_set: str | None = None) -> list[dict]:
        """CHAIR_s, CHAIR_i, recall and POPE F1 of every round evaluated on one set (long format for
        the plot; default: ``evaluated_sets()``'s first): rounds evaluated on other sets are left
        out, not drawn on the same line."""
        if evaluation_set is None:
            evaluation_set = next(iter(self.evaluated_sets()), None)
        rows = []
        for rnd in self.store.list_rounds():
            ev = round_evaluations(rnd.get("metrics")).get(evaluation_set)
            for key in ("chair_s", "chair_i", "recall", "pope_f1"):
                val = _metric(ev or {}, key)
                if val is not None:
                    rows.append({"round": rnd["id"], "metric": key, "value": val, "set": evaluation_set})
        return rows

    def compare(self, a: int, b: int, only_diff: bool = False, include_probes: bool = False,
                evaluation_set: str | None = None) -> dict:
        """Both rounds' evaluation answers side by side per item, with hallucinated objects, and a
        metrics table, on one evaluation set both rounds were evaluated on (``evaluation_set``, a
        label of ``evaluated_sets``; by default round B's latest, else A's, else another they share;
        answers on other sets are left out). Rounds that share no set are shown with a note."""
        a, b = whole_number(a, "round A"), whole_number(b, "round B")
        outputs, rounds = {}, {}
        for rid in (a, b):
            row = rounds[rid] = self.store.get_round(rid)
            if rid != BASE_ROUND_ID and row is None:
                raise NotFoundError(f"round {rid} does not exist")
            outputs[rid] = self.store.eval_outputs(rid)
            if not outputs[rid] and row is not None and row["status"] != "done":
                # Say why there is nothing to show instead of an empty comparison.
                why = f" ({row['error']})" if row.get("error") else ""
                raise ValueError(f"round {rid} is {row['status']}{why}: it has no answers to compare")
        evals = {rid: round_evaluations((rounds[rid] or {}).get("metrics")) for rid in (a, b)}
        # as typed (the CLI's --set, the JSON API): trimmed, and "" for the default
        evaluation_set = (str(evaluation_set).strip() or None) if evaluation_set is not None else None
        label, set_note = _comparison_set(a, b, evals, evaluation_set)
        # Each round's answers on the set read: the shared one, else (no set shared) its latest.
        shown = {rid: evals[rid][label] if label is not None else _round_eval(rounds[rid]) for rid in (a, b)}
        outputs = {rid: _outputs_on(rows, shown[rid]) for rid, rows in outputs.items()}
        out_a = {r["item_id"]: r for r in outputs[a]}
        out_b = {r["item_id"]: r for r in outputs[b]}
        rows = []
        for item_id in sorted(set(out_a) | set(out_b)):
            ra, rb = out_a.get(item_id), out_b.get(item_id)
            if not include_probes and any((r.get("meta") or {}).get("kind") == "pope" for r in (ra, rb) if r):
                continue
            if only_diff and (not (ra and rb) or (ra["answer"] or "").strip() == (rb["answer"] or "").strip()):
                continue  # "where they differ": both answered, differently
            base = ra or rb
            rows.append({
                "item_id": item_id, "prompt": base.get("prompt"), "image_path": base.get("image_path"),
                "objects": base.get("gt_objects"),
                "a": _eval_view(ra), "b": _eval_view(rb),
            })
        metrics = []
        own_metrics_cover_all = True
        for rid in (a, b):
            ev = shown[rid]
            answered = len(out_a if rid == a else out_b)
            computed = _metrics_from_outputs(outputs[rid])
            # "answers": how many answers these figures cover (a later, smaller eval covers fewer
            # than the round holds)
            metrics.append({"round": rid, **{k: _metric(ev, k) if _metric(ev, k) is not None else computed.get(k)
                                             for k in ("chair_s", "chair_i", "recall", "pope_f1")},
                            "answers": ev.get("n_items") or answered, "no_mentions": no_mentions_note(ev)})
            # A later, smaller `eval` replaces the metrics but keeps the other stored answers.
            own_metrics_cover_all &= ev.get("n_items") in (None, answered)
        # Each round's own metrics may cover different items (another eval_limit, a later `eval`):
        # then the same measures on the items both answered, which are comparable.
        common = sorted(set(out_a) & set(out_b))
        common_metrics = []
        if common and (set(out_a) != set(out_b) or not own_metrics_cover_all):
            for rid, out in ((a, out_a), (b, out_b)):
                rows_common = [out[i] for i in common]
                common_metrics.append({"round": rid, **_metrics_from_outputs(rows_common), "answers": len(common)})
        disjoint = bool(out_a) and bool(out_b) and not common
        return {"a": a, "b": b, "rows": rows, "metrics": metrics, "common_metrics": common_metrics,
                "paired": _paired_chair_s(out_a, out_b), "paired_pope": _paired_pope_f1(out_a, out_b),
                "answered": (len(out_a), len(out_b)), "set": label,
                "sets": _shared(evals[a], evals[b]),
                "note": set_note or (DISJOINT_NOTE if disjoint else None)}


# ---- helpers -----------------------------------------------------------------------------------
def _comparison_set(a: int, b: int, evals: dict[int, dict[str, dict]], wanted: str | None) -> tuple[str | None, str | None]:
    """The evaluation set two rounds are compared on (``Studio.compare``), and a note when they
    share none: figures on two different sets side by side would read as a change."""
    if wanted is not None:
        for rid in (a, b):
            if wanted not in evals[rid]:
                raise ValueError(f"round {rid} was not evaluated on {wanted} "
                                 f"(its evaluations: {', '.join(evals[rid]) or 'none'})")
        return wanted, None
    common = _shared(evals[a], evals[b])
    latest = {rid: list(evals[rid])[-1] for rid in (a, b) if evals[rid]}
    for label in (latest.get(b), latest.get(a), *common[::-1]):
        if label in common:
            return label, None
    if len(latest) == 2:
        return None, (f"round {a} was evaluated on {latest[a]} and round {b} on {latest[b]}, no set both: their "
                      f"figures are not comparable (evaluate both on one set)")
    return None, None


def _shared(evals_a: dict[str, dict], evals_b: dict[str, dict]) -> list[str]:
    """The set labels two rounds' evaluations (``round_evaluations``) share, in round B's order."""
    return [label for label in evals_b if label in evals_a]


def _outputs_on(rows: list[dict], ev: dict) -> list[dict]:
    """The stored answers of one evaluation's set (one that does not say its set keeps them all)."""
    wanted = set(evaluation_pairs(ev))
    return [r for r in rows if (r.get("dataset"), r.get("split")) in wanted] if wanted else rows


# Compare's word when two rounds were evaluated on sets that share no item (one on the world's test
# scenes, one on an imported set): their figures side by side would read as a change.
DISJOINT_NOTE = ("the two rounds answered no item in common (they were evaluated on different sets): their "
                 "metrics are not comparable, and nothing is compared item by item")


# CSR's own defaults (5 candidates per node) pair nearly every world item in well under a second
# each; with 3 candidates most searches end in one distinct answer and make no pair.
_DEMO_SEED_PARAMS: dict[str, dict] = {"csr": {}, "povid": {}, "stic": {}}
_NO_PAIR_WHY = {
    "csr": "fewer than two distinct complete answers in the search, or all of them scored the same",
    "povid": "no reference answer to inject hallucinations into, or no rejected answer",
    "stic": "the preferred and dispreferred descriptions came out the same",
}


def _round_eval(rnd: dict | None) -> dict:
    """A round's stored evaluation metrics; {} when it has none (a round trained without evaluation
    items stores ``"eval": None``, which crashed Compare and its plot)."""
    metrics = (rnd or {}).get("metrics") or {}
    ev = metrics.get("eval", metrics)
    return ev if isinstance(ev, dict) else {}


def round_(x: float, nd: int = 3) -> float:
    return float(round(x, nd))


def _reviewer(name: str | None) -> str:
    """A reviewer name as stored: trimmed, at most REVIEWER_MAX_CHARS printable characters (what an
    import of an export accepts back, io._pair_from)."""
    if name is not None and not isinstance(name, str):
        raise ValueError(f"a reviewer name is text, not {type(name).__name__}")
    name = (name or "").strip()
    if not name:
        raise ValueError("a reviewer name is needed (sign in, or type a name in the Review tab)")
    if len(name) > REVIEWER_MAX_CHARS:
        raise ValueError(f"a reviewer name is at most {REVIEWER_MAX_CHARS} characters")
    if not name.isprintable():
        raise ValueError(f"a reviewer name has printable characters only (no tabs or control characters), "
                         f"not {name[:40]!r}")
    return name


def _optional_reviewer(name: str | None) -> str | None:
    """``_reviewer`` of a name that may be absent (None or empty: no reviewer)."""
    return None if name is None or name == "" else _reviewer(name)


def _check_names(**values: Any) -> None:
    """Each of ``values`` (a model, dataset, split or method name) is text or None: a JSON client's
    number or list is refused by name instead of failing later in SQL or a dict lookup."""
    for name, value in values.items():
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} is a name, not {type(value).__name__}")


# Every reviewer of a pair is shown its edits and notes: bounded so one cannot make the pair unloadable.
EDIT_MAX_CHARS = 20_000  # an answer, edited (the demo's are ~200 characters; a long LVLM answer ~4,000)
NOTE_MAX_CHARS = 2_000


def whole_number(value: Any, name: str, low: int = 0, high: int = MAX_ID) -> int:
    """``value`` (an int, a whole float, or its text, as a form or a JSON client sends it) as an
    int in [low, high], or a ValueError naming ``name``: never int()'s "invalid literal" or
    SQLite's OverflowError."""
    number = None
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = int(value.strip())
    elif isinstance(value, float):
        number = int(value) if value.is_integer() else None
    elif not isinstance(value, bool):
        with contextlib.suppress(TypeError):
            number = operator.index(value)  # int, numpy's integers
    if number is None:
        raise ValueError(f"{name} must be a whole number, not {repr(value)[:40]}")
    if number < low:
        raise ValueError(f"{name} must be at least {low}, not {number}")
    if number > high:
        raise ValueError(f"{name} must be at most {high}, not {str(number)[:40]}")
    return number


def _text(value: Any, name: str, limit: int) -> str | None:
    """Optional free text (an edit, a note) of at most ``limit`` characters."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name} is text, not {type(value).__name__}")
    if len(value) > limit:
        raise ValueError(f"{name} is at most {limit:,} characters, not {len(value):,}")
    return value


def _eval_item(it: dict) -> dict:
    """An item as the evaluation reads it."""
    return {"item_id": it["id"], "prompt": it["prompt"], "image_path": it["image_path"],
            "objects": it.get("objects") or [], "reference": it.get("reference"), "meta": it.get("meta"),
            "dataset": it.get("dataset"), "split": it.get("split"), "image_id": it.get("image_id")}


def _evaluation_plan(extractor: str, items: list[dict]) -> tuple[Any, list[dict], str | None]:
    """``jobs.evaluation_plan``, its refusal (a set no vocabulary knows) a ValueError, as the
    service's callers expect of bad input."""
    from lvlm_studio.jobs import JobError, evaluation_plan

    try:
        return evaluation_plan(extractor, items)
    except JobError as exc:
        raise ValueError(str(exc)) from None


def _round_extractor(rnd: dict) -> str:
    """The object extractor a round's job evaluated with (its config's ``extractor``), 'auto' else."""
    name = (rnd.get("config") or {}).get("extractor")
    return name if isinstance(name, str) and name else "auto"


def _cand_view(c: dict | None) -> dict:
    c = c or {}
    return {"id": c.get("id"), "text": c.get("text") or "", "source": c.get("source"),
            "sentences": c.get("sentences") or [], "spans": c.get("spans") or [],
            "score": c.get("score"), "model": c.get("model"), "round": c.get("round")}


def _eval_view(r: dict | None) -> dict | None:
    if r is None:
        return None
    return {"answer": r.get("answer") or "", "objects": r.get("objects") or [],
            "hallucinated": r.get("hallucinated") or [], "spans": (r.get("meta") or {}).get("spans")}


def _metric(d: dict, key: str) -> float | None:
    aliases = {"chair_s": ("chair_s", "CHAIR_s", "chairs"), "chair_i": ("chair_i", "CHAIR_i", "chairi"),
               "recall": ("recall", "object_recall"), "pope_f1": ("pope_f1", "POPE_f1", "f1")}
    for k in aliases.get(key, (key,)):
        if isinstance(d.get(k), int | float):
            return float(d[k])
    pope = d.get("pope")
    if key == "pope_f1" and isinstance(pope, dict) and isinstance(pope.get("f1"), int | float):
        return float(pope["f1"])
    return None


def _paired_chair_s(out_a: dict[int, dict], out_b: dict[int, dict]) -> dict | None:
    """evaluation.paired_chair_s over the captions (describe items) both rounds answered."""
    from lvlm_studio.evaluation import CAPTION_KINDS, paired_chair_s

    common = [i for i in sorted(set(out_a) & set(out_b))
              if all((r.get("meta") or {}).get("kind") in CAPTION_KINDS for r in (out_a[i], out_b[i]))]
    if not common:
        return None
    return paired_chair_s([bool(out_a[i].get("hallucinated")) for i in common],
                          [bool(out_b[i].get("hallucinated")) for i in common])


def _asked_under(candidates: list[dict]) -> list[dict]:
    """The candidates with the system prompt the model was asked under (LVLM_STUDIO_SYSTEM_PROMPT;
    None when unset) in their params: a round trains with the system prompt set then, and says how
    many of its pairs were made under another one (``jobs``, ``Store.pairs_system_prompts``)."""
    from lvlm_studio.models.base import system_prompt

    system = system_prompt()
    return [{**c, "params": {**(c.get("params") or {}), "system_prompt": system}} for c in candidates]


def _pope_probe(row: dict) -> dict | None:
    """A stored answer's POPE probe record (its meta holds label and prediction), if it is one with
    a yes/no label and a parsed yes/no prediction."""
    meta = row.get("meta") or {}
    return meta if meta.get("kind") == "pope" and meta.get("label") in ("yes", "no") and meta.get(
        "prediction") in ("yes", "no") else None


def _paired_pope_f1(out_a: dict[int, dict], out_b: dict[int, dict]) -> dict | None:
    """evaluation.paired_pope_f1 over the POPE probes both rounds answered."""
    from lvlm_studio.evaluation import paired_pope_f1

    both = [(i, pa, pb) for i in sorted(set(out_a) & set(out_b))
            if (pa := _pope_probe(out_a[i])) is not None and (pb := _pope_probe(out_b[i])) is not None]
    if not both:
        return None
    # An image's probes (POPE asks a yes and a no of each) are resampled together.
    return paired_pope_f1([pa.get("prediction") for _, pa, _ in both], [pb.get("prediction") for _, _, pb in both],
                          [pa["label"] for _, pa, _ in both],
                          groups=[out_a[i].get("image_id", f"item-{i}") for i, _, _ in both])


def _add_note(report: dict, text: str) -> None:
    """Add ``text`` to a run report's note (notes join with "; ")."""
    report["note"] = f"{report['note']}; {text}" if report.get("note") else text


def item_seed(seed: int, item: dict) -> int:
    """An item's own draw seed in a run (STIC's rejection draw, POVID's injection and noise, CSR's
    sampled expansion): the
    methods counted items from 0 in each chunk of 8, so every 8th item drew the same, and a resumed
    run drew differently; keyed by the item's id, a draw is the item's whatever run it falls in.
    Sampled decoding (temperature > 0) in STIC and POVID is seeded per batch, not per item."""
    return seed * 1_000_003 + int(item["id"])


def _metrics_from_outputs(rows: list[dict]) -> dict:
    """CHAIR_s / CHAIR_i / recall recomputed from stored answers (when a round has no metrics), over
    the captions CHAIR scores: not POPE probes, nor answers like a count that list no objects; and
    POPE F1 over the probes (``_pope_f1_from_outputs``; None without any)."""
    return {**_chair_from_outputs(rows), "pope_f1": _pope_f1_from_outputs(rows)}


def _chair_from_outputs(rows: list[dict]) -> dict:
    from lvlm_studio.evaluation import CAPTION_KINDS

    rows = [r for r in rows if (r.get("meta") or {}).get("kind") in CAPTION_KINDS]
    if not rows:
        return {}
    mentions = sum(len(r.get("objects") or []) for r in rows)
    hallu = sum(len(r.get("hallucinated") or []) for r in rows)
    gt = hit = 0
    for r in rows:
        meta = r.get("meta") or {}
        if isinstance(meta.get("gt"), list) and isinstance(meta.get("recalled"), list):
            # what the evaluation scored against: the canonical truth (COCO: instance labels plus the
            # categories the human captions name, synonyms resolved; the world: sizes dropped)
            truth, found = set(map(str, meta["gt"])), set(map(str, meta["recalled"]))
        else:  # answers stored without it (an older evaluation): the image's objects as written
            truth = set(map(str, r.get("gt_objects") or []))
            found = truth & set(map(str, r.get("objects") or []))
        gt, hit = gt + len(truth), hit + len(found & truth)
    return {"chair_s": sum(bool(r.get("hallucinated")) for r in rows) / len(rows),
            "chair_i": hallu / mentions if mentions else 0.0,
            "recall": hit / gt if gt else None}


def _pope_f1_from_outputs(rows: list[dict]) -> float | None:
    """POPE F1 recomputed from stored probe answers (their meta holds label and prediction)."""
    from lvlm_studio.evaluation import pope_metrics

    probes = [probe for probe in map(_pope_probe, rows) if probe is not None]
    if not probes:
        return None
    return pope_metrics([p.get("prediction") for p in probes], [p["label"] for p in probes])["f1"]


def _checked_params(method: str, params: dict | None) -> dict:
    """A method's parameters checked against its config dataclass: known names (unknown ones would
    fail later as a TypeError on the dataclass) and JSON types."""
    from dataclasses import fields

    from lvlm_studio.methods import METHOD_CONFIGS

    if params is not None and not isinstance(params, dict):
        raise ValueError(f"{method} parameters must be an object of option names and values")
    cls = METHOD_CONFIGS[method]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(params or {}) - known)
    if unknown:
        raise ValueError(f"unknown {method} parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return check_option_types(cls, dict(params or {}), f"{method} parameter")


def _jsonable(x: Any) -> Any:
    try:
        json.dumps(x)
        return x
    except TypeError:
        return json.loads(json.dumps(x, default=str))


def _png(image: Any) -> bytes:
    import io as _io

    buf = _io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _povid_rows(res: Any, model: str, round_id: int, seed: int, config: Any) -> tuple[list[dict], list[dict]]:
    """chosen (the reference) vs the injected answer and vs the noisy-image answer: up to two pairs
    sharing one chosen candidate. POVID has no automatic score, so the margin stays NULL."""
    cands: list[dict] = []
    pairs: list[dict] = []

    def cand(c: Any) -> dict:
        return {"text": c.text, "source": c.source, "sentences": c.sentences, "spans": c.spans or None,
                "score": None, "model": model, "round": round_id,
                "params": _jsonable({**c.params, "config": config.__dict__}), "seed": c.seed}

    cands.append(cand(res.chosen))
    for kind, rej in (("text", res.rejected_text), ("image", res.rejected_image)):
        if rej is None or rej.text.strip() == res.chosen.text.strip():
            continue
        cands.append(cand(rej))
        pairs.append({"chosen": 0, "rejected": len(cands) - 1, "method": "povid", "margin": None,
                      "round": round_id, "meta": {"kind": kind, "model": model, "seed": seed}})
    return cands, pairs


def _opt(rec: Any, name: str) -> Any:
    return rec.get(name) if isinstance(rec, dict) else getattr(rec, name, None)


def demo_rounds_summary(rounds: Sequence[dict]) -> list[dict]:
    """Rows for the UI's round tables."""
    out = []
    for r in rounds:
        cfg = r.get("config") or {}
        out.append({"id": r["id"], "status": r["status"], "parent": r.get("parent_id"),
                    "method": ",".join(cfg.get("methods") or []) if isinstance(cfg.get("methods"), list)
                    else cfg.get("method", ""),
                    "progress": r.get("progress"), "created": r.get("created"), "error": r.get("error")})
    return out


__all__ = [
    "DEFAULT_PROMPT", "EXPORT_FORMATS", "IMPORT_FORMATS", "METHODS", "REVIEW_DECISIONS", "Studio", "User", "cohen_kappa", "fleiss_kappa",
    "margin_buckets", "parse_users",
]
