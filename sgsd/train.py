"""SGSD training loop (DESIGN §2-§3), end to end.

    torchrun --nproc_per_node=1 sgsd/train.py --max-steps 3 --output-dir runs/demo
    torchrun --nproc_per_node=8 sgsd/train.py --model Qwen/Qwen3-1.7B \\
        --dataset BytedTsinghua-SIA/DAPO-Math-17k --output-dir runs/qwen3-1.7b-sgsd
    python sgsd/train.py --resume latest --output-dir runs/demo     # continue a run

One optimizer step:

1. the policy samples G completions for each of this rank's problems (vLLM colocated in
   this process, or HF generate), after its current weights are pushed into vLLM;
2. math-verify gives each rollout a reward of +1 / -1;
3. the skill bank retrieves K skill-mistake teachers per problem (BM25);
4. the live model (current weights, no grad) scores the *same* completion tokens under
   each teacher context: last hidden states -> ``sgsd_kernels.linear_logprobs`` (the
   ``[T, V]`` logits are never materialised), in bounded micro-batches;
5. ONE student forward with grad per rollout -> ``sgsd_kernels.linear_gated_kd_loss`` ->
   backward (gradient accumulation over micro-batches);
6. clip the gradient norm, optimizer and scheduler step;
7. log, maybe checkpoint.

Everything configurable lives in :class:`sgsd.config.TrainConfig`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import sgsd_kernels as sk
from sgsd import prompts
from sgsd.checkpoint import (
    GracefulStop,
    TrainerState,
    find_checkpoint,
    load_checkpoint,
    load_extra,
    save_checkpoint,
)
from sgsd.config import TrainConfig, load_config, usage
from sgsd.losses import PER_ROLLOUT_METRICS, LossStrategy, ScoredBatch, build_loss
from sgsd.model import Policy, gathered, is_fsdp, load_policy, model_source, shard_fsdp2
from sgsd.rollout import RolloutEngine, build_rollout_engine
from sgsd.teachers import TeacherWeights
from sgsd.train_eval import TrainingEval

log = logging.getLogger("sgsd.train")


# ----------------------------------------------------------------------------- setup
@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """torch.distributed from torchrun's environment (single process without it)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world_size, local_rank, device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))
        if cfg.lr_schedule == "linear":  # step 0 at the full rate, 0 after max_steps
            return max(0.0, 1.0 - (step - cfg.warmup_steps) / span)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------- rollouts
@dataclass
class Rollout:
    """One sampled completion and everything the loss needs about it."""

    problem: object  # sgsd.data.Problem
    prompt_ids: list[int]  # student prompt
    completion_ids: list[int]
    token_mask: list[bool]  # DESIGN §3 m: False for chat/think markers and whitespace
    reward: float  # +1 / -1
    predicted: str | None
    teachers: list[tuple[list[int], float]]  # (teacher prompt ids, weight), at most K
    advantage: float = 0.0  # set by strategy.prepare (GRPO)
    old_logprobs: list[float] | None = None  # first-pass log-probs (num_iterations > 1)


