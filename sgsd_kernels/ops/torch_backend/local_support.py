"""Blockwise PyTorch kernels for the top-k local support terms of docs/design.md §3.2 (the
``torch`` backend of ``linear_gated_kd_loss(..., local_support_top_k=k)``).

Per (rollout, teacher, position) row the support is the teacher's top-k tokens ∪ {y_t}.
The teacher needs one no-grad pass over the vocabulary (a running top-k per row, from
:func:`~sgsd_kernels.ops.torch_backend.linear_divergence.teacher_top_k`). The student
needs only the k + 1 support columns: with the support as an [M, V] sparse matrix, z_S is
one sampled GEMM (SDDMM) and the backward's dh and dW are one sparse·dense product each,
so the student side costs (k + 1)/V of a full logits GEMM, forward and backward, in a
handful of kernel calls whatever M is.

Returned per row: Δ̃ = log p̃_T(y) − log p̃_S(y) (constant), the local KL
Σ p̃_T (log p̃_T − log p̃_S) (differentiable through p̃_S) and the support size. The
backward uses ∂KL̃/∂z_S = p̃_S − p̃_T on the support.
"""

from __future__ import annotations

import warnings

import torch

from sgsd_kernels.ops.torch_backend.linear_divergence import plan_blocks, teacher_top_k

# Teacher logits per top-k block (2**22 fp32 = 16 MiB: 128 rows at V = 32768).
TOPK_ELEMENTS = 1 << 22


def _gather(x, index):
    """x[index] for an index tensor of any shape, via index_select (a row copy per index)."""
    return x.index_select(0, index.reshape(-1)).view(*index.shape, *x.shape[1:])


def _support_matrix(columns, values, V):
    """The [M, V] CSR matrix holding ``values`` [M, k+1] at the support ``columns``: one
    sparse kernel call then does all M rows' gather-GEMM. A duplicated column (y_t inside
    the top-k: its value is 0) is a second entry, which the kernels used here (sampled
    dot products, CSR·dense) treat independently."""
    M, k1 = columns.shape
    crow = torch.arange(0, M * k1 + 1, k1, device=columns.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the kernels used are not
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(
            crow, columns.reshape(-1), values.reshape(-1), (M, V), check_invariants=False
        )


def _student_logits(hs, w, b, student_row, columns, inv_t, dtype):
    """z_S / T at the support columns [M, k+1], one sampled GEMM (SDDMM) over all rows.
    Per-chunk gathers of the W rows and bmm cost ~10x more wall time with 2 threads on the
    loaded 2-core EPYC (one small parallel region per op per chunk; M = 1024, k = 100,
    V = 32768, H = 256: 1000 ms vs 90 ms)."""
    rows_h = _gather(hs, student_row).to(dtype)
    if columns.shape[1] > w.shape[0]:  # k = V: the output is as large as the full logits
        z = (rows_h @ w.to(dtype).T).gather(1, columns)  # (SDDMM takes at most V per row)
    else:
        pattern = _support_matrix(columns, rows_h.new_zeros(columns.shape), w.shape[0])
        z = torch.sparse.sampled_addmm(pattern, rows_h, w.to(dtype).T, beta=0.0)
        z = z.values().view(columns.shape)
    if b is not None:
        z = z + _gather(b, columns).to(dtype)
    return z.mul_(inv_t)


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
    # one teacher logits block (and topk's outputs) at a time: the peak stays flat in N
    rows, vblock = plan_blocks(M, V, workspace or TOPK_ELEMENTS, buffers=1)  # read at call time
    for r0 in range(0, M, rows):
        sl = slice(r0, min(M, r0 + rows))
        ht_c = ht[sl].to(dtype)
        idx, vals = teacher_top_k(ht_c, w, b, k, inv_t, dtype, vblock)
        y = targets[sl]
        z_y = (ht_c * _gather(w, y).to(dtype)).sum(-1)
        if b is not None:
            z_y = z_y + _gather(b, y).to(dtype)
        columns[sl, :k], columns[sl, k] = idx, y
        teacher_z[sl, :k], teacher_z[sl, k] = vals, z_y * inv_t
    in_support = torch.ones(M, k + 1, dtype=torch.bool, device=device)
    in_support[:, k] = ~(columns[:, :k] == targets[:, None]).any(-1)
    t_local = torch.log_softmax(teacher_z.masked_fill_(~in_support, float("-inf")), -1)
    is_y = in_support & (columns == targets[:, None])
    z = _student_logits(hs, w, b, student_row, columns, inv_t, dtype)
    s_local = torch.log_softmax(z.masked_fill_(~in_support, float("-inf")), -1)
    delta = torch.where(is_y, t_local - s_local, 0.0).sum(-1)
    local_kl = torch.where(in_support, t_local.exp() * (t_local - s_local), 0.0).sum(-1)
    size = in_support.sum(-1).to(dtype)
    return delta, local_kl, size, columns, in_support, t_local


def backward(grad_kl, hs, w, b, student_row, columns, in_support, t_local, temperature, dtype,
             need_weight_grad):  # fmt: skip
    """Gradient of Σ grad_kl·KL̃ w.r.t. hs [N, H], W and b (W/b None unless needed): with
    gz = grad/T·(p̃_S − p̃_T) on the support, dh = G·W and dW = Gᵀ·h_S for the sparse
    matrix G of gz, rows scattered to the student rows (sparse kernels, no per-row GEMMs)."""
    V = w.shape[0]
    inv_t = 1.0 / temperature
    z = _student_logits(hs, w, b, student_row, columns, inv_t, dtype)
    p_s = torch.softmax(z.masked_fill_(~in_support, float("-inf")), -1)
    gz = torch.where(in_support, p_s - t_local.exp(), 0.0)
    gz.mul_((grad_kl.to(dtype) * inv_t)[:, None])
    if columns.shape[1] > V:  # k = V: dense, and cuSPARSE refuses more entries than M·V
        dense = torch.zeros(gz.shape[0], V, dtype=dtype, device=gz.device)
        gh_rows = dense.scatter_add_(1, columns, gz) @ w.to(dtype)
    else:
        gh_rows = _support_matrix(columns, gz, V) @ w.to(dtype)
    gh = torch.zeros(hs.shape, dtype=dtype, device=hs.device).index_add_(0, student_row, gh_rows)
    if not need_weight_grad:
        return gh, None, None
    flat = columns.reshape(-1)
    pairs = torch.stack([flat, student_row.repeat_interleave(columns.shape[1])])
    g_t = torch.sparse_coo_tensor(pairs, gz.reshape(-1), (V, hs.shape[0]), check_invariants=False)
    gw = torch.zeros(w.shape, dtype=dtype, device=w.device)
    gw.addmm_(g_t, hs.to(dtype))  # sums duplicate (column, row) pairs
    gb = None
    if b is not None:
        gb = torch.zeros(V, dtype=dtype, device=w.device).index_add_(0, flat, gz.reshape(-1))
    return gh, gw, gb
