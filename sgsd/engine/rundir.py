"""One run per output directory (docs/training.md, "Run directories").

A run directory holds one run: its ``config.yaml``, ``metrics.jsonl``, ``samples.jsonl``,
``checkpoints/`` and the logs that optional features add (listed in :data:`RUN_FILES`).
Every run has an id; each metrics record and each checkpoint carries it, so a resume can
check that the checkpoint and the metrics it appends to are the same run's.

:func:`plan_run` decides, from the options and what is on disk, whether this is a fresh
start or a resume and from which checkpoint; it reads but never writes, and it needs
neither torch nor the model, so a bad start is refused in well under 2 s. Once the run
has really started (model, data and rollout engine loaded), rank 0 calls
:func:`start_run`, which is the first write: it clears an overwritten run, drops what a
resume from an earlier step supersedes, and writes ``config.yaml`` atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from sgsd.config import ConfigError, TrainConfig, resumed_config

__all__ = [
    "MANIFEST",
    "RUN_FILES",
    "NothingToDo",
    "RunPlan",
    "checkpoints",
    "checkpoint_problem",
    "fsync_dir",
    "new_run_id",
    "plan_run",
    "start_run",
    "write_manifest",
]

#: What a run writes into its output directory. ``--overwrite`` deletes these; a fresh
#: start refuses when any but config.yaml exists. A feature that writes a new log adds
#: its name here.
RUN_FILES = (
    "checkpoints",
    "metrics.jsonl",
    "samples.jsonl",
    "skill_bank",
    "eval.jsonl",
    "eval_samples",
    "tb",
    "wandb",
    "config.yaml",
)
_STEP_PREFIX = "step_"
#: Written last into every checkpoint: each file's size and sha256 (resume verifies them).
MANIFEST = "manifest.json"


class NothingToDo(Exception):  # noqa: N818 - an outcome, not an error
    """The resumed checkpoint already reached ``max_steps``."""


@dataclass(frozen=True)
class RunPlan:
    out_dir: Path
    run_id: str
    checkpoint: Path | None  # resume from here; None: fresh start
    resume_step: int  # the checkpoint's step (0 when fresh)
    overwrite: bool  # delete the earlier run's files in start_run
    config: TrainConfig | None = None  # the run's options (a resume: the checkpoint's)
    notes: list[str] = field(default_factory=list)  # what the user should hear: changed
    # options, damaged checkpoints skipped, an unverified (manifest-less) checkpoint


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints (they hold trainer_state.json) under out_dir, oldest first."""
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(_STEP_PREFIX) and (p / "trainer_state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(_STEP_PREFIX) :]))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(path: Path) -> None:
    """Record every file under checkpoint directory ``path`` (size, sha256) in
    :data:`MANIFEST`, written atomically; call it once everything else is written."""
    files = {
        f.relative_to(path).as_posix(): {"size": f.stat().st_size, "sha256": _sha256(f)}
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name != MANIFEST
    }
    tmp = path / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"version": 1, "files": files}, indent=1))
    os.replace(tmp, path / MANIFEST)


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with checkpoint ``path`` against its manifest (a missing, truncated
    or changed file, named), or None when every file matches. A checkpoint without a
    manifest (written before manifests existed) is not checked: None."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != want["size"]:
            return f"{name} has {size} bytes, the manifest says {want['size']}"
        if _sha256(f) != want["sha256"]:
            return f"{name} does not match its sha256 in the manifest (changed or corrupt)"
    return None


def _checkpoint_meta(path: Path) -> dict:
    try:
        return json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--resume {path}: unreadable trainer_state.json ({e})") from None


def metrics_run_id(out_dir: Path) -> str | None:
    """The run id of ``metrics.jsonl``'s first record (None: no file, no record, no id)."""
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    with open(path) as f:
        for line in f:
            if line.strip():
                try:
                    return json.loads(line).get("run_id")
                except ValueError:
                    return None
    return None


def _describe(out_dir: Path) -> str:
    held = [name for name in RUN_FILES[:-1] if (out_dir / name).exists()]
    steps = [p.name[len(_STEP_PREFIX) :].lstrip("0") or "0" for p in checkpoints(out_dir)]
    if steps:
        held[held.index("checkpoints")] = f"checkpoints of steps {', '.join(steps)}"
    return ", ".join(held)


