"""Eager, materialising reference implementations of every public op.

Written to read like docs/design.md §3: every intermediate (full logits, full log-softmax, the
per-token gaps) is a plain tensor. This is the baseline in benchmarks and, run in
float64, the oracle in tests. Math is done in float32 (float64 when the inputs are
float64); the memory cost is O(N·V) (O(K·N·V) for the gated loss from hidden states),
which is exactly what the fused backends avoid.

No validation happens here: the public functions in :mod:`sgsd_kernels.functional`
validate and then dispatch to these (``backend="reference"``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sgsd_kernels.ops.common import compute_dtype

__all__ = [
    "logprobs_from_logits_ref",
    "linear_logprobs_ref",
    "gated_kd_ref",
    "linear_gated_kd_ref",
]


def logprobs_from_logits_ref(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """log_softmax(logits / temperature).gather(targets); ignored targets give 0.0.

    Entropy (when requested) is that of softmax(logits / temperature); 0.0 where the
    target is ignored.
    """
    dtype = compute_dtype(logits)
    z = logits.to(dtype) / temperature
    logp = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    lp = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros((), dtype=dtype, device=logits.device)
    lp = torch.where(valid, lp, zero)
    if not return_entropy:
        return lp
    entropy = -(logp.exp() * logp).sum(-1)
    entropy = torch.where(valid, entropy, zero)
    return lp, entropy


def linear_logprobs_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """log_softmax((hidden @ weight.T + bias).float() / temperature).gather(targets)."""
    dtype = compute_dtype(hidden, weight, bias)
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    return logprobs_from_logits_ref(logits, targets, temperature, ignore_index, return_entropy)


def gate(delta: torch.Tensor, tau: float) -> torch.Tensor:
    """ℓ(Δ) = log 2 − softplus(−Δ²/(2τ)): 0 at Δ = 0, saturates at log 2 for large |Δ|."""
    return math.log(2.0) - F.softplus(-delta.square() / (2.0 * tau))


def gated_kd_ref(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    token_mask: torch.Tensor,
    rewards: torch.Tensor,
    teacher_weights: torch.Tensor,
    gate_tau: float = 1.0,
    clip_delta: float = 3.0,
    confidence_threshold: float = 0.05,
) -> dict[str, torch.Tensor]:
    """The SGSD gated loss, docs/design.md §3, line by line.

    ``student_logprobs`` is s[b, t] [B, T], or one row per (rollout, teacher) [B, K, T]
    the way the published code replicates the student (same values for every k; the
    gradient then sums over the K copies).

    Returns a dict with ``loss`` (differentiable w.r.t. ``student_logprobs`` only),
    ``support``, ``polarity``, ``row_loss`` ([B, K]) and ``clipped`` (count of masked-in
    tokens of present teachers whose gap was clipped, a float scalar).
    """
    K = teacher_logprobs.shape[1]
    s_rows = student_logprobs
    if s_rows.dim() == 2:
        s_rows = s_rows.unsqueeze(1).expand(-1, K, -1)  # [B, K, T]
    dtype = compute_dtype(s_rows, teacher_logprobs)
    s = s_rows.to(dtype)  # [B, K, T]
    u = teacher_logprobs.detach().to(dtype)  # [B, K, T]  (teachers are constants)
    m = token_mask.to(torch.bool).unsqueeze(1)  # [B, 1, T]
    w = teacher_weights.detach().to(dtype)  # [B, K]
    B = s.shape[0]

    # Masked positions may hold padding garbage (-inf, NaN): select, never multiply.
    delta = torch.where(m, u - s, torch.zeros((), dtype=dtype, device=s.device))
    n = token_mask.to(dtype).sum(-1).clamp_min(1.0).unsqueeze(1)  # [B, 1]

    with torch.no_grad():
        clipped_delta = delta.detach().clamp(-clip_delta, clip_delta)
        support = clipped_delta.sum(-1) / n  # S[b,k]
        sigma = torch.where(
            support.abs() > confidence_threshold, torch.sign(support), torch.zeros_like(support)
        )
        outcome = torch.where(rewards > 0, 1.0, -1.0).to(dtype).unsqueeze(1)  # [B, 1]
        polarity = outcome * sigma  # ρ[b,k]
        present = (w > 0).unsqueeze(-1)
        clipped = ((delta.detach().abs() > clip_delta) & m & present).sum().to(dtype)

    per_token = torch.where(m, gate(delta, gate_tau), torch.zeros((), dtype=dtype, device=s.device))
    row_loss = per_token.sum(-1) / n  # L[b,k]
    # Absent teachers (w = 0) are inert even if their log-probs are garbage.
    zero = torch.zeros((), dtype=dtype, device=s.device)
    term = torch.where(w > 0, w * polarity * row_loss, zero)
    loss = term.sum() / max(B, 1)
    return {
        "loss": loss,
        "support": support,
        "polarity": polarity,
        "row_loss": row_loss.detach(),
        "clipped": clipped,
    }


def linear_gated_kd_ref(
    student_hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_mask: torch.Tensor,
    rewards: torch.Tensor,
    teacher_weights: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_logprobs: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    gate_tau: float = 1.0,
    clip_delta: float = 3.0,
    confidence_threshold: float = 0.05,
    ignore_index: int = -100,
) -> dict[str, torch.Tensor]:
    """The SGSD loss from hidden states the way the published (TRL-based) code computes it:
    one row per (rollout, teacher). The student forward is replicated K times, and the
    full log_softmax of the student [B,K,T,V] and teacher [B,K,T,V] logits is
    materialised; the per-row student log-probs s[b,k,t] then enter §3 (the same values
    for every k, so the loss equals §3 with s[b,t]; the gradient sums the K copies).
    Positions whose target is ``ignore_index`` get log-prob 0 and are masked out.
    """
    B, T, H = student_hidden.shape
    K = teacher_weights.shape[1]
    valid = targets != ignore_index
    row_targets = targets.unsqueeze(1).expand(B, K, T)
    student_rows = student_hidden.unsqueeze(1).expand(B, K, T, H)  # one copy per teacher
    s_rows = linear_logprobs_ref(student_rows, weight, row_targets, bias, temperature, ignore_index)
    if teacher_logprobs is None:
        with torch.no_grad():
            u = linear_logprobs_ref(
                teacher_hidden.detach(),
                weight.detach(),
                row_targets,
                None if bias is None else bias.detach(),
                temperature,
                ignore_index,
            )
    else:
        u = teacher_logprobs.detach().to(s_rows.dtype)
    mask = token_mask & valid
    out = gated_kd_ref(
        s_rows, u, mask, rewards, teacher_weights, gate_tau, clip_delta, confidence_threshold
    )
    out["student_logprobs"] = s_rows[:, 0].detach()
    out["teacher_logprobs"] = u.detach()
    return out
