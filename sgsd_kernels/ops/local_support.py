"""The ``sgsd::local_support`` custom op (docs/design.md §3.2): per (rollout, teacher, position)
row, the student's and teacher's distributions renormalised on the teacher's top-k ∪ {y_t},
from hidden states. Returns Δ̃ (constant), the local KL (differentiable w.r.t. the student
hidden states, W and b) and the support size; the gated epilogue on these small [B, K, T]
tensors runs as plain PyTorch in :func:`sgsd_kernels.reference.local_support_gated_rows`.

Rows with ``valid`` False (masked positions, absent teachers) are dropped before the
kernels run and give 0. ``backend="native"`` runs ``ops/native_backend/local_support.py``
(C++ top-k sweep and student kernels); every other backend runs
``ops/torch_backend/local_support.py``: the teacher side is a top-k pass of GEMMs over V
(cuBLAS on CUDA), the student side sparse kernels over the k + 1 support columns, far
below the cost of the full student pass they replace.
"""

from __future__ import annotations

import torch

from sgsd_kernels.ops import common, head_grads
from sgsd_kernels.ops.native_backend import local_support as native_kernels
from sgsd_kernels.ops.torch_backend import local_support as torch_kernels


def _kernels(backend: str):
    """The kernel module of a resolved backend (native has its own; the rest use torch's)."""
    return native_kernels if backend == "native" else torch_kernels


def _take(rows: torch.Tensor, *tensors: torch.Tensor):
    """The given per-row tensors at ``rows``."""
    return (t.index_select(0, rows) for t in tensors)


_SCHEMA = head_grads.schema(
    "Tensor teacher_hidden, Tensor student_row, Tensor targets, Tensor valid, int top_k, "
    "float temperature, str backend",
    5,
)
_BACKWARD_SCHEMA = head_grads.backward_schema(
    "Tensor student_row, Tensor columns, Tensor t_local, float temperature"
)


@torch.library.custom_op("sgsd::local_support", mutates_args=(), schema=_SCHEMA)
def local_support_op(student_hidden, weight, bias, teacher_hidden, student_row, targets, valid,
                     top_k, temperature, backend):  # fmt: skip
    """student_hidden [N, H]; teacher_hidden [M, H]; student_row, targets, valid [M] ->
    (Δ̃ [M], KL̃ [M], size [M], then for the backward: columns [M, k+1] int64 and teacher
    local log-probs [M, k+1], −inf off the support and on every invalid row)."""
    dtype = common.compute_dtype(student_hidden)
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
        student_hidden, weight, bias, *_take(rows, teacher_hidden, student_row, targets), top_k,
        temperature, dtype,
    )  # fmt: skip
    delta[rows], local_kl[rows], size[rows] = d, kl, sz
    columns[rows], t_local[rows] = cols, t_loc
    return delta, local_kl, size, columns, t_local


@local_support_op.register_fake
def _(student_hidden, weight, bias, teacher_hidden, student_row, targets, valid, top_k,
      temperature, backend):  # fmt: skip
    M, dt = teacher_hidden.shape[0], common.compute_dtype(student_hidden)
    k1 = min(top_k, weight.shape[0]) + 1
    new = teacher_hidden.new_empty
    return (
        new(M, dtype=dt),
        new(M, dtype=dt),
        new(M, dtype=dt),
        new(M, k1, dtype=torch.long),
        new(M, k1, dtype=dt),
    )


@torch.library.custom_op("sgsd::local_support_backward", mutates_args=(), schema=_BACKWARD_SCHEMA)
def local_support_backward_op(grad, student_hidden, weight, bias, student_row, columns, t_local,
                              temperature, need_weight_grad, backend):  # fmt: skip
    """-> (grad student_hidden, grad weight (or [0]), grad bias (or [0])), input dtypes."""
    dtype = common.compute_dtype(student_hidden)
    # outside the support t_local is -inf; a NaN teacher row stays in it, so its gradient
    # is NaN like its forward value (as in the reference), not a silent zero
    in_support = t_local != float("-inf")
    rows = in_support.any(-1).nonzero().squeeze(1)
    dh = dw = db = None
    if rows.numel():
        dh, dw, db = _kernels(backend).backward(
            *_take(rows, grad), student_hidden, weight, bias,
            *_take(rows, student_row, columns, in_support, t_local), temperature, dtype,
            need_weight_grad,
        )  # fmt: skip
    return head_grads.outputs(dh, dw, db, student_hidden, weight, bias, need_weight_grad)


@local_support_backward_op.register_fake
def _(grad, student_hidden, weight, bias, student_row, columns, t_local, temperature,
      need_weight_grad, backend):  # fmt: skip
    return head_grads.fake_outputs(student_hidden, weight, bias, need_weight_grad)


def _setup_context(ctx, inputs, output):
    hs, w, b, _, student_row, _, _, _, temperature, backend = inputs
    ctx.save_for_backward(hs, w, b, student_row, output[3], output[4])
    # The outputs besides the one differentiated get no gradient: with materialisation on,
    # autograd would allocate zeros for each (a V×H one for dW_unit) in the backward.
    ctx.set_materialize_grads(False)
    ctx.temperature = temperature
    ctx.backend = backend
    ctx.has_bias = b is not None


def _backward(ctx, _g_delta, grad_kl, *_rest):
    hs, w, b, student_row, columns, t_local = ctx.saved_tensors
    if grad_kl is None:
        grad_kl = torch.zeros(student_row.shape[0], dtype=t_local.dtype, device=hs.device)
    grads = local_support_backward_op(
        grad_kl.contiguous(), hs, w, b, student_row, columns, t_local, ctx.temperature,
        head_grads.need_weight_grad(ctx), ctx.backend,
    )  # fmt: skip
    return head_grads.for_inputs(ctx, grads, 10)


torch.library.register_autograd("sgsd::local_support", _backward, setup_context=_setup_context)
