"""SGSD training loop (docs/design.md §2-§3), end to end.

    torchrun --nproc_per_node=1 sgsd/train.py --max-steps 3 --output-dir runs/demo
    torchrun --nproc_per_node=8 sgsd/train.py --model Qwen/Qwen3-1.7B \\
        --dataset BytedTsinghua-SIA/DAPO-Math-17k --output-dir runs/qwen3-1.7b-sgsd
    sgsd-train --nproc-per-node 2 --max-steps 3 --output-dir runs/demo   # the same
    python -m sgsd.train --resume --output-dir runs/demo   # continue the newest checkpoint

:func:`sgsd.cli.validate` checks the options and plans the run directory before anything
heavy is imported, then :func:`run` reads top to bottom: :func:`setup` builds
a :class:`Trainer` (model, data, skill bank, loss strategy, optimizer, resume, rollout
engine), the run starts (the first write into its directory), :func:`train_step` takes
each optimizer step, :func:`finish` releases what setup acquired. One optimizer step:

1. the policy samples G completions for each of this rank's problems (vLLM colocated in
   this process, or HF generate), after its current weights are pushed into vLLM;
2. math-verify gives each rollout a reward of +1 / -1;
3. the skill bank retrieves K skill-mistake teachers per problem (BM25);
4. the live model (current weights, no grad) scores the *same* completion tokens under
   each teacher context: last hidden states -> ``sgsd_kernels.linear_logprobs`` (the
   ``[T, V]`` logits are never materialised), in bounded micro-batches;
5. ONE student forward with grad per rollout -> the loss strategy (SGSD:
   ``sgsd_kernels.linear_gated_kd_loss``) -> backward, accumulated over micro-batches;
6. clip the gradient norm, optimizer and scheduler step; every ``skill_update_every``
   steps, the online skill-bank update (:mod:`sgsd.skills.online_update`);
7. metrics over all ranks, the console line;
8. (in :func:`run`) maybe checkpoint, stop on a signal.

Steps 2-5 live in :mod:`sgsd.engine.scoring`, the loss in the method the registry builds
(:mod:`sgsd.methods`), metrics in :mod:`sgsd.metrics`; what the loop drives (model,
rollouts, teacher weights, checkpoints, run directory) in :mod:`sgsd.engine`. Everything
configurable lives in :class:`sgsd.config.TrainConfig`.
"""

from __future__ import annotations

if __name__ == "__main__":  # python sgsd/train.py, python -m sgsd.train, torchrun --module
    # Validate the options before the imports below (torch alone takes seconds); the run
    # starts at the bottom of this file.
    from sgsd.cli import validate as _validate

    _PREPARED = _validate()
    if isinstance(_PREPARED, int):
        raise SystemExit(_PREPARED)

import faulthandler
import gc
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from sgsd import cli, console
from sgsd.config import TrainConfig
from sgsd.engine.checkpoint import (
    GracefulStop,
    TrainerState,
    load_checkpoint,
    load_extra,
    save_checkpoint,
)
from sgsd.engine.distributed import Dist, reduce_over_ranks, seed_everything, setup_distributed
from sgsd.engine.model import Policy, gathered, load_policy, model_source, wrap_for_parallelism
from sgsd.engine.optim import build_optimizer, build_scheduler, resume_schedule
from sgsd.engine.problems import ProblemSampler, load_problem_set
from sgsd.engine.rollout import RolloutEngine, build_rollout_engine
from sgsd.engine.rundir import RunPlan, start_run
from sgsd.engine.scoring import Rollout, forward_backward, make_rollouts
from sgsd.engine.teacher_weights import TeacherWeights
from sgsd.eval.during_training import TrainingEval
from sgsd.methods import build_method
from sgsd.methods.base import LossStrategy
from sgsd.metrics import MetricsLogger, format_line, reduce_sums, step_record
from sgsd.skills.bank import DEFAULT_BANK_FILE, SkillBank
from sgsd.skills.online_update import OnlineBankUpdater

__all__ = ["Trainer", "finish", "main", "run", "setup", "train_step"]

log = logging.getLogger("sgsd.train")


