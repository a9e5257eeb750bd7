"""SGSD (docs/design.md §3): K skill-mistake teachers retrieved from the bank, the gated
loss :func:`sgsd_kernels.linear_gated_kd_loss` on the student's hidden states and the
teachers' log-probs of the sampled tokens.

``--local-support-top-k k`` swaps in the "Top-k local support" gate
(:class:`sgsd.methods.local_support.LocalSupportSGSDLoss`, a registered variant).
"""

from __future__ import annotations

import torch

import sgsd_kernels as sk
from sgsd.methods.base import LossResult, LossStrategy, ScoredBatch

__all__ = ["SGSDLoss"]


class SGSDLoss(LossStrategy):
    """Skill-conditioned gated self-distillation: K skill-mistake teachers from the bank,
    :func:`sgsd_kernels.linear_gated_kd_loss` on the student's hidden states."""

    name = "sgsd"

    def __init__(self, cfg):
        self.num_teachers = cfg.num_teachers
        self.retrieval_mode = cfg.retrieval_mode
        self.teacher_style = cfg.teacher_style
        self.temperature = cfg.logprob_temperature
        self.gate_tau = cfg.gate_tau
        self.clip_delta = cfg.clip_delta
        self.confidence_threshold = cfg.confidence_threshold
        self.use_polarity = cfg.polarity
        self.format_mask = cfg.token_mask
        self.backend = cfg.kernel_backend

    def token_mask(self, tokenizer, completion_ids) -> list[bool]:
        if self.format_mask:
            return super().token_mask(tokenizer, completion_ids)
        return [True] * len(completion_ids)  # the ablation: format tokens count too

    def teachers(self, problem, bank) -> list[tuple[list[dict], float]]:
        specs = bank.teachers(
            problem.problem, self.num_teachers, mode=self.retrieval_mode, style=self.teacher_style
        )
        # spec.context is the teacher text in the configured style (sgsd_teacher_text)
        return [
            ([{"role": "user", "content": spec.context}], float(spec.weight))
            for spec in specs[: self.num_teachers]
        ]

    def gated_loss(self, student_hidden, weight, bias, batch: ScoredBatch, **teachers):
        """:func:`sgsd_kernels.linear_gated_kd_loss` with this method's settings;
        ``teachers``: ``teacher_logprobs=`` or ``teacher_hidden=`` (+ its options)."""
        return sk.linear_gated_kd_loss(
            student_hidden,
            weight,
            batch.targets,
            batch.token_mask,
            batch.rewards,
            batch.teacher_weights,
            bias=bias,
            temperature=self.temperature,
            gate_tau=self.gate_tau,
            clip_delta=self.clip_delta,
            confidence_threshold=self.confidence_threshold,
            use_polarity=self.use_polarity,
            backend=self.backend,
            **teachers,
        )

    def loss(self, student_hidden, weight, bias, batch: ScoredBatch) -> LossResult:
        out = self.gated_loss(
            student_hidden, weight, bias, batch, teacher_logprobs=batch.teacher_logprobs
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
