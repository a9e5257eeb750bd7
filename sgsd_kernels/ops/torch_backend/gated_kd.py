"""The ``torch`` backend of ``sgsd::gated_kd`` (docs/design.md §3): plain vectorised math
with an explicit gradient. The op is O(B·K·T), tiny next to the log-prob GEMMs, so no
blocking is needed; no autograd graph is recorded, which keeps ``torch.compile`` and
memory simple.
"""

from __future__ import annotations

import math

import torch

_LOG2 = math.log(2.0)


def forward(s, u, mask, rewards, weights, tau, delta, eps, use_polarity=True):
    """Returns (loss [], support [B,K], polarity [B,K], row_loss [B,K], clipped [])."""
    dtype = s.dtype
    B = s.shape[0]
    m = mask.unsqueeze(1)  # [B,1,T] bool
    zero = torch.zeros((), dtype=dtype, device=s.device)
    # Select (not multiply) so that padding garbage (-inf/NaN) at masked positions is inert.
    gap = torch.where(m, u - s.unsqueeze(1), zero)  # Δ [B,K,T]
    n = mask.sum(-1).clamp_min(1).to(dtype).unsqueeze(1)  # [B,1]
    support = gap.clamp(-delta, delta).sum(-1) / n
    sigma = torch.where(support.abs() > eps, torch.sign(support), zero)
    if use_polarity:
        polarity = torch.where(rewards > 0, 1.0, -1.0).to(dtype).unsqueeze(1) * sigma
    else:  # the ablation: every present teacher is helpful
        polarity = torch.ones_like(support)
    gate = _LOG2 - torch.nn.functional.softplus(-gap.square() / (2.0 * tau))
    row_loss = torch.where(m, gate, zero).sum(-1) / n
    # Absent teachers (w = 0) are inert even if their log-probs are garbage.
    loss = torch.where(weights > 0, weights * polarity * row_loss, zero).sum() / max(B, 1)
    clipped = ((gap.abs() > delta) & m & (weights > 0).unsqueeze(-1)).sum().to(dtype)
    return loss, support, polarity, row_loss, clipped


def backward(grad_loss, s, u, mask, weights, polarity, tau):
    """∂loss/∂s[b,t] = −(1/B) Σ_k w ρ m ℓ'(Δ) / n, ℓ'(Δ) = sigmoid(−Δ²/(2τ))·Δ/τ."""
    dtype = s.dtype
    B = s.shape[0]
    m = mask.unsqueeze(1)
    zero = torch.zeros((), dtype=dtype, device=s.device)
    gap = torch.where(m, u - s.unsqueeze(1), zero)
    n = mask.sum(-1).clamp_min(1).to(dtype).unsqueeze(1)
    dgate = torch.sigmoid(-gap.square() / (2.0 * tau)) * gap / tau
    coef = torch.where(weights > 0, weights * polarity / n, zero).unsqueeze(-1)  # [B,K,1]
    grad = -(torch.where(m, coef * dgate, zero)).sum(1) * (grad_loss.to(dtype) / B)
    return grad
