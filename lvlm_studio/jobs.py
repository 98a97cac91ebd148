"""Training rounds as background subprocesses, with status, progress and logs in the store.

One round = one process: ``python -m lvlm_studio.jobs run ROUND_ID --home HOME``. It trains
(``training.train_round`` on ``Store.training_pairs``), evaluates (``evaluation.evaluate_backend``
on the evaluation set: by default the items of split "test" whose images have ground-truth
objects, i.e. ShapesWorld's unbiased test split or any imported dataset with objects), writes the
evaluation outputs, and only then, in the same transaction, marks the round 'done' with its
adapter, which makes it the current round. A process runs in its own session, so it outlives the
app or CLI that started it; ``reattach`` finds it again after a restart.

One training job at a time: ``start_round`` refuses while a round is queued or running. A round
whose process is gone (SIGKILL, OOM, crash, reboot) while the store still says queued/running is
"stale": the next ``status``/``reattach``/``start_round`` marks it 'failed' with the reason. Its
adapter was never marked current (that happens only in the final transaction), so the previous
round stays current and the store stays consistent. Liveness is checked by pid, excluding zombies
and pids reused by another program or another round's job (``/proc/PID/cmdline`` must run this
module for this round and data root).

Cancelling records the request on the round (``cancel_requested``), then sends SIGTERM: the job's
handler sets a flag that the trainer checks after each step (and the evaluation before each
batch). Once asked, the round ends 'cancelled' however it stops (cleanly, killed, or reaching its
end), and no adapter becomes current; what it left on disk is removed.
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lvlm_studio.config import Settings, data_root_lock, round_dirname

ACTIVE = ("queued", "running")
TERMINAL = ("done", "failed", "cancelled")
CANCELLED_BY_REQUEST = "cancelled by request"
# A 'queued' row without a pid older than this is a start that died before spawning its process.
QUEUED_GRACE_S = 120.0
# Training takes this share of the progress bar, evaluation the rest.
TRAIN_SHARE = 0.8

# Round id -> the process this process started for it: poll() reaps it (a dead child stays a
# zombie, which os.kill(pid, 0) would still report alive) and tells how it ended. Keyed by round,
# not pid: once reaped, its pid may be reused by another round's job (started by the CLI, say).
_CHILDREN: dict[int, subprocess.Popen] = {}


class JobError(RuntimeError):
    """A job request that cannot be carried out."""


class RoundBusyError(JobError):
    """Another round is queued or running."""


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _store(settings: Settings):
    from lvlm_studio.store import Store

    settings.ensure_dirs()
    return Store.open(settings)


def _start_lock(settings: Settings) -> contextlib.AbstractContextManager[None]:
    """An exclusive file lock around check-then-create, so two round starts cannot both pass."""
    return data_root_lock(settings, ".jobs.lock")


def process_running(pid: int) -> bool:
    """Is ``pid`` a process that has not exited (a zombie has)? A number no process can have (0 and
    negatives name process groups to kill(); one beyond pid_t raised OverflowError) is none."""
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 2**31:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True  # no /proc here: alive as far as we can tell
    return state not in ("Z", "X")


def pid_alive(pid: int | None, round_id: int | None = None, home: str | Path | None = None) -> bool:
    """Is ``pid`` a live round process (not a zombie, not a reused pid of another program)? With
    ``round_id`` (and ``home``), the job of that round (of that data root), not another one's."""
    if not process_running(pid):  # another user's live process is running: its command line decides
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.parent.is_dir():
        return True  # no /proc here: alive as far as we can tell
    try:
        args = cmdline.read_bytes().split(b"\0")
    except OSError:
        return False
    return _runs_round_job(args, round_id, home)  # else the pid was reused by another program


def _runs_round_job(args: list[bytes], round_id: int | None, home: str | Path | None) -> bool:
    """Does a command line (``job_command``'s, maybe under torchrun) run ``lvlm_studio.jobs``, for
    round ``round_id`` and the data root ``home`` when given?"""
    if b"lvlm_studio.jobs" not in args:
        return False
    if round_id is None:
        return True
    tail = args[args.index(b"lvlm_studio.jobs") + 1:]
    if tail[:2] != [b"run", str(round_id).encode()]:
        return False
    if home is not None and b"--home" in tail[:-1]:
        value = os.fsdecode(tail[tail.index(b"--home") + 1])
        if os.path.isabs(value):  # job_command writes it absolute; a relative one is left unchecked
            try:
                return os.path.samefile(value, home)
            except OSError:
                return False
    return True


def _child(row: dict) -> subprocess.Popen | None:
    """The process this process started for the round, if that is still the round's pid."""
    proc = _CHILDREN.get(row["id"])
    return proc if proc is not None and proc.pid == row.get("pid") else None


def round_process_alive(row: dict, home: str | Path | None = None) -> bool:
    """Is the round's recorded process (its job, not a program that reused the pid) running?"""
    proc = _child(row)
    if proc is not None:
        return proc.poll() is None
    return pid_alive(row.get("pid"), row["id"], home)


def _forget_ended_children(store) -> None:
    """Reap every child process that has exited (no zombie per finished round), and forget those
    whose round has an outcome; a child whose round is still active is kept for ``_exit_reason``."""
    for round_id, proc in list(_CHILDREN.items()):
        if proc.poll() is not None:
            row = store.get_round(round_id)
            if row is None or row["status"] not in ACTIVE:
                _CHILDREN.pop(round_id, None)


def _exit_reason(row: dict) -> str:
    pid = row.get("pid")
    proc = _child(row)
    code = proc.poll() if proc is not None else None
    if code is None:
        return f"the training process (pid {pid}) is gone: killed or crashed before finishing"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the training process (pid {pid}) was killed by {name} before finishing"
    return f"the training process (pid {pid}) exited with code {code} before finishing"


