"""The loss-strategy boundary: what a method needs from the trainer's step.

A step produces rollouts (student prompt + sampled completion + verifier reward). A
:class:`LossStrategy` then says

0. what the student sees (``student_messages``; "+Skill" variants put skills here),
1. which *teacher contexts* score each rollout (``teachers``: a list of
   ``(chat messages, weight)`` per problem; the live model scores the rollout's tokens
   under each, with no gradient), and
2. how the loss is computed from the student's last hidden states at the completion
   positions, the LM head, and the :class:`ScoredBatch` (``loss``).

SGSD (docs/design.md §3) is the strategy implemented here; ``LOSSES`` names the ones that
exist and ``build_loss`` picks one by ``TrainConfig.loss``. GRPO (:mod:`sgsd.grpo`) plugs
into the same methods: no teachers (``teachers`` returns ``[]``), advantages set in
``prepare`` and a loss on student log-probs over ``num_iterations`` passes. OPSD's teacher
context is the reference solution and its loss is the full-vocabulary divergence, which
needs teacher *hidden states* rather than log-probs of the sampled tokens (the trainer's
teacher scoring would grow that option).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import sgsd_kernels as sk
from sgsd import prompts
from sgsd.config import TrainConfig

__all__ = [
    "LossResult",
    "LossStrategy",
    "SGSDLoss",
    "ScoredBatch",
    "build_loss",
]


@dataclass
class ScoredBatch:
    """One micro-batch of rollouts on the training device (B rollouts, K teacher slots,
    T = longest completion in the micro-batch)."""

    targets: torch.Tensor  # [B, T] completion token ids (0 where padded)
    token_mask: torch.Tensor  # [B, T] bool: real completion token and not a format token
    rewards: torch.Tensor  # [B] float, +1 / -1
    teacher_weights: torch.Tensor  # [B, K] >= 0, 0 for missing teachers
    teacher_logprobs: torch.Tensor | None  # [B, K, T] constants (None if no teachers)
    # For strategies with ``needs_teacher_hidden`` (sgsd.divergence_losses): [B, K, T, H]
    # teacher hidden states instead of log-probs, and the completion-token mask without
    # the format-token filter.
    teacher_hidden: torch.Tensor | None = None
    valid: torch.Tensor | None = None  # [B, T] bool
    advantages: torch.Tensor | None = None  # [B] (GRPO: group-normalised rewards)
    old_logprobs: torch.Tensor | None = None  # [B, T] first-pass log-probs (GRPO passes > 1)
    teacher_entropy: torch.Tensor | None = None  # [B, K, T] teachers' token entropies
    log_entropy: bool = False  # also measure the student's token entropy (no grad)


@dataclass
class LossResult:
    loss: torch.Tensor  # scalar, differentiable; mean over the micro-batch's rollouts
    metrics: dict[str, float]  # detached floats for logging
    output: object = None  # the raw op output (GatedKDOutput for SGSD)


class LossStrategy:
    """Interface; see the module docstring."""

    name: str = "base"
    num_teachers: int = 0
    num_iterations: int = 1
    """Optimisation passes over each step's rollouts (GRPO: 2; SGSD: 1)."""

    def token_mask(self, tokenizer, completion_ids) -> list[bool]:
        """Which completion tokens count in the loss (default: docs/design.md §3's m)."""
        return prompts.format_token_mask(tokenizer, completion_ids)

    def prepare(self, rollouts) -> None:
        """Per-step hook over all of this rank's rollouts before any loss (GRPO sets
        ``advantage`` from each problem's group here)."""

    def student_messages(self, problem) -> list[dict]:
        """The chat messages the policy samples its rollout from."""
        return prompts.student_messages(problem.problem)

    def teachers(self, problem, bank) -> list[tuple[list[dict], float]]:
        """Teacher contexts for one problem: ``[(chat messages, weight), ...]``."""
        raise NotImplementedError

    def loss(
        self,
        student_hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        batch: ScoredBatch,
    ) -> LossResult:
        raise NotImplementedError


