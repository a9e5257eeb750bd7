"""SGSD training loop (docs/design.md §2-§3), end to end.

    torchrun --nproc_per_node=1 sgsd/train.py --max-steps 3 --output-dir runs/demo
    torchrun --nproc_per_node=8 sgsd/train.py --model Qwen/Qwen3-1.7B \\
        --dataset BytedTsinghua-SIA/DAPO-Math-17k --output-dir runs/qwen3-1.7b-sgsd
    python sgsd/train.py --resume latest --output-dir runs/demo     # continue a run

:func:`main` reads top to bottom: :func:`setup` builds a :class:`Trainer` (model, data,
skill bank, loss strategy, optimizer, resume, rollout engine), :func:`train_step` takes one
optimizer step, :func:`finish` releases what setup acquired. One optimizer step:

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
   steps, the online skill-bank update (:mod:`sgsd.skill_update`);
7. metrics over all ranks, the console line;
8. (in :func:`main`) maybe checkpoint, stop on a signal.

Steps 2-5 live in :mod:`sgsd.scoring`, the loss itself in :mod:`sgsd.losses`, metrics in
:mod:`sgsd.metrics`. Everything configurable lives in :class:`sgsd.config.TrainConfig`.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from sgsd import prompts
from sgsd.checkpoint import (
    GracefulStop,
    TrainerState,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from sgsd.config import TrainConfig, load_config, usage
from sgsd.distributed import Dist, seed_everything, setup_distributed
from sgsd.losses import LossStrategy, build_loss
from sgsd.metrics import MetricsLogger, MetricSums, format_line, reduce_sums
from sgsd.model import Policy, gathered, is_fsdp, load_policy, model_source, shard_fsdp2
from sgsd.rollout import RolloutEngine, build_rollout_engine
from sgsd.scoring import Rollout, forward_backward, make_rollouts
from sgsd.skill_update import OnlineBankUpdater

__all__ = [
    "Dist",
    "ProblemSampler",
    "Rollout",
    "Trainer",
    "build_scheduler",
    "finish",
    "forward_backward",
    "main",
    "setup",
    "setup_distributed",
    "train_step",
]

log = logging.getLogger("sgsd.train")


class ProblemSampler:
    """Deterministic problem order: epoch e is a permutation of the problems seeded by
    (seed, e); every step takes the next ``problems_per_step`` of the global stream and
    rank r takes its contiguous share. The position in the stream is the data state."""

    def __init__(self, num_problems: int, seed: int):
        self.n = num_problems
        self.seed = seed

    def _epoch(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, position: int, count: int) -> list[int]:
        out = []
        while len(out) < count:
            epoch, offset = divmod(position + len(out), self.n)
            order = self._epoch(epoch)
            out.extend(order[offset : offset + count - len(out)])
        return out


def build_scheduler(cfg: TrainConfig, optimizer):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.lr_schedule == "cosine":
            span = max(1, cfg.max_steps - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
    bank: object  # sgsd.skills.SkillBank
    params: list[torch.nn.Parameter]  # trainable parameters (clipped, optimised)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    engine: RolloutEngine
    metrics_log: MetricsLogger
    state: TrainerState
    last_saved: int  # step of the newest checkpoint this run wrote or resumed from; -1: none
    bank_updater: OnlineBankUpdater  # online skill-bank update (rank 0 updates, all receive)
    bar: object = None  # tqdm bar on rank 0, when enabled and stderr is a terminal
    out_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.cfg.output_dir)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id


# ----------------------------------------------------------------------------- setup
def load_problem_set(cfg: TrainConfig, tokenizer, strategy: LossStrategy):
    """The problems whose rendered student prompt fits ``max_prompt_tokens``, and those
    prompts' token ids."""
    from sgsd.data import load_problems

    loaded = load_problems(
        cfg.dataset, split=cfg.dataset_split, answer_field=cfg.answer_field, limit=cfg.dataset_limit
    )
    problems, prompt_ids = [], []
    for p in loaded:
        ids = prompts.render_prompt_ids(
            tokenizer, strategy.student_messages(p), enable_thinking=cfg.enable_thinking
        )
        if len(ids) <= cfg.max_prompt_tokens:
            problems.append(p)
            prompt_ids.append(ids)
    if skipped := len(loaded) - len(problems):
        log.warning(
            "skipped %d of %d problems: student prompt longer than max_prompt_tokens=%d",
            skipped,
            len(loaded),
            cfg.max_prompt_tokens,
        )
    if not problems:
        raise ValueError(
            f"no problem in {cfg.dataset!r} fits max_prompt_tokens={cfg.max_prompt_tokens}"
        )
    return problems, prompt_ids


