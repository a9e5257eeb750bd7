"""One step's rollouts, their teacher scores and the loss (docs/design.md §2-§3).

:func:`make_rollouts` turns sampled completions into :class:`Rollout` records (reward from
math-verify, teacher contexts from the loss strategy); :func:`forward_backward` scores them
under every teacher with the live model (no grad) and accumulates the strategy's loss
gradient over micro-batches. Hidden states go through ``sgsd_kernels``: the ``[T, V]``
logits are never materialised.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

import sgsd_kernels as sk
from sgsd import prompts
from sgsd.config import TrainConfig
from sgsd.engine.model import Policy, is_fsdp
from sgsd.engine.sequences import gather_positions, sequences_batch
from sgsd.engine.teacher_hidden import teacher_hidden_states
from sgsd.methods.base import LossStrategy, ScoredBatch
from sgsd.metrics import MetricSums

__all__ = [
    "Rollout",
    "forward_backward",
    "make_rollouts",
    "rollout_loss",
    "teacher_logprobs",
]


@dataclass
class Rollout:
    """One sampled completion and everything the loss needs about it."""

    problem: object  # sgsd.data.Problem
    prompt_ids: list[int]  # student prompt
    completion_ids: list[int]
    token_mask: list[bool]  # docs/design.md §3 m: False for chat/think markers, whitespace
    reward: float  # +1 / -1
    predicted: str | None
    teachers: list[tuple[list[int], float]]  # (teacher prompt ids, weight), at most K
    advantage: float = 0.0  # set by strategy.prepare (GRPO)
    old_logprobs: list[float] | None = None  # first-pass log-probs (num_iterations > 1)
    verify_limited: bool = False  # the verifier's worker hit its memory or CPU cap

    def truncated(self, max_tokens: int, eos_id: int) -> bool:
        """The completion hit ``max_tokens`` without ending in EOS."""
        ids = self.completion_ids
        return len(ids) >= max_tokens and (not ids or ids[-1] != eos_id)


def make_rollouts(
    cfg: TrainConfig, batch_problems, completions, tokenizer, bank, strategy: LossStrategy
) -> list[Rollout]:
    """Verify every completion (math-verify) and attach its problem's teacher contexts."""
    from sgsd.eval.verify import verify_batch

    flat = [
        (problem, prompt_ids, list(c))
        for problem, prompt_ids, group in zip(*batch_problems, completions)
        for c in group
    ]
    texts = [tokenizer.decode(c, skip_special_tokens=True) for _, _, c in flat]
    results = verify_batch(
        texts,
        [problem.answer for problem, _, _ in flat],
        timeout_s=cfg.verify_timeout_s,
        memory_mb=cfg.verify_memory_mb,
    )
    teachers: dict[int, list[tuple[list[int], float]]] = {}
    rollouts = []
    for (problem, prompt_ids, completion_ids), result in zip(flat, results):
        if id(problem) not in teachers:  # retrieve once per problem, shared by its G rollouts
            teachers[id(problem)] = [
                (
                    prompts.render_prompt_ids(
                        tokenizer,
                        messages,
                        enable_thinking=getattr(
                            strategy, "teacher_enable_thinking", cfg.teacher_thinking
                        ),
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
                verify_limited=result.resource_limited,
                teachers=teachers[id(problem)],
            )
        )
    strategy.prepare(rollouts)
    return rollouts


def float_dtype(policy: Policy) -> torch.dtype:
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[B, K, T]`` log-probs of each rollout's completion under each teacher context,
    from the model (no grad), and the matching token entropies (``cfg.log_entropy``;
    else None). Missing teachers stay 0 (their weight is 0)."""
    dtype = float_dtype(policy)
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
    """The strategy's loss on one micro-batch (mean over its rollouts, differentiable),
    and the number of present teachers (weight > 0) it was computed over.

    ``model`` is what the student forward runs through (the DDP wrapper under DDP, else
    ``policy``); teachers always run on ``policy`` itself.
    """
    K = strategy.num_teachers
    fdtype = float_dtype(policy)
    ids, attn, pos, targets, valid = sequences_batch(
        [r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts], pad_id, device
    )
    mask = torch.zeros_like(valid)
    weights = torch.zeros((len(rollouts), K), dtype=fdtype, device=device)
    for b, r in enumerate(rollouts):
        mask[b, : len(r.token_mask)] = torch.tensor(r.token_mask, dtype=torch.bool)
        for k, (_, w) in enumerate(r.teachers[:K]):
            weights[b, k] = w
    needs_hidden = getattr(strategy, "needs_teacher_hidden", False)
    old = None
    if rollouts[0].old_logprobs is not None:
        old = torch.zeros(targets.shape, dtype=fdtype, device=device)
        for b, r in enumerate(rollouts):
            old[b, : len(r.old_logprobs)] = torch.tensor(r.old_logprobs, dtype=fdtype)
    t_lp = t_ent = None
    if not needs_hidden:  # OPSD / local support stream the teachers' hidden states instead
        tw = getattr(
            strategy, "teacher_weights", None
        )  # sgsd.engine.teacher_weights: which weights score
        with tw.active(policy) if tw is not None else contextlib.nullcontext():
            t_lp, t_ent = teacher_logprobs(
                policy, rollouts, K, targets.shape[1], cfg, pad_id, device
            )
    batch = ScoredBatch(
        targets=targets,
        token_mask=mask & valid,
        rewards=torch.tensor([r.reward for r in rollouts], dtype=fdtype, device=device),
        teacher_weights=weights,
        teacher_logprobs=t_lp,
        valid=valid,
        advantages=torch.tensor([r.advantage for r in rollouts], dtype=fdtype, device=device),
        old_logprobs=old,
        teacher_entropy=t_ent,
        log_entropy=cfg.log_entropy,
    )
    if needs_hidden:  # OPSD / local support: the loss streams the teachers' full distributions
        batch.teacher_hidden = teacher_hidden_states(
            policy, rollouts, K, targets.shape[1], cfg.teacher_micro_batch_size, pad_id,
            device, lambda: strategy.teacher_context(policy),
        )  # fmt: skip
    hidden = gather_positions(model(ids, attn), pos)  # ONE student forward, with grad
    weight, bias = policy.lm_head()
    present = int((weights > 0).sum())
    return strategy.loss(hidden, weight, bias, batch), present


def forward_backward(
    model,
    policy: Policy,
    strategy: LossStrategy,
    rollouts: list[Rollout],
    cfg: TrainConfig,
    pad_id: int,
    device: torch.device,
) -> tuple[float, MetricSums]:
    """Accumulate d(loss)/d(params) over micro-batches, loss = mean over ``rollouts``.

    Returns the loss and the loss metrics as :class:`sgsd.metrics.MetricSums` (weighted
    sums that add over micro-batches and ranks; ``.means()`` gives the averages).
    """
    total = len(rollouts)
    loss_sum = 0.0
    sums = MetricSums()
    starts = range(0, total, cfg.micro_batch_size)
    for i, lo in enumerate(starts):
        chunk = rollouts[lo : lo + cfg.micro_batch_size]
        last = i == len(starts) - 1  # reduce gradients across ranks only after the last one
        sync = contextlib.nullcontext()
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not last:
            sync = model.no_sync()
        elif is_fsdp(model):
            model.set_requires_gradient_sync(last)
        with sync:
            result, present = rollout_loss(model, policy, strategy, chunk, cfg, pad_id, device)
            (result.loss * (len(chunk) / total)).backward()
        loss_sum += float(result.loss.detach()) * len(chunk)
        if strategy.num_iterations > 1 and chunk[0].old_logprobs is None:  # first pass
            lp = result.output.logprobs
            for b, r in enumerate(chunk):
                r.old_logprobs = lp[b, : len(r.completion_ids)].tolist()
        sums.add(result.metrics, rollouts=len(chunk), teachers=present)
    return loss_sum / total, sums
