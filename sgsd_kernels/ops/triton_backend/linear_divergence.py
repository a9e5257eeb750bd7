"""Fused Triton kernels for the full-vocabulary divergence of docs/design.md §3.1 (the ``triton``
backend of ``linear_divergence``).

Forward (``_fwd_kernel``): one program per block of BLOCK_N rows streams both logit tiles
z_S = h_S·Wᵀ and z_T = h_T·W_Tᵀ over the vocabulary (fp32 accumulation, loop over H in
BLOCK_H steps). Pass 1 keeps an online logsumexp for both; pass 2 recomputes the tiles and
accumulates D = Σ_v min(c, d_v) and Σ_v e_v (e = ∂d/∂log p_S, see the torch backend's
docstring for the formulas; the β-JSD in the two-mass form of docs/design.md §3.1). Nothing
of size N×V is allocated. The forward and the gradient kernel have their own launch
configs (``_CONFIGS``), each checked free of register spills on sm_80 and sm_90.

Backward: ``_grad_kernel`` recomputes both tiles for a bounded chunk of rows and writes the
student logit gradient g·(e − p_S·Σe)/T into a [chunk, V] workspace; two GEMMs give dh and
dW (deterministic, no atomics). The chunk holds at most ``WORKSPACE_ELEMENTS`` fp32.

``teacher_top_k`` runs the blockwise torch kernels (a running top-k per row inside the
Triton tiles is not written); their memory is bounded in the same way.

fp32 inputs use full-precision dots (``input_precision="ieee"``) unless the user enabled
TF32 (``torch.backends.cuda.matmul.allow_tf32``), as PyTorch's own matmul does.
Triton-interpreter note (Triton 3.9, ``TRITON_INTERPRET=1``): ``tl.dot`` on bf16 operands
returns garbage, so operands are upcast to fp32 under the constexpr ``UPCAST``, set only
when interpreting bf16 inputs; on a GPU the dot runs on bf16 tensor cores.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sgsd_kernels.ops.torch_backend import linear_divergence as torch_kernels
from sgsd_kernels.ops.triton_backend import triton_configs
from sgsd_kernels.ops.triton_backend.softcap import load_cap, tanh
from sgsd_kernels.ops.triton_backend.tiles import dot_w_block
from sgsd_kernels.runtime import interpreting

# [chunk, V] fp32 gradient workspace of the backward: 2**26 elements = 256 MiB.
WORKSPACE_ELEMENTS = 1 << 26


# Launch configs per kernel and input dtype: BLOCK_NxBLOCK_VxBLOCK_H/warps/stages, and
# ``maxnreg`` where set. Two [BLOCK_N, BLOCK_V] accumulators (student and teacher) are live
# per program, plus the element-wise terms' temporaries. Chosen from the register budget of
# tools/triton_aot.py (Triton 3.9's bundled ptxas, every variant: β-mode 0/1/2, clip,
# biases), not timed on a GPU; the figures are max registers over the variants on sm_90 /
# sm_80, none of which spills (benchmarks/results/triton-aot/). maxnreg=255 is set where
# ptxas, left to itself, traded registers for occupancy and spilled 4-48 B in some
# variants (TF32 forward at 168 registers, 16-bit forward at 8 warps on sm_80, TF32
# gradient); with the cap it uses what it needs without spilling.
# - 16-bit forward: 64x64x64 at 8 warps, maxnreg=255: 166 / 168. At 4 warps the sm_80
#   β-JSD forward spilled 56-76 B. Gradient: same tile, 80 / 106.
# - fp32 and TF32 forward: 32x64x32 at 4 warps, maxnreg=255: fp32 255 / 254 (the ieee FMA
#   dot takes the whole file), TF32 190 / 176.
# - fp32 and TF32 gradient: 32x64x32 at 8 warps, maxnreg=255: fp32 255 / 246, TF32 199 /
#   101. At 4 warps the fp32 gradient tile spilled 4-88 B even with the cap.
# - fp64: 32x32x16 at 4 warps, 1 stage: forward 162 / 232, gradient 162 / 208. At 32x64
#   (4 warps, 2 stages) the β-JSD forward spilled up to 376 B; 8 warps moved 12-16 B of
#   spills to the KL variants on sm_90.
_CONFIGS = {
    ("fwd", "16"): ("64x64x64/8/2", 255),
    ("grad", "16"): ("64x64x64/8/2", None),
    ("fwd", "32"): ("32x64x32/4/2", 255),
    ("grad", "32"): ("32x64x32/8/2", 255),
    ("fwd", "64"): ("32x32x16/4/1", None),
    ("grad", "64"): ("32x32x16/4/1", None),
}


def _config(kind: str, dtype: torch.dtype) -> dict:
    """Launch config of ``_fwd_kernel`` (kind "fwd") or ``_grad_kernel`` ("grad")."""
    if interpreting():  # numpy per program: few, large tiles; tl.dot needs dims >= 16
        return dict(BLOCK_N=16, BLOCK_V=64, BLOCK_H=32, num_warps=1, num_stages=1)
    bits = {torch.float64: "64", torch.float32: "32"}.get(dtype, "16")
    tile, maxnreg = _CONFIGS[(kind, bits)]
    cfg = triton_configs.parse_tile(tile)
    return cfg if maxnreg is None else dict(cfg, maxnreg=maxnreg)


def _constexprs(dtype: torch.dtype, beta: float, clip, softcap=None) -> dict:
    mode = 0 if beta == 0.0 else (1 if beta == 1.0 else 2)
    return dict(
        BETA_MODE=mode,
        HAS_CLIP=clip is not None,
        HAS_SOFTCAP=softcap is not None,
        UPCAST=interpreting() and dtype == torch.bfloat16,
        # fp32 dots in full precision unless TF32 is enabled in PyTorch (docs/design.md §8)
        PRECISION=triton_configs.input_precision(dtype),
    )


@triton.jit
def _tile(X, W, Bias, rows, row_ok, cols, col_ok, H, stride_x, stride_w, inv_t, Cap,
          HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
          PRECISION: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):  # fmt: skip
    """(x·Wᵀ + b)/T on one [BLOCK_N, BLOCK_V] tile (64-bit offsets), or under HAS_SOFTCAP
    (c/T)·tanh((x·Wᵀ + b)/c) with (1/c, c/T) read from ``Cap`` (docs/design.md §3.3); −inf
    past V."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=ACC)
    for h0 in range(0, H, BLOCK_H):
        hk = h0 + tl.arange(0, BLOCK_H)
        h_ok = hk < H
        x = tl.load(X + rows[:, None] * stride_x + hk[None, :],
                    mask=row_ok[:, None] & h_ok[None, :], other=0.0)  # fmt: skip
        acc = dot_w_block(acc, x, W, cols, col_ok, hk, h_ok, stride_w, UPCAST, PRECISION)
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    if HAS_SOFTCAP:
        inv_cap, post = load_cap(Cap)
        acc = tanh(acc * inv_cap) * post
    else:
        acc = acc * inv_t
    return tl.where(col_ok[None, :], acc, float("-inf"))