def setup(cfg: TrainConfig, env: Dist) -> Trainer:
    """Build the run; all ranks call it. The order matters where noted."""
    from sgsd.skills import SkillBank

    if cfg.problems_per_step % env.world_size:
        raise ValueError(
            f"problems_per_step={cfg.problems_per_step} must be divisible by the "
            f"number of ranks ({env.world_size})"
        )
    out_dir = Path(cfg.output_dir)
    if env.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(out_dir / "config.yaml")
    seed_everything(cfg.seed)

    # 1. model, data, skills, loss (rank 0 builds/fetches the weights once, then all load)
    if env.main:
        model_source(cfg)
    if dist.is_initialized():
        dist.barrier()
    policy, tokenizer, source = load_policy(cfg, env.device)
    strategy = build_loss(cfg)
    problems, prompt_ids = load_problem_set(cfg, tokenizer, strategy)
    capacity = cfg.skill_online_capacity
    bank = (
        SkillBank.load(cfg.skill_bank, online_capacity=capacity)
        if cfg.skill_bank
        else SkillBank.default(online_capacity=capacity)
    )
    log.info(
        "%d problems, skill bank %s, loss %s, K=%d, %d rank(s)",
        len(problems),
        cfg.skill_bank or "(bundled default)",
        strategy.name,
        strategy.num_teachers,
        env.world_size,
    )

    # 2. distributed wrapper, then the optimizer (FSDP2 replaces the parameters)
    model = policy
    if env.world_size > 1 and cfg.parallelism == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(
            policy, device_ids=[env.device.index] if env.device.type == "cuda" else None
        )
    elif env.world_size > 1 and cfg.parallelism == "fsdp2":
        model = shard_fsdp2(policy, env.device, env.world_size)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay
    )
    scheduler = build_scheduler(cfg, optimizer)

    # 3. resume: weights, optimizer, scheduler, RNG, data position, skill bank
    state = TrainerState(world_size=env.world_size)
    ckpt = find_checkpoint(cfg.resume, out_dir)
    if ckpt is not None:
        state, bank_state = load_checkpoint(
            ckpt,
            policy=policy,
            optimizer=optimizer,
            scheduler=scheduler,
            rank=env.rank,
            world_size=env.world_size,
        )
        bank = SkillBank.from_state_dict(bank_state)
        log.info("resumed from %s at step %d", ckpt, state.step)
    elif env.main and find_checkpoint("latest", out_dir) is not None:
        log.warning(
            "%s already holds checkpoints; this fresh run will overwrite and prune "
            "them (use --resume latest to continue instead)",
            out_dir,
        )

    # 4. rollout engine (weights are pushed before every generation, so also after resume)
    threads = torch.get_num_threads()
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
        ),
    )
    if torch.get_num_threads() != threads:  # vLLM may lower it for serving
        torch.set_num_threads(threads)
    log.info("rollouts: %s", engine.name)
    if is_fsdp(policy) and engine.name != "vllm":
        engine.close()
        raise ValueError(
            "parallelism='fsdp2' needs vLLM rollouts: HF generate would run a "
            "different number of (collective) forwards on each rank"
        )

    # 5. logging
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
        metrics_log=MetricsLogger(cfg, env.main, state.step),
        state=state,
        last_saved=state.step if ckpt is not None else -1,
        bank_updater=OnlineBankUpdater(cfg, out_dir, rank=env.rank),
        bar=bar,
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

    # 4-5. teacher scoring + one student forward/backward per rollout
    t_train = time.perf_counter()
    t.optimizer.zero_grad(set_to_none=True)
    loss, loss_sums = forward_backward(
        t.model, t.policy, t.strategy, rollouts, cfg, t.pad_id, env.device
    )

    # 6. clip, step
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(t.params, max_norm)
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # same on every rank
        raise FloatingPointError(
            f"step {step}: non-finite loss ({loss}) or gradient "
            f"norm ({grad_norm}); the weights were not updated"
        )
    t.optimizer.step()
    t_train = time.perf_counter() - t_train
    lr = t.scheduler.get_last_lr()[0]
    t.scheduler.step()
    t.state.step = step
    t.state.data_position += cfg.problems_per_step
    # online skill-bank update: rank 0 updates, every rank gets the same bank
    t.bank, bank_metrics = t.bank_updater.step(
        step, rollouts, t.bank, t.engine, t.tokenizer, env.device
    )

    # 7. metrics over all ranks (sums, divided once), console line
    local = {
        "loss": loss * len(rollouts),
        "reward": sum(r.reward for r in rollouts),
        "tokens": sum(len(r.completion_ids) for r in rollouts),
        **loss_sums.sums,
    }
    sums = reduce_sums(local, env.device)
    step_time = time.perf_counter() - t0
    record = {
        "step": step,
        "loss": sums["loss"] / sums["rollouts"],
        "reward": sums["reward"] / sums["rollouts"],
        "grad_norm": grad_norm,
        "lr": lr,
        "tokens_per_s": sums["tokens"] / step_time,
        "step_time_s": step_time,
        "gen_time_s": t_gen,
        "train_time_s": t_train,
        "completion_tokens": int(sums["tokens"]),
        "mean_completion_len": sums["tokens"] / sums["rollouts"],
        **MetricSums(sums).means(),
        "teachers_per_rollout": sums["teachers"] / sums["rollouts"],
        **bank_metrics,
    }
    t.metrics_log.step(record)
    if env.main and (step % cfg.log_every == 0 or step == cfg.max_steps):
        line = format_line(record)
        if step % cfg.sample_every == 0 or step == 1:
            line += "\n" + t.metrics_log.samples(step, rollouts, t.tokenizer)
        if t.bar:
            t.bar.write(line)
        else:
            print(line, flush=True)
    if t.bar:
        t.bar.update(1)
    return record, rollouts


