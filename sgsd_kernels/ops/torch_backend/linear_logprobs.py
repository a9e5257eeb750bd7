"""The ``torch`` backend of ``sgsd::linear_logprobs``: portable blockwise PyTorch kernels
for log-probs from hidden states.

Never allocates N×V: tokens are processed in row chunks and the vocabulary in column
blocks (``plan_blocks``: a cache-sized tile, at most ``WORKSPACE_ELEMENTS`` logits), in
one reused workspace. When the vocabulary fits one block the forward runs ATen's fused
log_softmax on each row chunk; otherwise, or with entropy, it keeps an online
(max, Σexp, Σexp·(z−max)) per row. The backward recomputes each logits block and
accumulates dh, dW and db with GEMMs. Both loop over vocabulary blocks outermost, so
each block of W is cast once and (backward) its dW slice stays in cache (2 MiB at
H=256) across row chunks.

exp(x) is computed as exp2(x·log2(e)): ATen vectorises exp2 about 3× faster than exp
(256×2048 fp32 block, 1 thread, AMD EPYC: exp 436 µs, exp2 148 µs + 27 µs for the
multiply, against 2.7 ms for the block's GEMM). The shift z − max (or z − lse) stays in
natural units: scaling the logits by log2(e) before it loses the exact 0 at the max.

Backward trick: with p = softmax(z) and per-row gradient g on the target log-prob,
∂/∂z = g·(onehot − p). Instead of forming g·p over the block, the row scale is applied to
the small operand of each GEMM: S = p @ W accumulates per row and dh = g ⊙ (W[t] − S) at
the end, dW = pᵀ @ (−g ⊙ h); the onehot part is a gather/index_add of N rows.

Measured (N=1024, V=32768, H=256, fp32, 1 thread, loaded 2-core AMD EPYC, per-process
CPU time) the backward spends ~93% of its time in the three GEMMs per tile; the rest is
exp2, the log p shift and the first touch of the fresh dW.
"""

from __future__ import annotations

import torch

from sgsd_kernels.ops import torch_backend
from sgsd_kernels.ops.arguments import LinearInputs, RowGrads, RowTargets, Streams
from sgsd_kernels.ops.common import compute_dtype, safe_targets, zero_ignored

_MIN_ROWS = 64
_LOG2E = 1.4426950408889634
# Tile: 256 rows × 2048 vocabulary = 2 MiB of fp32 logits in one reused buffer, so the
# block stays in cache between the GEMM that writes it and the passes and GEMMs that read
# it. Measured on a loaded 2-core AMD EPYC, fp32, 1 thread, per-process CPU time: torch.mm
# into a preallocated out runs at 95-100 GFLOP/s at this shape (no larger shape is
# faster); at N=1024, V=32768, H=256 the backward takes 570-590 ms with 256×1024,
# 256×2048, 512×1024, 512×2048 or 1024×512 tiles, 610-680 ms with 128×4096, and 700 ms with
# the former 512×32768 (64 MiB) block; at N=256, V=151936, H=1024 vocabulary blocks of
# 512-2048 tie and 128 rows is 6% slower. Fwd+bwd medians, interleaved in one process
# (same machine, 1 thread, fp32): N=1024, V=32768, H=256: 843 ms (512×32768 block before:
# 989 ms; eager 956 ms; Cut Cross-Entropy torch_compile 759 ms); N=256: 225 ms (290;
# eager 251; CCE 204); N=256, V=151936, H=1024: 3.9 s (4.8 s; eager 3.2 s).
TILE_ROWS = 256
TILE_VOCAB = 2048