@triton.jit
def _load_scalars(Scalars):
    """1/T, log β, log(1 − β) and the clip, stored by ``_scalars`` in the accumulation
    dtype. A tensor, not float arguments: a compiled Triton kernel receives a Python float
    as an fp32 scalar, which would round 1/T and log β to ~1e-7 in the fp64 kernels."""
    return tl.load(Scalars), tl.load(Scalars + 1), tl.load(Scalars + 2), tl.load(Scalars + 3)


@triton.jit
def _logits(Xs, Xt, W, Wt, Bs, Bt, rows, row_ok, cols, col_ok, H, stride_xs, stride_xt,
            stride_w, stride_wt, inv_t, Cap, HAS_BIAS: tl.constexpr, HAS_TBIAS: tl.constexpr,
            HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
            ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
            BLOCK_H: tl.constexpr):  # fmt: skip
    """The student and teacher tiles (z_S, z_T) of one [BLOCK_N, BLOCK_V] block."""
    zs = _tile(Xs, W, Bs, rows, row_ok, cols, col_ok, H, stride_xs, stride_w, inv_t, Cap,
               HAS_BIAS, HAS_SOFTCAP, UPCAST, PRECISION, ACC, BLOCK_N, BLOCK_V,
               BLOCK_H)  # fmt: skip
    zt = _tile(Xt, Wt, Bt, rows, row_ok, cols, col_ok, H, stride_xt, stride_wt, inv_t, Cap,
               HAS_TBIAS, HAS_SOFTCAP, UPCAST, PRECISION, ACC, BLOCK_N, BLOCK_V,
               BLOCK_H)  # fmt: skip
    return zs, zt