def save(t: Trainer) -> None:
    """Checkpoint the current step (all ranks call it)."""
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
        export_full=t.policy.is_peft or t.state.step >= t.cfg.max_steps,
    )
    t.last_saved = t.state.step


def finish(t: Trainer) -> None:
    """Release what setup acquired, on success or failure."""
    if t.bar:
        t.bar.close()
    t.metrics_log.close()
    t.engine.close()  # vLLM's shutdown may also destroy the default process group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(usage())
        return 0
    cfg = load_config(argv)
    env = setup_distributed()
    logging.basicConfig(
        level=logging.INFO if env.main else logging.WARNING,
        format=f"%(asctime)s [rank{env.rank}] %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    t = setup(cfg, env)
    stop = GracefulStop()
    try:
        while t.state.step < cfg.max_steps:
            _record, rollouts = train_step(t)
            step = t.state.step

            del rollouts  # the online skill-bank update already ran inside train_step

            # 8. checkpoint, stop on a signal (every rank agrees on the step)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                save(t)
            if stop.should_stop(env.device if env.device.type == "cuda" else None):
                log.warning("stopping at step %d on signal", step)
                break
        if t.last_saved != t.state.step:
            save(t)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    finally:
        stop.restore()
        finish(t)
    log.info("done: step %d, output in %s", t.state.step, t.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
