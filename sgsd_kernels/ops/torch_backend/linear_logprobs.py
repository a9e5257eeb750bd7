"""The ``torch`` backend of ``sgsd::linear_logprobs``: portable blockwise PyTorch kernels
for log-probs from hidden states.

Never allocates N×V: tokens are processed in row chunks and the vocabulary in column
blocks, so the workspace is at most ``WORKSPACE_ELEMENTS`` logits (plus one V×H-sized
block of the weight cast to the compute dtype when the weight is low precision).
When the vocabulary fits one block (the common case) the forward runs ATen's fused
log_softmax on each row chunk; otherwise, or with entropy, it keeps an online
(max, Σexp, Σexp·(z−max)) per row. The backward recomputes each logits block and
accumulates dh, dW and db with GEMMs.

Backward trick: with p = softmax(z) and per-row gradient g on the target log-prob,
∂/∂z = g·(onehot − p). Instead of forming g·p over the whole block (an extra pass over
rows×V memory), the row scale is applied to the small operand of each GEMM:
dh = −g ⊙ (p @ W) and dW = pᵀ @ (−g ⊙ h); the onehot part is a gather/index_add of
N rows. That removes two read-modify-write passes (scale, scatter) over each rows×V
block; it was not timed separately.
"""

from __future__ import annotations

import torch

from sgsd_kernels.ops import torch_backend
from sgsd_kernels.ops.arguments import LinearInputs, RowGrads, RowTargets, Streams
from sgsd_kernels.ops.common import compute_dtype, safe_targets, zero_ignored

_MIN_ROWS = 64