@triton.jit
def _elements(a, c, col_ok, log_beta, log_1m_beta, clip, BETA_MODE: tl.constexpr,
              HAS_CLIP: tl.constexpr):  # fmt: skip
    """(d, e = ∂d/∂a) per element from a = log p_S and c = log p_T; 0 past V.

    β-JSD: with x1 = log((1−β)p_S) and x2 = log(β p_T), the larger mass is E = exp(max)
    and the smaller E·r with r = exp(−|x1 − x2|), and log M = max + log(1 + r). That is
    two exp and one log per element where the direct form (p_S, p_T and a logsumexp of
    x1, x2) takes four exp and a log; the fewer live temporaries keep the fp64 and TF32
    forwards inside the register file (numbers in ``_config``)."""
    if BETA_MODE == 0:
        p_t = tl.exp(c)
        d = p_t * (c - a)
        e = -p_t
    elif BETA_MODE == 1:
        p_s = tl.exp(a)
        d = p_s * (a - c)
        e = d + p_s
    else:
        x1 = a + log_1m_beta
        x2 = c + log_beta
        top = tl.maximum(x1, x2)
        r = tl.exp(-tl.abs(x1 - x2))
        big = tl.exp(top)
        student_top = x1 >= x2
        mass_s = tl.where(student_top, big, big * r)  # (1 − β) p_S
        mass_t = tl.where(student_top, big * r, big)  # β p_T
        log_m = top + tl.log(1.0 + r)
        e = mass_s * (a - log_m)
        d = mass_t * (c - log_m) + e
    if HAS_CLIP:
        e = tl.where(d > clip, 0.0, e)
        d = tl.minimum(d, clip)
    keep = col_ok[None, :]
    return tl.where(keep, d, 0.0), tl.where(keep, e, 0.0)


