"""The result type of the SGSD gated-loss functions."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class GatedKDOutput:
    """Result of :func:`sgsd_kernels.gated_kd_loss` / :func:`linear_gated_kd_loss`.

    Attributes:
        loss: scalar, differentiable w.r.t. the student (log-probs or hidden states/W/bias).
        support: S[b, k], the clipped, masked mean log-prob gap (no gradient).
        polarity: ρ[b, k] ∈ {-1, 0, +1} (no gradient).
        row_loss: L[b, k], the masked mean gate value (detached).
        student_logprobs: [B, T] detached (only for the ``linear_*`` entry point).
        teacher_logprobs: [B, K, T] detached (only for the ``linear_*`` entry point).
    """

    loss: torch.Tensor
    support: torch.Tensor
    polarity: torch.Tensor
    row_loss: torch.Tensor
    student_logprobs: torch.Tensor | None = None
    teacher_logprobs: torch.Tensor | None = None
    # Book-keeping for metrics(): which teachers are present (w > 0), how many masked-in
    # tokens there are, and how many (token, present teacher) gaps were clipped.
    _present: torch.Tensor | None = field(default=None, repr=False)
    _kept_tokens: torch.Tensor | None = field(default=None, repr=False)
    _total_tokens: int = field(default=0, repr=False)
    _clipped: torch.Tensor | None = field(default=None, repr=False)

    def metrics(self) -> dict[str, float]:
        """Floats for logging (one device sync).

        helpful / harmful / neutral: fractions of present teachers (w > 0) with polarity
        +1 / -1 / 0. clipped_frac: fraction of (masked-in token, present teacher) gaps with
        |Δ| > δ. mask_keep_frac: fraction of the B×T positions kept by the mask.
        mean_support: mean S over present teachers.
        teacher_rows: how many (rollout, teacher) rows are present (w > 0), summed over
        the batch: B = 2 rollouts with K = 8 present teachers each give 16.0. It is the
        denominator of the three fractions, so callers can re-weight them across batches;
        teacher_rows / B is the mean number of present teachers per rollout.
        """
        present = self._present
        pol = self.polarity.detach()
        sup = self.support.detach()
        n_present = present.sum()
        denom = n_present.clamp_min(1).to(torch.float64)
        kept = self._kept_tokens.to(torch.float64)  # [B]
        pair_tokens = (present.to(torch.float64) * kept.unsqueeze(1)).sum()
        stats = torch.stack(
            [
                self.loss.detach().to(torch.float64),
                ((pol > 0) & present).sum().to(torch.float64) / denom,
                ((pol < 0) & present).sum().to(torch.float64) / denom,
                ((pol == 0) & present).sum().to(torch.float64) / denom,
                self._clipped.to(torch.float64) / pair_tokens.clamp_min(1.0),
                kept.sum() / max(1, self._total_tokens),
                torch.where(present, sup.to(torch.float64), 0.0).sum() / denom,
                n_present.to(torch.float64),
            ]
        ).tolist()
        names = (
            "loss",
            "helpful_frac",
            "harmful_frac",
            "neutral_frac",
            "clipped_frac",
            "mask_keep_frac",
            "mean_support",
            "teacher_rows",
        )
        return dict(zip(names, stats))