def plan_blocks(n_rows: int, vocab: int, workspace: int | None = None) -> tuple[int, int]:
    """(row chunk, vocab block) such that chunk × block ≤ workspace (for N, V ≥ 1)."""
    workspace = workspace or torch_backend.WORKSPACE_ELEMENTS  # read at call time
    if vocab * _MIN_ROWS <= workspace:
        vblock = vocab
    else:
        vblock = max(1, workspace // _MIN_ROWS)
    rows = max(1, min(n_rows, workspace // vblock))
    return rows, vblock


def _workspace(rows: int, vblock: int, dtype, device) -> torch.Tensor:
    # One buffer reused for every block: a fresh 16 MiB allocation per block costs page
    # faults (glibc mmaps large blocks); measured on the CI CPU, reusing it lifts the
    # 128-row logits GEMM from ~75 to ~95 GFLOP/s.
    return torch.empty(rows * vblock, dtype=dtype, device=device)


def _logits_block(out, h, weight, bias, v0, v1, inv_t, dtype):
    """Scaled logits z = (h @ W[v0:v1]ᵀ + b[v0:v1]) / T written into ``out`` (a flat
    workspace), in ``dtype`` (fp32 accumulation)."""
    w = weight[v0:v1].to(dtype)
    z = out[: h.shape[0] * (v1 - v0)].view(h.shape[0], v1 - v0)
    if bias is not None:
        torch.addmm(bias[v0:v1].to(dtype), h, w.T, beta=inv_t, alpha=inv_t, out=z)
    else:
        torch.mm(h, w.T, out=z)
        if inv_t != 1.0:
            z.mul_(inv_t)
    return z


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
            z = _logits_block(buf, hidden[r0:r1].to(dtype), weight, bias, 0, V, inv_t, dtype)
            t = safe_t[r0:r1].unsqueeze(1)
            z_t = z.gather(1, t).squeeze(1)
            logp = out[: z.numel()].view_as(z)
            torch.ops.aten._log_softmax.out(z, 1, False, out=logp)
            picked[r0:r1] = logp.gather(1, t).squeeze(1)
            lse[r0:r1] = z_t - picked[r0:r1]
        return *zero_ignored(valid, picked), lse
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        h = hidden[r0:r1].to(dtype)
        t = safe_t[r0:r1]
        run_max = run_sum = run_acc = None
        tgt = torch.zeros(r1 - r0, dtype=dtype, device=device)
        for v0 in range(0, V, vblock):
            v1 = min(V, v0 + vblock)
            z = _logits_block(buf, h, weight, bias, v0, v1, inv_t, dtype)
            inside = (t >= v0) & (t < v1)
            local = (t - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)
            tgt = torch.where(inside, z.gather(1, local).squeeze(1), tgt)
            blk_max = z.amax(1)
            new_max = blk_max if run_max is None else torch.maximum(run_max, blk_max)
            z.sub_(new_max.unsqueeze(1))  # z ← z − m  (≤ 0)
            if with_entropy:
                e = torch.exp(z)
                blk_acc = (e * z).sum(1)  # Σ e·(z − m)
                blk_sum = e.sum(1)
                del e
            else:
                blk_sum = z.exp_().sum(1)
            if run_max is None:
                run_sum = blk_sum
                run_acc = blk_acc if with_entropy else None
            else:
                # Rescale the running sums to the new max: Σe' = c·Σe, with c = exp(m − m').
                shift = run_max - new_max
                c = torch.exp(shift)
                if with_entropy:
                    run_acc = c * (run_acc + shift * run_sum) + blk_acc
                run_sum = c * run_sum + blk_sum
            run_max = new_max
            del z
        log_sum = torch.log(run_sum)
        lse[r0:r1] = run_max + log_sum
        # (z_t − max) − log Σ like eager log_softmax: z_t − lse loses eps·|z| to rounding.
        picked[r0:r1] = (tgt - run_max) - log_sum
        if with_entropy:
            # H = lse − Σ p z = log Σe − (Σ e(z − m)) / Σe
            entropy[r0:r1] = log_sum - run_acc / run_sum
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
    """
    hidden, weight, bias = x.hidden, x.weight, x.bias
    N, H = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    inv_t = 1.0 / grad_rows.temperature
    dtype = compute_dtype(hidden)
    safe_t, g, ge = grad_rows.scales(dtype, inv_t)
    lse, entropy = grad_rows.lse, grad_rows.entropy
    grad_w = torch.zeros(V, H, dtype=dtype, device=device) if need_weight_grad else None
    need_bias_grad = need_weight_grad and bias is not None
    grad_b = torch.zeros(V, dtype=dtype, device=device) if need_bias_grad else None
    grad_h = torch.empty(N, H, dtype=hidden.dtype, device=device)
    rows, vblock = plan_blocks(N, V, workspace)
    buf = _workspace(rows, vblock, dtype, device)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        h = hidden[r0:r1].to(dtype)
        g_c = g[r0:r1]
        lse_c = lse[r0:r1].to(dtype).unsqueeze(1)
        t = safe_t[r0:r1]
        # Onehot part: +g at the target column.
        dh = g_c.unsqueeze(1) * weight[t].to(dtype)
        if grad_w is not None:
            grad_w.index_add_(0, t, g_c.unsqueeze(1) * h)
        if grad_b is not None:
            grad_b.index_add_(0, t, g_c)
        if ge is None:
            neg_gh = h * (-g_c).unsqueeze(1)
        else:
            ge_c = ge[r0:r1].unsqueeze(1)
            ent_c = entropy[r0:r1].to(dtype).unsqueeze(1)
        for v0 in range(0, V, vblock):
            v1 = min(V, v0 + vblock)
            z = _logits_block(buf, h, weight, bias, v0, v1, inv_t, dtype)
            z.sub_(lse_c)  # log p
            w = weight[v0:v1].to(dtype)
            if ge is None:
                p = z.exp_()
                dh.sub_(g_c.unsqueeze(1) * (p @ w))
                if grad_w is not None:
                    grad_w[v0:v1].addmm_(p.T, neg_gh)
                if grad_b is not None:
                    grad_b[v0:v1].sub_(p.T @ g_c)
            else:
                # ∂H/∂z_j = −p_j (log p_j + H); total −p (g + ge (log p + H)).
                p = torch.exp(z)
                coef = z.add_(ent_c).mul_(ge_c).add_(g_c.unsqueeze(1))
                G = p.mul_(coef).neg_()
                dh.addmm_(G, w)
                if grad_w is not None:
                    grad_w[v0:v1].addmm_(G.T, h)
                if grad_b is not None:
                    grad_b[v0:v1].add_(G.sum(0))
                del coef
            del z, p
        grad_h[r0:r1] = dh.to(hidden.dtype)
    return (
        grad_h,
        None if grad_w is None else grad_w.to(weight.dtype),
        None if grad_b is None else grad_b.to(bias.dtype),
    )