@triton.jit
def _fwd_kernel(Xs, Xt, W, Wt, Bs, Bt, Out, N, V, H, stride_xs, stride_xt, stride_w,
                stride_wt, Scalars,
                HAS_BIAS: tl.constexpr, HAS_TBIAS: tl.constexpr, BETA_MODE: tl.constexpr,
                HAS_CLIP: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):  # fmt: skip
    """Out [4, N]: D, Σe, lse_S, lse_T."""
    inv_t, log_beta, log_1m_beta, clip = _load_scalars(Scalars)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    m_s = tl.full((BLOCK_N,), float("-inf"), dtype=ACC)
    m_t = tl.full((BLOCK_N,), float("-inf"), dtype=ACC)
    l_s = tl.zeros((BLOCK_N,), dtype=ACC)
    l_t = tl.zeros((BLOCK_N,), dtype=ACC)
    for v0 in range(0, V, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)  # cols·stride_w can pass 2**31
        col_ok = cols < V
        zs, zt = _logits(Xs, Xt, W, Wt, Bs, Bt, rows, row_ok, cols, col_ok, H, stride_xs,
                         stride_xt, stride_w, stride_wt, inv_t, Scalars + 4, HAS_BIAS, HAS_TBIAS,
                         HAS_SOFTCAP, UPCAST, PRECISION, ACC, BLOCK_N, BLOCK_V,
                         BLOCK_H)  # fmt: skip
        new_s = tl.maximum(m_s, tl.max(zs, 1))
        new_t = tl.maximum(m_t, tl.max(zt, 1))
        l_s = l_s * tl.exp(m_s - new_s) + tl.sum(tl.exp(zs - new_s[:, None]), 1)
        l_t = l_t * tl.exp(m_t - new_t) + tl.sum(tl.exp(zt - new_t[:, None]), 1)
        m_s = new_s
        m_t = new_t
    lse_s = m_s + tl.log(l_s)
    lse_t = m_t + tl.log(l_t)
    acc_d = tl.zeros((BLOCK_N,), dtype=ACC)
    acc_e = tl.zeros((BLOCK_N,), dtype=ACC)
    for v0 in range(0, V, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_ok = cols < V
        zs, zt = _logits(Xs, Xt, W, Wt, Bs, Bt, rows, row_ok, cols, col_ok, H, stride_xs,
                         stride_xt, stride_w, stride_wt, inv_t, Scalars + 4, HAS_BIAS, HAS_TBIAS,
                         HAS_SOFTCAP, UPCAST, PRECISION, ACC, BLOCK_N, BLOCK_V,
                         BLOCK_H)  # fmt: skip
        d, e = _elements(zs - lse_s[:, None], zt - lse_t[:, None], col_ok, log_beta,
                         log_1m_beta, clip, BETA_MODE, HAS_CLIP)  # fmt: skip
        acc_d += tl.sum(d, 1)
        acc_e += tl.sum(e, 1)
    tl.store(Out + rows, acc_d, mask=row_ok)
    tl.store(Out + N + rows, acc_e, mask=row_ok)
    tl.store(Out + 2 * N + rows, lse_s, mask=row_ok)
    tl.store(Out + 3 * N + rows, lse_t, mask=row_ok)


@triton.jit
def _grad_kernel(Xs, Xt, W, Wt, Bs, Bt, Stats, G, Grad, r0, R, N, V, H,
                 stride_xs, stride_xt, stride_w, stride_wt, Scalars, HAS_BIAS: tl.constexpr,
                 HAS_TBIAS: tl.constexpr, BETA_MODE: tl.constexpr, HAS_CLIP: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                 ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_H: tl.constexpr):  # fmt: skip
    """G[i, v] = grad·(e − p_S·Σe)/T for rows r0 + i, i < R (G is [R, V], row-major);
    under HAS_SOFTCAP times the student's slope 1 − tanh², with tanh = z_S·(T/c) taken
    back from the capped tile (one multiply, instead of a second live tile)."""
    inv_t, log_beta, log_1m_beta, clip = _load_scalars(Scalars)
    local = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = r0 + local
    row_ok = local < R
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    sum_e = tl.load(Stats + N + rows, mask=row_ok, other=0.0)
    lse_s = tl.load(Stats + 2 * N + rows, mask=row_ok, other=0.0)
    lse_t = tl.load(Stats + 3 * N + rows, mask=row_ok, other=0.0)
    g = tl.load(Grad + rows, mask=row_ok, other=0.0).to(ACC) * inv_t
    zs, zt = _logits(Xs, Xt, W, Wt, Bs, Bt, rows, row_ok, cols, col_ok, H, stride_xs,
                     stride_xt, stride_w, stride_wt, inv_t, Scalars + 4, HAS_BIAS, HAS_TBIAS,
                     HAS_SOFTCAP, UPCAST, PRECISION, ACC, BLOCK_N, BLOCK_V,
                     BLOCK_H)  # fmt: skip
    a = zs - lse_s[:, None]
    _, e = _elements(a, zt - lse_t[:, None], col_ok, log_beta, log_1m_beta, clip, BETA_MODE,
                     HAS_CLIP)  # fmt: skip
    p_s = tl.where(col_ok[None, :], tl.exp(a), 0.0)
    gz = (e - p_s * sum_e[:, None]) * g[:, None]
    if HAS_SOFTCAP:
        t = tl.where(col_ok[None, :], zs, 0.0) * tl.load(Scalars + 6)
        gz = gz * (1.0 - t * t)
    tl.store(G + local[:, None] * V + cols[None, :], gz, mask=row_ok[:, None] & col_ok[None, :])


def _scalars(beta, temperature, clip, dtype, device, softcap=None):
    """The kernels' ``Scalars`` [7] in the accumulation dtype (see ``_load_scalars``), then
    the soft cap's 1/c, c/T (``softcap.load_cap``) and T/c (1, 1/T, 1 without a cap)."""
    log_beta = math.log(beta) if beta > 0 else 0.0
    log_1m_beta = math.log1p(-beta) if beta < 1 else 0.0
    values = [1.0 / temperature, log_beta, log_1m_beta, 0.0 if clip is None else clip]
    if softcap is None:
        values += [1.0, 1.0 / temperature, 1.0]
    else:
        values += [1.0 / softcap, softcap / temperature, temperature / softcap]
    return torch.tensor(values, dtype=dtype, device=device)


def _acc(dtype: torch.dtype):
    """``ACC`` for a compute dtype (float64 or float32), like ``tl_compute_dtype``."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def forward(hs, w, b, ht, tw, tb, beta, temperature, clip, top_k, dtype, workspace=None,
            softcap=None):  # fmt: skip
    """Same contract as the torch backend's ``forward``: (D, Σe, lse_S, lse_T) [N]."""
    if top_k is not None:
        return torch_kernels.forward(hs, w, b, ht, tw, tb, beta, temperature, clip, top_k, dtype,
                                     softcap=softcap)  # fmt: skip
    N, V, H = hs.shape[0], w.shape[0], w.shape[1]
    out = torch.empty(4, N, dtype=dtype, device=hs.device)
    cfg = _config("fwd", hs.dtype)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]),)
    scalars = _scalars(beta, temperature, clip, dtype, hs.device, softcap)
    _fwd_kernel[grid](
        hs, ht, w, tw, b if b is not None else w, tb if tb is not None else w, out, N, V, H,
        hs.stride(0), ht.stride(0), w.stride(0), tw.stride(0), scalars,
        HAS_BIAS=b is not None, HAS_TBIAS=tb is not None, ACC=_acc(dtype),
        **_constexprs(hs.dtype, beta, clip, softcap), **cfg,
    )  # fmt: skip
    return out[0], out[1], out[2], out[3]