def _mark_if_stale(store, row: dict) -> dict:
    """Mark an active round whose process is gone 'failed', or 'cancelled' when a cancel was asked
    for (under the write lock, re-reading the row, so a job that just finished cleanly is never
    overwritten), and remove what its process left on disk."""
    if row["status"] not in ACTIVE:
        return row
    with store.transaction():
        row = store.get_round(row["id"])
        if row["status"] not in ACTIVE:
            return row
        pid = row.get("pid")
        if pid is None:
            created = calendar.timegm(time.strptime(row["created"][:19], "%Y-%m-%dT%H:%M:%S"))  # UTC
            if time.time() - created < QUEUED_GRACE_S and not row.get("cancel_requested"):
                return row
            reason = "the round was queued but its process never started"
        elif round_process_alive(row, store.root):
            return row
        else:
            reason = _exit_reason(row)
        if row.get("cancel_requested"):
            store.update_round(row["id"], status="cancelled", error=CANCELLED_BY_REQUEST)
        else:
            log = f"; see the log {row['log_path']}" if row.get("log_path") else ""
            store.update_round(row["id"], status="failed", error=f"{reason}{log}")
    remove_leftovers(store, row["id"])
    return store.get_round(row["id"])


# The data root's per-round folders (config.round_dirname), with a killed writer's scratch beside them.
ROUND_FOLDER_PARENTS = ("adapters", "runs", "merged", "chains")
_ROUND_FOLDER = re.compile(r"^\.?round[-_](\d+)(?:\..*)?$")


def _highest_round_folder(root: Path) -> int:
    """The highest round number any per-round folder under ``root`` is named for (0: none). A store
    restored from a backup, or deleted beside its folders, would give a new round the id of an old
    folder: the round then refused to overwrite it and its cleanup deleted it, and merged/ and
    chains/ would have served the old round's weights as the new one's."""
    highest = 0
    for parent in ROUND_FOLDER_PARENTS:
        with contextlib.suppress(OSError):
            for entry in (root / parent).iterdir():
                if (match := _ROUND_FOLDER.match(entry.name)) and entry.is_dir():
                    highest = max(highest, int(match.group(1)))
    return highest


def remove_leftovers(store, round_id: int) -> None:
    """What a round that ended without becoming current left beside the adapters: a killed
    trainer's scratch dirs (.round-N.run-PID / .tmp-PID; .round_N.* before folders were named
    round-N), and an adapter saved but never made current (no round points at it: killed or
    cancelled while evaluating, or failed after saving), which would only hold disk (hundreds of
    MB for a 7B LoRA)."""
    row = store.get_round(round_id)
    if row is None or row["status"] not in ("failed", "cancelled") or row.get("adapter_path"):
        return
    for name in (round_dirname(round_id), f"round_{round_id}"):
        for scratch in (store.root / "adapters").glob(f".{name}.*"):
            shutil.rmtree(scratch, ignore_errors=True)
    shutil.rmtree(store.root / "adapters" / round_dirname(round_id), ignore_errors=True)


def refresh(settings: Settings) -> list[dict]:
    """Mark stale rounds failed; return all rounds."""
    store = _store(settings)
    try:
        for row in store.list_rounds():
            if row["status"] in ACTIVE:
                _mark_if_stale(store, row)
        _forget_ended_children(store)
        return store.list_rounds()
    finally:
        store.close()


def resolve_model_path(ref: str) -> str:
    """A model reference ("demo", a local directory, a Hub id) → what from_pretrained loads."""
    try:
        from lvlm_studio.models.registry import resolve_model_ref
    except ImportError:  # registry not present: local paths only
        return ref
    return resolve_model_ref(ref)[0]


def pairs_under_other_system_prompt(store, pairs: list[dict], log: Callable[[str], None]) -> int:
    """How many of the round's pairs were generated under another system prompt than the one it
    trains with (LVLM_STUDIO_SYSTEM_PROMPT now), logged as a warning: the model learns answers to a
    conversation it was not asked in. Pairs that record none (imported ones) are not counted."""
    from lvlm_studio.models.base import system_prompt

    now = system_prompt()
    other = {prompt: n for prompt, n in store.pairs_system_prompts(p["pair_id"] for p in pairs).items()
             if prompt != now}
    if other:
        said = "; ".join(f"{n} under {prompt!r}" if prompt is not None else f"{n} under none"
                         for prompt, n in sorted(other.items(), key=lambda kv: -kv[1]))
        log(f"warning: {sum(other.values())} of the {len(pairs)} pairs were generated under another system "
            f"prompt than this round trains with ({'none' if now is None else repr(now)}): {said}")
    return sum(other.values())


def adapter_lineage(store, round_id: int | None, base_model: str | None = None) -> list[str]:
    """The adapter chain of a round (oldest first): round t's model = base + this chain, in order
    (the round job evaluates it merged in float32; training and generation hold it per dtype, models/lora.py).

    With ``base_model``: a round's adapter fits only the base it was trained on, so a round of the
    chain trained on another base (a changed LVLM_STUDIO_MODEL or --model on the same data root)
    is refused, to continue from or to generate with. Round 0 (the base itself, no adapter) fits
    any; a round that recorded no base is not checked."""
    chain: list[str] = []
    seen: set[int] = set()
    while round_id is not None:
        if round_id in seen:
            raise JobError(f"the round lineage loops back to round {round_id}: the rounds table is inconsistent")
        seen.add(round_id)
        row = store.get_round(round_id)
        if row is None:
            raise JobError(f"round {round_id} does not exist")
        # Every round of the chain must have finished: a failed or cancelled round has no adapter,
        # and skipping it would silently train from its own parent.
        if row["status"] != "done":
            raise JobError(f"round {round_id} is {row['status']}, not done: it cannot be a parent")
        trained_on = row.get("base_model")
        if base_model is not None and row["id"] != 0 and trained_on is not None \
                and not _same_model(trained_on, base_model):
            raise JobError(f"round {row['id']} was trained on {trained_on!r}, not on {base_model!r}: its adapter does "
                           f"not fit this model; start from round 0 (--from-round 0) or use the model {trained_on!r} "
                           "(LVLM_STUDIO_MODEL / --model)")
        if row["adapter_path"]:
            chain.insert(0, row["adapter_path"])
        round_id = row["parent_id"]
    return chain


