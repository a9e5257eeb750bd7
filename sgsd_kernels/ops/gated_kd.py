"""The ``sgsd::gated_kd`` custom op (the SGSD gated loss, docs/design.md §3, on per-token
log-probs): fake registration, autograd formula and dispatch to
``ops/torch_backend/gated_kd.py`` or ``ops/triton_backend/gated_kd.py``.
"""

from __future__ import annotations

import torch

from sgsd_kernels import validation as check
from sgsd_kernels.ops.common import backend_module

_OP = "gated_kd"


@torch.library.custom_op("sgsd::gated_kd", mutates_args=())
def gated_kd_op(
    s: torch.Tensor,
    u: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    weights: torch.Tensor,
    tau: float,
    delta: float,
    eps: float,
    use_polarity: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs already in the compute dtype, contiguous; ``mask`` bool."""
    check.teacher_weights_valid(weights)  # here, so that it also runs under torch.compile
    kernels = backend_module(backend, _OP)
    outputs = kernels.forward(s, u, mask, rewards, weights, tau, delta, eps, use_polarity)
    return tuple(t.contiguous() for t in outputs)


@gated_kd_op.register_fake
def _(s, u, mask, rewards, weights, tau, delta, eps, use_polarity, backend):
    B, K = u.shape[0], u.shape[1]
    scalar = s.new_empty(())
    return scalar, s.new_empty(B, K), s.new_empty(B, K), s.new_empty(B, K), s.new_empty(())


@torch.library.custom_op("sgsd::gated_kd_backward", mutates_args=())
def gated_kd_backward_op(
    grad_loss: torch.Tensor,
    s: torch.Tensor,
    u: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    polarity: torch.Tensor,
    tau: float,
    backend: str,
) -> torch.Tensor:
    kernels = backend_module(backend, _OP)
    return kernels.backward(grad_loss, s, u, mask, weights, polarity, tau).contiguous()


@gated_kd_backward_op.register_fake
def _(grad_loss, s, u, mask, weights, polarity, tau, backend):
    return torch.empty_like(s)


def _setup_context(ctx, inputs, output):
    s, u, mask, rewards, weights, tau, delta, eps, use_polarity, backend = inputs
    polarity = output[2]
    ctx.save_for_backward(s, u, mask, weights, polarity)
    ctx.tau = tau
    ctx.backend = backend


def _backward(ctx, grad_loss, *unused_grads):
    s, u, mask, weights, polarity = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 10
    grad_s = gated_kd_backward_op(grad_loss, s, u, mask, weights, polarity, ctx.tau, ctx.backend)
    return grad_s, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("sgsd::gated_kd", _backward, setup_context=_setup_context)