@dataclass
class Trainer:
    """Everything :func:`setup` builds; :func:`train_step` reads it and advances ``state``.
    A feature that needs more per-run objects adds a field here and builds it in setup."""

    cfg: TrainConfig
    env: Dist
    policy: Policy  # the trained model (also what teachers run on)
    model: torch.nn.Module  # what the student forward runs through: DDP wrapper or policy
    tokenizer: object
    strategy: LossStrategy
    problems: list  # sgsd.data.Problem, those whose student prompt fits
    prompt_ids: list[list[int]]  # each problem's rendered student prompt
    sampler: ProblemSampler
    bank: SkillBank
    params: list[torch.nn.Parameter]  # trainable parameters (clipped, optimised)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    engine: RolloutEngine
    state: TrainerState
    last_saved: int  # step of the newest checkpoint this run wrote or resumed from; -1: none
    bank_updater: OnlineBankUpdater  # online skill-bank update (rank 0 updates, all receive)
    last_exported: bool = False  # whether that checkpoint holds the merged model/ export
    bar: object = None  # tqdm bar on rank 0, when enabled and stderr is a terminal
    metrics_log: MetricsLogger | None = None  # built once the run has started (see run)
    teacher: TeacherWeights | None = None  # which weights the teachers score with
    evaluator: TrainingEval | None = None  # evaluation during training (eval_every)
    out_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.cfg.output_dir)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id


# ----------------------------------------------------------------------------- setup
def setup(cfg: TrainConfig, env: Dist, plan: RunPlan) -> Trainer:
    """Build the run; all ranks call it. It writes nothing into the run directory (a
    failed setup leaves it as it was). The order matters where noted."""
    seed_everything(cfg.seed)

    # 1. model, data, skills, loss (rank 0 builds/fetches the weights once, then all load)
    if env.main:
        model_source(cfg)
    if dist.is_initialized():
        dist.barrier()
    policy, tokenizer, source = load_policy(cfg, env.device)
    strategy = build_method(cfg)
    bank_file = cfg.skill_bank or DEFAULT_BANK_FILE
    bank = SkillBank.load(bank_file, online_capacity=cfg.skill_online_capacity)
    problems, prompt_ids = load_problem_set(cfg, tokenizer, strategy, bank)
    log.info(
        "%d problems, skill bank %s, loss %s, K=%d, %d rank(s)",
        len(problems),
        cfg.skill_bank or "(bundled default)",
        strategy.name,
        strategy.num_teachers,
        env.world_size,
    )

    # 2. distributed wrapper, then the optimizer (FSDP2 replaces the parameters)
    model = wrap_for_parallelism(policy, cfg.parallelism, env.device, env.world_size)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params)
    scheduler = build_scheduler(cfg, optimizer)
    # Before resuming: `frozen` keeps the initial weights; ema/periodic state is loaded below.
    teacher = None
    if strategy.num_teachers:
        teacher = TeacherWeights(
            cfg.teacher, policy, ema_decay=cfg.teacher_ema_decay, every=cfg.teacher_refresh_every
        )
    strategy.teacher_weights = teacher

    # 3. resume: weights, optimizer, scheduler, RNG, data position, skill bank
    state = TrainerState(world_size=env.world_size, run_id=plan.run_id)
    ckpt = plan.checkpoint
    if ckpt is not None:
        state, bank_state = load_checkpoint(
            ckpt,
            policy=policy,
            optimizer=optimizer,
            scheduler=scheduler,
            rank=env.rank,
            world_size=env.world_size,
        )
        state.run_id = plan.run_id
        resume_schedule(scheduler)  # this run's --max-steps may differ from the saved one
        bank = SkillBank.from_state_dict(bank_state)
        if teacher is not None and teacher.mode in ("ema", "periodic"):
            saved = load_extra(ckpt, "teacher")
            if saved is None:
                raise ValueError(f"checkpoint {ckpt} holds no teacher={teacher.mode} state")
            teacher.load_state_dict(saved)
        log.info("resuming run %s from %s at step %d", plan.run_id, ckpt, state.step)

    # 4. rollout engine (weights are pushed before every generation, so also after resume);
    # its context also fits the evaluation prompts and completions
    evaluator = TrainingEval(
        cfg,
        tokenizer,
        Path(cfg.output_dir),
        rank=env.rank,
        world_size=env.world_size,
        resume_step=state.step,
    )
    engine = build_rollout_engine(
        cfg,
        policy,
        tokenizer,
        source,
        env.device,
        rank=env.rank,
        max_model_len=max(
            max(map(len, prompt_ids)) + cfg.max_completion_tokens,
            OnlineBankUpdater.context_len(cfg),  # room for the skill-bank prompts
            evaluator.max_model_len(),
        ),
    )
    log.info("rollouts: %s", engine.name)

    # 5. progress bar (metrics files are opened in run(), once the run has started)
    bar = None
    if env.main and cfg.progress_bar and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=state.step, desc="sgsd", dynamic_ncols=True)
    return Trainer(
        cfg=cfg,
        env=env,
        policy=policy,
        model=model,
        tokenizer=tokenizer,
        strategy=strategy,
        problems=problems,
        prompt_ids=prompt_ids,
        sampler=ProblemSampler(len(problems), cfg.seed),
        bank=bank,
        params=params,
        optimizer=optimizer,
        scheduler=scheduler,
        engine=engine,
        state=state,
        last_saved=state.step if ckpt is not None else -1,
        bank_updater=OnlineBankUpdater(cfg, cfg.output_dir, rank=env.rank),
        bar=bar,
        teacher=teacher,
        evaluator=evaluator,
    )


