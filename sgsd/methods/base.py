"""The loss-strategy boundary: what a method needs from the trainer's step.

A step produces rollouts (student prompt + sampled completion + verifier reward). A
:class:`LossStrategy` then says

0. what the student sees (``student_messages``; "+Skill" variants put skills here),
1. which *teacher contexts* score each rollout (``teachers``: a list of
   ``(chat messages, weight)`` per problem; the live model scores the rollout's tokens
   under each, with no gradient), and
2. how the loss is computed from the student's last hidden states at the completion
   positions, the LM head, and the :class:`ScoredBatch` (``loss``).

Each method implements this interface in a file of its own and is registered once in
:mod:`sgsd.methods` (``--loss NAME``). SGSD scores each rollout under K skill-conditioned
teacher contexts; GRPO has no teachers (``teachers`` returns ``[]``), sets advantages in
``prepare`` and runs ``num_iterations`` passes; OPSD and the local-support gate need the
teachers' *hidden states* (``needs_teacher_hidden``) rather than log-probs of the sampled
tokens. Strategies never import the trainer: they get their settings from the run's
``TrainConfig`` and their inputs as a :class:`ScoredBatch`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sgsd import prompts

__all__ = ["LossResult", "LossStrategy", "ScoredBatch"]


@dataclass
class ScoredBatch:
    """One micro-batch of rollouts on the training device (B rollouts, K teacher slots,
    T = longest completion in the micro-batch)."""

    targets: torch.Tensor  # [B, T] completion token ids (0 where padded)
    token_mask: torch.Tensor  # [B, T] bool: real completion token and not a format token
    rewards: torch.Tensor  # [B] float, +1 / -1
    teacher_weights: torch.Tensor  # [B, K] >= 0, 0 for missing teachers
    teacher_logprobs: torch.Tensor | None  # [B, K, T] constants (None if no teachers)
    # For strategies with ``needs_teacher_hidden`` (sgsd.methods.opsd): [B, K, T, H]
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
    needs_teacher_hidden: bool = False
    """Fill ``ScoredBatch.teacher_hidden`` [B, K, T, H] instead of teacher log-probs."""
    teacher_weights = None
    """Which weights the teachers score with (``sgsd.engine.teacher_weights``); the trainer
    sets it."""

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
