"""Atomic checkpoints and exact resume.

A checkpoint is a directory ``OUTPUT/checkpoints/step_000025/``::

    trainable.safetensors   every trainable parameter (LoRA adapter or full model): resume
    adapter/                the PEFT LoRA adapter (save_pretrained; LoRA runs only)
    model/                  standalone merged model + tokenizer (LoRA merged into the base
                            weights): AutoModelForCausalLM / vLLM load it with nothing else.
                            Written into the run's last checkpoint (a model-sized copy)
    optimizer.pt            full optimizer state   scheduler.pt   LR-scheduler state
    rng/rank{r}.pt          python / numpy / torch (+ CUDA) RNG states of every rank
    skill_bank.json         SkillBank.state_dict()
    trainer_state.json      run id, step, data position, world size, config
    manifest.json           every other file's size and sha256, written last; a resume
                            verifies it (sgsd.engine.rundir.checkpoint_problem)

Nothing in a checkpoint is unpickled into arbitrary objects: the ``.pt`` files hold only
tensors and plain data (RNG states included) and load with ``torch.load(...,
weights_only=True)``; a file that needs more is refused with a one-line error naming it
(:func:`check_loadable`, run before anything heavy on resume; docs/threat-model.md).

It is written into ``.tmp-step_000025`` and renamed into place, so a crash mid-write never
leaves a directory that looks complete. Model and optimizer states are gathered as *full*
state dicts (``torch.distributed.checkpoint.state_dict``), so one format serves single
process, DDP and FSDP2. Only rank 0 writes, except each rank's RNG file (all ranks write
into the temporary directory before rank 0 renames it).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from sgsd.engine.rundir import checkpoints, fsync_dir, write_manifest

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "GracefulStop",
    "TrainerState",
    "check_loadable",
    "load_checkpoint",
    "load_extra",
    "load_pt",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

_PREFIX = "step_"


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps completed
    data_position: int = 0  # problems consumed (all ranks)
    world_size: int = 1
    run_id: str = ""  # the run this state belongs to (sgsd.engine.rundir)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded safely; the message is one line naming it."""