# ----------------------------------------------------------------------------- one step
def train_step(t: Trainer) -> tuple[dict, list[Rollout]]:
    """One optimizer step (steps 1-7 of the module docstring); all ranks call it.
    Returns the step's metrics record and this rank's rollouts."""
    cfg, env = t.cfg, t.env
    step = t.state.step + 1
    t0 = time.perf_counter()

    # 1. rollouts: G samples per problem, one batched call, from the live weights
    per_rank = cfg.problems_per_step // env.world_size
    global_ids = t.sampler.take(t.state.data_position, cfg.problems_per_step)
    mine = global_ids[env.rank * per_rank : (env.rank + 1) * per_rank]
    batch = ([t.problems[i] for i in mine], [t.prompt_ids[i] for i in mine])
    with gathered(t.policy):  # full weights under FSDP2 (a no-op otherwise)
        t.engine.sync_weights(t.policy)
    completions = t.engine.generate(batch[1], cfg.rollouts_per_problem, step=step)
    t_gen = time.perf_counter() - t0

    # 2-3. verify, retrieve teachers
    rollouts = make_rollouts(cfg, batch, completions, t.tokenizer, t.bank, t.strategy)

    # 4-6. teacher scoring + one student forward/backward per rollout; clip, step.
    # num_iterations passes (GRPO): the first pass's log-probs are the old ones; the
    # logged loss and metrics are the first pass's. The teacher update follows each step.
    t_train = time.perf_counter()
    for it in range(t.strategy.num_iterations):
        t.optimizer.zero_grad(set_to_none=True)
        it_loss, it_sums = forward_backward(
            t.model, t.policy, t.strategy, rollouts, cfg, t.pad_id, env.device
        )
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(t.params, max_norm)
        it_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not (math.isfinite(it_loss) and math.isfinite(it_norm)):  # same on every rank
            raise FloatingPointError(
                f"step {step}: non-finite loss ({it_loss}) or gradient "
                f"norm ({it_norm}); the weights were not updated"
            )
        t.optimizer.step()
        if t.teacher is not None:
            t.teacher.after_optimizer_step(
                t.policy, (step - 1) * t.strategy.num_iterations + it + 1
            )
        if it == 0:
            loss, loss_sums, grad_norm = it_loss, it_sums, it_norm
    t_train = time.perf_counter() - t_train
    lr = t.scheduler.get_last_lr()[0]
    t.scheduler.step()
    t.state.step = step
    t.state.data_position += cfg.problems_per_step
    # online skill-bank update: rank 0 updates, every rank gets the same bank
    t.bank, bank_metrics = t.bank_updater.step(
        step, rollouts, t.bank, t.engine, t.tokenizer, env.device
    )

    # 7. metrics over all ranks (sums, divided once), console line, samples
    eos = t.tokenizer.eos_token_id
    local = {
        "loss": loss * len(rollouts),
        "reward": sum(r.reward for r in rollouts),
        "correct": sum(r.reward > 0 for r in rollouts),
        "tokens": sum(len(r.completion_ids) for r in rollouts),
        "truncated": sum(r.truncated(cfg.max_completion_tokens, eos) for r in rollouts),
        "verify_resource_kills": sum(r.verify_limited for r in rollouts),
        **loss_sums.sums,
    }
    sums = reduce_sums(local, env.device)
    record = step_record(
        step,
        t.state.run_id,
        sums,
        grad_norm=grad_norm,
        lr=lr,
        step_time=time.perf_counter() - t0,
        rollout_time=t_gen,
        update_time=t_train,
    )
    record.update(bank_metrics)
    lengths = [len(r.completion_ids) for r in rollouts]
    record["completion_tokens_min"] = reduce_over_ranks(min(lengths), "min", env.device)
    record["completion_tokens_max"] = reduce_over_ranks(max(lengths), "max", env.device)
    record["truncated_frac"] = sums["truncated"] / sums["rollouts"]
    t.metrics_log.step(record)
    sample = ""
    if env.main and step % cfg.sample_every == 0:
        sample = "\n" + t.metrics_log.samples(step, rollouts, t.tokenizer)
    if env.main and (step % cfg.log_every == 0 or step == cfg.max_steps):
        line = format_line(record) + sample
        if t.bar:
            t.bar.write(line)
        else:
            print(line, flush=True)
    if t.bar:
        t.bar.update(1)
    return record, rollouts


