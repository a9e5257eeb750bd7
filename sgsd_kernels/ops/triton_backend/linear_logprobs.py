"""Fused Triton kernels for log-probs from hidden states (the `triton` backend).

Longer than ~450 lines on purpose: the layout keeps one file per op and backend, and this
op's forward, its backward kernel and the jit helper they share (``_logits_tile``)
are one unit that is tuned together.

Forward (``_fwd_kernel``): grid = (token blocks, vocab splits). Each program tiles
z = h·Wᵀ for BLOCK_N tokens × BLOCK_V vocab columns with fp32 accumulation (loop over H
in BLOCK_H steps), keeps an online (max, Σexp, Σexp·(z−max)) per row and picks the target
logit; it writes one partial per (split, row). A deterministic torch combine merges the
splits. Nothing of size N×V is ever allocated. Splitting V keeps the GPU busy when there
are few token blocks (small N), without atomics.

Two input streams share one launch (rows < N1 come from X1, the rest from X2): the
student and its K teachers run as one stream of (K+1)·N rows over W.

Backward (``_grad_logits_kernel`` + GEMMs), a vocabulary chunk at a time: the kernel
recomputes the logits tiles of all N rows × a column chunk and writes G = ∂loss/∂z into a
bounded workspace (256 MiB); cuBLAS then gives the chunk's dW rows (one GEMM over all N,
written once) and its share of dh. It has no atomics, so it is bit-reproducible. On an
H100 (bf16, V=151936, H=2048, N=8192, benchmarks/results/h100-20261126/gpu-tune.csv, both
with a 64x128 forward tile) forward+backward took 45 ms with this backward and 532 ms
with a fused CCE-style one that recomputes each tile and accumulates dh and dW with fp32
atomics: the atomics, not the arithmetic, bound that design, so this backward is the only
one. With the 64x256 forward tile it is 39.6 ms.

Tile sizes per architecture and the dots' ``input_precision`` (the constexpr ``PRECISION``:
"ieee" for fp32 unless the user enabled TF32 in PyTorch) come from ``triton_configs``.

Triton-interpreter note (Triton 3.9, ``TRITON_INTERPRET=1``): ``tl.dot`` on bf16 operands
returns garbage, so the kernels upcast operands to fp32 before ``tl.dot`` under the
constexpr ``UPCAST``, which the launchers set only when interpreting bf16 inputs. On a
GPU the dot runs on bf16 tensor cores with fp32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sgsd_kernels.ops.arguments import LinearInputs, RowGrads, RowTargets, Streams
from sgsd_kernels.ops.common import compute_dtype, safe_targets, zero_ignored
from sgsd_kernels.ops.triton_backend import inv_temperature, tl_compute_dtype, triton_configs
from sgsd_kernels.ops.triton_backend.softcap import cap_scalars, load_cap, tanh_and_slope
from sgsd_kernels.runtime import interpreting


def _upcast(dtype: torch.dtype) -> bool:
    return interpreting() and dtype == torch.bfloat16


@triton.jit
def _load_rows(X1, X2, N1, rows, row_ok, hk, h_ok, stride1, stride2, TWO_STREAMS: tl.constexpr):
    """Rows < N1 from X1, rows >= N1 from X2 (64-bit offsets)."""
    in1 = rows < N1
    x = tl.load(
        X1 + rows[:, None] * stride1 + hk[None, :],
        mask=(row_ok & in1)[:, None] & h_ok[None, :],
        other=0.0,
    )
    if TWO_STREAMS:
        x += tl.load(
            X2 + (rows - N1)[:, None] * stride2 + hk[None, :],
            mask=(row_ok & (rows >= N1))[:, None] & h_ok[None, :],
            other=0.0,
        )
    return x


@triton.jit
def _raw_tile(
    X1,
    X2,
    N1,
    W,
    Bias,
    rows,
    row_ok,
    cols,
    col_ok,
    H,
    stride1,
    stride2,
    stride_w,
    HAS_BIAS: tl.constexpr,
    TWO_STREAMS: tl.constexpr,
    UPCAST: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """z_raw = x·Wᵀ + b for one [BLOCK_N, BLOCK_V] tile, accumulated in ACC (fp32; fp64
    for fp64 inputs)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=ACC)
    for h0 in range(0, H, BLOCK_H):
        hk = h0 + tl.arange(0, BLOCK_H)
        h_ok = hk < H
        x = _load_rows(X1, X2, N1, rows, row_ok, hk, h_ok, stride1, stride2, TWO_STREAMS)
        w = tl.load(
            W + cols[:, None] * stride_w + hk[None, :],
            mask=col_ok[:, None] & h_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        # out_dtype spelled out: Triton 3.6 defaults it to fp32 and rejects an fp64 acc.
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    return acc


@triton.jit
def _logits_tile(
    X1,
    X2,
    N1,
    W,
    Bias,
    rows,
    row_ok,
    cols,
    col_ok,
    H,
    stride1,
    stride2,
    stride_w,
    InvT,
    Cap,
    HAS_BIAS: tl.constexpr,
    TWO_STREAMS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """z = (x·Wᵀ + b) / T for one tile, or (c/T)·tanh((x·Wᵀ + b)/c) under HAS_SOFTCAP
    (docs/design.md §3.3). 1/T (or the cap's scalars, ``Cap``) is read after the dot loop,
    so that it holds no register across it."""
    acc = _raw_tile(X1, X2, N1, W, Bias, rows, row_ok, cols, col_ok, H, stride1, stride2,
                    stride_w, HAS_BIAS, TWO_STREAMS, UPCAST, ACC, PRECISION, BLOCK_N, BLOCK_V,
                    BLOCK_H)  # fmt: skip
    if HAS_SOFTCAP:
        inv_cap, post = load_cap(Cap)
        t, _ = tanh_and_slope(acc * inv_cap)
        return t * post
    return acc * tl.load(InvT)


@triton.jit
def _fwd_kernel(
    X1,
    X2,
    N1,
    N,
    W,
    Bias,
    Tgt,
    PartM,
    PartS,
    PartA,
    PartT,
    V,
    H,
    stride1,
    stride2,
    stride_w,
    InvT,
    Cap,
    cols_per_split,
    HAS_BIAS: tl.constexpr,
    TWO_STREAMS: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tgt = tl.load(Tgt + rows, mask=row_ok, other=0)
    run_max = tl.full((BLOCK_N,), float("-inf"), ACC)
    run_sum = tl.zeros((BLOCK_N,), ACC)
    run_acc = tl.zeros((BLOCK_N,), ACC)
    picked = tl.zeros((BLOCK_N,), ACC)
    v_begin = pid_s * cols_per_split
    v_end = tl.minimum(v_begin + cols_per_split, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)  # cols·stride_w can pass 2**31
        col_ok = cols < v_end
        z = _logits_tile(
            X1,
            X2,
            N1,
            W,
            Bias,
            rows,
            row_ok,
            cols,
            col_ok,
            H,
            stride1,
            stride2,
            stride_w,
            InvT,
            Cap,
            HAS_BIAS,
            TWO_STREAMS,
            HAS_SOFTCAP,
            UPCAST,
            ACC,
            PRECISION,
            BLOCK_N,
            BLOCK_V,
            BLOCK_H,
        )
        z = tl.where(col_ok[None, :], z, float("-inf"))
        picked += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        # First block: run_max = -inf, so the old sums (zero) are scaled by exp(-inf) = 0.
        scale = tl.exp(run_max - new_max)
        # Masked columns: shifted = 0 and e = 0 (not −inf and 0·−inf = NaN).
        shifted = tl.where(col_ok[None, :], z - new_max[:, None], 0.0)
        e = tl.where(col_ok[None, :], tl.exp(shifted), 0.0)
        if WITH_ENTROPY:
            shift = tl.where(run_sum > 0, run_max - new_max, 0.0)
            run_acc = scale * (run_acc + shift * run_sum) + tl.sum(e * shifted, axis=1)
        run_sum = run_sum * scale + tl.sum(e, axis=1)
        run_max = new_max
    out = pid_s.to(tl.int64) * N + rows
    tl.store(PartM + out, run_max, mask=row_ok)
    tl.store(PartS + out, run_sum, mask=row_ok)
    tl.store(PartT + out, picked, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(PartA + out, run_acc, mask=row_ok)


def _num_splits(n_rows: int, vocab: int, block_n: int, block_v: int, device) -> int:
    return triton_configs.num_splits(n_rows, vocab, block_n, block_v)


def _combine(part_m, part_s, part_a, part_t, with_entropy):
    """Deterministic merge of the per-split online softmax states ->
    (log-prob of the target before the ignore mask, lse, entropy)."""
    big_m = part_m.max(0).values
    finite = torch.isfinite(part_m)
    weight = torch.where(finite, torch.exp(part_m - big_m), 0.0)
    total = (part_s * weight).sum(0)
    log_total = torch.log(total)
    lse = big_m + log_total
    # (z_t − max) − log Σ, as eager log_softmax (z_t − lse would lose eps·|z|).
    picked = (part_t.sum(0) - big_m) - log_total
    entropy = None
    if with_entropy:
        shift = torch.where(finite, part_m - big_m, 0.0)
        acc = (weight * (part_a + shift * part_s)).sum(0)
        entropy = torch.log(total) - acc / total
    return picked, lse, entropy


def _launch_forward(x1, x2, weight, bias, targets, temperature, with_entropy, softcap):
    n1 = x1.shape[0]
    n = n1 + (0 if x2 is None else x2.shape[0])
    V, H = weight.shape
    f32 = dict(dtype=compute_dtype(x1), device=x1.device)
    inv_t = inv_temperature(temperature, x1)
    cap = inv_t if softcap is None else cap_scalars(softcap, temperature, x1)

    def run(cfg):
        splits = _num_splits(n, V, cfg["BLOCK_N"], cfg["BLOCK_V"], x1.device)
        cols_per_split = triton.cdiv(triton.cdiv(V, splits), cfg["BLOCK_V"]) * cfg["BLOCK_V"]
        splits = triton.cdiv(V, cols_per_split)
        part_m = torch.empty(splits, n, **f32)
        part_s = torch.empty(splits, n, **f32)
        part_t = torch.empty(splits, n, **f32)
        part_a = torch.empty(splits, n, **f32) if with_entropy else part_s
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), splits)
        _fwd_kernel[grid](
            x1,
            x1 if x2 is None else x2,
            n1,
            n,
            weight,
            weight if bias is None else bias,
            targets,
            part_m,
            part_s,
            part_a,
            part_t,
            V,
            H,
            x1.stride(0),
            x1.stride(0) if x2 is None else x2.stride(0),
            weight.stride(0),
            inv_t,
            cap,
            cols_per_split,
            HAS_BIAS=bias is not None,
            TWO_STREAMS=x2 is not None,
            WITH_ENTROPY=with_entropy,
            HAS_SOFTCAP=softcap is not None,
            UPCAST=_upcast(x1.dtype),
            ACC=tl_compute_dtype(x1),
            PRECISION=triton_configs.input_precision(x1.dtype),
            **cfg,
        )
        return part_m, part_s, part_a, part_t

    key = (bias is not None, x2 is not None, with_entropy, softcap is not None, V, H)
    cfg = triton_configs.choose("fwd", x1.dtype, n, key, run)
    part_m, part_s, part_a, part_t = run(cfg)
    return _combine(part_m, part_s, part_a, part_t, with_entropy)


def forward(row_targets: RowTargets, x: LinearInputs):
    """-> (logprobs [N], entropy [N] or None, lse [N]) like the torch backend's."""
    t = row_targets
    valid, safe_t = safe_targets(t.targets, t.ignore_index)
    picked, lse, entropy = _launch_forward(
        x.hidden, None, x.weight, x.bias, safe_t, t.temperature, t.with_entropy, x.softcap
    )
    return *zero_ignored(valid, picked, entropy), lse


def forward_streams(streams: Streams):
    """Student and teacher rows in one launch -> (logprobs [N+M], lse [N+M])."""
    s = streams
    valid, safe_t = safe_targets(s.targets(), s.ignore_index)
    picked, lse, _ = _launch_forward(
        s.student_hidden, s.teacher_hidden, s.weight, s.bias, safe_t, s.temperature, False,
        s.softcap,
    )  # fmt: skip
    return zero_ignored(valid, picked)[0], lse


@triton.jit
def _grad_logits_kernel(
    X,
    W,
    Bias,
    Tgt,
    Lse,
    G,
    GE,
    Ent,
    Out,
    N,
    V0,
    V,
    H,
    stride_x,
    stride_w,
    stride_out,
    InvT,
    Cap,
    HAS_BIAS: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """This program's (row block, vocabulary block) tile of ∂loss/∂z, recomputing the
    logits: g·(onehot − p) − ge·p·(log p + H), already ×1/T, stored into Out, the
    [N, V − V0] workspace of the vocabulary columns V0..V (row stride ``stride_out``).
    Under HAS_SOFTCAP it is ∂loss/∂z_raw: times the slope 1 − tanh²(z_raw/c), from the
    tanh of this very tile."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = V0 + tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    if HAS_SOFTCAP:
        raw = _raw_tile(X, X, N, W, Bias, rows, row_ok, cols, col_ok, H, stride_x, stride_x,
                        stride_w, HAS_BIAS, False, UPCAST, ACC, PRECISION, BLOCK_N, BLOCK_V,
                        BLOCK_H)  # fmt: skip
        inv_cap, post = load_cap(Cap)
        t, slope = tanh_and_slope(raw * inv_cap)
        z = t * post
    else:
        z = _logits_tile(
            X,
            X,
            N,
            W,
            Bias,
            rows,
            row_ok,
            cols,
            col_ok,
            H,
            stride_x,
            stride_x,
            stride_w,
            InvT,
            Cap,
            HAS_BIAS,
            False,
            False,
            UPCAST,
            ACC,
            PRECISION,
            BLOCK_N,
            BLOCK_V,
            BLOCK_H,
        )
    tgt = tl.load(Tgt + rows, mask=row_ok, other=0)
    lse = tl.load(Lse + rows, mask=row_ok, other=0.0)
    g = tl.load(G + rows, mask=row_ok, other=0.0)
    logp = z - lse[:, None]
    p = tl.exp(logp)
    grad = tl.where(cols[None, :] == tgt[:, None], g[:, None], 0.0) - g[:, None] * p
    if WITH_ENTROPY:
        ge = tl.load(GE + rows, mask=row_ok, other=0.0)
        ent = tl.load(Ent + rows, mask=row_ok, other=0.0)
        grad -= ge[:, None] * p * (logp + ent[:, None])
    if HAS_SOFTCAP:
        grad = grad * slope
    tl.store(
        Out + rows[:, None] * stride_out + (cols - V0)[None, :],
        grad.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


# The [N, chunk] gradient workspace is bounded (256 MiB whatever N and V). Chunks run over
# the vocabulary, so the dW rows of a chunk are one GEMM over all N rows, written once in
# the weight's dtype (no [V, H] fp32 accumulator), and only the small dh [N, H] is
# accumulated across chunks.
_WORKSPACE_BYTES = 1 << 28
_CHUNK_ALIGN = 256  # columns: 16-byte aligned workspace rows, no ragged tile per chunk


def backward(grad_rows: RowGrads, linear: LinearInputs, need_weight_grad: bool):
    """dh, dW, db, a vocabulary chunk at a time: ``_grad_logits_kernel`` writes
    G = ∂loss/∂z for all N rows × the chunk, then GEMMs give the chunk's dW rows and its
    share of dh. bf16 inputs keep G in bf16, so the GEMMs run on tensor cores as eager's
    backward does (fp32 accumulation inside the GEMM, one rounding of dW); fp16, fp32 and
    fp64 keep G in fp32/fp64 (the GEMMs follow PyTorch's fp32 matmul setting).
    No atomics: bit-reproducible run to run."""
    hidden, weight, bias = linear.hidden, linear.weight, linear.bias
    N, H = hidden.shape
    V = weight.shape[0]
    acc = compute_dtype(hidden)
    safe_t, g, ge = grad_rows.scales(acc, 1.0 / grad_rows.temperature)
    inv_t = inv_temperature(grad_rows.temperature, hidden)
    softcap = linear.softcap
    cap = inv_t if softcap is None else cap_scalars(softcap, grad_rows.temperature, hidden)
    with_entropy = ge is not None
    ge = ge if with_entropy else g
    ent = grad_rows.entropy.to(acc) if with_entropy else g
    lse = grad_rows.lse.to(acc)
    # bf16 has fp32's exponent range; fp16's would flush g·p to zero for a mean-reduced loss
    # (g ≈ 1/N): with N = 64, V = 4096, g = 1/8192, dW off the targets was 34 % off.
    work_dtype = torch.bfloat16 if hidden.dtype == torch.bfloat16 else acc
    cols = _WORKSPACE_BYTES // (work_dtype.itemsize * max(N, 1))
    cols = V if cols >= V else max(_CHUNK_ALIGN, cols // _CHUNK_ALIGN * _CHUNK_ALIGN)
    work = torch.empty(N, cols, dtype=work_dtype, device=hidden.device)

    def launch(cfg, v0, v1):
        grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(v1 - v0, cfg["BLOCK_V"]))
        _grad_logits_kernel[grid](
            hidden,
            weight,
            weight if bias is None else bias,
            safe_t,
            lse,
            g,
            ge,
            ent,
            work,
            N,
            v0,
            v1,
            H,
            hidden.stride(0),
            weight.stride(0),
            work.stride(0),
            inv_t,
            cap,
            HAS_BIAS=bias is not None,
            WITH_ENTROPY=with_entropy,
            HAS_SOFTCAP=softcap is not None,
            UPCAST=_upcast(hidden.dtype),
            ACC=tl_compute_dtype(hidden),
            PRECISION=triton_configs.input_precision(hidden.dtype),
            **cfg,
        )

    key = (bias is not None, with_entropy, softcap is not None, V, H)
    cfg = triton_configs.choose("grad_logits", hidden.dtype, N, key, lambda c: launch(c, 0, cols))
    dx = torch.zeros(N, H, dtype=acc, device=hidden.device)
    dw = torch.empty(V, H, dtype=weight.dtype, device=weight.device) if need_weight_grad else None
    need_bias_grad = need_weight_grad and bias is not None
    db = torch.empty(V, dtype=acc, device=weight.device) if need_bias_grad else None
    x = hidden.to(work_dtype)
    for v0 in range(0, V, cols):
        v1 = min(V, v0 + cols)
        launch(cfg, v0, v1)
        grad_z = work[:, : v1 - v0]
        w_chunk = weight[v0:v1].to(work_dtype)
        if work_dtype == acc:
            dx.addmm_(grad_z, w_chunk)
        else:  # bf16 product (fp32 inside the GEMM), summed over chunks in fp32
            dx.add_(torch.mm(grad_z, w_chunk))
        if dw is not None and dw.dtype == work_dtype:
            torch.mm(grad_z.T, x, out=dw[v0:v1])
        elif dw is not None:
            dw[v0:v1] = torch.mm(grad_z.T, x)
        if db is not None:
            db[v0:v1] = grad_z.sum(0, dtype=acc)
    return dx.to(hidden.dtype), dw, None if db is None else db.to(bias.dtype)
