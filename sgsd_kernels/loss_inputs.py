"""The validated arguments of the losses from hidden states, bundled.

The public functions in :mod:`sgsd_kernels.functional` validate and normalise their
arguments once and bundle them here; both the reference (``backend="reference"``) and
the fused op paths read the same bundle, so the argument list is spelled once, in the
public signature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from sgsd_kernels.ops.arguments import LinearInputs


class GateHypers(NamedTuple):
    """The gated loss's τ > 0, δ > 0 (∞: no clipping) and ε >= 0, and whether the
    polarity ρ is used (docs/design.md §3), in the order and with the names of
    :func:`sgsd_kernels.gated_kd_loss`'s keywords."""

    gate_tau: float
    clip_delta: float
    confidence_threshold: float
    use_polarity: bool = True


@dataclass(frozen=True)
class HiddenGatedInputs:
    """:func:`sgsd_kernels.linear_gated_kd_loss` after validation. ``student`` holds the
    student hidden states [B, T, H] and the shared head; ``mask`` [B, T] bool is the
    token mask with ignored targets already removed. Exactly one of ``teacher_hidden``
    [B, K, T, H] and ``teacher_logprobs`` [B, K, T] is set. ``softcap`` and
    ``logit_scale`` are the public values (docs/design.md §3.3), shared by every head."""

    student: LinearInputs
    targets: torch.Tensor
    mask: torch.Tensor
    rewards: torch.Tensor
    teacher_weights: torch.Tensor
    teacher_hidden: torch.Tensor | None
    teacher_logprobs: torch.Tensor | None
    temperature: float
    ignore_index: int
    gate: GateHypers
    softcap: float | None = None
    logit_scale: float | None = None


@dataclass(frozen=True)
class DivergenceInputs:
    """:func:`sgsd_kernels.linear_divergence` after validation, with the teacher head
    resolved (no teacher weight: the student's weight and, unless a teacher bias is
    given, its bias). ``mask`` [...] or None keeps every position. ``softcap`` and
    ``logit_scale`` (the public values, docs/design.md §3.3) apply to both heads."""

    student: LinearInputs
    teacher: LinearInputs
    beta: float
    temperature: float
    elementwise_clip: float | None
    teacher_top_k: int | None
    mask: torch.Tensor | None
    softcap: float | None = None
    logit_scale: float | None = None