def _same_model(a: str, b: str) -> bool:
    """The same model reference: equal, or two spellings of one local folder."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.is_dir() and pb.is_dir() and pa.resolve() == pb.resolve()


# ----------------------------------------------------------------------------------------------
# Public API (UI / CLI / service)
# ----------------------------------------------------------------------------------------------
def infusion_items(store: Any, cfg: Any) -> list[dict]:
    """STIC stage 2's instruction data: items of ``cfg.infusion_dataset`` (default the evaluation
    dataset) and ``cfg.infusion_split`` with a reference answer, at most ``cfg.infusion_limit``
    (CSR's derived yes/no questions excluded: they are pairs' material, not instructions)."""
    dataset = cfg.infusion_dataset or cfg.eval_dataset
    items = [it for it in store.list_items(dataset=dataset, split=cfg.infusion_split)
             if (it.get("reference") or "").strip() and (it.get("meta") or {}).get("kind") != "csr_existence"]
    return items[: cfg.infusion_limit] if cfg.infusion_limit is not None else items


def training_material(store: Any, cfg: Any) -> list[dict]:
    """The round's training material (pairs, or for a STIC infusion round its instruction items);
    JobError when there is none."""
    if cfg.objective == "stic_infusion":
        items = infusion_items(store, cfg)
        if not items:
            raise JobError(f"no instruction items for STIC's stage 2: items of dataset "
                           f"{cfg.infusion_dataset or cfg.eval_dataset or 'any'!r}, split {cfg.infusion_split!r} "
                           "with a reference answer")
        return items
    pairs = store.training_pairs(methods=cfg.methods, include_auto=cfg.include_auto, round=cfg.pair_round)
    if not pairs:
        raise JobError(
            "no training pairs: review some pairs first, or allow automatic labels (CLI: --include-auto; "
            "app: 'Also use unreviewed pairs')"
            + (f" for methods {', '.join(cfg.methods)}" if cfg.methods else "")
            + (f" from round {cfg.pair_round}" if cfg.pair_round is not None else "")
        )
    if cfg.povid_stage1_epochs > 0:
        from lvlm_studio.training import povid_stage1_pairs

        try:
            povid_stage1_pairs(pairs)
        except ValueError as exc:
            raise JobError(str(exc)) from None
    return pairs


def _site_dirs() -> set[str]:
    """site-packages folders: never put on PYTHONPATH (ahead of the standard library)."""
    import site

    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    return {str(Path(d).resolve()) for d in dirs}


def _spawn(settings: Settings, store: Any, round_id: int, num_processes: int) -> subprocess.Popen:
    """Start round ``round_id``'s process, its output appended to ``runs/round-N/train.log``."""
    run_dir = settings.runs_dir / round_dirname(round_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "train.log"
    store.update_round(round_id, log_path=str(log_path))
    env = dict(os.environ)
    # The log is a file, not a terminal: the libraries' bars would only fill it with
    # "Loading weights 0%...100%" lines; the round's progress lives in the store.
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    env.update(
        LVLM_STUDIO_HOME=str(settings.home),
        LVLM_STUDIO_MODEL=settings.model,
        LVLM_STUDIO_CLIP=settings.clip,
        LVLM_STUDIO_DEVICE=settings.device,
        # `python -m` would put the working directory first on the import path: a folder holding
        # another checkout (or a stray torch.py) would run instead of this package (Python >= 3.11,
        # as pyproject requires).
        PYTHONSAFEPATH="1",
    )
    package_parent = str(Path(__file__).resolve().parent.parent)
    if package_parent not in _site_dirs():  # a checkout that is not installed: make it importable
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            job_command(round_id, settings.home, num_processes),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True,
        )


def start_round(settings: Settings, config: Any = None, parent_id: int | None = None) -> int:
    """Queue a round (parent: ``parent_id`` or the current round, else the base model) and start
    its process. Refuses with ``RoundBusyError`` while another round is queued or running."""
    from lvlm_studio.training import DPORoundConfig

    if config is None:
        cfg = DPORoundConfig()
    elif isinstance(config, DPORoundConfig):
        cfg = config
    else:
        cfg = DPORoundConfig.from_dict(config)
    with _start_lock(settings):
        store = _store(settings)
        try:
            for row in store.list_rounds():
                row = _mark_if_stale(store, row)
                if row["status"] in ACTIVE:
                    raise RoundBusyError(
                        f"round {row['id']} is already {row['status']} (pid {row['pid']}); one training "
                        "job runs at a time: wait for it to finish or cancel it"
                    )
            base = store.ensure_base_round(settings.model)
            if parent_id is None:
                current = store.current_round()
                parent_id = current["id"] if current else base
            adapter_lineage(store, parent_id, settings.model)  # validates the parent chain now, not in the job
            training_material(store, cfg)  # a round with nothing to train on is refused, not created to fail
            check_evaluation_choice(store, cfg)
            round_id = store.create_round(parent_id, settings.model, cfg.to_dict(),
                                          min_id=_highest_round_folder(store.root) + 1)
            try:
                proc = _spawn(settings, store, round_id, cfg.num_processes)
            except BaseException as exc:
                # The round exists: it must not stay 'queued' with no process (that would block
                # every start until the grace period ends), so it ends failed with the reason.
                with contextlib.suppress(Exception):
                    store.update_round(round_id, status="failed", error=f"could not start the job: {exc}")
                if isinstance(exc, Exception):
                    raise JobError(f"could not start the training process: {exc}") from exc
                raise
            _CHILDREN[round_id] = proc
            store.update_round(round_id, pid=proc.pid)
            return round_id
        finally:
            store.close()


