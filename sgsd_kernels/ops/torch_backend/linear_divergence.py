"""Blockwise PyTorch kernels for the full-vocabulary divergence of docs/design.md §3.1 (the
``torch`` backend of ``linear_divergence``).

Never allocates N×V: rows are processed in chunks and the vocabulary in blocks, and all
element-wise work happens in place in four reused scratch buffers of
``WORKSPACE_ELEMENTS`` elements (both logit blocks and two temporaries). When the whole
vocabulary fits one block the forward computes the two
logit blocks once per row chunk; otherwise it makes two passes (online logsumexp, then the
element-wise clipped terms). The backward recomputes the logits and forms the student
logit gradient from the saved row statistics.

Gradient: with a = log p_S, c = log p_T and e_v = ∂d_v/∂a_v (0 where the clip is active
or outside the teacher's top-k), ∂D/∂z_v = e_v − p_S(v)·Σ_u e_u, where
  β = 0:      e = −p_T
  β = 1:      e = p_S (a − c + 1)
  0 < β < 1:  e = (1 − β) p_S (a − log M)   (the p_T and p_S terms through M cancel).
Σ_u e_u is accumulated in the forward and saved, so the backward is one pass.
"""

from __future__ import annotations

import math

import torch

# 2**21 fp32 elements = 8 MiB per scratch buffer (four of them, reused), i.e.
# 64 rows at V = 32768. Sized for ~10x less peak memory than the materialising path at the
# docs/design.md §6 CPU shape (N=1024, V=32768, H=256) while keeping each logits GEMM 64+ rows tall.
WORKSPACE_ELEMENTS = 1 << 21
_MIN_ROWS = 16


