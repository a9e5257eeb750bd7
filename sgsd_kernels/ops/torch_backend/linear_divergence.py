"""Blockwise PyTorch kernels for the full-vocabulary divergence of docs/design.md §3.1 (the
``torch`` backend of ``linear_divergence``).

Never allocates N×V: rows are processed in chunks and the vocabulary in blocks, and all
element-wise work happens in place in three (β ∈ {0, 1}) or four reused scratch buffers
that share one budget of ``WORKSPACE_ELEMENTS`` elements, plus a bool clip mask. The logits
are computed vocabulary-major (W_blk · hᵀ, 1/T folded into h and b); with a shared head the
student and teacher rows are one GEMM. When the whole vocabulary fits one block the forward
normalises both with one in-place log_softmax; otherwise it makes two passes (online
logsumexp, then the element-wise clipped terms). The backward recomputes the logits and
forms the student logit gradient from the saved row statistics; in the one-block case
:func:`forward_with_unit_grads` instead forms that gradient (for a unit upstream gradient)
in the forward and runs the dh and dW GEMMs there.

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

# Elements of scratch per call, over all buffers: 3 * 2**22 fp32 = 48 MiB, i.e. three
# buffers of 128 rows at V = 32768 (β ∈ {0, 1}; four buffers of 96 rows otherwise). On the
# loaded 2-core EPYC dev box every parallel element-wise op costs about one scheduler slice
# (~12 ms at 4M elements, whatever the op), so the chunk is as tall as the memory target
# allows: scratch plus dW stay >= 10x under the materialising path's peak at the
# docs/design.md §6 CPU shape (N=1024, V=32768, H=256, fwd+bwd: reference 899 MiB at β = 0,
# 1923 MiB at β = 0.5; this path 85 MiB, measured as in tests/kernels/test_divergence_memory.py).
WORKSPACE_ELEMENTS = 3 << 22
# The unit-gradient forward holds dW_unit (V×H) beside its scratch: 3/4 of the budget (96
# rows at V = 32768, β ∈ {0, 1}) keeps it >= 10x under the reference's peak at the
# docs/design.md §6 CPU shape (β = 0, clip: 74 MiB vs 896; 87 MiB at 128 rows). 96 rows ran
# as fast as 128 fwd+bwd, 85 rows 1.2-1.4x slower (interleaved, 1 and 2 threads, loaded
# 2-core EPYC).
UNIT_WORKSPACE_ELEMENTS = 9 << 20
_MIN_ROWS = 16


def n_buffers(beta: float, softcap: float | None = None) -> int:
    """Scratch buffers the element-wise math of ``elements`` needs for this β, plus one for
    the student's soft-cap slope with a ``softcap``."""
    return (3 if beta in (0.0, 1.0) else 4) + (softcap is not None)


