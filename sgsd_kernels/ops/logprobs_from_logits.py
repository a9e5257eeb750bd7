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

_OP = "logprobs_from_logits"


@torch.library.custom_op("sgsd::logprobs_from_logits", mutates_args=())
def logprobs_from_logits_op(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [N,V], targets [N] int64 -> (logprobs [N], entropy [N] or [0], lse [N])."""
    check.targets_in_range("targets", targets, logits.shape[1], ignore_index)
    kernels = common.backend_module(backend, _OP)
    lp, ent, lse = kernels.forward(logits, targets, temperature, ignore_index, with_entropy)
    return lp, common.empty_if_none(ent, lp), lse


@logprobs_from_logits_op.register_fake
def _(logits, targets, temperature, ignore_index, with_entropy, backend):
    return common.fake_logprob_outputs(logits, with_entropy)


@torch.library.custom_op("sgsd::logprobs_from_logits_backward", mutates_args=())
def logprobs_from_logits_backward_op(
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    backend: str,
) -> torch.Tensor:
    rows = common.RowGrads(
        grad_logprobs, grad_entropy, targets, lse, entropy, temperature, ignore_index
    )
    return common.backend_module(backend, _OP).backward(rows, logits)


@logprobs_from_logits_backward_op.register_fake
def _(
    grad_logprobs, grad_entropy, logits, targets, lse, entropy, temperature, ignore_index, backend
):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, targets, temperature, ignore_index, with_entropy, backend = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, targets, lse, entropy if with_entropy else None)
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index
    ctx.backend = backend


def _backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
    logits, targets, lse, entropy = ctx.saved_tensors
    if grad_logprobs is None:
        grad_logprobs = torch.zeros_like(lse)
    if entropy is None:
        grad_entropy = None
    grad = logprobs_from_logits_backward_op(
        grad_logprobs.contiguous(),
        None if grad_entropy is None else grad_entropy.contiguous(),
        logits,
        targets,
        lse,
        entropy,
        ctx.temperature,
        ctx.ignore_index,
        ctx.backend,
    )
    return grad, None, None, None, None, None


torch.library.register_autograd(
    "sgsd::logprobs_from_logits", _backward, setup_context=_setup_context
)