def plan_run(cfg: TrainConfig, world_size: int, user_set: set[str] | None = None) -> RunPlan:
    """Validate the run directory against the options; raise :class:`ConfigError` (a
    one-line message naming the flag) or :class:`NothingToDo`. Writes nothing.

    A resume verifies the checkpoint against its manifest (``--resume latest`` takes the
    newest one that verifies) and takes the run's options from it: ``user_set`` (the
    options the user gave, see :func:`sgsd.config.user_options`) may change only the
    :data:`sgsd.config.RESUMABLE` ones."""
    out_dir = Path(cfg.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--output-dir {out_dir}: exists and is not a directory")
    if cfg.overwrite and cfg.resume is not None:
        raise ConfigError("--overwrite starts a new run and --resume continues one: pick one")

    checkpoint, notes = None, []
    if cfg.resume == "latest":
        found = checkpoints(out_dir)
        for candidate in reversed(found):
            problem = checkpoint_problem(candidate)
            if problem is None:
                checkpoint = candidate
                break
            notes.append(f"skipped the damaged checkpoint {candidate}: {problem}")
        if found and checkpoint is None:
            raise ConfigError(
                f"--resume: no checkpoint in {out_dir / 'checkpoints'} verifies against its "
                f"manifest ({'; '.join(notes)}); start again with --overwrite"
            )
    elif cfg.resume is not None:
        checkpoint = Path(cfg.resume)
        if not (checkpoint / "trainer_state.json").is_file():
            raise ConfigError(
                f"--resume {cfg.resume}: not a checkpoint directory (no trainer_state.json); "
                "a bare --resume continues the newest checkpoint in --output-dir"
            )
        problem = checkpoint_problem(checkpoint)
        if problem is not None:
            raise ConfigError(
                f"--resume {cfg.resume}: damaged checkpoint, {problem}; resume from an earlier "
                "one (a bare --resume takes the newest that verifies)"
            )

    if checkpoint is None:  # a fresh start
        held = _describe(out_dir) if out_dir.is_dir() else ""
        if held and not cfg.overwrite:
            raise ConfigError(
                f"--output-dir {out_dir} holds another run ({held}): "
                "add --resume to continue it or --overwrite to replace it"
            )
        return RunPlan(out_dir, new_run_id(), None, 0, cfg.overwrite, cfg)

    meta = _checkpoint_meta(checkpoint)
    if not (checkpoint / MANIFEST).is_file():
        notes.append(f"{checkpoint} has no {MANIFEST} (an older checkpoint): not verified")
    if isinstance(meta.get("config"), dict):
        cfg, changes = resumed_config(cfg, meta["config"], set(user_set or ()))
        notes += [f"changed on resume: {c}" for c in changes]
    step = int(meta["step"])
    if step >= cfg.max_steps:
        raise NothingToDo(
            f"nothing to do: {checkpoint} is at step {step} and --max-steps is "
            f"{cfg.max_steps} (raise --max-steps to train on)"
        )
    if meta.get("world_size", world_size) != world_size:
        raise ConfigError(
            f"--resume {checkpoint}: written by {meta['world_size']} ranks; resume with the "
            f"same number of ranks (got {world_size})"
        )
    run_id = meta.get("run_id")
    theirs = metrics_run_id(out_dir)
    own = checkpoints(out_dir)
    others = {_checkpoint_meta(p).get("run_id") for p in own} - {run_id}
    if (theirs is not None and theirs != run_id) or others:
        raise ConfigError(
            f"--resume {checkpoint}: the checkpoint is from run {run_id} but --output-dir "
            f"{out_dir} holds run {theirs or sorted(map(str, others))[0]}; resume into that "
            "run's own directory, or into a new one"
        )
    return RunPlan(out_dir, run_id or new_run_id(), checkpoint, step, False, cfg, notes)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def start_run(plan: RunPlan, cfg: TrainConfig) -> list[str]:
    """Rank 0, once the run has really started: the first write into the run directory.

    ``--overwrite`` deletes the earlier run's files; a resume from an earlier step of
    this directory's run deletes the newer checkpoints (the run continues from the
    earlier step, so they are no longer its future; metrics and samples after that step
    are dropped by the metrics logger). Then ``config.yaml`` is written atomically.
    Returns what was deleted, for the log.
    """
    out = plan.out_dir
    removed = []
    if plan.overwrite:
        for name in RUN_FILES:
            if (out / name).exists() or (out / name).is_symlink():
                _remove(out / name)
                removed.append(name)
    elif plan.checkpoint is not None:
        for path in checkpoints(out):
            if int(path.name[len(_STEP_PREFIX) :]) > plan.resume_step:
                _remove(path)
                removed.append(f"checkpoints/{path.name}")
    out.mkdir(parents=True, exist_ok=True)
    for tmp in (out / "checkpoints").glob(".tmp-*") if (out / "checkpoints").is_dir() else ():
        _remove(tmp)
    cfg.save(out / "config.yaml")
    fsync_dir(out)
    return removed


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename into it) to disk, where the OS allows."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
