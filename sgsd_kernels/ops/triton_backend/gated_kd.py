"""Triton epilogue kernels for the SGSD gated loss (docs/design.md §3), forward and backward.

Forward: one program per (b, k) streams T in BLOCK_T chunks and reduces the clipped
support, the gate sum and the clipped-token count; it writes S, ρ, L and the weighted
term w·ρ·L. The scalar loss is a deterministic torch sum over [B, K] (no atomics).
Backward: one program per (b, T block) sums over the K teachers:
∂loss/∂s[b,t] = −(g/B) Σ_k w ρ m ℓ'(Δ) / n, with ℓ'(Δ) = sigmoid(−Δ²/(2τ))·Δ/τ.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sgsd_kernels.ops.common import compute_dtype
from sgsd_kernels.ops.triton_backend import tl_compute_dtype
from sgsd_kernels.runtime import interpreting

_LOG2 = math.log(2.0)


@triton.jit
def _fwd_kernel(
    S,
    U,
    M,
    R,
    Wt,
    Support,
    Polarity,
    RowLoss,
    Term,
    Clipped,
    K,
    T,
    Hypers,
    ACC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    USE_POLARITY: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    tau = tl.load(Hypers)
    delta = tl.load(Hypers + 1)
    eps = tl.load(Hypers + 2)
    log2 = tl.load(Hypers + 3)
    sup = tl.zeros((), ACC)
    gate = tl.zeros((), ACC)
    kept = tl.zeros((), ACC)
    clipped = tl.zeros((), ACC)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        ok = t < T
        m = tl.load(M + b * T + t, mask=ok, other=0) != 0
        s = tl.load(S + b * T + t, mask=m, other=0.0)
        u = tl.load(U + (b * K + k) * T + t, mask=m, other=0.0)
        d = tl.where(m, u - s, 0.0)  # select: masked padding may hold -inf/NaN
        sup += tl.sum(tl.minimum(tl.maximum(d, -delta), delta))
        # ℓ(Δ) = log 2 − softplus(−Δ²/2τ); softplus(x) = log1p(exp(x)) is safe for x ≤ 0.
        x = -(d * d) / (2.0 * tau)
        ell = log2 - tl.log(1.0 + tl.exp(x))
        gate += tl.sum(tl.where(m, ell, 0.0))
        kept += tl.sum(m.to(ACC))
        clipped += tl.sum((m & (tl.abs(d) > delta)).to(ACC))
    n = tl.maximum(kept, 1.0)
    support = sup / n
    sigma = tl.where(support > eps, 1.0, tl.where(support < -eps, -1.0, 0.0))
    if USE_POLARITY:
        rho = (tl.where(tl.load(R + b) > 0, 1.0, -1.0) * sigma).to(ACC)
    else:  # the ablation: every present teacher is helpful
        rho = tl.full((), 1.0, ACC)
    row_loss = gate / n
    w = tl.load(Wt + b * K + k)
    tl.store(Support + b * K + k, support)
    tl.store(Polarity + b * K + k, rho)
    tl.store(RowLoss + b * K + k, row_loss)
    tl.store(Term + b * K + k, tl.where(w > 0, w * rho * row_loss, 0.0))  # absent: inert
    tl.store(Clipped + b * K + k, tl.where(w > 0, clipped, 0.0))


@triton.jit
def _bwd_kernel(GradLoss, S, U, M, Wt, Polarity, Nrow, Out, B, K, T, Hypers, BLOCK_T: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    tau = tl.load(Hypers)
    t = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = t < T
    m = tl.load(M + b * T + t, mask=ok, other=0) != 0
    s = tl.load(S + b * T + t, mask=m, other=0.0)
    n = tl.load(Nrow + b)
    scale = tl.load(GradLoss) / B
    acc = tl.zeros((BLOCK_T,), s.dtype)
    for k in range(0, K):
        u = tl.load(U + (b * K + k) * T + t, mask=m, other=0.0)
        d = tl.where(m, u - s, 0.0)
        x = -(d * d) / (2.0 * tau)
        dgate = d / tau / (1.0 + tl.exp(-x))  # sigmoid(x) · Δ/τ
        w = tl.load(Wt + b * K + k)
        coef = tl.where(w > 0, w * tl.load(Polarity + b * K + k), 0.0)
        acc += tl.where(w > 0, coef * dgate, 0.0)
    grad = tl.where(m, -scale * acc / n, 0.0)
    tl.store(Out + b * T + t, grad, mask=ok)


def _block_t(T: int) -> int:
    # At least 128 (one element per thread at the default 4 warps): a 16-wide fp64 block
    # spilled 4 B on sm_90 (benchmarks/results/triton-aot/), 128 to 1024 do not.
    return min(256 if interpreting() else 1024, triton.next_power_of_2(max(T, 128)))


def _hypers(tau, delta, eps, like: torch.Tensor) -> torch.Tensor:
    """(τ, δ, ε, log 2) as a tensor in the compute dtype of ``like`` for the kernels to load:
    a Python float reaches a compiled kernel as an fp32 scalar, which would round them in
    the fp64 kernels."""
    values = (tau, delta, eps, _LOG2)
    return torch.tensor(values, dtype=compute_dtype(like), device=like.device)


def forward(s, u, mask, rewards, weights, tau, delta, eps, use_polarity=True):
    B, K, T = u.shape
    dev, dt = s.device, s.dtype
    support = torch.empty(B, K, dtype=dt, device=dev)
    polarity = torch.empty_like(support)
    row_loss = torch.empty_like(support)
    term = torch.empty_like(support)
    clipped = torch.empty_like(support)
    if B and K:
        _fwd_kernel[(B, K)](
            s,
            u,
            mask.to(torch.int8),
            rewards,
            weights,
            support,
            polarity,
            row_loss,
            term,
            clipped,
            K,
            T,
            _hypers(tau, delta, eps, s),
            ACC=tl_compute_dtype(s),
            BLOCK_T=_block_t(T),
            USE_POLARITY=bool(use_polarity),
        )
    loss = term.sum() / max(B, 1)
    return loss, support, polarity, row_loss, clipped.sum()


def backward(grad_loss, s, u, mask, weights, polarity, tau):
    B, K, T = u.shape
    out = torch.empty_like(s)
    n = mask.sum(-1).clamp_min(1).to(s.dtype)
    if B and T:
        block = _block_t(T)
        _bwd_kernel[(B, triton.cdiv(T, block))](
            grad_loss.to(s.dtype).reshape(1),
            s,
            u,
            mask.to(torch.int8),
            weights,
            polarity,
            n,
            out,
            B,
            K,
            T,
            _hypers(tau, 0.0, 0.0, s),
            BLOCK_T=block,
        )
    return out