def job_command(round_id: int, home: str | Path, num_processes: int = 1) -> list[str]:
    """The round process's command line: this module directly, or under torchrun (what
    ``accelerate launch --multi_gpu`` runs underneath) with ``num_processes`` data-parallel workers.
    Either way ``lvlm_studio.jobs`` is on the command line, which ``pid_alive`` checks."""
    # An absolute --home: pid_alive compares it with the data root of whoever checks.
    job = ["-m", "lvlm_studio.jobs", "run", str(round_id), "--home", os.path.abspath(home)]
    if num_processes <= 1:
        return [sys.executable, *job]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_processes}", *job]


def _signal_job(pid: int, sig: signal.Signals) -> None:
    """Signal a round process and, when it leads its own process group (start_round starts it in a
    new session), every process of that group: a launcher's workers stop with it."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
            return
    except (ProcessLookupError, PermissionError):
        pass
    try:
        os.kill(pid, sig)
    except PermissionError:
        raise JobError(f"the round's process (pid {pid}) belongs to another user: stop it as that user") from None


def status(settings: Settings, round_id: int) -> dict:
    """The round row, after marking it failed if its process is gone."""
    store = _store(settings)
    try:
        row = store.get_round(round_id)
        if row is None:
            raise JobError(f"round {round_id} does not exist")
        row = _mark_if_stale(store, row)
        _forget_ended_children(store)
        return row
    finally:
        store.close()


def reattach(settings: Settings) -> dict | None:
    """After an app/CLI restart: the queued or running round whose process is alive (stale ones
    are marked failed on the way), or None."""
    for row in refresh(settings):
        if row["status"] in ACTIVE:
            return row
    return None


def wait(round_id: int, timeout: float = 600.0, settings: Settings | None = None, poll: float = 0.5) -> dict:
    """Block until the round is done/failed/cancelled; TimeoutError after ``timeout`` seconds."""
    settings = settings or Settings()
    deadline = time.monotonic() + timeout
    while True:
        row = status(settings, round_id)
        if row["status"] in TERMINAL:
            return row
        if time.monotonic() > deadline:
            raise TimeoutError(f"round {round_id} is still {row['status']} after {timeout:.0f} s")
        time.sleep(poll)


def _gone_within(row: dict, home: Path, seconds: float, poll: float) -> bool:
    """Wait up to ``seconds`` for the round's process to end; whether it has."""
    deadline = time.monotonic() + seconds
    while round_process_alive(row, home) and time.monotonic() < deadline:
        time.sleep(poll)
    return not round_process_alive(row, home)


def cancel_round(settings: Settings, round_id: int, timeout: float = 60.0, force: bool = True) -> dict:
    """Ask a round to stop: the request is recorded on the round, then its process gets SIGTERM
    (clean stop → 'cancelled'). Waits up to ``timeout`` s for the process to end (0 = return at
    once); if it has not ended and ``force``, SIGKILL. Once asked, the round ends 'cancelled'
    however it stops: cleanly, killed, dead of the SIGTERM before its handler was installed, or
    reaching its end (its adapter is then not made current), whoever notices first. A round whose
    process had already died keeps its own end (killed, crashed); a signal the process refuses
    (another user's) takes the request back, so the round finishes as it would have."""
    store = _store(settings)
    try:
        row = store.get_round(round_id)
        if row is None:
            raise JobError(f"round {round_id} does not exist")
        row = _mark_if_stale(store, row)  # already gone: 'failed' with its reason, not 'cancelled'
        if row["status"] not in ACTIVE:
            return row
        row = store.request_round_cancel(round_id)
        if row["status"] not in ACTIVE:
            return row
        if round_process_alive(row, store.root):
            try:
                _signal_job(row["pid"], signal.SIGTERM)
            except JobError:
                store.withdraw_round_cancel(round_id)
                raise
        if timeout > 0 and not _gone_within(row, store.root, timeout, poll=0.2) and force:
            _signal_job(row["pid"], signal.SIGKILL)
            _gone_within(row, store.root, 10.0, poll=0.1)
        row = _mark_if_stale(store, row)  # 'cancelled' once the process is gone
        _forget_ended_children(store)
        return row
    finally:
        store.close()


# ----------------------------------------------------------------------------------------------
# The job itself (runs in the subprocess)
# ----------------------------------------------------------------------------------------------
def eval_items_for(store, cfg) -> list[dict]:
    """The evaluation set: items of ``cfg.eval_split`` (and ``cfg.eval_dataset``) whose image has
    ground-truth objects and whose kind (meta["kind"], absent = describe) is in ``cfg.eval_kinds``,
    by image (in the order the images first appear, an image's items together) and at most
    ``eval_limit`` items of whole images (at least one image). An image's POPE probes added after
    its import (``Studio.add_pope_probes``) come with its caption, and a limit never keeps some of
    an image's probes without the rest (a POPE half of yes without its no)."""
    by_image: dict[str, list[dict]] = {}
    for it in store.list_items(dataset=cfg.eval_dataset, split=cfg.eval_split):
        kind = (it.get("meta") or {}).get("kind") or "describe"
        if it.get("objects") is None or kind not in cfg.eval_kinds:
            continue
        by_image.setdefault(it["image_id"], []).append(it)
    chosen: list[dict] = []
    for image_items in by_image.values():
        if cfg.eval_limit is not None and chosen and len(chosen) + len(image_items) > cfg.eval_limit:
            break
        chosen += image_items
    return [
        {
            "item_id": it["id"], "prompt": it["prompt"], "image_path": it["image_path"],
            "objects": it["objects"], "meta": it.get("meta"), "reference": it.get("reference"),
            "dataset": it.get("dataset"), "split": it.get("split"), "image_id": it["image_id"],
        }
        for it in chosen
    ]


