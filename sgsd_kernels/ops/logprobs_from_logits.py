"""Log-probs (and entropy) of targets from an existing logits tensor, streaming over the
vocabulary: no log_softmax copy of the logits is made. The ``sgsd::logprobs_from_logits``
custom op and its autograd formula; torch (``ops/torch_backend/logprobs_from_logits.py``) or
Triton
(``ops/triton_backend/logprobs_from_logits.py``) kernels.
"""

from __future__ import annotations

import torch

from sgsd_kernels import validation as check
from sgsd_kernels.ops import common
from sgsd_kernels.ops.arguments import RowGrads, RowTargets, sgsd_op, upstream_grads

_OP = "logprobs_from_logits"


@sgsd_op(
    "logprobs_from_logits",
    "Tensor logits",
    RowTargets,
    "str backend",
    returns="(Tensor, Tensor, Tensor)",
)
def logprobs_from_logits_op(logits, targets, temperature, ignore_index, with_entropy, backend):
    """logits [N,V], then the fields of ``RowTargets`` (targets [N] int64,
    temperature, ignore_index, with_entropy), backend -> (logprobs [N], entropy [N] or [0],
    lse [N])."""
    check.targets_in_range("targets", targets, logits.shape[1], ignore_index)
    rows = RowTargets(targets, temperature, ignore_index, with_entropy)
    lp, ent, lse = common.backend_module(backend, _OP).forward(rows, logits)
    return lp, common.empty_if_none(ent, lp), lse


@logprobs_from_logits_op.register_fake
def _(logits, targets, temperature, ignore_index, with_entropy, backend):
    return common.fake_logprob_outputs(logits, with_entropy)


@sgsd_op(
    "logprobs_from_logits_backward",
    "Tensor grad_logprobs, Tensor? grad_entropy, Tensor logits",
    "Tensor targets, Tensor lse, Tensor? entropy, float temperature, SymInt ignore_index",
    "str backend",
    returns="Tensor",
)
def logprobs_from_logits_backward_op(
    grad_logprobs, grad_entropy, logits, targets, lse, entropy, temperature, ignore_index, backend
):
    """The upstream gradients, then what the forward saved, then its scalars ->
    grad_logits [N,V]."""
    rows = RowGrads(grad_logprobs, grad_entropy, targets, lse, entropy, temperature, ignore_index)
    return common.backend_module(backend, _OP).backward(rows, logits)


@logprobs_from_logits_backward_op.register_fake
def _(grad_logprobs, grad_entropy, logits, *_):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, targets, temperature, ignore_index, with_entropy, backend = inputs
    _, entropy, lse = output
    # In the order the backward op takes them, after the upstream gradients.
    ctx.save_for_backward(logits, targets, lse, entropy if with_entropy else None)
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index
    ctx.backend = backend


def _backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
    *_, lse, entropy = ctx.saved_tensors
    g, ge = upstream_grads(grad_logprobs, grad_entropy, lse, entropy)
    grad = logprobs_from_logits_backward_op(
        g, ge, *ctx.saved_tensors, ctx.temperature, ctx.ignore_index, ctx.backend
    )
    return grad, None, None, None, None, None


torch.library.register_autograd(
    "sgsd::logprobs_from_logits", _backward, setup_context=_setup_context
)