def rng_state() -> dict:
    """Every RNG's state as tensors and plain data (loadable with ``weights_only=True``)."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "python": {
            "version": version,
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`'s states (or those of a checkpoint written before RNG
    states were plain data: python and numpy tuples)."""
    py, nps = state["python"], state["numpy"]
    if isinstance(py, dict):
        py = (py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"])
    if isinstance(nps, dict):
        nps = {
            "bit_generator": nps["bit_generator"],
            "state": {"key": nps["key"].numpy().astype(np.uint32), "pos": nps["pos"]},
            "has_gauss": nps["has_gauss"],
            "gauss": nps["gauss"],
        }
    random.setstate(py)
    np.random.set_state(nps)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_array_globals() -> list:
    """What a numpy array's pickle names: the RNG files of checkpoints written before RNG
    states were tensors hold numpy's MT19937 key as one (uint32)."""
    names = []
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        try:
            names.append(__import__(module, fromlist=["_reconstruct"])._reconstruct)
        except (ImportError, AttributeError):
            continue
    return [*names, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_pt(path: Path, *, mmap: bool = False, name: str | None = None):
    """``torch.load(path, weights_only=True)``: tensors and plain data only (numpy arrays
    too in RNG files). Anything else raises :class:`CheckpointError` naming the file
    (as ``name``, default its path)."""
    import pickle
    import re

    allowed = _numpy_array_globals() if path.parent.name == "rng" else []
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError, OSError) as e:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        why = f"it names {found.group(1)}" if found else text.strip().split("\n")[0][:120]
        raise CheckpointError(
            f"{name or path} is refused: it does not load as tensors and plain data "
            f"without running code ({why}); a checkpoint from an untrusted source, or damaged"
        ) from None


def check_loadable(path: Path) -> None:
    """Load every ``.pt`` file of checkpoint ``path`` the safe way (memory-mapped, so a
    large optimizer state is not read); :class:`CheckpointError` names the first that
    is refused."""
    for f in sorted(Path(path).rglob("*.pt")):
        load_pt(f, mmap=True, name=f.relative_to(path).as_posix())


def _checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _full_state(policy, optimizer) -> tuple[dict, dict]:
    """Full (unsharded, CPU) model and optimizer state dicts, populated on rank 0.
    A collective under FSDP2; plain copies otherwise."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (
        get_model_state_dict(policy, options=opts),
        get_optimizer_state_dict(policy, optimizer, options=opts),
    )


def save_checkpoint(
    output_dir,
    *,
    policy,
    optimizer,
    scheduler,
    bank,
    state: TrainerState,
    config: dict,
    rank: int,
    keep: int = 0,
    tokenizer=None,
    export_model: bool = True,
    extra: dict | None = None,
    protect: frozenset[int] = frozenset(),
) -> Path:
    """Write a checkpoint for ``state.step`` atomically; all ranks must call it.
    ``export_model``: also write the standalone merged ``model/`` (with ``tokenizer``).
    ``extra``: ``{name: object}`` written by rank 0 as ``name.pt`` (tensors, numbers,
    strings; read back with :func:`load_extra`), e.g. the EMA teacher's weights.
    ``protect``: steps whose checkpoints pruning to ``keep`` never deletes (evaluated ones).
    """
    from safetensors.torch import save_file

    from sgsd.engine.model import trainable_names

    root = _checkpoint_root(output_dir)
    final = root / f"{_PREFIX}{state.step:06d}"
    tmp = root / f".tmp-{_PREFIX}{state.step:06d}"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "rng").mkdir(parents=True)
    _barrier()
    torch.save(rng_state(), tmp / "rng" / f"rank{rank}.pt")
    model_sd, optim_sd = _full_state(policy, optimizer)
    if export_model:
        _export_merged(policy, tokenizer, tmp / "model", rank)
    if rank == 0:
        trainable = {n: model_sd[n].contiguous() for n in trainable_names(policy)}
        save_file(trainable, str(tmp / "trainable.safetensors"))
        if policy.is_peft:
            # policy.model's own keys: drop the Policy wrapper's "model." prefix
            inner = {k.removeprefix("model."): v for k, v in model_sd.items()}
            policy.model.save_pretrained(
                str(tmp / "adapter"), state_dict=inner, safe_serialization=True
            )
        torch.save(optim_sd, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "skill_bank.json").write_text(json.dumps(bank.state_dict()))
        for name, obj in (extra or {}).items():
            torch.save(obj, tmp / f"{name}.pt")
        meta = {
            "step": state.step,
            "data_position": state.data_position,
            "world_size": state.world_size,
            "run_id": state.run_id,
            "config": config,
        }
        (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=2))
    del model_sd, optim_sd
    _barrier()
    if rank == 0:
        write_manifest(tmp)  # last: it covers every rank's files
        if final.exists():  # re-saving the same step (e.g. stop signal right after a save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        _prune(root, keep, protect)
        log.info("saved checkpoint %s", final)
    _barrier()
    return final


def _export_merged(policy, tokenizer, path: Path, rank: int) -> None:
    """The model with its LoRA deltas merged in, under the base model's names, saved with
    ``save_pretrained`` (config, generation config, safetensors) and the tokenizer. A
    collective under FSDP2 (the weights are gathered); only rank 0 copies and writes."""
    from sgsd.engine.model import gathered, merged_weights
    from sgsd_kernels import hf

    base = hf.unwrap_causal_lm(policy.model)
    with gathered(policy):
        merged = (
            {k: v.detach().to("cpu", copy=True).contiguous() for k, v in merged_weights(policy)}
            if rank == 0
            else None
        )
    if rank != 0:
        return
    base.save_pretrained(str(path), state_dict=merged, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))


def _prune(root: Path, keep: int, protect: frozenset[int] = frozenset()) -> None:
    if keep <= 0:
        return
    for old in checkpoints(root.parent)[:-keep]:
        if int(old.name[len(_PREFIX) :]) not in protect:
            shutil.rmtree(old, ignore_errors=True)


def load_extra(path: Path, name: str):
    """The object saved as ``extra[name]`` in checkpoint ``path``, or None if absent."""
    f = Path(path) / f"{name}.pt"
    return load_pt(f) if f.is_file() else None


def load_checkpoint(path: Path, *, policy, optimizer, scheduler, rank: int, world_size: int):
    """Restore everything in place (all ranks); returns ``(TrainerState, bank state dict)``."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from sgsd.engine.model import trainable_names

    meta = json.loads((path / "trainer_state.json").read_text())
    if meta["world_size"] != world_size:
        raise ValueError(
            f"checkpoint {path} was written by {meta['world_size']} ranks; "
            f"resume with the same --nproc_per_node (got {world_size})"
        )
    trainable = load_file(str(path / "trainable.safetensors"))
    expected = set(trainable_names(policy))
    if set(trainable) != expected:
        raise ValueError(
            f"checkpoint {path} does not match the model's trainable parameters: "
            f"missing {sorted(expected - set(trainable))[:5]}, "
            f"unexpected {sorted(set(trainable) - expected)[:5]}"
        )
    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(policy, trainable, options=opts)
    set_optimizer_state_dict(
        policy,
        optimizer,
        options=opts,
        optim_state_dict=load_pt(path / "optimizer.pt"),
    )
    scheduler.load_state_dict(load_pt(path / "scheduler.pt"))
    set_rng_state(load_pt(path / "rng" / f"rank{rank}.pt"))
    bank_state = json.loads((path / "skill_bank.json").read_text())
    state = TrainerState(
        step=meta["step"],
        data_position=meta["data_position"],
        world_size=world_size,
        run_id=meta.get("run_id", ""),
    )
    return state, bank_state


class GracefulStop:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint and exits after the current
    step. A second signal more than ``grace_s`` later aborts at once (KeyboardInterrupt).

    The grace window is for torchrun: Ctrl-C reaches the workers from the terminal *and*
    from the torchrun agent, which forwards it; usually the two coalesce into one Python
    signal, but an echo that arrives after the handler ran must not count as the second,
    aborting signal. (The agent SIGKILLs workers still running 30 s after it was
    signalled, so under torchrun a step longer than that loses the save.)"""

    def __init__(self, grace_s: float = 5.0):
        self.requested = False
        self.grace_s = grace_s
        self._first = 0.0
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            if time.monotonic() - self._first < self.grace_s:
                return
            self.restore()
            raise KeyboardInterrupt
        self.requested = True
        self._first = time.monotonic()
        log.warning(
            "received %s: finishing this step, saving a checkpoint, then exiting "
            "(signal again to abort)",
            signal.Signals(signum).name,
        )

    def should_stop(self, device: torch.device | None = None) -> bool:
        """True on every rank if any rank was signalled (a collective: call on all ranks)."""
        flag = self.requested
        if dist.is_available() and dist.is_initialized():
            t = torch.tensor([1.0 if flag else 0.0], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item() > 0)
        return flag

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