def parent_evaluated_on(store, parent: dict, items: list[dict]) -> bool:
    """Has round ``parent`` a stored evaluation on the set of ``items``, over as many items (a later,
    smaller evaluation replaced its figures on the whole set), and an answer to each?"""
    from lvlm_studio.evaluation import evaluation_set_label, evaluation_set_of, round_evaluations

    stored = round_evaluations(parent.get("metrics")).get(evaluation_set_label(evaluation_set_of(items)))
    if stored is None or not isinstance(stored.get("n_items"), int) or stored["n_items"] < len(items):
        return False
    answered = {r["item_id"] for r in store.eval_outputs(parent["id"])}
    return {it["item_id"] for it in items} <= answered


def training_on_evaluation_images(material: list[dict], eval_items: list[dict]) -> str | None:
    """A warning when some of a round's training rows are on its evaluation images (pairs made on
    the evaluation split, or an evaluation set that is the training split): its figures are then
    not held out. None when none are."""
    images = {it.get("image_id") for it in eval_items} - {None}
    shared = sum(1 for row in material if row.get("image_id") in images)
    if not shared:
        return None
    return (f"{shared} of the round's {len(material)} training rows are on its evaluation images: its metrics "
            "are not held out (train on another split than eval_split)")


def check_evaluation_choice(store, cfg) -> None:
    """Refuse, before a round exists, an evaluation set chosen by hand (``eval_dataset``,
    ``eval_split`` or ``eval_kinds`` not the default) that selects no item: a mistyped name gave a
    round that ended 'done' with no evaluation. The defaults may select nothing: a store without a
    test split trains, and the round says it was not evaluated. So does a default set that no
    extractor can score (``evaluation_plan``); one chosen by hand is refused."""
    from lvlm_studio.training import DPORoundConfig

    default = DPORoundConfig()
    chosen = (cfg.eval_dataset is not None or cfg.eval_split != default.eval_split
              or list(cfg.eval_kinds) != default.eval_kinds or cfg.extractor != default.extractor)
    if items := eval_items_for(store, cfg):
        if chosen:  # a set chosen by hand that no extractor can score: refused now, not after training
            evaluation_plan(cfg.extractor, items)
        return
    if not chosen:
        return
    where = _evaluation_set_name(cfg)
    items = store.list_items(dataset=cfg.eval_dataset, split=cfg.eval_split)
    if not items:
        datasets = store.stats()["datasets"]
        if cfg.eval_dataset is None:
            splits = sorted({split for by_split in datasets.values() for split in by_split})
            found = f"no item is in {where} (splits in the store: {', '.join(splits) or 'none'})"
        elif cfg.eval_dataset in datasets:
            found = f"no item is in {where} (its splits: {', '.join(sorted(datasets[cfg.eval_dataset]))})"
        else:
            found = f"no item is in {where}: the store has no such dataset (its datasets: {', '.join(sorted(datasets)) or 'none'})"
    else:
        kinds = sorted({(it.get("meta") or {}).get("kind") or "describe" for it in items if it.get("objects") is not None})
        found = (f"no item of {where} with ground-truth objects is of a kind in eval_kinds {list(cfg.eval_kinds)} "
                 f"(kinds there: {', '.join(kinds) or 'none: no item there has ground-truth objects'})")
    raise JobError(f"the evaluation set is empty: {found}")


def _evaluation_set_name(cfg) -> str:
    """"split 'test'" or "split 'val' of dataset 'coco'": how messages name a round's evaluation set."""
    return f"split {cfg.eval_split!r}" + (f" of dataset {cfg.eval_dataset!r}" if cfg.eval_dataset is not None else "")


def no_evaluation_items_note(store, cfg) -> str:
    """Why a round was not evaluated when its evaluation set is empty, with the settings that would
    pick a set the store holds (an imported set is not the default: the world's test split is)."""
    where = _evaluation_set_name(cfg)
    sets = store.ground_truth_sets()
    from lvlm_studio.evaluation import evaluation_set_label

    hint = ("; sets with ground-truth objects here: " + ", ".join(evaluation_set_label([p]) for p in sets[:5])
            + " (--config eval_dataset=D --config eval_split=S)") if sets else \
        ": import the world's test split or a dataset with objects"
    return f"no evaluation items ({where} with ground-truth objects){hint}"


