"""GRPO (group relative policy optimisation) on hidden states, as the SGSD paper's
baseline runs it: library functions plus the trainer's :class:`GRPOLoss` strategy.

Published settings (TRL's GRPO trainer, the SGSD authors' launch scripts): G rollouts per
problem at temperature 1.2 (G = 8), group-normalised advantages
(``scale_rewards="group"``), PPO clip ε = 0.2, ``num_iterations = 2`` optimisation passes
per batch with the *old* log-probs taken from the first pass, β = 0 (no reference model,
no KL), and the loss averaged per sequence over its tokens, then over the batch:

    A[b]      = (r[b] - mean_g r) / (std_g r + eps)        g = b's group, std unbiased
    ratio     = exp(s[b,t] - s_old[b,t])                   s = log p(y_t | x, y<t)
    L[b,t]    = -min(ratio · A[b], clip(ratio, 1-ε, 1+ε) · A[b])
    loss      = (1/B) Σ_b (1/n[b]) Σ_t m[b,t] L[b,t]       n[b] = max(1, Σ_t m[b,t])

``s`` comes from :func:`sgsd_kernels.linear_logprobs` on the last hidden states and the LM
head, with gradient, so the ``[B, T, V]`` logits are never built (docs/design.md §3:
GRPO's logit gradient is the per-token weighted cross-entropy one, g_t = -A·ratio·m/n
where the clip is inactive). On the first pass ``s_old = s.detach()``: the ratio is 1 and
the gradient is the plain policy gradient; later passes reuse the first pass's values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import sgsd_kernels as sk
from sgsd.methods.base import LossResult, LossStrategy, ScoredBatch

__all__ = ["GRPOLoss", "GRPOOutput", "group_advantages", "grpo_loss"]

#: Added to the group std before dividing (TRL's value).
ADVANTAGE_EPS = 1e-4


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, scale: bool = True, eps: float = ADVANTAGE_EPS
) -> torch.Tensor:
    """Group-normalised advantages of ``rewards [B]`` (B = groups · ``group_size``,
    consecutive rows form a group): reward minus the group mean, divided by the group's
    unbiased std + ``eps`` when ``scale``. A group whose rewards are all equal (or of
    size 1) gets advantage 0."""
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor, got {_describe(rewards)}")
    if not rewards.is_floating_point():
        raise TypeError(f"rewards must be floating point, got {rewards.dtype}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(
            f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}"
        )
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    r = rewards.view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale and group_size > 1:
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


@dataclass
class GRPOOutput:
    loss: torch.Tensor  # scalar, differentiable
    logprobs: torch.Tensor  # [B, T] detached: this pass's s (the next passes' s_old)
    entropy: torch.Tensor | None  # [B, T] detached token entropy, if asked for
    clip_frac: float  # fraction of masked tokens where the clipped term was chosen
    ratio_mean: float  # masked mean of the ratio

    def metrics(self) -> dict[str, float]:
        return {
            "loss": float(self.loss.detach()),
            "clip_frac": self.clip_frac,
            "ratio_mean": self.ratio_mean,
        }


def grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    clip_eps: float = 0.2,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
) -> GRPOOutput:
    """The GRPO loss of the module docstring from hidden states ``[B, T, H]``.

    ``targets [B, T]`` token ids, ``mask [B, T]`` bool (tokens that count),
    ``advantages [B]`` (:func:`group_advantages`), ``old_logprobs [B, T]`` or ``None``
    (first pass: ratio 1). Gradients flow to ``hidden``, ``weight`` and ``bias``.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got {_describe(hidden)}")
    b, t = hidden.shape[:2]
    for name, x in (("targets", targets), ("mask", mask)):
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != (b, t):
            raise ValueError(f"{name} must be [B, T] = [{b}, {t}], got {_describe(x)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool, got {mask.dtype}")
    if not isinstance(advantages, torch.Tensor) or tuple(advantages.shape) != (b,):
        raise ValueError(f"advantages must be [B] = [{b}], got {_describe(advantages)}")
    if old_logprobs is not None and (
        not isinstance(old_logprobs, torch.Tensor) or tuple(old_logprobs.shape) != (b, t)
    ):
        raise ValueError(f"old_logprobs must be [B, T] = [{b}, {t}], got {_describe(old_logprobs)}")
    if not (isinstance(clip_eps, (int, float)) and 0 < clip_eps < 1):
        raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps!r}")
    ignore = -100
    tgt = torch.where(mask, targets, torch.full_like(targets, ignore))
    out = sk.linear_logprobs(
        hidden,
        weight,
        tgt,
        bias=bias,
        temperature=temperature,
        ignore_index=ignore,
        return_entropy=return_entropy,
        backend=backend,
    )
    lp, ent = out if return_entropy else (out, None)
    old = lp.detach()
    if old_logprobs is not None:  # masked-out slots keep ratio 1 whatever the caller put there
        old = torch.where(mask, old_logprobs.to(lp.dtype), old)
    ratio = torch.exp(lp - old)
    adv = advantages.to(lp.dtype).unsqueeze(1)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    per_token = -torch.minimum(unclipped, clipped)
    m = mask.to(lp.dtype)
    n = m.sum(dim=1).clamp(min=1)
    loss = ((per_token * m).sum(dim=1) / n).mean()
    with torch.no_grad():
        total = m.sum().clamp(min=1)
        clip_frac = float(((clipped < unclipped).to(lp.dtype) * m).sum() / total)
        ratio_mean = float((ratio * m).sum() / total)
    return GRPOOutput(
        loss, lp.detach(), None if ent is None else ent.detach(), clip_frac, ratio_mean
    )


class GRPOLoss(LossStrategy):
    """The trainer's GRPO strategy: no teachers; advantages over each problem's G rollouts
    (:meth:`prepare`); :func:`grpo_loss` on the student's hidden states. Every completion
    token counts (``token_mask`` is all True, as in TRL's completion mask)."""

    name = "grpo"
    num_teachers = 0

    def __init__(self, cfg):
        self.temperature = cfg.logprob_temperature
        self.backend = cfg.kernel_backend
        self.clip_eps = cfg.grpo_clip_eps
        self.num_iterations = cfg.num_iterations
        self.group_size = cfg.rollouts_per_problem

    def teachers(self, problem, bank) -> list:
        return []

    def token_mask(self, tokenizer, completion_ids) -> list[bool]:
        return [True] * len(completion_ids)

    def prepare(self, rollouts) -> None:
        """Set ``r.advantage`` on each rollout; consecutive ``group_size`` rollouts are one
        problem's group (the order the trainer builds them in)."""
        if not rollouts:
            return
        rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float64)
        for r, a in zip(rollouts, group_advantages(rewards, self.group_size).tolist()):
            r.advantage = a

    def loss(self, student_hidden, weight, bias, batch: ScoredBatch) -> LossResult:
        out = grpo_loss(
            student_hidden,
            weight,
            batch.targets,
            batch.token_mask,
            batch.advantages,
            batch.old_logprobs,
            bias=bias,
            clip_eps=self.clip_eps,
            temperature=self.temperature,
            backend=self.backend,
        )
        return LossResult(out.loss, out.metrics(), out)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {list(x.shape)}"
    return type(x).__name__