def sequences_batch(
    prefixes: list[list[int]], completions: list[list[int]], pad_id: int, device: torch.device
):
    """Right-padded ``prefix + completion`` batch and, for each completion token t, the
    position whose hidden state predicts it (``len(prefix) - 1 + t``).

    Returns ``input_ids [N, L]``, ``attention_mask [N, L]``, ``positions [N, T]``,
    ``targets [N, T]`` (0 where padded) and ``valid [N, T]`` (bool), T = longest completion.
    """
    n = len(prefixes)
    width = max(len(p) + len(c) for p, c in zip(prefixes, completions))
    t_max = max(1, max(len(c) for c in completions))
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    pos = torch.zeros((n, t_max), dtype=torch.long)
    targets = torch.zeros((n, t_max), dtype=torch.long)
    valid = torch.zeros((n, t_max), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prefixes, completions)):
        seq, start = prompts.concat_prompt_and_completion(p, c)
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        pos[i] = start - 1  # padded slots point at a real position; masked out below
        pos[i, : len(c)] = torch.arange(start - 1, start - 1 + len(c))
        targets[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        valid[i, : len(c)] = True
    return ids.to(device), attn.to(device), pos.to(device), targets.to(device), valid.to(device)


def gather_positions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``hidden [N, L, H]`` at ``positions [N, T]`` -> ``[N, T, H]``."""
    return hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def make_rollouts(
    cfg: TrainConfig, batch_problems, completions, tokenizer, bank, strategy: LossStrategy
) -> list[Rollout]:
    """Verify every completion (math-verify) and attach its problem's teacher contexts."""
    from sgsd.verify import verify_batch

    flat = [
        (problem, prompt_ids, list(c))
        for problem, prompt_ids, group in zip(*batch_problems, completions)
        for c in group
    ]
    texts = [tokenizer.decode(c, skip_special_tokens=True) for _, _, c in flat]
    results = verify_batch(texts, [problem.answer for problem, _, _ in flat])
    teachers: dict[int, list[tuple[list[int], float]]] = {}
    rollouts = []
    for (problem, prompt_ids, completion_ids), result in zip(flat, results):
        if id(problem) not in teachers:  # retrieve once per problem, shared by its G rollouts
            teachers[id(problem)] = [
                (
                    prompts.render_prompt_ids(
                        tokenizer, messages, enable_thinking=cfg.teacher_thinking
                    ),
                    w,
                )
                for messages, w in strategy.teachers(problem, bank)
            ]
        rollouts.append(
            Rollout(
                problem=problem,
                prompt_ids=prompt_ids,
                completion_ids=completion_ids,
                token_mask=strategy.token_mask(tokenizer, completion_ids),
                reward=float(result.reward),
                predicted=result.predicted,
                teachers=teachers[id(problem)],
            )
        )
    strategy.prepare(rollouts)
    return rollouts


# ----------------------------------------------------------------------------- the loss
def _float_dtype(policy: Policy) -> torch.dtype:
    """float64 for a float64 model (the tests' oracle setting), else float32."""
    dtype = next(policy.parameters()).dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def teacher_logprobs(
    policy: Policy,
    rollouts: list[Rollout],
    num_teachers: int,
    t_max: int,
    cfg: TrainConfig,
    pad_id: int,
    device: torch.device,
) -> torch.Tensor:
    """``[B, K, T]`` log-probs of each rollout's completion under each teacher context,
    from the model (no grad), and the matching token entropies (``cfg.log_entropy``;
    else None). Missing teachers stay 0 (their weight is 0)."""
    dtype = _float_dtype(policy)
    out = torch.zeros((len(rollouts), num_teachers, t_max), dtype=dtype, device=device)
    ent = torch.zeros_like(out) if cfg.log_entropy else None
    jobs = [
        (b, k, ids)
        for b, r in enumerate(rollouts)
        for k, (ids, _) in enumerate(r.teachers[:num_teachers])
    ]
    size = cfg.teacher_micro_batch_size
    chunks = [jobs[lo : lo + size] for lo in range(0, len(jobs), size)]
    for chunk in chunks:
        completions = [rollouts[b].completion_ids for b, _, _ in chunk]
        ids, attn, pos, targets, _ = sequences_batch(
            [j[2] for j in chunk], completions, pad_id, device
        )
        hidden = gather_positions(policy(ids, attn), pos)
        weight, bias = policy.lm_head()  # after the forward: FSDP2 has gathered the head
        lp = sk.linear_logprobs(
            hidden,
            weight,
            targets,
            bias=bias,
            temperature=cfg.logprob_temperature,
            return_entropy=cfg.log_entropy,
            backend=cfg.kernel_backend,
        )
        lp, h = lp if cfg.log_entropy else (lp, None)
        for row, (b, k, _) in enumerate(chunk):
            n = len(rollouts[b].completion_ids)
            out[b, k, :n] = lp[row, :n].to(dtype)
            if h is not None:
                ent[b, k, :n] = h[row, :n].to(dtype)
    if is_fsdp(policy):  # every forward is a collective: match the busiest rank's count
        count = torch.tensor([len(chunks)], device=device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        dummy = torch.full((1, 1), pad_id, dtype=torch.long, device=device)
        for _ in range(int(count.item()) - len(chunks)):
            policy(dummy, torch.ones_like(dummy))
    return out, ent


def rollout_loss(
    model,
    policy: Policy,
    strategy: LossStrategy,
    rollouts: list[Rollout],
    cfg: TrainConfig,
    pad_id: int,
    device: torch.device,
):
    """The strategy's loss on one micro-batch (mean over its rollouts, differentiable).

    ``model`` is what the student forward runs through (the DDP wrapper under DDP, else
    ``policy``); teachers always run on ``policy`` itself.
    """
    K = strategy.num_teachers
    fdtype = _float_dtype(policy)
    ids, attn, pos, targets, valid = sequences_batch(
        [r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts], pad_id, device
    )
    mask = torch.zeros_like(valid)
    weights = torch.zeros((len(rollouts), K), dtype=fdtype, device=device)
    for b, r in enumerate(rollouts):
        mask[b, : len(r.token_mask)] = torch.tensor(r.token_mask, dtype=torch.bool)
        for k, (_, w) in enumerate(r.teachers[:K]):
            weights[b, k] = w
    old = None
    if rollouts[0].old_logprobs is not None:
        old = torch.zeros(targets.shape, dtype=fdtype, device=device)
        for b, r in enumerate(rollouts):
            old[b, : len(r.old_logprobs)] = torch.tensor(r.old_logprobs, dtype=fdtype)
    tw = getattr(strategy, "teacher_weights", None)
    with tw.active(policy) if tw is not None else contextlib.nullcontext():
        t_lp, t_ent = teacher_logprobs(policy, rollouts, K, targets.shape[1], cfg, pad_id, device)
    batch = ScoredBatch(
        targets=targets,
        token_mask=mask & valid,
        rewards=torch.tensor([r.reward for r in rollouts], dtype=fdtype, device=device),
        teacher_weights=weights,
        teacher_logprobs=t_lp,
        advantages=torch.tensor([r.advantage for r in rollouts], dtype=fdtype, device=device),
        old_logprobs=old,
        teacher_entropy=t_ent,
        log_entropy=cfg.log_entropy,
    )
    hidden = gather_positions(model(ids, attn), pos)  # ONE student forward, with grad
    weight, bias = policy.lm_head()
    return strategy.loss(hidden, weight, bias, batch)


def forward_backward(
    model,
    policy: Policy,
    strategy: LossStrategy,
    rollouts: list[Rollout],
    cfg: TrainConfig,
    pad_id: int,
    device: torch.device,
):
    """Accumulate d(loss)/d(params) over micro-batches, loss = mean over ``rollouts``.

    Returns ``(loss, metrics)`` where metrics are micro-batch metrics averaged with the
    number of present teachers (fractions) or rollouts (mask_keep_frac) as weights.
    """
    total = len(rollouts)
    loss_sum = 0.0
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    mbs = range(0, total, cfg.micro_batch_size)
    for i, lo in enumerate(mbs):
        chunk = rollouts[lo : lo + cfg.micro_batch_size]
        last = i == len(mbs) - 1  # reduce gradients across ranks only after the last one
        sync = _nullcontext()
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not last:
            sync = model.no_sync()
        elif is_fsdp(model):
            model.set_requires_gradient_sync(last)
        with sync:
            result = rollout_loss(model, policy, strategy, chunk, cfg, pad_id, device)
            (result.loss * (len(chunk) / total)).backward()
        loss_sum += float(result.loss.detach()) * len(chunk)
        if strategy.num_iterations > 1 and chunk[0].old_logprobs is None:  # first pass
            lp = result.output.logprobs
            for b, r in enumerate(chunk):
                r.old_logprobs = lp[b, : len(r.completion_ids)].tolist()
        n_teachers = result.metrics.get("num_teachers")
        for key, value in result.metrics.items():
            if key in ("loss", "num_teachers"):
                continue
            w = len(chunk) if key in PER_ROLLOUT_METRICS or n_teachers is None else n_teachers
            sums[key] = sums.get(key, 0.0) + value * w
            weights[key] = weights.get(key, 0.0) + w
        sums["num_teachers"] = sums.get("num_teachers", 0.0) + (n_teachers or 0.0)
    metrics = {k: sums[k] / weights[k] if weights.get(k) else 0.0 for k in weights}
    metrics["num_teachers"] = sums.get("num_teachers", 0.0)
    return loss_sum / total, metrics


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ----------------------------------------------------------------------------- logging
class MetricsLogger:
    """Console line per step, metrics.jsonl, samples.jsonl, optional TensorBoard / W&B.
    Only rank 0 writes."""

    def __init__(self, cfg: TrainConfig, enabled: bool, resume_step: int):
        self.enabled = enabled
        self.out = Path(cfg.output_dir)
        self.tb = self.wandb = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "samples.jsonl"):
            _truncate_after(self.out / name, resume_step)
        if cfg.tensorboard:
            SummaryWriter = _optional("torch.utils.tensorboard", "tensorboard").SummaryWriter
            self.tb = SummaryWriter(str(self.out / "tb"))
        if cfg.wandb_project:
            wandb = _optional("wandb", "wandb")
            self.wandb = wandb.init(
                project=cfg.wandb_project, config=cfg.to_dict(), dir=str(self.out), resume="allow"
            )

    def step(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in numeric.items():
                self.tb.add_scalar(k, v, record["step"])
        if self.wandb is not None:
            self.wandb.log(numeric, step=record["step"])

    def samples(self, step: int, rollouts: list[Rollout], tokenizer) -> str:
        """Append this rank's rollouts to samples.jsonl; return one for the console."""
        if not self.enabled:
            return ""
        with open(self.out / "samples.jsonl", "a") as f:
            f.writelines(
                json.dumps(
                    {
                        "step": step,
                        "problem_id": r.problem.id,
                        "answer": r.problem.answer,
                        "predicted": r.predicted,
                        "reward": r.reward,
                        "completion": tokenizer.decode(r.completion_ids, skip_special_tokens=False),
                    }
                )
                + "\n"
                for r in rollouts
            )
        r = rollouts[0]
        text = tokenizer.decode(r.completion_ids, skip_special_tokens=True).strip()
        return (
            f"  sample [{r.problem.id}] reward={r.reward:+.0f} answer={r.problem.answer!r} "
            f"predicted={r.predicted!r}\n  | " + text[:300].replace("\n", "\n  | ")
        )

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _optional(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"this logging option needs `pip install {package}`") from e


def _truncate_after(path: Path, step: int) -> None:
    """Drop records of steps > ``step`` (a resumed run rewrites them)."""
    if not path.exists():
        return
    keep = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    path.write_text("".join(line + "\n" for line in keep))


def format_line(r: dict) -> str:
    if "helpful_frac" in r:
        method = (
            f"help/harm/neut {r['helpful_frac']:.2f}/{r['harmful_frac']:.2f}/"
            f"{r['neutral_frac']:.2f}"
        )
    else:  # GRPO
        method = f"clip {r.get('clip_frac', 0.0):.3f} ratio {r.get('ratio_mean', 1.0):.3f}"
    return (
        f"step {r['step']:>5} | loss {r['loss']:+.5f} | reward {r['reward']:+.3f} | "
        f"{method} | gnorm {r['grad_norm']:.3g} | lr {r['lr']:.2e} | "
        f"{r['tokens_per_s']:.0f} tok/s | {r['step_time_s']:.2f}s "
        f"(gen {r['gen_time_s']:.2f}s, train {r['train_time_s']:.2f}s)"
    )


def _reduce_extreme(value: float, which: str, device: torch.device) -> float:
    """``min`` or ``max`` of ``value`` over ranks."""
    if not (dist.is_available() and dist.is_initialized()):
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN if which == "min" else dist.ReduceOp.MAX)
    return float(t.item())


def reduce_sums(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum each value over ranks."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


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

    # ---- model, data, skills, loss -----------------------------------------------------
    from sgsd.data import load_problems
    from sgsd.evaluate import problem_messages
    from sgsd.skills import SkillBank

    if env.main:  # build/fetch the weights once before every rank loads them
        model_source(cfg)
    if dist.is_initialized():
        dist.barrier()
    policy, tokenizer, source = load_policy(cfg, env.device)
    pad_id = tokenizer.pad_token_id
    strategy = build_loss(cfg)
    bank = SkillBank.load(cfg.skill_bank) if cfg.skill_bank else SkillBank.default()
    problems, prompt_ids = [], []
    loaded = load_problems(
        cfg.dataset, split=cfg.dataset_split, answer_field=cfg.answer_field, limit=cfg.dataset_limit
    )
    n_loaded = len(loaded)
    for p in loaded:
        messages = strategy.student_messages(p)
        if cfg.student_skills:  # "+Skill": skills and mistakes before the problem
            messages = problem_messages(p, bank, cfg.student_skills_k)
        ids = prompts.render_prompt_ids(tokenizer, messages, enable_thinking=cfg.enable_thinking)
        if len(ids) <= cfg.max_prompt_tokens:
            problems.append(p)
            prompt_ids.append(ids)
    if skipped := n_loaded - len(problems):
        log.warning(
            "skipped %d of %d problems: student prompt longer than max_prompt_tokens=%d",
            skipped,
            n_loaded,
            cfg.max_prompt_tokens,
        )
    if not problems:
        raise ValueError(
            f"no problem in {cfg.dataset!r} fits max_prompt_tokens={cfg.max_prompt_tokens}"
        )
    sampler = ProblemSampler(len(problems), cfg.seed)
    log.info(
        "%d problems, skill bank %s, loss %s, K=%d, %d rank(s)",
        len(problems),
        cfg.skill_bank or "(bundled default)",
        strategy.name,
        strategy.num_teachers,
        env.world_size,
    )

    # ---- distributed wrapper, optimizer (after sharding: FSDP2 replaces the parameters) ---
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
    # Before resuming: `frozen` keeps the initial weights; ema/periodic state is loaded below.
    teacher = None
    if strategy.num_teachers:
        teacher = TeacherWeights(
            cfg.teacher, policy, ema_decay=cfg.teacher_ema_decay, every=cfg.teacher_refresh_every
        )
    strategy.teacher_weights = teacher

    # ---- resume --------------------------------------------------------------------------
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
        if teacher is not None and teacher.mode in ("ema", "periodic"):
            saved = load_extra(ckpt, "teacher")
            if saved is None:
                raise ValueError(f"checkpoint {ckpt} holds no teacher={teacher.mode} state")
            teacher.load_state_dict(saved)
        log.info("resumed from %s at step %d", ckpt, state.step)
    elif env.main and find_checkpoint("latest", out_dir) is not None:
        log.warning(
            "%s already holds checkpoints; this fresh run will overwrite and prune "
            "them (use --resume latest to continue instead)",
            out_dir,
        )

    # ---- rollout engine (weights are pushed before every generation, so also after resume)
    evaluator = TrainingEval(
        cfg, tokenizer, out_dir, rank=env.rank, world_size=env.world_size, resume_step=state.step
    )
    threads = torch.get_num_threads()
    engine: RolloutEngine = build_rollout_engine(
        cfg,
        policy,
        tokenizer,
        source,
        env.device,
        rank=env.rank,
        max_model_len=max(
            max(map(len, prompt_ids)) + cfg.max_completion_tokens, evaluator.max_model_len()
        ),
    )
    if torch.get_num_threads() != threads:  # vLLM may lower it for serving
        torch.set_num_threads(threads)
    log.info("rollouts: %s", engine.name)
    if is_fsdp(policy) and engine.name != "vllm":
        raise ValueError(
            "parallelism='fsdp2' needs vLLM rollouts: HF generate would run a "
            "different number of (collective) forwards on each rank"
        )

    metrics_log = MetricsLogger(cfg, env.main, state.step)
    stop = GracefulStop()
    per_rank = cfg.problems_per_step // env.world_size
    bar = None
    if env.main and cfg.progress_bar and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=state.step, desc="sgsd", dynamic_ncols=True)
    last_saved = state.step if ckpt is not None else -1

    keep_teacher = teacher if teacher is not None and teacher.mode in ("ema", "periodic") else None

    def checkpoint() -> None:
        nonlocal last_saved
        save_checkpoint(
            out_dir,
            policy=policy,
            optimizer=optimizer,
            scheduler=scheduler,
            bank=bank,
            state=state,
            config=cfg.to_dict(),
            rank=env.rank,
            keep=cfg.keep_checkpoints,
            export_full=policy.is_peft or state.step >= cfg.max_steps,
            extra=None if keep_teacher is None else {"teacher": keep_teacher.state_dict()},
            protect=evaluator.protected,
        )
        last_saved = state.step

    try:
        while state.step < cfg.max_steps:
            step = state.step + 1
            t0 = time.perf_counter()

            # 1. rollouts: G samples per problem, one batched call, from the live weights
            global_ids = sampler.take(state.data_position, cfg.problems_per_step)
            mine = global_ids[env.rank * per_rank : (env.rank + 1) * per_rank]
            batch = ([problems[i] for i in mine], [prompt_ids[i] for i in mine])
            with gathered(policy):  # full weights under FSDP2 (a no-op otherwise)
                engine.sync_weights(policy)
            completions = engine.generate(batch[1], cfg.rollouts_per_problem, step=step)
            t_gen = time.perf_counter() - t0

            # 2-3. verify, retrieve teachers
            rollouts = make_rollouts(cfg, batch, completions, tokenizer, bank, strategy)

            # 4-6. teacher scoring + one student forward/backward per rollout; clip, step.
            # num_iterations passes (GRPO): the first pass's log-probs are the old ones;
            # the logged loss and metrics are the first pass's.
            t_train = time.perf_counter()
            for it in range(strategy.num_iterations):
                optimizer.zero_grad(set_to_none=True)
                it_loss, it_metrics = forward_backward(
                    model, policy, strategy, rollouts, cfg, pad_id, env.device
                )
                max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                it_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
                if not (math.isfinite(it_loss) and math.isfinite(it_norm)):  # same on all ranks
                    raise FloatingPointError(
                        f"step {step}: non-finite loss ({it_loss}) or gradient "
                        f"norm ({it_norm}); the weights were not updated"
                    )
                optimizer.step()
                if teacher is not None:
                    teacher.after_optimizer_step(
                        policy, (step - 1) * strategy.num_iterations + it + 1
                    )
                if it == 0:
                    loss, loss_metrics, grad_norm = it_loss, it_metrics, it_norm
            t_train = time.perf_counter() - t_train
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            state.step = step
            state.data_position += cfg.problems_per_step

            # 7. metrics over all ranks
            n_teach = loss_metrics.pop("num_teachers")
            lengths = [len(r.completion_ids) for r in rollouts]
            eos = tokenizer.eos_token_id
            truncated = sum(
                len(r.completion_ids) >= cfg.max_completion_tokens
                and (not r.completion_ids or r.completion_ids[-1] != eos)
                for r in rollouts
            )
            sums = {
                "loss": loss * len(rollouts),
                "reward": sum(r.reward for r in rollouts),
                "rollouts": len(rollouts),
                "num_teachers": n_teach,
                "tokens": sum(lengths),
                "truncated": truncated,
            }
            per_rollout = PER_ROLLOUT_METRICS if strategy.num_teachers else set(loss_metrics)
            sums.update(
                {
                    f"w_{k}": v * (len(rollouts) if k in per_rollout else n_teach)
                    for k, v in loss_metrics.items()
                }
            )
            sums = reduce_sums(sums, env.device)
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
            }
            record["completion_len_min"] = _reduce_extreme(min(lengths), "min", env.device)
            record["completion_len_max"] = _reduce_extreme(max(lengths), "max", env.device)
            record["truncated_frac"] = sums["truncated"] / sums["rollouts"]
            for k in loss_metrics:
                w = sums["rollouts"] if k in per_rollout else sums["num_teachers"]
                record[k] = sums[f"w_{k}"] / w if w else 0.0
            record["teachers_per_rollout"] = sums["num_teachers"] / sums["rollouts"]
            metrics_log.step(record)
            if env.main and (step % cfg.log_every == 0 or step == cfg.max_steps):
                line = format_line(record)
                if step % cfg.sample_every == 0 or step == 1:
                    line += "\n" + metrics_log.samples(step, rollouts, tokenizer)
                if bar:
                    bar.write(line)
                else:
                    print(line, flush=True)
            if bar:
                bar.update(1)

            # Online skill-bank update (DESIGN §2) lands here in its own issue: it will read
            # this step's `rollouts` and mutate `bank`, whose state every checkpoint saves.

            # 8. evaluate (the engine gets the updated weights first), checkpoint
            if evaluator.due(step):
                with gathered(policy):
                    engine.sync_weights(policy)
                result = evaluator.run(step, engine, metrics_log)
                if result is not None:
                    log.info(
                        "eval step %d: mean avg@%d %.4f (best %.4f at step %d)",
                        step,
                        cfg.eval_n,
                        result["mean_avg"],
                        result["best_mean_avg"],
                        result["best_step"],
                    )
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or evaluator.due(step):
                checkpoint()
            if stop.should_stop(env.device if env.device.type == "cuda" else None):
                log.warning("stopping at step %d on signal", step)
                break
        if last_saved != state.step:
            checkpoint()
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    finally:
        stop.restore()
        if bar:
            bar.close()
        metrics_log.close()
        engine.close()  # NB: vLLM's shutdown may also destroy the default process group
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    log.info("done: step %d, output in %s", state.step, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