def evaluation_plan(name: str, items: list[dict]) -> tuple[Any, list[dict], str | None]:
    """(extractor, the items it scores, a note or None). 'auto': ShapesWorld when its vocabulary
    parses every item's ground truth, else COCO when CHAIR's table does. A split that mixes the two
    (the demo world's test scenes beside an imported COCO test split) is evaluated on the larger
    group only, and the note says so: one CHAIR figure cannot mix two vocabularies, and COCO's
    extractor refused the world's objects, failing the round after it had trained. A named
    extractor scores the items it parses, with the same note for the rest. No item parsed is a
    JobError: such a round was scored on nothing and made current as if evaluated."""
    from lvlm_studio.evaluation import CocoExtractor, ShapesWorldExtractor, get_extractor

    def parsed_by(extractor) -> list[dict]:
        kept = []
        for it in items:
            try:
                extractor.ground_truth(it["objects"])
            except ValueError:
                continue
            kept.append(it)
        return kept

    candidates = [get_extractor(name)] if name != "auto" else [ShapesWorldExtractor.from_world(), CocoExtractor()]
    if name == "auto" and items and not any(it.get("dataset") == "shapesworld" for it in items):
        candidates.reverse()  # an imported set: COCO first, where both parse (images without objects)
    groups = []
    for extractor in candidates:
        parsed = parsed_by(extractor)
        if len(parsed) == len(items):
            return extractor, items, None
        groups.append((extractor, parsed))
    extractor, kept = max(groups, key=lambda group: len(group[1]))  # ties: the one listed first
    if not kept:
        unknown = next((o for it in items for o in (it.get("objects") or [])), None)
        vocabularies = " or ".join(sorted((e.name for e, _ in groups), reverse=True))  # shapesworld or coco
        raise JobError(f"none of the {len(items)} evaluation items has ground-truth objects the {vocabularies} "
                       f"vocabulary knows (e.g. {str(unknown)[:60]!r}), so CHAIR and POPE cannot score them: choose "
                       "another evaluation set (eval_dataset, eval_split) or the extractor that knows them")
    datasets = sorted({str(it.get("dataset")) for it in items if it not in kept})
    mix = "mix vocabularies" if name == "auto" else f"are not all in the {extractor.name} vocabulary"
    note = (f"the evaluation items {mix}: scored {len(kept)} of {len(items)} with the {extractor.name} "
            f"extractor; left out the items of dataset(s) {', '.join(datasets)} (set eval_dataset to pick one)")
    return extractor, kept, note


def refuse_broken_round(diverged: bool, eval_rows: list[dict]) -> None:
    """A round whose training diverged, or whose model answers every evaluation item with nothing,
    fails instead of becoming current: an empty answer names no object, so CHAIR_s 0 would read
    as a perfect round, and the next round would start from it (a learning rate of 1e9 did that)."""
    if diverged:
        raise JobError("training diverged (the last logged loss was not a finite number); lower the learning "
                       "rate. The adapter was not made current")
    if eval_rows and not any((row.get("answer") or "").strip() for row in eval_rows):
        raise JobError(f"the trained model answers all {len(eval_rows)} evaluation items with nothing; "
                       "lower the learning rate. The adapter was not made current")


def _evaluate(model, processor, model_id: str, device: str, items, extractor, cfg, progress, should_stop,
              mode_of: dict | None = None):
    """Greedy answers at ``cfg``'s answer length; describe-first as ``mode_of`` (a round's row: a
    parent is answered in its own mode, as ``Studio.evaluate`` answers a round) or else ``cfg`` says."""
    from lvlm_studio.evaluation import evaluate_backend
    from lvlm_studio.models.base import GenerationParams
    from lvlm_studio.models.hf import HFBackend

    backend = HFBackend(model, processor, model_id, device)
    params = GenerationParams(max_new_tokens=cfg.eval_max_new_tokens, temperature=0.0)
    describe_prompt = cfg.evaluation_describe_prompt
    if mode_of is not None:
        from lvlm_studio.training import DPORoundConfig

        describe_prompt = DPORoundConfig.describe_prompt_of(mode_of.get("config"))
    metrics, rows = evaluate_backend(backend, items, extractor, params, cfg.eval_batch_size, progress, should_stop,
                                     describe_prompt=describe_prompt)
    metrics["describe_first"] = describe_prompt is not None
    metrics["max_new_tokens"] = params.max_new_tokens
    return metrics, rows


def _describe_for_infusion(items: list[dict], base_path: str, chain: list[str], cfg: Any, log) -> list[dict]:
    """STIC stage 2's rows: the parent model (base + chain) describes each instruction image with
    ``cfg.describe_prompt`` (greedy), and the description is prepended to the item's question; the
    target is the item's reference answer (``methods.stic.build_description_sft_data``)."""
    from lvlm_studio.media import load_image
    from lvlm_studio.methods.stic import STICConfig, build_description_sft_data
    from lvlm_studio.models.hf import HFBackend
    from lvlm_studio.training import materialize_round_model, resolve_device

    device = resolve_device(cfg.device)
    model, processor = materialize_round_model(base_path, chain, device=device)
    backend = HFBackend(model, processor, "parent", device)
    inputs = [(load_image(it["image_path"]), it["prompt"], it["reference"], it["id"]) for it in items]
    stic_cfg = STICConfig(description_prompt=cfg.describe_prompt, max_new_tokens=cfg.eval_max_new_tokens,
                          temperature=0.0, batch_size=cfg.eval_batch_size, seed=cfg.seed)
    rows = build_description_sft_data(backend, inputs, stic_cfg)
    if not rows:
        raise JobError(f"the parent model described none of the {len(inputs)} instruction images (every "
                       "description came out empty): stage 2 has nothing to infuse")
    for row in rows:
        row["item_id"] = row["image_key"]
    left_out = f" ({len(inputs) - len(rows)} described with nothing, left out)" if len(rows) < len(inputs) else ""
    log(f"described {len(rows)} instruction images{left_out}; e.g. {rows[0]['prompt'][:160]!r} -> {rows[0]['answer'][:60]!r}")
    del model, backend
    return rows