def plan_blocks(
    n_rows: int, vocab: int, workspace: int | None = None, buffers: int = 3
) -> tuple[int, int]:
    """(row chunk, vocab block) with ``buffers`` × chunk × block ≤ workspace (N, V ≥ 1)."""
    per = max(1, (workspace or WORKSPACE_ELEMENTS) // buffers)  # read at call time: tests shrink it
    vblock = vocab if vocab * _MIN_ROWS <= per else max(1, per // _MIN_ROWS)
    return max(1, min(n_rows, per // vblock)), vblock


def logits_block(h, weight, bias, v0, v1, inv_t, dtype, out=None, softcap=None):
    """z = (h @ W[v0:v1]ᵀ + b[v0:v1]) / T in ``dtype`` (h is already in ``dtype``),
    written into ``out`` when given; with a ``softcap`` c, (c/T)·tanh(z_raw/c)."""
    if softcap is not None:
        t = logits_block(h, weight, bias, v0, v1, 1.0 / softcap, dtype, out)
        return t.tanh_().mul_(softcap * inv_t)
    w = weight[v0:v1].to(dtype)
    if bias is not None:
        return torch.addmm(bias[v0:v1].to(dtype), h, w.T, beta=inv_t, alpha=inv_t, out=out)
    z = torch.mm(h, w.T, out=out) if out is not None else h @ w.T
    return z.mul_(inv_t) if inv_t != 1.0 else z


class Scratch:
    """Flat buffers of ``rows × vblock`` elements, allocated once per call and reused for
    every block: a fresh multi-MiB tensor per block lets the glibc heap fragment and grow
    with N (measured: +81 MiB from N = 1024 to 4096 at V = 32768 without reuse).

    The logits are written vocabulary-major, as W_blk · hᵀ ([width, rows] in memory) and
    used through the transposed view [rows, width]: that GEMM ran 1.3-1.6x faster than
    h · W_blkᵀ at 64-128 rows (H = 256, V = 32768, 2-core EPYC), and with a shared head
    the student and teacher rows form one GEMM of twice the height."""

    def __init__(self, size, buffers, dtype, device, clip, softcap=None):
        # With a soft cap the last buffer holds the student's slope 1 − tanh² (``slope``).
        self.flat = torch.empty(buffers, size, dtype=dtype, device=device)
        self.mask = None if clip is None else torch.empty(size, dtype=torch.bool, device=device)
        self.n_temps = buffers - 2 - (softcap is not None)

    def slope(self, r, width):
        """The soft-cap slope buffer as an [r, width] view (vocabulary-major)."""
        return self.flat[-1, : r * width].view(width, r).T

    def logits(self, r, width, fused):
        """(student view, teacher view, GEMM output(s)) of a [r, width] block."""
        if fused:
            both = self.flat[:2].view(-1)[: 2 * r * width].view(width, 2 * r)
            return both[:, :r].T, both[:, r:].T, (both,)
        zs_t = self.flat[0, : r * width].view(width, r)
        zt_t = self.flat[1, : r * width].view(width, r)
        return zs_t.T, zt_t.T, (zs_t, zt_t)

    def temps(self, r, width):
        """The free buffers as [r, width] views (one or two), then the clip mask view."""
        views = [self.flat[i, : r * width].view(width, r).T for i in range(2, 2 + self.n_temps)]
        mask = None if self.mask is None else self.mask[: r * width].view(width, r).T
        return (*views, None)[:2], mask


def _same(x, y) -> bool:
    """Whether two tensors (or Nones) are views of the same memory with the same layout (the
    op receives the shared head as ``weight`` and ``weight.detach()``)."""
    if x is None or y is None:
        return x is y
    return (x.data_ptr(), x.shape, x.stride(), x.dtype, x.device) == (
        y.data_ptr(), y.shape, y.stride(), y.dtype, y.device
    )  # fmt: skip


class _Head:
    """One row chunk's GEMM operands: prescaled (by 1/T) transposed hidden states and
    biases, so the GEMM output is already z / T (no separate scaling pass). With a soft
    cap c they are prescaled by 1/c instead and :meth:`cap` finishes the logits."""

    def __init__(self, hs, w, b, ht, tw, tb, inv_t, dtype, softcap=None):
        self.fused = _same(w, tw) and _same(b, tb)
        self.w, self.tw, self.dtype = w, tw, dtype
        self.softcap, self.post = softcap, None
        if softcap is not None:
            inv_t, self.post = 1.0 / softcap, softcap * inv_t
        scale = lambda x: None if x is None else x.to(dtype) * inv_t  # noqa: E731
        self.b, self.tb = scale(b), scale(tb)
        if self.fused:
            self.h2t = torch.cat([hs, ht]).mul_(inv_t).T
        else:
            self.hst, self.htt = (hs * inv_t).T, (ht * inv_t).T

    def fill(self, outs, v0, v1):
        def mm(w, bias, ht, out):
            wb = w[v0:v1].to(self.dtype)
            if bias is None:
                return torch.mm(wb, ht, out=out)
            return torch.addmm(bias[v0:v1, None], wb, ht, out=out)

        if self.fused:
            mm(self.w, self.b, self.h2t, outs[0])
        else:
            mm(self.w, self.b, self.hst, outs[0])
            mm(self.tw, self.tb, self.htt, outs[1])

    def cap(self, outs, zs, slope):
        """The soft cap on the filled GEMM outputs ``outs`` (holding z_raw/c): tanh, the
        student's slope 1 − tanh² (``zs`` its view) into ``slope``, then ×c/T."""
        for o in outs:
            o.tanh_()
        torch.mul(zs, zs, out=slope).neg_().add_(1.0)
        for o in outs:
            o.mul_(self.post)
        return slope


def teacher_top_k(h, weight, bias, k, inv_t, dtype, vblock, softcap=None):
    """Indices (and scaled logits) of the k largest teacher logits per row, keeping a
    running top-k over vocabulary blocks: [r, k] int64, [r, k]. The soft cap applies
    before the choice, as in the reference (tanh can make distinct raw logits tie)."""
    V = weight.shape[0]
    best_v = best_i = None
    for v0 in range(0, V, vblock):
        v1 = min(V, v0 + vblock)
        z = logits_block(h, weight, bias, v0, v1, inv_t, dtype, softcap=softcap)
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


def _lse(z, tmp):
    """Row logsumexp of the [r, width] view ``z`` using ``tmp`` (same shape) as scratch:
    torch.logsumexp would allocate an r × width temporary per call."""
    m = z.amax(-1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all -inf rows stay -inf
    s = torch.sub(z, m[:, None], out=tmp).exp_().sum(-1)
    return s.log_().add_(m)


def elements(a, c, drop, beta, clip, temps, mask, need_d=True, need_ps=True):
    """Per-element (d, e, p_S, sign) on one block from the log-probs ``a`` (student) and
    ``c`` (teacher), in place: ``a``, ``c`` and the scratch ``temps`` (one buffer for
    β ∈ {0, 1}, two otherwise) are overwritten and the results are views of them; ``mask``
    is bool scratch for the clip. ∂d/∂a = sign · e (β = 0 keeps p_T unnegated: one pass
    fewer). ``need_d`` False (the backward) skips the clamp and the drop of d, which is
    then not used; ``need_ps`` False leaves p_S None for β = 0 (the other β need it for
    d). Columns in ``drop`` (outside the teacher's top-k) give 0."""
    s1, s2 = temps
    p_s, sign = None, 1.0
    if beta == 0.0:
        e = torch.exp(c, out=s1)  # p_T; ∂d/∂a = −p_T
        d = c.sub_(a).mul_(e)  # p_T (c − a), in c
        sign = -1.0
        if need_ps:
            p_s = a.exp_()
    elif beta == 1.0:
        p_s = torch.exp(a, out=s1)
        diff = c.neg_().add_(a)
        d = torch.mul(p_s, diff, out=a)  # p_S (a − c); a is no longer needed
        e = diff.add_(1.0).mul_(p_s)
    else:
        log_m = torch.logaddexp(
            torch.add(a, math.log1p(-beta), out=s1), torch.add(c, math.log(beta), out=s2), out=s1
        )
        p_t = torch.exp(c, out=s2)
        d = c.sub_(log_m).mul_(p_t).mul_(beta)  # β p_T (c − log M), in c
        a_m = torch.sub(a, log_m, out=s1)
        p_s = torch.exp(a, out=s2)
        e = a_m.mul_(p_s).mul_(1.0 - beta)  # (1 − β) p_S (a − log M)
        d = d.add_(e)
    if clip is not None:
        e.masked_fill_(torch.gt(d, clip, out=mask), 0.0)
        if need_d:
            d.clamp_(max=clip)
    if drop is not None:
        e.masked_fill_(drop, 0.0)
        if need_d:
            d.masked_fill_(drop, 0.0)
    return d, e, p_s, sign


def _blocks(V, vblock):
    return [(v0, min(V, v0 + vblock)) for v0 in range(0, V, vblock)]


def _both_logits(head, top, v0, v1, scratch):
    """Scaled student and teacher logits of block [v0, v1) (as [r, width] views, with the
    columns outside the top-k at −inf), the GEMM outputs they view, the free scratch
    views and the clip mask view. With a soft cap, ``head.slope`` is the student's
    slope ∂z/∂(z_raw/T) on the block."""
    r = head.rows
    zs, zt, outs = scratch.logits(r, v1 - v0, head.fused)
    head.fill(outs, v0, v1)
    if head.softcap is not None:
        head.slope = head.cap(outs, zs, scratch.slope(r, v1 - v0))
    drop = _drop_block(top, v0, v1)
    temps, mask = scratch.temps(r, v1 - v0)
    return _masked(zs, drop), _masked(zt, drop), outs, temps, mask, drop


def _log_softmax_(outs, r):
    """Normalise the whole-vocabulary logits in place (each GEMM output is [V, rows] in
    memory, so one fused log_softmax over dim 0 covers student and teacher rows) and
    return (lse_S, lse_T). lse = max z − max log p (both at the row's arg-max, where
    log p ∈ [−log V, 0]), so it is as exact as the logits; two amax reductions cost less
    than one max-with-indices over dim 0 (~110 ms vs ~1 ms at [32768, 256])."""
    lse = []
    for o in outs:
        z_max = o.amax(0)
        torch.ops.aten._log_softmax.out(o, 0, False, out=o)
        lse.append(z_max.sub_(o.amax(0)))
    lse = torch.cat(lse)
    return lse[:r], lse[r:]


def _normalise_(zs, zt, outs, lse_s, lse_t, fused):
    """a = z_S − lse_S and c = z_T − lse_T in place (one pass over a shared-head block)."""
    if fused:
        outs[0].sub_(torch.cat([lse_s, lse_t]))
    else:
        zs.sub_(lse_s[:, None])
        zt.sub_(lse_t[:, None])
    return zs, zt


def _lse_pass(head, top, V, vblock, scratch):
    lse_s = torch.full((head.rows,), float("-inf"), dtype=head.dtype, device=head.w.device)
    lse_t = lse_s.clone()
    for v0, v1 in _blocks(V, vblock):
        zs, zt, _, temps, _, _ = _both_logits(head, top, v0, v1, scratch)
        lse_s = torch.logaddexp(lse_s, _lse(zs, temps[0]))
        lse_t = torch.logaddexp(lse_t, _lse(zt, temps[0]))
    return lse_s, lse_t


def _chunk(hs, w, b, ht, tw, tb, sl, inv_t, top_k, dtype, vblock, softcap=None):
    hs_c, ht_c = hs[sl].to(dtype), ht[sl].to(dtype)
    head = _Head(hs_c, w, b, ht_c, tw, tb, inv_t, dtype, softcap)
    head.rows = hs_c.shape[0]
    top = None
    if top_k is not None:
        top, _ = teacher_top_k(ht_c, tw, tb, top_k, inv_t, dtype, vblock, softcap)
    return hs_c, head, top


def single_block(V: int, beta: float, workspace: int | None = None, softcap=None) -> bool:
    """Whether the whole vocabulary fits one block of the unit-gradient forward's workspace
    (V up to 196608 at β ∈ {0, 1}), the case in which :func:`forward_with_unit_grads`
    applies."""
    workspace = workspace or UNIT_WORKSPACE_ELEMENTS  # read at call time
    return plan_blocks(1, V, workspace, n_buffers(beta, softcap))[1] == V


def forward(hs, w, b, ht, tw, tb, beta, temperature, clip, top_k, dtype, workspace=None,
            softcap=None):  # fmt: skip
    """Rows [N, H] (all valid) -> (D, Σe, lse_S, lse_T), each [N] in ``dtype``; ``softcap``
    caps both heads' raw logits."""
    outs = _forward(hs, w, b, ht, tw, tb, beta, temperature, clip, top_k, dtype, workspace,
                    softcap=softcap)  # fmt: skip
    return outs[:4]


def forward_with_unit_grads(
    hs, w, b, ht, tw, tb, beta, temperature, clip, top_k, dtype, hidden, weight, workspace=None,
    softcap=None,
):  # fmt: skip
    """:func:`forward` plus, while each logits block is still in cache, the gradient of
    Σ_n D_n (a unit upstream gradient on every row): (D, Σe, lse_S, lse_T, dh_unit [N, H]
    or None, dW_unit [V, H] or None, db_unit [V] or None), dh_unit when ``hidden``, dW_unit
    (and db_unit with a bias) when ``weight``. Only where :func:`single_block` holds.

    dh_unit[n] = ∂D_n/∂h_n, so dh = grad[:, None]·dh_unit for any upstream gradient;
    dW_unit = Σ_n ∂D_n/∂W, so dW = c·dW_unit when the upstream gradient is c on every
    row. That costs 2 G here instead of the backward's 4 G (recompute both logits, dh, dW).
    """
    if not single_block(w.shape[0], beta, workspace, softcap):
        raise ValueError("forward_with_unit_grads needs the vocabulary in one block")
    workspace = workspace or UNIT_WORKSPACE_ELEMENTS
    return _forward(
        hs, w, b, ht, tw, tb, beta, temperature, clip, top_k, dtype, workspace, hidden, weight,
        softcap,
    )  # fmt: skip


class _UnitGrads:
    """Accumulators of the unit-upstream-gradient gradients (see
    :func:`forward_with_unit_grads`)."""

    def __init__(self, hs, w, b, dtype, hidden, weight):
        N, (V, H) = hs.shape[0], w.shape
        new = lambda *shape: torch.zeros(*shape, dtype=dtype, device=hs.device)  # noqa: E731
        self.dh = new(N, H) if hidden else None
        self.dw = new(V, H) if weight else None
        self.db = new(V) if weight and b is not None else None
        self.w = w.to(dtype) if hidden else None  # dh GEMM operand (a copy for bf16/fp16 only)

    @property
    def wanted(self) -> bool:
        return self.dh is not None or self.dw is not None

    def add(self, gz, alpha, hs_c, sl):
        """Accumulate one row chunk's whole-vocabulary logit gradient alpha·gz [r, V]."""
        if self.dh is not None:
            torch.mm(gz, self.w, out=self.dh[sl]).mul_(alpha)
        if self.dw is not None:
            self.dw.addmm_(gz.T, hs_c, alpha=alpha)
        if self.db is not None:
            self.db.add_(gz.sum(0), alpha=alpha)


def _forward(hs, w, b, ht, tw, tb, beta, temperature, clip, top_k, dtype, workspace,
             unit_hidden=False, unit_weight=False, softcap=None):  # fmt: skip
    N, V = hs.shape[0], w.shape[0]
    inv_t = 1.0 / temperature
    out = torch.empty(4, N, dtype=dtype, device=hs.device)
    unit = _UnitGrads(hs, w, b, dtype, unit_hidden, unit_weight)
    buffers = n_buffers(beta, softcap)
    rows, vblock = plan_blocks(N, V, workspace, buffers)
    scratch = Scratch(rows * vblock, buffers, dtype, hs.device, clip, softcap)
    for r0 in range(0, N, rows):
        sl = slice(r0, min(N, r0 + rows))
        hs_c, head, top = _chunk(hs, w, b, ht, tw, tb, sl, inv_t, top_k, dtype, vblock, softcap)
        if vblock == V:
            zs, zt, outs, temps, mask, drop = _both_logits(head, top, 0, V, scratch)
            lse_s, lse_t = _log_softmax_(outs, head.rows)
            d, e, p_s, sign = elements(zs, zt, drop, beta, clip, temps, mask, need_ps=unit.wanted)
            out[0, sl], out[1, sl] = d.sum(-1), e.sum(-1).mul_(sign)
            if unit.wanted:  # ∂D/∂z = (sign/T)·(e − sign·Σe·p_S), as in the backward
                gz = e.addcmul_(p_s, out[1, sl, None], value=-sign)
                if softcap is not None:
                    gz.mul_(head.slope)
                unit.add(gz, sign * inv_t, hs_c, sl)
        else:
            lse_s, lse_t = _lse_pass(head, top, V, vblock, scratch)
            acc_d = torch.zeros_like(lse_s)
            acc_e = torch.zeros_like(lse_s)
            for v0, v1 in _blocks(V, vblock):
                zs, zt, outs, temps, mask, drop = _both_logits(head, top, v0, v1, scratch)
                a, c = _normalise_(zs, zt, outs, lse_s, lse_t, head.fused)
                d, e, _, sign = elements(a, c, drop, beta, clip, temps, mask, need_ps=False)
                acc_d += d.sum(-1)
                acc_e += e.sum(-1).mul_(sign)
            out[0, sl], out[1, sl] = acc_d, acc_e
        out[2, sl], out[3, sl] = lse_s, lse_t
    return out[0], out[1], out[2], out[3], unit.dh, unit.dw, unit.db


def backward(
    grad, hs, w, b, ht, tw, tb, sum_e, lse_s, lse_t, beta, temperature, clip, top_k, dtype,
    need_weight_grad, workspace=None, need_hidden_grad=True, softcap=None,
):  # fmt: skip
    """∂(Σ grad·D) w.r.t. the student rows, W and b: (gh [N, H] | None, gw [V, H] | None,
    gb [V] | None) in ``dtype``. Recomputes both logit blocks (and the teacher top-k).
    Per block gz = g/T · (∂d/∂a − p_S Σe) = (sign·g/T) · (e − sign·Σe·p_S); the row
    factor sign·g/T is applied to the small GEMM operands, not to the block; a soft cap's
    slope 1 − tanh² multiplies the block."""
    N, V = hs.shape[0], w.shape[0]
    inv_t = 1.0 / temperature
    gh = torch.zeros(hs.shape, dtype=dtype, device=hs.device) if need_hidden_grad else None
    gw = torch.zeros(w.shape, dtype=dtype, device=w.device) if need_weight_grad else None
    gb = (
        torch.zeros(V, dtype=dtype, device=w.device) if need_weight_grad and b is not None else None
    )
    buffers = n_buffers(beta, softcap)
    rows, vblock = plan_blocks(N, V, workspace, buffers)
    scratch = Scratch(rows * vblock, buffers, dtype, hs.device, clip, softcap)
    for r0 in range(0, N, rows):
        sl = slice(r0, min(N, r0 + rows))
        hs_c, head, top = _chunk(hs, w, b, ht, tw, tb, sl, inv_t, top_k, dtype, vblock, softcap)
        g = grad[sl].to(dtype) * inv_t
        for v0, v1 in _blocks(V, vblock):
            zs, zt, outs, temps, mask, drop = _both_logits(head, top, v0, v1, scratch)
            a, c = _normalise_(zs, zt, outs, lse_s[sl], lse_t[sl], head.fused)
            _, e, p_s, sign = elements(a, c, drop, beta, clip, temps, mask, need_d=False)
            gz = e.addcmul_(p_s, sum_e[sl, None], value=-sign)
            if softcap is not None:
                gz.mul_(head.slope)
            row = g * sign
            if gh is not None:
                gh[sl] += (gz @ w[v0:v1].to(dtype)).mul_(row[:, None])
            if gw is not None:
                gw[v0:v1].addmm_(gz.T, hs_c * row[:, None])
            if gb is not None:
                gb[v0:v1].addmv_(gz.T, row)
    return gh, gw, gb
