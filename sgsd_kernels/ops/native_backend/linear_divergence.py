"""The native backend of ``sgsd::linear_divergence`` (docs/design.md §3.1): the torch backend's
row chunks and GEMMs (``ops/torch_backend/linear_divergence.py``), with every element-wise
pass over a chunk's logits replaced by one fused C++ kernel (``csrc/divergence.cpp``):
both log-normalisers, D and Σe per row, and in place the student-logit gradient.

The GEMMs stay ATen calls (torch.mm/addmm run near the GEMM rate), so the extension only
sees the chunk's scaled logits, [V, r] vocabulary-major as the GEMM writes them. Only
the student and teacher logit buffers are needed (the torch backend needs three or
four), so the same workspace budget holds chunks 1.5-2× taller.

The fused kernel covers the case where the whole vocabulary fits one block of the
workspace, i.e. 16 rows of both logit buffers (V up to 294912 for the unit-gradient
forward, 393216 otherwise, at the default budgets). A larger vocabulary runs the torch
backend's two-pass blockwise functions unchanged (``forward``, ``backward``,
``forward_with_unit_grads``).

Measured with ``benchmarks/bench_gated_kd.py --workloads divergence`` (interleaved, fp32,
N = 1024, V = 32768, H = 256, fwd+bwd of the masked mean, 2-core AMD EPYC dev box, shared):
2 threads native 506 ms, torch 678, torch.compile of the reference 728, reference 1280;
1 thread native 1030, torch 1322, torch.compile 1370. GEMMs are ~85 % of native's time.
"""

from __future__ import annotations

import torch

from sgsd_kernels.ops.torch_backend import linear_divergence as blockwise

# Logit buffers per chunk: student and teacher (the kernel works on them in place).
_BUFFERS = 2
# Rows per task of the kernel (kGroup in csrc/divergence.cpp).
_GROUP = 16


def _ops():
    # Imported here, not at module level: `python -m sgsd_kernels.native` must not find the
    # module already imported by the package (runpy warns about that).
    from sgsd_kernels import native

    return native.ops()