def plan_blocks(n_rows: int, vocab: int, workspace: int | None = None) -> tuple[int, int]:
    """(row chunk, vocab block) such that chunk × block ≤ workspace (for N, V ≥ 1)."""
    workspace = workspace or torch_backend.WORKSPACE_ELEMENTS  # read at call time
    vblock = max(1, min(vocab, TILE_VOCAB, workspace // _MIN_ROWS))
    rows = max(1, min(n_rows, TILE_ROWS, workspace // vblock))
    return rows, vblock


def _workspace(rows: int, vblock: int, dtype, device) -> torch.Tensor:
    # One buffer reused for every block: a fresh 16 MiB allocation per block costs page
    # faults (glibc mmaps large blocks); measured on the CI CPU, reusing it lifts the
    # 128-row logits GEMM from ~75 to ~95 GFLOP/s.
    return torch.empty(rows * vblock, dtype=dtype, device=device)


def _logits_block(out, h, weight, bias, v0, v1, inv_t, dtype, sliced=False):
    """Scaled logits z = (h @ W[v0:v1]ᵀ + b[v0:v1]) / T written into ``out`` (a flat
    workspace), in ``dtype`` (fp32 accumulation). ``sliced``: ``weight`` is already the
    block W[v0:v1] in ``dtype``."""
    w = weight if sliced else weight[v0:v1].to(dtype)
    z = out[: h.shape[0] * (v1 - v0)].view(h.shape[0], v1 - v0)
    if bias is not None:
        torch.addmm(bias[v0:v1].to(dtype), h, w.T, beta=inv_t, alpha=inv_t, out=z)
    else:
        # beta=0: the scale rides on the GEMM's alpha instead of a pass over the block.
        torch.addmm(z, h, w.T, beta=0, alpha=inv_t, out=z)
    return z


def _z_block(out, h, weight, bias, v0, v1, inv_t, dtype, sliced=False, softcap=None):
    """The block's logits after the soft cap and the temperature (docs/design.md §3.3):
    ``_logits_block`` without a cap, else (c/T)·tanh(z_raw/c), with 1/c on the GEMM's alpha."""
    if softcap is None:
        return _logits_block(out, h, weight, bias, v0, v1, inv_t, dtype, sliced)
    z = _logits_block(out, h, weight, bias, v0, v1, 1.0 / softcap, dtype, sliced)
    return z.tanh_().mul_(softcap * inv_t)


def _target_cap_slope(h, w_t, bias, safe_t, softcap, dtype):
    """1 − tanh²(z_raw[y]/c) per row, the soft cap's slope at each row's target logit
    (``h`` [N, H] and ``w_t`` = W[targets] [N, H] in ``dtype``)."""
    raw = (h * w_t).sum(1)
    if bias is not None:
        raw = raw + bias[safe_t].to(dtype)
    return 1.0 - torch.tanh(raw / softcap).square()


def forward(
    row_targets: RowTargets, x: LinearInputs, workspace: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Returns (logprobs [N], entropy [N] or None, lse [N]); rows with ignored targets
    give 0 log-prob and 0 entropy (their lse is still computed, for the backward)."""
    hidden, weight, bias = x.hidden, x.weight, x.bias
    with_entropy = row_targets.with_entropy
    N, V = hidden.shape[0], weight.shape[0]
    device = hidden.device
    inv_t = 1.0 / row_targets.temperature
    dtype = compute_dtype(hidden)
    valid, safe_t = safe_targets(row_targets.targets, row_targets.ignore_index)
    lse = torch.empty(N, dtype=dtype, device=device)
    picked = torch.empty(N, dtype=dtype, device=device)  # z_target − max − log Σ, see below
    entropy = torch.empty(N, dtype=dtype, device=device) if with_entropy else None
    rows, vblock = plan_blocks(N, V, workspace)
    buf = _workspace(rows, vblock, dtype, device)
    if vblock == V and not with_entropy:
        # The whole vocabulary fits one block: ATen's fused log_softmax walks each row in
        # cache (max, Σexp, write) instead of four full passes over the block. Measured on
        # the 2-core CI CPU, N=2048, V=32768, H=256 fp32: forward 1.7 G vs 1.95 G.
        # On CPU it runs in place (the kernel reads each element before writing it; exact,
        # checked by the oracle tests); elsewhere into a second buffer.
        out = buf if device.type == "cpu" else _workspace(rows, vblock, dtype, device)
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            z = _z_block(buf, hidden[r0:r1].to(dtype), weight, bias, 0, V, inv_t, dtype,
                         softcap=x.softcap)  # fmt: skip
            t = safe_t[r0:r1].unsqueeze(1)
            z_t = z.gather(1, t).squeeze(1)
            logp = out[: z.numel()].view_as(z)
            torch.ops.aten._log_softmax.out(z, 1, False, out=logp)
            picked[r0:r1] = logp.gather(1, t).squeeze(1)
            lse[r0:r1] = z_t - picked[r0:r1]
        return *zero_ignored(valid, picked), lse
    # Vocabulary blocks outermost, as in the backward: each block of W is cast once; the
    # per-row online state (max, Σexp, Σexp·(z−max), target logit) is N-sized.
    h_all = hidden.to(dtype)
    run_max = torch.empty(N, dtype=dtype, device=device)
    run_sum = torch.empty(N, dtype=dtype, device=device)
    run_acc = torch.empty(N, dtype=dtype, device=device) if with_entropy else None
    tgt = torch.zeros(N, dtype=dtype, device=device)
    for v0 in range(0, V, vblock):
        v1 = min(V, v0 + vblock)
        w = weight[v0:v1].to(dtype)
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            t = safe_t[r0:r1]
            z = _z_block(buf, h_all[r0:r1], w, bias, v0, v1, inv_t, dtype, True, x.softcap)
            inside = (t >= v0) & (t < v1)
            local = (t - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)
            tgt[r0:r1] = torch.where(inside, z.gather(1, local).squeeze(1), tgt[r0:r1])
            blk_max = z.amax(1)
            old_max = run_max[r0:r1]
            new_max = blk_max if v0 == 0 else torch.maximum(old_max, blk_max)
            z.sub_(new_max.unsqueeze(1))  # z ← z − m  (≤ 0)
            if with_entropy:
                e = torch.mul(z, _LOG2E).exp2_()
                blk_acc = (e * z).sum(1)  # Σ e·(z − m)
                blk_sum = e.sum(1)
                del e
            else:
                blk_sum = z.mul_(_LOG2E).exp2_().sum(1)
            if v0 == 0:
                run_sum[r0:r1] = blk_sum
                if with_entropy:
                    run_acc[r0:r1] = blk_acc
            else:
                # Rescale the running sums to the new max: Σe' = c·Σe, with c = exp(m − m').
                shift = old_max - new_max
                c = torch.exp(shift)
                if with_entropy:
                    run_acc[r0:r1] = c * (run_acc[r0:r1] + shift * run_sum[r0:r1]) + blk_acc
                run_sum[r0:r1] = c * run_sum[r0:r1] + blk_sum
            run_max[r0:r1] = new_max
            del z
    log_sum = torch.log(run_sum)
    lse = run_max + log_sum
    # (z_t − max) − log Σ like eager log_softmax: z_t − lse loses eps·|z| to rounding.
    picked = (tgt - run_max) - log_sum
    if with_entropy:
        # H = lse − Σ p z = log Σe − (Σ e(z − m)) / Σe
        entropy = log_sum - run_acc / run_sum
    return *zero_ignored(valid, picked, entropy), lse


def forward_streams(streams: Streams) -> tuple[torch.Tensor, torch.Tensor]:
    """Student rows then teacher rows -> (logprobs [N+M], lse [N+M]). Two blockwise
    passes: on CPU a joint pass would gain nothing, the GEMMs already stream W per block."""
    s_lp, _, s_lse = forward(*streams.student())
    u_lp, _, u_lse = forward(*streams.teacher())
    return torch.cat([s_lp, u_lp]), torch.cat([s_lse, u_lse])


def backward(
    grad_rows: RowGrads,
    x: LinearInputs,
    need_weight_grad: bool = True,
    workspace: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dh [N,H] in hidden's dtype, dW [V,H] in weight's dtype, db or None).

    ``need_weight_grad=False`` (a frozen LM head, e.g. under LoRA) skips the dW and db
    GEMMs: the backward then costs 2 G instead of 3 G.

    Vocabulary blocks are the outer loop: each block of W is cast once and its dW/db
    slice stays in cache while every row chunk adds to it; the per-row accumulator
    S = Σ_v p_v W_v ([N,H], small) collects the softmax part of dh.

    With a soft cap, ∂z/∂z_raw = (1 − tanh²(z_raw/c)) on top of 1/T: the softmax part
    takes it element-wise from a second block (the block's tanh, recomputed), the target
    part per row (``_target_cap_slope``).
    """
    hidden, weight, bias, softcap = x.hidden, x.weight, x.bias, x.softcap
    N, H = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    inv_t = 1.0 / grad_rows.temperature
    dtype = compute_dtype(hidden)
    safe_t, g, ge = grad_rows.scales(dtype, inv_t)
    lse = grad_rows.lse.to(dtype).unsqueeze(1)
    h_all = hidden.to(dtype)
    # dW and db start empty: the first row chunk of each vocabulary block writes its slice
    # (beta=0), the others add. A separate zero fill is one more pass over V×H, measured
    # at 18 ms of a 570 ms backward (N=1024, V=32768, H=256, fp32, 1 thread, AMD EPYC).
    grad_w = torch.empty(V, H, dtype=dtype, device=device) if need_weight_grad else None
    need_bias_grad = need_weight_grad and bias is not None
    grad_b = torch.empty(V, dtype=dtype, device=device) if need_bias_grad else None
    if N == 0:  # no row chunk runs to write the uninitialised slices
        for grad in (grad_w, grad_b):
            if grad is not None:
                grad.zero_()
    rows, vblock = plan_blocks(N, V, workspace)
    buf = _workspace(rows, vblock, dtype, device)
    if softcap is not None:
        # Half the workspace each for the logits and the cap's slope.
        rows = max(1, rows // 2)
        slope_buf = _workspace(rows, vblock, dtype, device)
        w_t = weight[safe_t].to(dtype)
        g_y = g * _target_cap_slope(h_all, w_t, bias, safe_t, softcap, dtype)
    if ge is None:
        # dz = g (onehot − p): dh = g (W[t] − S), dW = onehot·(g h) − pᵀ (g h), db likewise.
        g_h = h_all * g.unsqueeze(1)
        neg_gh = -g_h
        neg_g = -g
        acc = torch.zeros(N, H, dtype=dtype, device=device)  # S
    else:
        # ∂H/∂z_j = −p_j (log p_j + H); total g·onehot − p (g + ge (log p + H)) =: onehot·g + G.
        ge_c = ge.unsqueeze(1)
        ent = grad_rows.entropy.to(dtype).unsqueeze(1)
        g_col = g.unsqueeze(1)
        acc = torch.zeros(N, H, dtype=dtype, device=device)  # Σ_v G_v W_v
        ones = torch.ones(rows, dtype=dtype, device=device)
    for v0 in range(0, V, vblock):
        v1 = min(V, v0 + vblock)
        w = weight[v0:v1].to(dtype)
        gw = None if grad_w is None else grad_w[v0:v1]
        gb = None if grad_b is None else grad_b[v0:v1]
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            beta = 0 if r0 == 0 else 1  # beta=0 ignores the (uninitialised) slice
            h = h_all[r0:r1]
            if softcap is None:
                z = _logits_block(buf, h, w, bias, v0, v1, inv_t, dtype, sliced=True)
            else:
                tanh = _logits_block(buf, h, w, bias, v0, v1, 1.0 / softcap, dtype, True).tanh_()
                slope = torch.mul(tanh, tanh, out=slope_buf[: tanh.numel()].view_as(tanh))
                slope.neg_().add_(1.0)  # 1 − tanh²
                z = tanh.mul_(softcap * inv_t)
            z.sub_(lse[r0:r1])  # log p
            if ge is None:
                p = z.mul_(_LOG2E).exp2_()
                if softcap is not None:
                    p.mul_(slope)  # p ⊙ ∂z/∂z_raw (×T, already in g)
                acc[r0:r1].addmm_(p, w)
                if gw is not None:
                    torch.addmm(gw, p.T, neg_gh[r0:r1], beta=beta, out=gw)
                if gb is not None:
                    torch.addmv(gb, p.T, neg_g[r0:r1], beta=beta, out=gb)
            else:
                # G = −p (g + ge (log p + H)), formed in place while the block is in cache.
                p = torch.mul(z, _LOG2E).exp2_()
                coef = z.add_(ent[r0:r1]).mul_(ge_c[r0:r1]).add_(g_col[r0:r1])
                G = p.mul_(coef).neg_()
                if softcap is not None:
                    G.mul_(slope)
                acc[r0:r1].addmm_(G, w)
                if gw is not None:
                    torch.addmm(gw, G.T, h, beta=beta, out=gw)
                if gb is not None:
                    torch.addmv(gb, G.T, ones[: r1 - r0], beta=beta, out=gb)
                del coef
            del z, p
    # Onehot part: +g at each row's target column (g·slope there with a soft cap).
    if softcap is not None:
        if ge is None:  # dh = g_y W[t] − g S
            grad_h = acc.mul_(-g.unsqueeze(1)).addcmul_(w_t, g_y.unsqueeze(1))
        else:
            grad_h = acc.addcmul_(w_t, g_y.unsqueeze(1))
        if grad_w is not None:
            grad_w.index_add_(0, safe_t, h_all * g_y.unsqueeze(1))
        if grad_b is not None:
            grad_b.index_add_(0, safe_t, g_y)
        return (
            grad_h.to(hidden.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
        )
    w_t = weight[safe_t].to(dtype)
    if ge is None:
        grad_h = (w_t - acc).mul_(g.unsqueeze(1))
        if grad_w is not None:
            grad_w.index_add_(0, safe_t, g_h)
    else:
        grad_h = acc.addcmul_(w_t, g_col)
        if grad_w is not None:
            grad_w.index_add_(0, safe_t, h_all * g_col)
    if grad_b is not None:
        grad_b.index_add_(0, safe_t, g)
    return (
        grad_h.to(hidden.dtype),
        None if grad_w is None else grad_w.to(weight.dtype),
        None if grad_b is None else grad_b.to(bias.dtype),
    )
