"""SGSD with the "Top-k local support" gate (``--local-support-top-k k``, docs/design.md
§3.2; the paper's Top-100 ablation): :func:`sgsd_kernels.linear_gated_kd_loss` with
``teacher_hidden`` and ``local_support_top_k``. The teachers are the live model as in
plain SGSD, but the loss needs their whole next-token distribution on the teacher's top-k
tokens ∪ {y_t}, so ``needs_teacher_hidden`` asks the trainer for teacher hidden states
[B, K, T, H] instead of log-probs of the sampled tokens.
"""

from __future__ import annotations

import contextlib

from sgsd.methods.base import LossResult, ScoredBatch
from sgsd.methods.sgsd import SGSDLoss

__all__ = ["LocalSupportSGSDLoss"]


class LocalSupportSGSDLoss(SGSDLoss):
    name = "sgsd"
    needs_teacher_hidden = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.local_support_top_k = cfg.local_support_top_k

    @staticmethod
    def teacher_context(policy):
        return contextlib.nullcontext()  # live teachers: the current weights

    def loss(self, student_hidden, weight, bias, batch: ScoredBatch) -> LossResult:
        out = self.gated_loss(
            student_hidden,
            weight,
            bias,
            batch,
            teacher_hidden=batch.teacher_hidden.to(student_hidden.dtype),
            local_support_top_k=self.local_support_top_k,
        )
        return LossResult(out.loss, out.metrics(), out)
