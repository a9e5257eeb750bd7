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
exist and ``build_loss`` picks one by ``TrainConfig.loss``. Other methods fit the same two
methods: GRPO needs no teachers (``teachers`` returns ``[]``) and a loss on student
log-probs with group-normalised advantages; OPSD's teacher context is the reference
solution and its loss is the full-vocabulary divergence, which needs teacher *hidden
states* rather than log-probs of the sampled tokens (the trainer's teacher scoring would
grow that option).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import sgsd_kernels as sk
from sgsd import prompts
from sgsd.config import TrainConfig

__all__ = ["LossResult", "LossStrategy", "SGSDLoss", "ScoredBatch", "build_loss"]


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


@dataclass
class LossResult:
    loss: torch.Tensor  # scalar, differentiable; mean over the micro-batch's rollouts
    metrics: dict[str, float]  # detached floats for logging
    output: object = None  # the raw op output (GatedKDOutput for SGSD)


class LossStrategy:
    """Interface; see the module docstring."""

    name: str = "base"
    num_teachers: int = 0

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
        return LossResult(out.loss, out.metrics(), out)


LOSSES = {"sgsd": SGSDLoss}


def build_loss(cfg: TrainConfig) -> LossStrategy:
    if cfg.loss == "opsd" or cfg.local_support_top_k is not None:
        from sgsd import divergence_losses

        return divergence_losses.build(cfg)
    return LOSSES[cfg.loss](cfg)