def evaluate_now(t: Trainer) -> None:
    """Evaluation during training (:mod:`sgsd.eval.during_training`); all ranks call it. The engine
    gets the weights of this step first."""
    with gathered(t.policy):
        t.engine.sync_weights(t.policy)
    result = t.evaluator.run(t.state.step, t.engine, t.metrics_log)
    if result is not None:
        log.info(
            "eval step %d: mean avg@%d %.4f (best %.4f at step %d)",
            t.state.step,
            t.cfg.eval_n,
            result["mean_avg"],
            result["best_mean_avg"],
            result["best_step"],
        )


def _kept_teacher(t: Trainer) -> TeacherWeights | None:
    """The teacher whose state a checkpoint must hold (ema, periodic)."""
    return t.teacher if t.teacher is not None and t.teacher.mode in ("ema", "periodic") else None


def save(t: Trainer, *, export_model: bool) -> None:
    """Checkpoint the current step (all ranks call it); ``export_model`` also writes the
    standalone merged ``model/`` (the run's last checkpoint has one)."""
    save_checkpoint(
        t.out_dir,
        policy=t.policy,
        optimizer=t.optimizer,
        scheduler=t.scheduler,
        bank=t.bank,
        state=t.state,
        config=t.cfg.to_dict(),
        rank=t.env.rank,
        keep=t.cfg.keep_checkpoints,
        tokenizer=t.tokenizer,
        export_model=export_model,
        extra=None if _kept_teacher(t) is None else {"teacher": t.teacher.state_dict()},
        protect=t.evaluator.protected if t.evaluator is not None else frozenset(),
    )
    t.last_saved, t.last_exported = t.state.step, export_model


def finish(t: Trainer) -> None:
    """Release what setup acquired, on success or failure."""
    if t.bar:
        t.bar.close()
    if t.metrics_log is not None:
        t.metrics_log.close()
    t.engine.close()  # vLLM's shutdown may also destroy the default process group
    # The DDP reducer and FSDP2's state hold the process group. Released here, nothing that
    # owns a gloo backend outlives destroy_process_group into interpreter exit, where a
    # backend torn down late can abort the rank ("terminate called without an active
    # exception") after a successful run.
    t.model = t.policy = t.optimizer = t.scheduler = t.params = t.teacher = None
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- run
def run(cfg: TrainConfig, plan: RunPlan) -> int:
    """Train with validated options (:func:`sgsd.cli.validate`'s)."""
    env = setup_distributed()
    if env.world_size > 1:
        faulthandler.enable()  # a rank killed by a native abort prints every thread's stack
    console.configure_logging(env.rank, cfg.verbose)
    t = setup(cfg, env, plan)
    stop, stopped = GracefulStop(), False
    try:
        # The run has started: the first write into its directory, then the metrics files.
        if env.main:
            removed = start_run(plan, cfg)
            if removed:
                log.warning("removed from %s: %s", plan.out_dir, ", ".join(removed))
        if dist.is_initialized():
            dist.barrier()
        t.metrics_log = MetricsLogger(cfg, env.main, t.state.step)
        t.evaluator.start()
        log.info("run %s: steps %d..%d", t.state.run_id, t.state.step + 1, cfg.max_steps)
        while t.state.step < cfg.max_steps:
            _record, rollouts = train_step(t)
            step = t.state.step

            del rollouts  # the online skill-bank update already ran inside train_step

            # 8. evaluate; checkpoint (always at evaluated steps); stop on a signal
            evaluated = t.evaluator.due(step)
            if evaluated:
                evaluate_now(t)
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or evaluated:
                save(t, export_model=step >= cfg.max_steps)
            if stop.should_stop(env.device if env.device.type == "cuda" else None):
                log.warning("stopping at step %d on signal", step)
                stopped = True
                break
        if t.last_saved != t.state.step or not t.last_exported:  # last one: with model/
            save(t, export_model=True)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    finally:
        stop.restore()
        finish(t)
    log.info("done: step %d, output in %s", t.state.step, t.out_dir)
    return 130 if stopped else 0  # 128 + SIGINT: the shell's status for an interrupted job


def main(argv: list[str] | None = None) -> int:
    """The command line: validate (:func:`sgsd.cli.validate`), then :func:`run`."""
    prepared = cli.validate(argv)
    return prepared if isinstance(prepared, int) else run(*prepared)


if __name__ == "__main__":
    raise SystemExit(run(*_PREPARED))