def backward(grad, hs, w, b, ht, tw, tb, sum_e, lse_s, lse_t, beta, temperature, clip, top_k,
             dtype, need_weight_grad, workspace=None, softcap=None):  # fmt: skip
    """Same contract as the torch backend's ``backward``: (gh, gw | None, gb | None)."""
    if top_k is not None:
        return torch_kernels.backward(
            grad, hs, w, b, ht, tw, tb, sum_e, lse_s, lse_t, beta, temperature, clip, top_k,
            dtype, need_weight_grad, softcap=softcap,
        )  # fmt: skip
    N, V, H = hs.shape[0], w.shape[0], w.shape[1]
    stats = torch.stack([torch.zeros_like(sum_e), sum_e, lse_s, lse_t]).contiguous()
    grad = grad.contiguous()
    w_c = w.to(dtype)  # GEMM operand in the compute dtype (a copy only for bf16/fp16)
    gh = torch.empty(N, H, dtype=dtype, device=hs.device)
    gw = torch.zeros(V, H, dtype=dtype, device=w.device) if need_weight_grad else None
    gb = (
        torch.zeros(V, dtype=dtype, device=w.device) if need_weight_grad and b is not None else None
    )
    cfg = _config("grad", hs.dtype)
    rows = max(1, min(N, (workspace or WORKSPACE_ELEMENTS) // V))
    G = torch.empty(rows * V, dtype=dtype, device=hs.device)
    scalars = _scalars(beta, temperature, clip, dtype, hs.device, softcap)
    consts = _constexprs(hs.dtype, beta, clip, softcap)
    for r0 in range(0, N, rows):
        R = min(rows, N - r0)
        g_blk = G[: R * V].view(R, V)
        grid = (triton.cdiv(R, cfg["BLOCK_N"]), triton.cdiv(V, cfg["BLOCK_V"]))
        _grad_kernel[grid](
            hs, ht, w, tw, b if b is not None else w, tb if tb is not None else w, stats,
            g_blk, grad, r0, R, N, V, H, hs.stride(0), ht.stride(0), w.stride(0),
            tw.stride(0), scalars, HAS_BIAS=b is not None, HAS_TBIAS=tb is not None,
            ACC=_acc(dtype), **consts, **cfg,
        )  # fmt: skip
        torch.mm(g_blk, w_c, out=gh[r0 : r0 + R])
        if gw is not None:
            gw.addmm_(g_blk.T, hs[r0 : r0 + R].to(dtype))
        if gb is not None:
            gb += g_blk.sum(0)
    return gh, gw, gb
