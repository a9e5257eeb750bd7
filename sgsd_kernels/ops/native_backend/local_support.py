"""Native CPU kernels for the top-k local support terms of docs/design.md §3.2, behind the
same ``forward``/``backward`` signatures as ``ops/torch_backend/local_support.py``.

The teacher logits are torch.mm GEMMs over row chunks of the full vocabulary (one
[rows, V] buffer, reused); per chunk ``sgsd_native::local_support_teacher`` sweeps each row
once, keeping its running top-k, and writes the support columns (top-k then y_t), the
teacher's local log-probs and the support mask. ``local_support_student`` gathers the
student's k + 1 support logits and gives Δ̃ and the local KL; ``local_support_backward``
recomputes them and forms dh, dW and db (C++ in ``sgsd_kernels/csrc/local_support.cpp``).
Ties at the k-th teacher value go to the lower vocabulary index (the C++ header says why).

fp32/bf16/fp16 inputs compute in fp32, fp64 in fp64 (``dtype``, from ``ops.common``).
"""

from __future__ import annotations

import torch

# Teacher logits per chunk: whole vocabulary rows, 2**22 elements (16 MiB in fp32: 128
# rows at V = 32768), but never fewer than MIN_ROWS rows: the [V, rows] GEMM is slow for
# skinny chunks. Forward at M = 256, V = 151936, H = 1024, fp32, 2 threads on the 2-core
# AMD EPYC (best of 3, interleaved): 27 rows 2338 ms, 64 rows 705 ms, 128 rows 623 ms.
TOPK_ELEMENTS = 1 << 22
MIN_ROWS = 64


def _ops():
    # Imported here, not at module level: `python -m sgsd_kernels.native` must not find the
    # module already imported by the package (runpy warns about that).
    from sgsd_kernels import native

    return native.ops()


def chunk_rows(M: int, V: int, workspace: int | None = None, min_rows: int | None = None) -> int:
    """Teacher rows per GEMM chunk: as many whole rows of V as fit the workspace, at least
    ``min_rows`` (default MIN_ROWS), at most M (≥ 1)."""
    floor = MIN_ROWS if min_rows is None else min_rows
    return max(1, min(M, max(floor, (workspace or TOPK_ELEMENTS) // V)))


def forward(hs, w, b, ht, student_row, targets, top_k, temperature, dtype, workspace=None,
            min_rows=None):  # fmt: skip
    """hs [N, H] student rows; ht [M, H] teacher rows; student_row [M] (the student row of
    each teacher row); targets [M] valid token ids.

    Returns (delta [M], local_kl [M], size [M], columns [M, k+1] int64,
    in_support [M, k+1] bool, teacher local log-probs [M, k+1]); k = min(top_k, V).
    """
    ops = _ops()
    M, V = ht.shape[0], w.shape[0]
    k = min(top_k, V)
    inv_t = 1.0 / temperature
    w_c = w.detach().to(dtype)  # converted once, not per chunk (no copy for fp32/fp64)
    b_c = None if b is None else b.detach().to(dtype)[:, None]
    rows = chunk_rows(M, V, workspace, min_rows)
    buf = torch.empty(V * rows, dtype=dtype, device=ht.device)
    columns = torch.empty(M, k + 1, dtype=torch.long, device=ht.device)
    t_local = torch.empty(M, k + 1, dtype=dtype, device=ht.device)
    in_support = torch.empty(M, k + 1, dtype=torch.bool, device=ht.device)
    for r0 in range(0, M, rows):
        r1 = min(M, r0 + rows)
        zt = buf[: V * (r1 - r0)].view(V, r1 - r0)  # vocabulary-major: W · hᵀ
        h_t = ht[r0:r1].detach().to(dtype).T
        if b_c is None:
            torch.mm(w_c, h_t, out=zt)
        else:
            torch.addmm(b_c, w_c, h_t, out=zt)
        cols, t_loc, keep = ops.local_support_teacher(zt, targets[r0:r1], k, inv_t)
        columns[r0:r1], t_local[r0:r1], in_support[r0:r1] = cols, t_loc, keep
    delta, local_kl = ops.local_support_student(
        hs.detach(), w.detach(), b, student_row, columns, t_local, in_support, inv_t
    )
    size = in_support.sum(-1).to(dtype)
    return delta, local_kl, size, columns, in_support, t_local


def backward(grad_kl, hs, w, b, student_row, columns, in_support, t_local, temperature, dtype,
             need_weight_grad):  # fmt: skip
    """Gradient of Σ grad_kl·KL̃ w.r.t. hs [N, H], W and b (W/b None unless needed), in
    ``dtype``: gz = grad/T·(p̃_S − p̃_T) on the support, dh = Σ gz·W[col] per student row,
    dW[v] = Σ gz·h over the support entries holding v."""
    gh, gw, gb = _ops().local_support_backward(
        grad_kl, hs.detach(), w.detach(), b, student_row, columns, t_local.to(dtype),
        in_support, 1.0 / temperature, need_weight_grad,
    )  # fmt: skip
    if not need_weight_grad:
        return gh, None, None
    return gh, gw, gb if b is not None else None
