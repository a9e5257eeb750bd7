"""The ``sgsd::local_support`` custom op (docs/design.md §3.2): per (rollout, teacher, position)
row, the student's and teacher's distributions renormalised on the teacher's top-k ∪ {y_t},
from hidden states. Returns Δ̃ (constant), the local KL (differentiable w.r.t. the student
hidden states, W and b) and the support size; the gated epilogue on these small [B, K, T]
tensors runs as plain PyTorch in :func:`sgsd_kernels.reference.local_support_gated_rows`.

Rows with ``valid`` False (masked positions, absent teachers) are dropped before the
kernels run and give 0. Every backend runs ``ops/torch_backend/local_support.py`` (the
student side is a (k + 1)-column gather-GEMM, the teacher side a top-k pass over V).
"""

from __future__ import annotations

import torch

from sgsd_kernels.ops.torch_backend import local_support as torch_kernels


def _kernels(backend: str):
    """Every backend runs the torch kernels: on CUDA they are a top-k pass of cuBLAS GEMMs
    (bounded workspace) and one (k + 1)-column gather-GEMM, already far below the cost of
    the full student pass they replace."""
    return torch_kernels


def _out_dtype(hidden: torch.Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


@torch.library.custom_op("sgsd::local_support", mutates_args=())
def local_support_op(
    student_hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor,
    student_row: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    top_k: int,
    temperature: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """student_hidden [N, H]; teacher_hidden [M, H]; student_row, targets, valid [M] ->
    (Δ̃ [M], KL̃ [M], size [M], then for the backward: columns [M, k+1] int64 and teacher
    local log-probs [M, k+1], −inf off the support and on every invalid row)."""
    dtype = _out_dtype(student_hidden)
    M, V = teacher_hidden.shape[0], weight.shape[0]
    k1 = min(top_k, V) + 1
    device = teacher_hidden.device
    delta = torch.zeros(M, dtype=dtype, device=device)
    local_kl = torch.zeros_like(delta)
    size = torch.zeros_like(delta)
    columns = torch.zeros(M, k1, dtype=torch.long, device=device)
    t_local = torch.full((M, k1), float("-inf"), dtype=dtype, device=device)
    rows = valid.nonzero().squeeze(1)
    if rows.numel() == 0:
        return delta, local_kl, size, columns, t_local
    d, kl, sz, cols, _, t_loc = _kernels(backend).forward(
        student_hidden,
        weight,
        bias,
        teacher_hidden.index_select(0, rows),
        student_row.index_select(0, rows),
        targets.index_select(0, rows),
        top_k,
        temperature,
        dtype,
    )
    delta[rows], local_kl[rows], size[rows] = d, kl, sz
    columns[rows], t_local[rows] = cols, t_loc
    return delta, local_kl, size, columns, t_local


@local_support_op.register_fake
def _(student_hidden, weight, bias, teacher_hidden, student_row, targets, valid, top_k,
      temperature, backend):  # fmt: skip
    M, dt = teacher_hidden.shape[0], _out_dtype(student_hidden)
    k1 = min(top_k, weight.shape[0]) + 1
    new = teacher_hidden.new_empty
    return (
        new(M, dtype=dt),
        new(M, dtype=dt),
        new(M, dtype=dt),
        new(M, k1, dtype=torch.long),
        new(M, k1, dtype=dt),
    )


@torch.library.custom_op("sgsd::local_support_backward", mutates_args=())
def local_support_backward_op(
    grad_kl: torch.Tensor,
    student_hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    student_row: torch.Tensor,
    columns: torch.Tensor,
    t_local: torch.Tensor,
    temperature: float,
    need_weight_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (grad student_hidden, grad weight (or [0]), grad bias (or [0])), input dtypes."""
    dtype = _out_dtype(student_hidden)
    in_support = torch.isfinite(t_local)
    rows = in_support.any(-1).nonzero().squeeze(1)
    if rows.numel() == 0:
        gw = torch.zeros_like(weight) if need_weight_grad else weight.new_empty(0)
        use_b = need_weight_grad and bias is not None
        gb = torch.zeros_like(bias) if use_b else weight.new_empty(0)
        return torch.zeros_like(student_hidden), gw, gb
    dh, dw, db = _kernels(backend).backward(
        grad_kl.index_select(0, rows),
        student_hidden,
        weight,
        bias,
        student_row.index_select(0, rows),
        columns.index_select(0, rows),
        in_support.index_select(0, rows),
        t_local.index_select(0, rows),
        temperature,
        dtype,
        need_weight_grad,
    )
    gw = dw.to(weight.dtype) if need_weight_grad else weight.new_empty(0)
    gb = db.to(bias.dtype) if need_weight_grad and bias is not None else weight.new_empty(0)
    return dh.to(student_hidden.dtype), gw, gb


@local_support_backward_op.register_fake
def _(grad_kl, student_hidden, weight, bias, student_row, columns, t_local, temperature,
      need_weight_grad, backend):  # fmt: skip
    gw = torch.empty_like(weight) if need_weight_grad else weight.new_empty(0)
    gb = torch.empty_like(bias) if need_weight_grad and bias is not None else weight.new_empty(0)
    return torch.empty_like(student_hidden), gw, gb


def _setup_context(ctx, inputs, output):
    hs, w, b, _, student_row, _, _, _, temperature, backend = inputs
    ctx.save_for_backward(hs, w, b, student_row, output[3], output[4])
    ctx.temperature = temperature
    ctx.backend = backend
    ctx.has_bias = b is not None


def _backward(ctx, _g_delta, grad_kl, *_rest):
    hs, w, b, student_row, columns, t_local = ctx.saved_tensors
    if grad_kl is None:
        grad_kl = torch.zeros(student_row.shape[0], dtype=t_local.dtype, device=hs.device)
    need_w = ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2])
    gh, gw, gb = local_support_backward_op(
        grad_kl.contiguous(), hs, w, b, student_row, columns, t_local, ctx.temperature,
        need_w, ctx.backend,
    )  # fmt: skip
    return (
        gh if ctx.needs_input_grad[0] else None,
        gw if ctx.needs_input_grad[1] else None,
        gb if ctx.has_bias and ctx.needs_input_grad[2] else None,
        *([None] * 7),
    )


torch.library.register_autograd("sgsd::local_support", _backward, setup_context=_setup_context)