def _stop_with_parent() -> None:
    """Ask Linux to send this worker SIGTERM (a clean stop) when its launcher dies, e.g. SIGKILLed:
    a worker must not train on, and write an adapter, for a round already marked failed."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # not Linux: the status check before 'done' still guards
        return
    if os.getppid() == 1:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def run_round(round_id: int, home: str | Path) -> int:
    """Body of the round process. Returns the process exit code."""
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum, frame):  # noqa: ARG001 - signal handler signature
        received.append(signal.Signals(signum).name)
        with contextlib.suppress(OSError):
            print(f"[round {round_id}] received {received[-1]}: stopping cleanly", flush=True)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    from lvlm_studio.training import distributed_rank

    rank, _, world_size = distributed_rank()
    main = rank == 0  # under torchrun every worker runs this; rank 0 alone writes the store
    settings = Settings(home=Path(home))
    store = _store(settings)
    with store.transaction():
        row = store.get_round(round_id)
        if row is None:
            print(f"round {round_id} does not exist", file=sys.stderr)
            return 2
        if row["status"] not in (("queued",) if main else ACTIVE):
            print(f"round {round_id} is {row['status']}, not queued: nothing to do", flush=True)
            return 0
        if main and row.get("cancel_requested"):  # cancelled before its process got here
            store.update_round(round_id, status="cancelled", error=f"{CANCELLED_BY_REQUEST} before it started")
            return 0
        if main:
            # Under a launcher the recorded pid stays the launcher's: cancel signals its group.
            pid = os.getpid() if world_size == 1 else (row["pid"] or os.getppid())
            store.update_round(round_id, status="running", pid=pid, progress=0.0)

    def log(msg: str) -> None:
        if main:
            # Best effort: a log that cannot be written (a full disk) must not become the round's
            # failure, nor hide the one that is; the store holds status and reason either way.
            with contextlib.suppress(OSError):
                print(f"[round {round_id}] {time.strftime('%H:%M:%S')} {msg}", flush=True)

    launcher = os.getppid()

    def cancelled(msg: str) -> int:
        # A cancel signals the launcher too, but it outlives its workers; a dead (or zombie)
        # launcher means the stop came from _stop_with_parent.
        orphaned = world_size > 1 and not process_running(launcher)
        requested = not orphaned  # other ranks do not read the store: rank 0 decides what is recorded
        if main:
            with store.transaction():
                current = store.get_round(round_id)
                # A cancel also stops the launcher, which may end before this worker gets here: a
                # round whose cancel was asked for is cancelled, launcher or not.
                requested = bool(current.get("cancel_requested"))
                if not requested and orphaned:
                    msg = f"the launcher (pid {launcher}) died; the workers stopped ({msg})"
                elif not requested:
                    # A signal no cancel asked for (the machine shutting down, someone's kill): the
                    # round did not finish, and nobody chose to drop it.
                    msg = (f"stopped by {received[-1] if received else 'a signal'}, which no cancel asked for "
                           f"(the machine shutting down, or the process stopped by hand); "
                           f"{msg.replace('cancelled', 'it stopped', 1)}")
                if current["status"] == "running":  # a failure already recorded stands
                    store.update_round(round_id, status="cancelled" if requested else "failed", error=msg)
            remove_leftovers(store, round_id)
        log(msg)
        return 0 if requested else 1

    if world_size > 1:
        _stop_with_parent()

    try:
        threads = os.environ.get("LVLM_STUDIO_THREADS")
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        from lvlm_studio.training import (
            DPORoundConfig,
            materialize_round_model,
            resolve_device,
            train_round,
            train_sft_round,
        )

        cfg = DPORoundConfig.from_dict(row["config"])
        if cfg.device == "auto" and world_size == 1:
            # The data root's device (LVLM_STUDIO_DEVICE, passed by _spawn) is what 'auto' leaves
            # open: with it set to cpu, the app generated on the CPU while its rounds took the GPU.
            cfg = dataclasses.replace(cfg, device=settings.device)
        chain = adapter_lineage(store, row["parent_id"])
        base_path = resolve_model_path(row["base_model"] or settings.model)
        pairs = training_material(store, cfg)  # again: pairs may have changed since the round was queued
        what = "instruction items (STIC stage 2)" if cfg.objective == "stic_infusion" else "pairs"
        log(f"training on {len(pairs)} {what}; base {base_path}; parent chain {chain or '(base model)'}; "
            f"{torch.get_num_threads()} torch thread(s)")
        other_prompt = 0 if cfg.objective == "stic_infusion" else pairs_under_other_system_prompt(store, pairs, log)
        out_dir = settings.adapters_dir / round_dirname(round_id)
        last_progress = [0.0]

        def on_log(rec: dict) -> None:  # called on rank 0 only
            store.log_round_step(round_id, rec["step"], rec)
            if rec.get("max_steps"):
                p = TRAIN_SHARE * rec["step"] / rec["max_steps"]
                if p - last_progress[0] >= 0.01:
                    last_progress[0] = p
                    store.update_round(round_id, progress=p)

        if cfg.objective == "stic_infusion":
            rows = _describe_for_infusion(pairs, base_path, chain, cfg, log)
            if stop.is_set():
                return cancelled("cancelled while describing the instruction images (no adapter saved)")
            result = train_sft_round(rows, base_path, chain, out_dir, cfg, on_log=on_log, should_stop=stop.is_set)
        else:
            result = train_round(pairs, base_path, chain, out_dir, cfg, on_log=on_log, should_stop=stop.is_set)
        if result.stopped:
            return cancelled(f"cancelled during training after {result.steps} step(s) (no adapter saved)")
        if not main:
            return 0  # rank 0 saved the adapter; it alone evaluates and records the outcome

        # A refusal fails the round below, where remove_leftovers deletes its never-current adapter.
        refuse_broken_round(result.diverged, [])  # before the evaluation: a diverged model is not worth it
        dropped = result.lineage.get("n_dropped_by_balance", 0)
        sft_rows = result.lineage.get("n_sft_rows", 0)
        hardware = result.lineage.get("hardware") or {}
        log(f"trained {result.steps} steps in {result.seconds:.1f} s on {world_size} process(es) on "
            f"{result.n_pairs} pairs ({dropped} left out by balance_answers; SFT term on {sft_rows} of "
            f"{result.n_rows} rows; {hardware.get('dtype')} on {hardware.get('device')}, gradient "
            f"checkpointing {'on' if hardware.get('gradient_checkpointing') else 'off'}); "
            f"adapter {result.adapter_path}")
        store.update_round(round_id, progress=TRAIN_SHARE)

        metrics: dict[str, Any] = {
            "train": {k: v for k, v in result.final.items() if k != "max_steps"},
            "n_pairs": result.n_pairs,
            "n_pairs_other_system_prompt": other_prompt,
            "n_rows": result.n_rows,
            "n_dropped_by_balance": dropped,
            "n_sft_rows": sft_rows,
            "hardware": hardware,
            "steps": result.steps,
            "train_seconds": result.seconds,
            "eval": None,
        }
        if result.lineage.get("povid_stages"):
            metrics["povid_stages"] = result.lineage["povid_stages"]
        items = eval_items_for(store, cfg)
        rows: list[dict] = []
        extractor = None
        if not items:
            metrics["eval_note"] = no_evaluation_items_note(store, cfg)
        else:
            try:
                extractor, items, mixed = evaluation_plan(cfg.extractor, items)
                if mixed:
                    metrics["eval_note"] = mixed
            except JobError as exc:  # the default set, unscorable (one chosen by hand was refused at start)
                metrics["eval_note"] = f"not evaluated: {exc}"
        if extractor is not None and (overlap := training_on_evaluation_images(pairs, items)):
            metrics["eval_note"] = "; ".join(filter(None, [metrics.get("eval_note"), overlap]))
        if metrics.get("eval_note"):
            log(metrics["eval_note"])
        if extractor is not None:
            from lvlm_studio.evaluation import EvaluationCancelled, with_evaluation

            device = resolve_device(cfg.device)
            try:
                parent = store.get_round(row["parent_id"]) if row["parent_id"] is not None else None
                # The parent is evaluated unless its evaluation on this set covers these items (it may
                # have been evaluated on another set only, or on fewer items): compare reads both on
                # the same set.
                if cfg.eval_parent and parent is not None and not parent_evaluated_on(store, parent, items):
                    log(f"evaluating the parent round {parent['id']} on {len(items)} items (it has no stored "
                        "evaluation of them)")
                    model, processor = materialize_round_model(base_path, chain, device=device)
                    pm, prow = _evaluate(model, processor, f"round {parent['id']}", device, items, extractor,
                                         cfg, None, stop.is_set, mode_of=parent)
                    with store.transaction():  # read again under the lock: another evaluation may have landed
                        store.add_eval_outputs(parent["id"], prow)
                        now = store.get_round(parent["id"])["metrics"]
                        store.update_round(parent["id"], metrics=with_evaluation(now, pm))
                    del model
                log(f"evaluating round {round_id} on {len(items)} items ({extractor.name} objects)")
                model, processor = materialize_round_model(base_path, [*chain, str(out_dir)], device=device)

                def progress(done: int, total: int) -> None:
                    store.update_round(round_id, progress=TRAIN_SHARE + (1 - TRAIN_SHARE) * done / max(total, 1))

                em, rows = _evaluate(model, processor, f"round {round_id}", device, items, extractor, cfg,
                                     progress, stop.is_set)
            except EvaluationCancelled as exc:
                return cancelled(f"cancelled during evaluation ({exc}); the adapter was not made current")
            metrics = with_evaluation(metrics, em)
            log(f"evaluation: {em}")
        if stop.is_set():
            return cancelled("cancelled after training; the adapter was not made current")
        refuse_broken_round(False, rows)
        # Outputs and 'done' in one transaction: a crash leaves either nothing or the finished round.
        with store.transaction():
            current = store.get_round(round_id)
            finished = current["status"] == "running" and not current.get("cancel_requested")
            if finished:
                if rows:
                    store.add_eval_outputs(round_id, rows)
                store.update_round(round_id, status="done", adapter_path=str(out_dir), metrics=metrics, progress=1.0)
            elif current["status"] == "running":  # a cancel asked for after the last check of the stop flag
                store.update_round(round_id, status="cancelled",
                                   error=f"{CANCELLED_BY_REQUEST} as it finished; the adapter was not made current")
        if not finished:  # or e.g. the launcher was killed and the round marked failed while this worker ran on
            log(f"the round is {store.get_round(round_id)['status']} now: that outcome stands, the adapter is not "
                "made current")
            remove_leftovers(store, round_id)
            return 1
        log("done")
        return 0
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the store
        _log_traceback()
        message = f"{type(exc).__name__}: {exc}" + (f" (rank {rank} of {world_size})" if world_size > 1 else "")
        try:
            with store.transaction():  # an outcome already written (done, or failed by the launcher) stands
                if store.get_round(round_id)["status"] not in TERMINAL:
                    store.update_round(round_id, status="failed", error=message[:2000])
            if main:
                remove_leftovers(store, round_id)
        except Exception:  # noqa: BLE001 - the store itself failed; the log has the traceback
            _log_traceback()
        return 1
    finally:
        store.close()


def _log_traceback() -> None:
    """The failure's traceback into the job's log, if the log can still be written: on a full disk
    it cannot, and the failure must still reach the store (it stayed 'running' with no reason)."""
    with contextlib.suppress(OSError):
        traceback.print_exc()
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lvlm_studio.jobs", description="Run one DPO round job.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a queued round (started by start_round)")
    run.add_argument("round_id", type=int)
    run.add_argument("--home", required=True, help="the data root (LVLM_STUDIO_HOME)")
    args = parser.parse_args(argv)
    if args.command == "run":
        return run_round(args.round_id, args.home)
    return 2


if __name__ == "__main__":
    sys.exit(main())
