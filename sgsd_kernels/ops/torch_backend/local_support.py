"""Blockwise PyTorch kernels for the top-k local support terms of docs/design.md §3.2 (the
``torch`` backend of ``linear_gated_kd_loss(..., local_support_top_k=k)``).

Per (rollout, teacher, position) row the support is the teacher's top-k tokens ∪ {y_t}.
The teacher needs one no-grad pass over the vocabulary (a running top-k per row, from
:func:`~sgsd_kernels.ops.torch_backend.linear_divergence.teacher_top_k`). The student
needs only the k + 1 support columns: a gather-GEMM of those rows of W against its hidden
state, so the student side costs (k + 1)/V of a full logits GEMM, forward and backward.

Returned per row: Δ̃ = log p̃_T(y) − log p̃_S(y) (constant), the local KL
Σ p̃_T (log p̃_T − log p̃_S) (differentiable through p̃_S) and the support size. The
backward uses ∂KL̃/∂z_S = p̃_S − p̃_T on the support.
"""

from __future__ import annotations

import torch

from sgsd_kernels.ops.torch_backend import linear_divergence as divergence
from sgsd_kernels.ops.torch_backend.linear_divergence import plan_blocks, teacher_top_k

# Gathered W rows per chunk: rows × (k + 1) × H ≤ this (2**22 fp32 = 16 MiB).
GATHER_ELEMENTS = 1 << 22


def _chunks(M, k1, H):
    rows = max(1, GATHER_ELEMENTS // max(1, k1 * H))
    return [slice(r0, min(M, r0 + rows)) for r0 in range(0, M, rows)]


def _student_logits(hs_rows, weight, bias, columns, inv_t, dtype):
    """z_S at the support columns: [r, k+1] from hs_rows [r, H] and columns [r, k+1]."""
    w_sel = weight[columns].to(dtype)  # [r, k+1, H]
    z = torch.bmm(w_sel, hs_rows.to(dtype).unsqueeze(-1)).squeeze(-1)
    if bias is not None:
        z = z + bias[columns].to(dtype)
    return z.mul_(inv_t), w_sel


def forward(hs, w, b, ht, student_row, targets, top_k, temperature, dtype, workspace=None):
    """hs [N, H] student rows; ht [M, H] teacher rows; student_row [M] (the student row of
    each teacher row); targets [M] valid token ids.

    Returns (delta [M], local_kl [M], size [M], columns [M, k+1] int64,
    in_support [M, k+1] bool, teacher local log-probs [M, k+1]); k = min(top_k, V).
    """
    M, V = ht.shape[0], w.shape[0]
    k = min(top_k, V)
    inv_t = 1.0 / temperature
    device = ht.device
    columns = torch.empty(M, k + 1, dtype=torch.long, device=device)
    teacher_z = torch.empty(M, k + 1, dtype=dtype, device=device)
    # the teacher's top-k pass holds one logits block and topk's temporaries: a sixth of
    # the divergence budget (2**21 fp32 = 8 MiB) keeps its peak flat in N
    workspace = workspace or divergence.WORKSPACE_ELEMENTS // 6  # read at call time
    rows, vblock = plan_blocks(M, V, workspace, buffers=1)
    for r0 in range(0, M, rows):
        sl = slice(r0, min(M, r0 + rows))
        ht_c = ht[sl].to(dtype)
        idx, vals = teacher_top_k(ht_c, w, b, k, inv_t, dtype, vblock)
        y = targets[sl]
        z_y = (ht_c * w[y].to(dtype)).sum(-1)
        if b is not None:
            z_y = z_y + b[y].to(dtype)
        columns[sl, :k], columns[sl, k] = idx, y
        teacher_z[sl, :k], teacher_z[sl, k] = vals, z_y * inv_t
    in_support = torch.ones(M, k + 1, dtype=torch.bool, device=device)
    in_support[:, k] = ~(columns[:, :k] == targets[:, None]).any(-1)
    t_local = torch.log_softmax(teacher_z.masked_fill_(~in_support, float("-inf")), -1)
    is_y = in_support & (columns == targets[:, None])
    delta = torch.empty(M, dtype=dtype, device=device)
    local_kl = torch.empty(M, dtype=dtype, device=device)
    for sl in _chunks(M, k + 1, w.shape[1]):
        z, _ = _student_logits(hs[student_row[sl]], w, b, columns[sl], inv_t, dtype)
        s_local = torch.log_softmax(z.masked_fill_(~in_support[sl], float("-inf")), -1)
        t_c, keep = t_local[sl], in_support[sl]
        delta[sl] = torch.where(is_y[sl], t_c - s_local, 0.0).sum(-1)
        local_kl[sl] = torch.where(keep, t_c.exp() * (t_c - s_local), 0.0).sum(-1)
    size = in_support.sum(-1).to(dtype)
    return delta, local_kl, size, columns, in_support, t_local


def backward(grad_kl, hs, w, b, student_row, columns, in_support, t_local, temperature, dtype,
             need_weight_grad):  # fmt: skip
    """Gradient of Σ grad_kl·KL̃ w.r.t. hs [N, H], W and b (W/b None unless needed)."""
    inv_t = 1.0 / temperature
    H = w.shape[1]
    gh = torch.zeros(hs.shape, dtype=dtype, device=hs.device)
    gw = torch.zeros(w.shape, dtype=dtype, device=w.device) if need_weight_grad else None
    gb = torch.zeros(w.shape[0], dtype=dtype, device=w.device)
    gb = gb if need_weight_grad and b is not None else None
    M, k1 = columns.shape
    for sl in _chunks(M, k1, H):
        rows_h = hs[student_row[sl]].to(dtype)
        z, w_sel = _student_logits(rows_h, w, b, columns[sl], inv_t, dtype)
        keep = in_support[sl]
        p_s = torch.softmax(z.masked_fill_(~keep, float("-inf")), -1)
        gz = (
            torch.where(keep, p_s - t_local[sl].exp(), 0.0)
            * (grad_kl[sl].to(dtype) * inv_t)[:, None]
        )
        gh.index_add_(0, student_row[sl], torch.bmm(gz.unsqueeze(1), w_sel).squeeze(1))
        if gw is not None:
            flat = columns[sl].reshape(-1)
            gw.index_add_(0, flat, (gz.unsqueeze(-1) * rows_h.unsqueeze(1)).reshape(-1, H))
            if gb is not None:
                gb.index_add_(0, flat, gz.reshape(-1))
    return gh, gw, gb