def _rows(N: int, V: int, workspace: int | None, unit: bool = False) -> int | None:
    """Rows per chunk with the whole vocabulary in one block, or None when it does not fit
    (then the torch backend's blockwise functions run). The budgets are read from the
    torch backend at call time (tests shrink them)."""
    default = blockwise.UNIT_WORKSPACE_ELEMENTS if unit else blockwise.WORKSPACE_ELEMENTS
    rows, vblock = blockwise.plan_blocks(N, V, workspace or default, _BUFFERS)
    if vblock != V:
        return None
    if rows == N:  # one chunk
        return rows
    # A multiple of the kernel's 16-row group: each group's 16 logits per vocabulary entry
    # are then one 64-byte line (the buffers are 64-byte aligned); at 142 rows the kernel
    # took 2.2x as long per row as at 128 or 144 (fp32, V = 32768, 1 thread, EPYC dev box).
    rows = max(_GROUP, rows - rows % _GROUP)
    # Chunks of about equal height: at N = 1024 eight of 128 rows rather than seven of 144
    # and one of 16, whose GEMMs run at about half the rate (same box: ~90 GFLOP/s at 144
    # rows, 50-65 at 64).
    even = -(-N // -(-N // rows))
    return min(rows, -(-even // _GROUP) * _GROUP)


def _padded(r: int) -> int:
    """Rows of the logits buffers for a chunk of r rows: r rounded up to the kernel's
    16-row group (zero hidden rows, results dropped) from 64 rows on, so that every group's
    logits of one vocabulary entry are one aligned 64-byte line. With a misaligned group
    each line is shared by two groups and fetched from memory by both: the kernel took
    2.2x as long per row at 142 rows as at 144 (fp32, V = 32768, 1 thread, EPYC dev box).
    Below 64 rows the padding would cost more than it saves."""
    return -(-r // _GROUP) * _GROUP if r >= 64 else r


class _Operands:
    """The logits GEMMs' operands for every row chunk, built with a few whole-tensor ops:
    per-chunk concatenation and scaling, as in the torch backend's ``_Head``, are two
    parallel ATen ops per chunk on tiny tensors, and with 2 threads on the loaded 2-core
    EPYC box they cost ~20 ms per chunk (~160 ms of ~1430 ms CPU time at N = 1024, V =
    32768, H = 256), about what the chunk's element-wise kernel costs. The hidden states
    are prescaled by 1/T (and the biases), so the GEMM output is z / T; with a shared head
    the student and teacher rows of a chunk are one [2r, H] operand and one GEMM."""

    def __init__(self, hs, w, b, ht, tw, tb, inv_t, dtype, rows):
        self.fused = blockwise._same(w, tw) and blockwise._same(b, tb)
        self.w, self.tw, self.dtype, self.rows = w, tw, dtype, rows
        scale = lambda x: None if x is None else x.to(dtype) * inv_t  # noqa: E731
        self.b, self.tb = scale(b), scale(tb)
        N, H = hs.shape
        if not self.fused:
            self.hs, self.ht = scale(hs), scale(ht)
            return
        # Full chunks: [k, 2, rows, H], chunk c's operand is [c]. rows is a multiple of 16
        # whenever there are several chunks; a single unpadded chunk is the tail.
        k = N // rows if _padded(rows) == rows else 0
        full = lambda x: x[: k * rows].view(k, rows, H)  # noqa: E731
        self.full = torch.stack([full(hs), full(ht)], 1).to(dtype).mul_(inv_t) if k else None
        self.tail = None
        if k * rows < N:  # [2, rp, H], zero rows after the r real ones of each half
            r = N - k * rows
            self.tail = hs.new_zeros((2, _padded(r), H), dtype=dtype)
            self.tail[:, :r] = torch.stack([hs[k * rows :], ht[k * rows :]])
            self.tail[:, :r] *= inv_t

    def logits(self, scratch, sl):
        """Fill the scratch with the scaled logits of rows ``sl`` and return them as [V, r]
        views (stride 1 across rows)."""
        r, V = sl.stop - sl.start, self.w.shape[0]
        rp = _padded(r)
        _, _, outs = scratch.logits(rp, V, self.fused)
        if self.fused:
            c = sl.start // self.rows
            full = self.full is not None and c < self.full.shape[0]
            h2 = self.full[c] if full else self.tail
            _mm(self.w, self.b, h2.view(2 * rp, -1).T, outs[0])
            return outs[0][:, :r], outs[0][:, rp : rp + r]
        hs, ht = self.hs[sl], self.ht[sl]
        if rp != r:
            hs, ht = (torch.cat([x, x.new_zeros(rp - r, x.shape[1])]) for x in (hs, ht))
        _mm(self.w, self.b, hs.T, outs[0])
        _mm(self.tw, self.tb, ht.T, outs[1])
        return outs[0][:, :r], outs[1][:, :r]


def _mm(w, bias, ht, out):
    """out [V, r] = W·hᵀ (+ b), W converted to the compute dtype (a copy for bf16/fp16)."""
    wb = w.to(out.dtype)
    if bias is None:
        return torch.mm(wb, ht, out=out)
    return torch.addmm(bias[:, None], wb, ht, out=out)


def _top(ht, tw, tb, sl, top_k, inv_t, dtype, softcap=None):
    """The teacher's top-k token indices of rows ``sl`` ([r, k] int64), or None."""
    if top_k is None:
        return None
    V = tw.shape[0]
    h = ht[sl].to(dtype)
    return blockwise.teacher_top_k(h, tw, tb, top_k, inv_t, dtype, V, softcap)[0]


def _chunks(hs, w, b, ht, tw, tb, top_k, inv_t, dtype, rows, softcap=None):
    """Per row chunk: (rows slice, student rows in ``dtype``, teacher top-k mask or None,
    student and teacher logit views [V, r], the student's soft-cap slope [V, r] or None);
    the logit (and slope) buffers are reused across chunks.

    With a soft cap c the GEMM operands are prescaled by 1/c, and the cap (tanh, the
    student's slope 1 − tanh², ×c/T) runs as ATen passes before the fused kernel, which
    then sees the capped logits / T as usual (docs/design.md §3.3)."""
    N, V = hs.shape[0], w.shape[0]
    buffers = _BUFFERS + (softcap is not None)
    scratch = blockwise.Scratch(_padded(rows) * V, buffers, dtype, hs.device, None, softcap)
    pre = inv_t if softcap is None else 1.0 / softcap
    ops = _Operands(hs, w, b, ht, tw, tb, pre, dtype, rows)
    for r0 in range(0, N, rows):
        sl = slice(r0, min(N, r0 + rows))
        zs, zt = ops.logits(scratch, sl)
        slope = None
        if softcap is not None:
            zs.tanh_(), zt.tanh_()
            slope = torch.mul(zs, zs, out=scratch.flat[-1, : zs.numel()].view_as(zs))
            slope.neg_().add_(1.0)
            zs.mul_(softcap * inv_t), zt.mul_(softcap * inv_t)
        top = _top(ht, tw, tb, sl, top_k, inv_t, dtype, softcap)
        yield sl, hs[sl].to(dtype), top, zs, zt, slope


def _fits(N, V, workspace, unit=False, softcap=None):
    """Rows per chunk of the fused path, or None (then the torch backend runs). A soft cap
    takes a third logits-sized buffer from the same budget."""
    if softcap is None:
        return _rows(N, V, workspace, unit)
    default = blockwise.UNIT_WORKSPACE_ELEMENTS if unit else blockwise.WORKSPACE_ELEMENTS
    budget = (workspace or default) * _BUFFERS // (_BUFFERS + 1)
    return _rows(N, V, budget, unit)


def forward(hs, w, b, ht, tw, tb, beta, temperature, clip, top_k, dtype, workspace=None,
            softcap=None):  # fmt: skip
    """Rows [N, H] (all valid) -> (D, Σe, lse_S, lse_T), each [N] in ``dtype``; ``softcap``
    caps both heads' raw logits."""
    if _fits(hs.shape[0], w.shape[0], workspace, softcap=softcap) is None:
        return blockwise.forward(hs, w, b, ht, tw, tb, beta, temperature, clip, top_k, dtype,
                                 workspace, softcap=softcap)  # fmt: skip
    return _forward(hs, w, b, ht, tw, tb, beta, temperature, clip, top_k, dtype, workspace,
                    softcap=softcap)[:4]  # fmt: skip


def forward_with_unit_grads(
    hs, w, b, ht, tw, tb, beta, temperature, clip, top_k, dtype, hidden, weight, workspace=None,
    softcap=None,
):  # fmt: skip
    """:func:`forward` plus the gradients of Σ_n D_n, as the torch backend's
    ``forward_with_unit_grads``: (D, Σe, lse_S, lse_T, dh_unit [N, H] or None, dW_unit
    [V, H] or None, db_unit [V] or None)."""
    N, V = hs.shape[0], w.shape[0]
    if _fits(N, V, workspace, unit=True, softcap=softcap) is None:
        return blockwise.forward_with_unit_grads(
            hs, w, b, ht, tw, tb, beta, temperature, clip, top_k, dtype, hidden, weight, workspace,
            softcap,
        )  # fmt: skip
    return _forward(hs, w, b, ht, tw, tb, beta, temperature, clip, top_k, dtype, workspace,
                    hidden, weight, softcap)  # fmt: skip


class _UnitGrads:
    """Accumulators of the unit-upstream-gradient gradients, as the torch backend's, but
    written by the first chunk's GEMM instead of zero-filled first (dW_unit is V×H), with
    1/T applied inside the GEMMs (no separate scaling pass)."""

    def __init__(self, hs, w, b, dtype, hidden, weight):
        N, (V, H) = hs.shape[0], w.shape
        self.dh = torch.empty(N, H, dtype=dtype, device=hs.device) if hidden else None
        self.dw = torch.empty(V, H, dtype=dtype, device=hs.device) if weight else None
        self.db = (
            torch.zeros(V, dtype=dtype, device=hs.device) if weight and b is not None else None
        )
        self.w = w.to(dtype) if hidden else None  # dh GEMM operand (a copy for bf16/fp16 only)
        self.first = True

    @property
    def wanted(self) -> bool:
        return self.dh is not None or self.dw is not None

    def add(self, gz, alpha, hs_c, sl):
        """Accumulate one row chunk's whole-vocabulary logit gradient alpha·gz [r, V]."""
        if self.dh is not None:  # beta = 0: the uninitialised rows are not read
            torch.addmm(self.dh[sl], gz, self.w, beta=0.0, alpha=alpha, out=self.dh[sl])
        if self.dw is not None:
            self.dw.addmm_(gz.T, hs_c, beta=0.0 if self.first else 1.0, alpha=alpha)
        if self.db is not None:
            self.db.add_(gz.sum(0), alpha=alpha)
        self.first = False


def _forward(hs, w, b, ht, tw, tb, beta, temperature, clip, top_k, dtype, workspace,
             unit_hidden=False, unit_weight=False, softcap=None):  # fmt: skip
    N, V = hs.shape[0], w.shape[0]
    inv_t = 1.0 / temperature
    unit = _UnitGrads(hs, w, b, dtype, unit_hidden, unit_weight)
    rows = _fits(N, V, workspace, unit=unit.wanted, softcap=softcap)
    out = torch.empty(4, N, dtype=dtype, device=hs.device)
    kernel = _ops().divergence_forward
    chunks = _chunks(hs, w, b, ht, tw, tb, top_k, inv_t, dtype, rows, softcap)
    for sl, hs_c, top, zs, zt, slope in chunks:
        out[:, sl] = kernel(zs, zt, top, beta, clip, unit.wanted)
        if unit.wanted:  # zs now holds ∂D/∂(z/T); ∂z/∂(z/T) = 1/T
            if slope is not None:
                zs.mul_(slope)
            unit.add(zs.T, inv_t, hs_c, sl)
    return out[0], out[1], out[2], out[3], unit.dh, unit.dw, unit.db


def backward(
    grad, hs, w, b, ht, tw, tb, sum_e, lse_s, lse_t, beta, temperature, clip, top_k, dtype,
    need_weight_grad, workspace=None, need_hidden_grad=True, softcap=None,
):  # fmt: skip
    """∂(Σ grad·D) w.r.t. the student rows, W and b: (gh [N, H] | None, gw [V, H] | None,
    gb [V] | None) in ``dtype``. Recomputes both logits (and the teacher top-k) per chunk;
    the kernel turns the student logits into g_z = e − Σe·p_S in one sweep (times the soft
    cap's slope, when there is one), and the row factor grad/T is applied to the small
    GEMM operands."""
    N, V = hs.shape[0], w.shape[0]
    rows = _fits(N, V, workspace, softcap=softcap)
    if rows is None:
        return blockwise.backward(
            grad, hs, w, b, ht, tw, tb, sum_e, lse_s, lse_t, beta, temperature, clip, top_k,
            dtype, need_weight_grad, workspace, need_hidden_grad, softcap,
        )  # fmt: skip
    inv_t = 1.0 / temperature
    new = lambda shape: torch.zeros(shape, dtype=dtype, device=hs.device)  # noqa: E731
    gh = new(hs.shape) if need_hidden_grad else None
    gw = new(w.shape) if need_weight_grad else None
    gb = new(V) if need_weight_grad and b is not None else None
    w_c = w.to(dtype) if gh is not None else None
    kernel = _ops().divergence_grad
    chunks = _chunks(hs, w, b, ht, tw, tb, top_k, inv_t, dtype, rows, softcap)
    for sl, hs_c, top, zs, zt, slope in chunks:
        kernel(zs, zt, top, lse_s[sl], lse_t[sl], sum_e[sl], beta, clip)
        if slope is not None:
            zs.mul_(slope)
        g = grad[sl].to(dtype) * inv_t
        if gh is not None:
            gh[sl] = (zs.T @ w_c).mul_(g[:, None])
        if gw is not None:
            gw.addmm_(zs, hs_c * g[:, None])
        if gb is not None:
            gb.addmv_(zs, g)
    return gh, gw, gb
