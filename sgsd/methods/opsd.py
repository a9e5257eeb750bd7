"""OPSD (``--loss opsd``, docs/design.md §3.1): on-policy self-distillation.

One teacher per rollout, the *fixed* base model (LoRA adapters disabled) seeing the problem
plus the reference solution (or "The answer is \\boxed{...}" when the data set has only an
answer) in thinking mode; the student sees the plain prompt (with ``--student-skills`` the
top retrieved skills and mistakes first: OPSD+Skill). Loss Σ_t m_t D_t / Σ_t m_t over the
valid completion tokens (no format mask), D = :func:`sgsd_kernels.linear_divergence` with
β = ``divergence_beta`` (0: forward KL), temperature ``divergence_temperature`` (1.1) and
element clip ``divergence_clip`` (0.05).

``needs_teacher_hidden``: the trainer fills ``ScoredBatch.teacher_hidden`` ([B, K, T, H],
one no-grad forward per (rollout, teacher), under ``teacher_context``) instead of teacher
log-probs. Nothing of size T×V is formed.

With several micro-batches per step the trainer weights each micro-batch's loss by its
number of rollouts, so the token normalisation is per micro-batch (exactly the published
Σ m D / Σ m when one micro-batch holds the whole step).
"""

from __future__ import annotations

import contextlib

import sgsd_kernels as sk
from sgsd import prompts
from sgsd.methods.base import LossResult, LossStrategy, ScoredBatch

__all__ = ["OPSDLoss", "opsd_reference"]


def opsd_reference(problem) -> str:
    """The worked solution when the data set has one, else the boxed final answer."""
    solution = (getattr(problem, "solution", "") or "").strip()
    return solution or f"The answer is \\boxed{{{problem.answer}}}."


class OPSDLoss(LossStrategy):
    name = "opsd"
    num_teachers = 1
    needs_teacher_hidden = True
    teacher_enable_thinking = True  # the teacher reasons over the reference, as published

    def __init__(self, cfg):
        self.beta = cfg.divergence_beta
        self.temperature = cfg.divergence_temperature
        self.clip = cfg.divergence_clip
        self.backend = cfg.kernel_backend

    def teachers(self, problem, bank) -> list[tuple[list[dict], float]]:
        return [(prompts.opsd_teacher_messages(problem.problem, opsd_reference(problem)), 1.0)]

    @staticmethod
    def teacher_context(policy):
        """The fixed teacher: the base weights, LoRA adapters switched off."""
        return policy.model.disable_adapter() if policy.is_peft else contextlib.nullcontext()

    def loss(self, student_hidden, weight, bias, batch: ScoredBatch) -> LossResult:
        valid = batch.valid
        d = sk.linear_divergence(
            student_hidden,
            weight,
            batch.teacher_hidden[:, 0].to(student_hidden.dtype),
            bias=bias,
            beta=self.beta,
            temperature=self.temperature,
            elementwise_clip=self.clip,
            mask=valid,
            backend=self.backend,
        )
        tokens = valid.sum()
        loss = d.sum() / tokens.clamp_min(1)
        present = (batch.teacher_weights[:, 0] > 0).sum()
        metrics = {
            "loss": float(loss.detach()),
            "divergence_mean": float(loss.detach()),  # per valid completion token
            "teacher_rows": float(present),
        }
        return LossResult(loss, metrics, d.detach())
