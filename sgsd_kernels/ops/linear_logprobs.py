"""Log-probs (and entropy) of targets from hidden states and the LM-head weight, without
materialising N×V logits: the ``sgsd::linear_logprobs`` custom op, its backward op and
autograd formula. Dispatches to the blockwise torch kernels
(``ops/torch_backend/linear_logprobs.py``), the fused Triton kernels
(``ops/triton_backend/linear_logprobs.py``) or the native C++ CPU kernels
(``ops/native_backend/linear_logprobs.py``).

Registered with ``torch.library.custom_op`` so that ``torch.compile`` treats it as one
opaque node with a fake (shape-only) implementation instead of tracing into the loops.
"""

from __future__ import annotations

import torch

from sgsd_kernels import validation as check
from sgsd_kernels.ops import common

_OP = "linear_logprobs"


@torch.library.custom_op("sgsd::linear_logprobs", mutates_args=())
def linear_logprobs_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [N,H], weight [V,H], bias [V] | None, targets [N] int64 ->
    (logprobs [N], entropy [N] (or [0] without entropy), lse [N]) in fp32 (fp64 for fp64)."""
    check.targets_in_range("targets", targets, weight.shape[0], ignore_index)
    kernels = common.backend_module(backend, _OP)
    lp, ent, lse = kernels.forward(
        hidden, weight, bias, targets, temperature, ignore_index, with_entropy
    )
    return lp, common.empty_if_none(ent, lp), lse


@linear_logprobs_op.register_fake
def _(hidden, weight, bias, targets, temperature, ignore_index, with_entropy, backend):
    return common.fake_logprob_outputs(hidden, with_entropy)


@torch.library.custom_op("sgsd::linear_logprobs_backward", mutates_args=())
def linear_logprobs_backward_op(
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    need_weight_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (grad_hidden [N,H], grad_weight [V,H] (or [0] when not needed),
    grad_bias [V] (or [0] when bias is None or not needed))."""
    rows = common.RowGrads(
        grad_logprobs, grad_entropy, targets, lse, entropy, temperature, ignore_index
    )
    kernels = common.backend_module(backend, _OP)
    gh, gw, gb = kernels.backward(rows, hidden, weight, bias, need_weight_grad)
    return gh, common.empty_if_none(gw, weight), common.empty_if_none(gb, weight)


@linear_logprobs_backward_op.register_fake
def _(
    grad_logprobs,
    grad_entropy,
    hidden,
    weight,
    bias,
    targets,
    lse,
    entropy,
    temperature,
    ignore_index,
    need_weight_grad,
    backend,
):
    gw = torch.empty_like(weight) if need_weight_grad else weight.new_empty(0)
    gb = torch.empty_like(bias) if need_weight_grad and bias is not None else weight.new_empty(0)
    return torch.empty_like(hidden), gw, gb


def _save(ctx, weight_index, tensors, temperature, ignore_index, backend):
    """What both autograd formulas keep: ``tensors`` = (hidden, weight, bias, targets, lse,
    entropy or None), the scalars, and where weight stands among the op's inputs
    (``weight_index``; bias right after it)."""
    ctx.save_for_backward(*tensors)
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index
    ctx.backend = backend
    ctx.has_bias = tensors[2] is not None
    ctx.weight_index = weight_index


def _input_grads(ctx, grad_logprobs, grad_entropy):
    """(grad_hidden, grad_weight, grad_bias) from the saved context, each None where its
    input needs no gradient."""
    hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
    if grad_logprobs is None:
        grad_logprobs = torch.zeros_like(lse)
    if entropy is None or grad_entropy is None:
        grad_entropy = None
    else:
        grad_entropy = grad_entropy.contiguous()
    w = ctx.weight_index
    need = ctx.needs_input_grad
    want_b = ctx.has_bias and need[w + 1]
    gh, gw, gb = linear_logprobs_backward_op(
        grad_logprobs.contiguous(),
        grad_entropy,
        hidden,
        weight,
        bias,
        targets,
        lse,
        entropy,
        ctx.temperature,
        ctx.ignore_index,
        need[w] or want_b,
        ctx.backend,
    )
    return gh if need[0] else None, gw if need[w] else None, gb if want_b else None


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, ignore_index, with_entropy, backend = inputs
    _, entropy, lse = output
    saved = (hidden, weight, bias, targets, lse, entropy if with_entropy else None)
    _save(ctx, 1, saved, temperature, ignore_index, backend)


def _backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
    gh, gw, gb = _input_grads(ctx, grad_logprobs, grad_entropy)
    return gh, gw, gb, None, None, None, None, None


torch.library.register_autograd("sgsd::linear_logprobs", _backward, setup_context=_setup_context)


# --- Student + K teachers sharing W -----------------------------------------------------


@torch.library.custom_op("sgsd::linear_logprobs_streams", mutates_args=())
def linear_logprobs_streams_op(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    student_targets: torch.Tensor,
    teacher_targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student rows [N,H] and teacher rows [M,H] with their targets ->
    (student logprobs [N], teacher logprobs [M], student lse [N]). Only the student
    output has a gradient (teachers are constants in SGSD).

    Triton: one launch over N + M rows, so each token block streams W once for all
    K+1 streams; native: one pass over W for all rows; torch: two blockwise passes.
    """
    check.targets_in_range("targets", student_targets, weight.shape[0], ignore_index)
    N = student_hidden.shape[0]
    kernels = common.backend_module(backend, _OP)
    lp, lse = kernels.forward_streams(
        student_hidden,
        teacher_hidden,
        weight,
        bias,
        student_targets,
        teacher_targets,
        temperature,
        ignore_index,
    )
    return lp[:N].clone(), lp[N:].clone(), lse[:N].clone()


@linear_logprobs_streams_op.register_fake
def _(
    student_hidden,
    teacher_hidden,
    weight,
    bias,
    student_targets,
    teacher_targets,
    temperature,
    ignore_index,
    backend,
):
    dt = common.compute_dtype(student_hidden)
    N, M = student_hidden.shape[0], teacher_hidden.shape[0]
    return (
        student_hidden.new_empty(N, dtype=dt),
        student_hidden.new_empty(M, dtype=dt),
        student_hidden.new_empty(N, dtype=dt),
    )


def _streams_setup_context(ctx, inputs, output):
    student_hidden, _, weight, bias, student_targets, _, temperature, ignore_index, backend = inputs
    saved = (student_hidden, weight, bias, student_targets, output[2], None)
    _save(ctx, 2, saved, temperature, ignore_index, backend)


def _streams_backward(ctx, grad_student, _grad_teacher, _grad_lse):
    gh, gw, gb = _input_grads(ctx, grad_student, None)
    return gh, None, gw, gb, None, None, None, None, None


torch.library.register_autograd(
    "sgsd::linear_logprobs_streams", _streams_backward, setup_context=_streams_setup_context
)
