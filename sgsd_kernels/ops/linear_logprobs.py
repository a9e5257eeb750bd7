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
from sgsd_kernels.ops.arguments import (
    LinearInputs,
    RowGrads,
    RowTargets,
    Streams,
    sgsd_op,
    upstream_grads,
)

_OP = "linear_logprobs"


@sgsd_op(
    "linear_logprobs",
    LinearInputs,
    RowTargets,
    "str backend",
    returns="(Tensor, Tensor, Tensor)",
)
def linear_logprobs_op(
    hidden, weight, bias, softcap, targets, temperature, ignore_index, with_entropy, backend
):
    """The fields of ``LinearInputs`` (hidden [N,H], weight [V,H], bias [V] | None,
    softcap | None), then those of ``RowTargets`` (targets [N] int64, temperature,
    ignore_index, with_entropy), backend -> (logprobs [N], entropy [N] (or [0] without
    entropy), lse [N]) in fp32 (fp64 for fp64)."""
    check.targets_in_range("targets", targets, weight.shape[0], ignore_index)
    rows = RowTargets(targets, temperature, ignore_index, with_entropy)
    kernels = common.backend_module(backend, _OP)
    lp, ent, lse = kernels.forward(rows, LinearInputs(hidden, weight, bias, softcap))
    return lp, common.empty_if_none(ent, lp), lse


@linear_logprobs_op.register_fake
def _(hidden, weight, bias, softcap, targets, temperature, ignore_index, with_entropy, backend):
    return common.fake_logprob_outputs(hidden, with_entropy)


@sgsd_op(
    "linear_logprobs_backward",
    "Tensor grad_logprobs, Tensor? grad_entropy",
    LinearInputs,
    "Tensor targets, Tensor lse, Tensor? entropy, float temperature, SymInt ignore_index",
    "bool need_weight_grad, str backend",
    returns="(Tensor, Tensor, Tensor)",
)
def linear_logprobs_backward_op(
    grad_logprobs,
    grad_entropy,
    hidden,
    weight,
    bias,
    softcap,
    targets,
    lse,
    entropy,
    temperature,
    ignore_index,
    need_weight_grad,
    backend,
):
    """The upstream gradients, then what the forward saved (``_save``), then its scalars
    -> (grad_hidden [N,H], grad_weight [V,H] (or [0] when not needed), grad_bias [V] (or
    [0] when bias is None or not needed))."""
    rows = RowGrads(grad_logprobs, grad_entropy, targets, lse, entropy, temperature, ignore_index)
    kernels = common.backend_module(backend, _OP)
    linear = LinearInputs(hidden, weight, bias, softcap)
    gh, gw, gb = kernels.backward(rows, linear, need_weight_grad)
    return gh, common.empty_if_none(gw, weight), common.empty_if_none(gb, weight)


@linear_logprobs_backward_op.register_fake
def _(grad_logprobs, grad_entropy, hidden, weight, bias, softcap, *rest):
    need_weight_grad = rest[-2]  # rest = (targets, ..., need_weight_grad, backend)
    gw = torch.empty_like(weight) if need_weight_grad else weight.new_empty(0)
    gb = torch.empty_like(bias) if need_weight_grad and bias is not None else weight.new_empty(0)
    return torch.empty_like(hidden), gw, gb


def _save(ctx, weight_index, tensors, softcap, temperature, ignore_index, backend):
    """What both autograd formulas keep: ``tensors`` = (hidden, weight, bias, targets, lse,
    entropy or None), in the order the backward op takes them (the soft cap goes after
    bias); the scalars; and where weight stands among the op's inputs (``weight_index``;
    bias right after it)."""
    ctx.save_for_backward(*tensors)
    ctx.softcap = softcap
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index
    ctx.backend = backend
    ctx.has_bias = tensors[2] is not None
    ctx.weight_index = weight_index


def _input_grads(ctx, grad_logprobs, grad_entropy):
    """(grad_hidden, grad_weight, grad_bias) from the saved context, each None where its
    input needs no gradient."""
    hidden, weight, bias, *rest = ctx.saved_tensors
    *_, lse, entropy = rest
    g, ge = upstream_grads(grad_logprobs, grad_entropy, lse, entropy)
    w = ctx.weight_index
    need = ctx.needs_input_grad
    want_b = ctx.has_bias and need[w + 1]
    gh, gw, gb = linear_logprobs_backward_op(
        g, ge, hidden, weight, bias, ctx.softcap, *rest, ctx.temperature, ctx.ignore_index,
        need[w] or want_b, ctx.backend,
    )  # fmt: skip
    return gh if need[0] else None, gw if need[w] else None, gb if want_b else None


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, softcap, targets, temperature, ignore_index, with_entropy, backend = (
        inputs
    )
    _, entropy, lse = output
    saved = (hidden, weight, bias, targets, lse, entropy if with_entropy else None)
    _save(ctx, 1, saved, softcap, temperature, ignore_index, backend)


def _backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
    gh, gw, gb = _input_grads(ctx, grad_logprobs, grad_entropy)
    return gh, gw, gb, None, None, None, None, None, None


torch.library.register_autograd("sgsd::linear_logprobs", _backward, setup_context=_setup_context)


# --- Student + K teachers sharing W -----------------------------------------------------


@sgsd_op("linear_logprobs_streams", Streams, "str backend", returns="(Tensor, Tensor, Tensor)")
def linear_logprobs_streams_op(*args):
    """The fields of ``Streams`` (student rows [N,H], teacher rows [M,H], weight, bias,
    student and teacher targets, temperature, ignore_index, softcap), then backend ->
    (student logprobs [N], teacher logprobs [M], student lse [N]). Only the student
    output has a gradient (teachers are constants in SGSD).

    Triton: one launch over N + M rows, so each token block streams W once for all
    K+1 streams; native: one pass over W for all rows; torch: two blockwise passes.
    """
    *fields, backend = args
    streams = Streams(*fields)
    check.targets_in_range(
        "targets", streams.student_targets, streams.weight.shape[0], streams.ignore_index
    )
    N = streams.student_hidden.shape[0]
    lp, lse = common.backend_module(backend, _OP).forward_streams(streams)
    return lp[:N].clone(), lp[N:].clone(), lse[:N].clone()


@linear_logprobs_streams_op.register_fake
def _(student_hidden, teacher_hidden, *_):
    dt = common.compute_dtype(student_hidden)
    N, M = student_hidden.shape[0], teacher_hidden.shape[0]
    return (
        student_hidden.new_empty(N, dtype=dt),
        student_hidden.new_empty(M, dtype=dt),
        student_hidden.new_empty(N, dtype=dt),
    )


def _streams_setup_context(ctx, inputs, output):
    student_hidden, _, weight, bias, student_targets, _, temperature, ignore_index, *rest = inputs
    softcap, backend = rest
    saved = (student_hidden, weight, bias, student_targets, output[2], None)
    _save(ctx, 2, saved, softcap, temperature, ignore_index, backend)


def _streams_backward(ctx, grad_student, _grad_teacher, _grad_lse):
    gh, gw, gb = _input_grads(ctx, grad_student, None)
    return gh, None, gw, gb, None, None, None, None, None, None


torch.library.register_autograd(
    "sgsd::linear_logprobs_streams", _streams_backward, setup_context=_streams_setup_context
)