class SGSDLoss(LossStrategy):
    """Skill-conditioned gated self-distillation: K skill-mistake teachers from the bank,
    :func:`sgsd_kernels.linear_gated_kd_loss` on the student's hidden states."""

    name = "sgsd"

    def __init__(self, cfg: TrainConfig):
        self.num_teachers = cfg.num_teachers
        self.retrieval_mode = cfg.retrieval_mode
        self.teacher_style = cfg.teacher_style
        self.temperature = cfg.logprob_temperature
        self.gate_tau = cfg.gate_tau
        self.clip_delta = cfg.clip_delta
        self.confidence_threshold = cfg.confidence_threshold
        self.backend = cfg.kernel_backend

    def teachers(self, problem, bank) -> list[tuple[list[dict], float]]:
        specs = bank.teachers(
            problem.problem, self.num_teachers, mode=self.retrieval_mode, style=self.teacher_style
        )
        # spec.context is the teacher text in the configured style (sgsd_teacher_text)
        return [
            ([{"role": "user", "content": spec.context}], float(spec.weight))
            for spec in specs[: self.num_teachers]
        ]

    def loss(self, student_hidden, weight, bias, batch: ScoredBatch) -> LossResult:
        out = sk.linear_gated_kd_loss(
            student_hidden,
            weight,
            batch.targets,
            batch.token_mask,
            batch.rewards,
            batch.teacher_weights,
            teacher_logprobs=batch.teacher_logprobs,
            bias=bias,
            temperature=self.temperature,
            gate_tau=self.gate_tau,
            clip_delta=self.clip_delta,
            confidence_threshold=self.confidence_threshold,
            backend=self.backend,
        )
        metrics = out.metrics()
        metrics.update(self._extra_metrics(out, student_hidden, weight, bias, batch))
        return LossResult(out.loss, metrics, out)

    @torch.no_grad()
    def _extra_metrics(self, out, student_hidden, weight, bias, batch: ScoredBatch) -> dict:
        """The published run's extra logs: the raw (unclipped) support score and the
        fraction of teachers with |S| <= epsilon (means over present teachers), and the
        masked mean token entropy of the student (per rollout) and of the teachers."""
        present = batch.teacher_weights > 0
        n_present = present.sum().clamp(min=1)
        m = batch.token_mask.to(out.student_logprobs.dtype)
        n = m.sum(dim=1).clamp(min=1)
        gap = out.teacher_logprobs - out.student_logprobs.unsqueeze(1)
        raw = (gap * m.unsqueeze(1)).sum(-1) / n.unsqueeze(1)
        below = (out.support.abs() <= self.confidence_threshold) & present
        stats = {
            "raw_support": float(torch.where(present, raw, 0.0).sum() / n_present),
            "below_threshold_frac": float(below.sum() / n_present),
        }
        if batch.teacher_entropy is not None:
            per = (batch.teacher_entropy * m.unsqueeze(1)).sum(-1) / n.unsqueeze(1)
            stats["teacher_entropy"] = float(torch.where(present, per, 0.0).sum() / n_present)
        if batch.log_entropy:
            tgt = torch.where(batch.token_mask, batch.targets, -100)
            _, ent = sk.linear_logprobs(
                student_hidden.detach(),
                weight.detach(),
                tgt,
                bias=None if bias is None else bias.detach(),
                temperature=self.temperature,
                return_entropy=True,
                backend=self.backend,
            )
            stats["student_entropy"] = float(((ent * m).sum(1) / n).mean())
        return stats


def _grpo(cfg: TrainConfig) -> LossStrategy:
    from sgsd.grpo import GRPOLoss  # sgsd.grpo imports this module

    return GRPOLoss(cfg)


LOSSES = {"sgsd": SGSDLoss, "grpo": _grpo}


def build_loss(cfg: TrainConfig) -> LossStrategy:
    if cfg.loss == "opsd" or cfg.local_support_top_k is not None:
        from sgsd import divergence_losses

        return divergence_losses.build(cfg)
    return LOSSES[cfg.loss](cfg)