def plan_blocks(n_rows: int, vocab: int, workspace: int | None = None) -> tuple[int, int]:
    """(row chunk, vocab block) with chunk × block ≤ workspace (for N, V ≥ 1)."""
    workspace = workspace or WORKSPACE_ELEMENTS  # read at call time: tests shrink it
    vblock = vocab if vocab * _MIN_ROWS <= workspace else max(1, workspace // _MIN_ROWS)
    return max(1, min(n_rows, workspace // vblock)), vblock


def logits_block(h, weight, bias, v0, v1, inv_t, dtype, out=None):
    """z = (h @ W[v0:v1]ᵀ + b[v0:v1]) / T in ``dtype`` (h is already in ``dtype``),
    written into ``out`` when given."""
    w = weight[v0:v1].to(dtype)
    if bias is not None:
        return torch.addmm(bias[v0:v1].to(dtype), h, w.T, beta=inv_t, alpha=inv_t, out=out)
    z = torch.mm(h, w.T, out=out) if out is not None else h @ w.T
    return z.mul_(inv_t) if inv_t != 1.0 else z


class Scratch:
    """Four flat buffers of ``rows × vblock`` elements, allocated once per call and reused
    for every block: a fresh multi-MiB tensor per block lets the glibc heap fragment and
    grow with N (measured: +81 MiB from N = 1024 to 4096 at V = 32768 without reuse)."""

    def __init__(self, size, dtype, device):
        self.flat = torch.empty(4, size, dtype=dtype, device=device)

    def views(self, r, width):
        return [self.flat[i, : r * width].view(r, width) for i in range(4)]


def teacher_top_k(h, weight, bias, k, inv_t, dtype, vblock):
    """Indices (and scaled logits) of the k largest teacher logits per row, keeping a
    running top-k over vocabulary blocks: [r, k] int64, [r, k]."""
    V = weight.shape[0]
    best_v = best_i = None
    for v0 in range(0, V, vblock):
        v1 = min(V, v0 + vblock)
        z = logits_block(h, weight, bias, v0, v1, inv_t, dtype)
        vals, idx = z.topk(min(k, v1 - v0), dim=-1)
        idx += v0
        if best_v is not None:
            vals, idx = torch.cat([best_v, vals], -1), torch.cat([best_i, idx], -1)
            vals, pos = vals.topk(min(k, vals.shape[-1]), dim=-1)
            idx = idx.gather(-1, pos)
        best_v, best_i = vals, idx
    return best_i, best_v


def _drop_block(top, v0, v1):
    """Bool [r, v1 − v0]: which columns of the block are NOT among the row's top-k."""
    if top is None:
        return None
    width = v1 - v0
    local = torch.where((top >= v0) & (top < v1), top - v0, width)
    drop = torch.ones(top.shape[0], width + 1, dtype=torch.bool, device=top.device)
    drop.scatter_(1, local, False)
    return drop[:, :width]


def _masked(z, drop):
    return z if drop is None else z.masked_fill_(drop, float("-inf"))


def elements(zs, zt, lse_s, lse_t, drop, beta, clip, s1, s2):
    """Per-element (d, e = ∂d/∂a, p_S) on one block, in place: ``zs``/``zt`` (the scaled
    logits) and the scratch ``s1``/``s2`` are overwritten and the results are views of
    them. Columns in ``drop`` (outside the teacher's top-k) give 0."""
    a = zs.sub_(lse_s[:, None])
    c = zt.sub_(lse_t[:, None])
    if beta == 0.0:
        p_t = torch.exp(c, out=s1)
        d = torch.sub(c, a, out=s2).mul_(p_t)
        e = p_t.neg_()
        p_s = torch.exp(a, out=zt)
    elif beta == 1.0:
        p_s = torch.exp(a, out=s1)
        diff = c.neg_().add_(a)
        d = torch.mul(p_s, diff, out=s2)
        e = diff.add_(1.0).mul_(p_s)
    else:
        log_m = torch.logaddexp(
            torch.add(a, math.log1p(-beta), out=s1), torch.add(c, math.log(beta), out=s2), out=s1
        )
        p_t = torch.exp(c, out=s2)
        d = c.sub_(log_m).mul_(p_t).mul_(beta)  # β p_T (c − log M), in zt
        a_m = torch.sub(a, log_m, out=s1)
        p_s = torch.exp(a, out=s2)
        e = a_m.mul_(p_s).mul_(1.0 - beta)  # (1 − β) p_S (a − log M)
        d = d.add_(e)
    if clip is not None:
        e.masked_fill_(d > clip, 0.0)
        d.clamp_(max=clip)
    if drop is not None:
        d.masked_fill_(drop, 0.0)
        e.masked_fill_(drop, 0.0)
    return d, e, p_s


def _blocks(V, vblock):
    return [(v0, min(V, v0 + vblock)) for v0 in range(0, V, vblock)]


def _both_logits(hs, w, b, ht, tw, tb, top, v0, v1, inv_t, dtype, scratch):
    """Scaled student and teacher logits of block [v0, v1) in scratch buffers 0 and 1, plus
    the two free scratch buffers and the drop mask (columns outside the top-k)."""
    zs, zt, s1, s2 = scratch.views(hs.shape[0], v1 - v0)
    drop = _drop_block(top, v0, v1)
    zs = _masked(logits_block(hs, w, b, v0, v1, inv_t, dtype, out=zs), drop)
    zt = _masked(logits_block(ht, tw, tb, v0, v1, inv_t, dtype, out=zt), drop)
    return zs, zt, s1, s2, drop


def _lse_pass(hs, w, b, ht, tw, tb, top, inv_t, dtype, vblock, scratch):
    r = hs.shape[0]
    lse_s = torch.full((r,), float("-inf"), dtype=dtype, device=hs.device)
    lse_t = lse_s.clone()
    for v0, v1 in _blocks(w.shape[0], vblock):
        zs, zt, *_ = _both_logits(hs, w, b, ht, tw, tb, top, v0, v1, inv_t, dtype, scratch)
        lse_s = torch.logaddexp(lse_s, torch.logsumexp(zs, -1))
        lse_t = torch.logaddexp(lse_t, torch.logsumexp(zt, -1))
    return lse_s, lse_t


def forward(hs, w, b, ht, tw, tb, beta, temperature, clip, top_k, dtype, workspace=None):
    """Rows [N, H] (all valid) -> (D, Σe, lse_S, lse_T), each [N] in ``dtype``."""
    N, V = hs.shape[0], w.shape[0]
    inv_t = 1.0 / temperature
    out = torch.empty(4, N, dtype=dtype, device=hs.device)
    rows, vblock = plan_blocks(N, V, workspace)
    scratch = Scratch(rows * vblock, dtype, hs.device)
    for r0 in range(0, N, rows):
        sl = slice(r0, min(N, r0 + rows))
        hs_c, ht_c = hs[sl].to(dtype), ht[sl].to(dtype)
        top = None
        if top_k is not None:
            top, _ = teacher_top_k(ht_c, tw, tb, top_k, inv_t, dtype, vblock)
        if vblock == V:
            zs, zt, s1, s2, drop = _both_logits(
                hs_c, w, b, ht_c, tw, tb, top, 0, V, inv_t, dtype, scratch
            )
            lse_s, lse_t = torch.logsumexp(zs, -1), torch.logsumexp(zt, -1)
            d, e, _ = elements(zs, zt, lse_s, lse_t, drop, beta, clip, s1, s2)
            out[0, sl], out[1, sl] = d.sum(-1), e.sum(-1)
        else:
            lse_s, lse_t = _lse_pass(hs_c, w, b, ht_c, tw, tb, top, inv_t, dtype, vblock, scratch)
            acc_d = torch.zeros_like(lse_s)
            acc_e = torch.zeros_like(lse_s)
            for v0, v1 in _blocks(V, vblock):
                zs, zt, s1, s2, drop = _both_logits(
                    hs_c, w, b, ht_c, tw, tb, top, v0, v1, inv_t, dtype, scratch
                )
                d, e, _ = elements(zs, zt, lse_s, lse_t, drop, beta, clip, s1, s2)
                acc_d += d.sum(-1)
                acc_e += e.sum(-1)
            out[0, sl], out[1, sl] = acc_d, acc_e
        out[2, sl], out[3, sl] = lse_s, lse_t
    return out[0], out[1], out[2], out[3]


def backward(
    grad, hs, w, b, ht, tw, tb, sum_e, lse_s, lse_t, beta, temperature, clip, top_k, dtype,
    need_weight_grad, workspace=None,
):  # fmt: skip
    """∂(Σ grad·D) w.r.t. the student rows, W and b: (gh [N, H], gw [V, H] | None,
    gb [V] | None) in ``dtype``. Recomputes both logit blocks (and the teacher top-k)."""
    N, V = hs.shape[0], w.shape[0]
    inv_t = 1.0 / temperature
    gh = torch.zeros(hs.shape, dtype=dtype, device=hs.device)
    gw = torch.zeros(w.shape, dtype=dtype, device=w.device) if need_weight_grad else None
    gb = (
        torch.zeros(V, dtype=dtype, device=w.device) if need_weight_grad and b is not None else None
    )
    rows, vblock = plan_blocks(N, V, workspace)
    scratch = Scratch(rows * vblock, dtype, hs.device)
    for r0 in range(0, N, rows):
        sl = slice(r0, min(N, r0 + rows))
        hs_c, ht_c = hs[sl].to(dtype), ht[sl].to(dtype)
        g = grad[sl].to(dtype) * inv_t
        top = None
        if top_k is not None:
            top, _ = teacher_top_k(ht_c, tw, tb, top_k, inv_t, dtype, vblock)
        for v0, v1 in _blocks(V, vblock):
            zs, zt, s1, s2, drop = _both_logits(
                hs_c, w, b, ht_c, tw, tb, top, v0, v1, inv_t, dtype, scratch
            )
            _, e, p_s = elements(zs, zt, lse_s[sl], lse_t[sl], drop, beta, clip, s1, s2)
            gz = e.sub_(p_s.mul_(sum_e[sl, None])).mul_(g[:, None])
            w_blk = w[v0:v1].to(dtype)
            gh[sl] += gz @ w_blk
            if gw is not None:
                gw[v0:v1].addmm_(gz.T, hs_c)
            if gb is not None:
                gb[v0:v1] += gz.sum(0)
    return gh, gw, gb
