"""SGSD gated loss (DESIGN §3) on per-token log-probs: torch math, Triton dispatch, and the
``sgsd::gated_kd`` custom op with its autograd formula.

The op is tiny next to the log-prob GEMMs (O(B·K·T)), so the torch path is plain
vectorised math with an explicit gradient (no autograd graph is recorded, which keeps
``torch.compile`` and memory simple). The Triton path runs the same math as one
forward and one backward kernel (``ops/triton_backend/gated_kd.py``).
"""

from __future__ import annotations

import math

import torch

from sgsd_kernels import validation as check

_LOG2 = math.log(2.0)


def forward_torch(s, u, mask, rewards, weights, tau, delta, eps):
    """Returns (loss [], support [B,K], polarity [B,K], row_loss [B,K], clipped [])."""
    dtype = s.dtype
    B = s.shape[0]
    m = mask.unsqueeze(1)  # [B,1,T] bool
    zero = torch.zeros((), dtype=dtype, device=s.device)
    # Select (not multiply) so that padding garbage (-inf/NaN) at masked positions is inert.
    gap = torch.where(m, u - s.unsqueeze(1), zero)  # Δ [B,K,T]
    n = mask.sum(-1).clamp_min(1).to(dtype).unsqueeze(1)  # [B,1]
    support = gap.clamp(-delta, delta).sum(-1) / n
    sigma = torch.where(support.abs() > eps, torch.sign(support), zero)
    outcome = torch.where(rewards > 0, 1.0, -1.0).to(dtype).unsqueeze(1)
    polarity = outcome * sigma
    gate = _LOG2 - torch.nn.functional.softplus(-gap.square() / (2.0 * tau))
    row_loss = torch.where(m, gate, zero).sum(-1) / n
    # Absent teachers (w = 0) are inert even if their log-probs are garbage.
    loss = torch.where(weights > 0, weights * polarity * row_loss, zero).sum() / max(B, 1)
    clipped = ((gap.abs() > delta) & m & (weights > 0).unsqueeze(-1)).sum().to(dtype)
    return loss, support, polarity, row_loss, clipped


def backward_torch(grad_loss, s, u, mask, weights, polarity, tau):
    """∂loss/∂s[b,t] = −(1/B) Σ_k w ρ m ℓ'(Δ) / n, ℓ'(Δ) = sigmoid(−Δ²/(2τ))·Δ/τ."""
    dtype = s.dtype
    B = s.shape[0]
    m = mask.unsqueeze(1)
    zero = torch.zeros((), dtype=dtype, device=s.device)
    gap = torch.where(m, u - s.unsqueeze(1), zero)
    n = mask.sum(-1).clamp_min(1).to(dtype).unsqueeze(1)
    dgate = torch.sigmoid(-gap.square() / (2.0 * tau)) * gap / tau
    coef = torch.where(weights > 0, weights * polarity / n, zero).unsqueeze(-1)  # [B,K,1]
    grad = -(torch.where(m, coef * dgate, zero)).sum(1) * (grad_loss.to(dtype) / B)
    return grad


def _run_forward(backend, s, u, mask, rewards, weights, tau, delta, eps):
    if backend == "triton":
        from sgsd_kernels.ops.triton_backend import gated_kd as triton_gated_kd

        return triton_gated_kd.forward(s, u, mask, rewards, weights, tau, delta, eps)
    return forward_torch(s, u, mask, rewards, weights, tau, delta, eps)


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
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs already in the compute dtype, contiguous; ``mask`` bool."""
    check.teacher_weights_valid(weights)  # here, so that it also runs under torch.compile
    outputs = _run_forward(backend, s, u, mask, rewards, weights, tau, delta, eps)
    return tuple(t.contiguous() for t in outputs)


@gated_kd_op.register_fake
def _(s, u, mask, rewards, weights, tau, delta, eps, backend):
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
    if backend == "triton":
        from sgsd_kernels.ops.triton_backend import gated_kd as triton_gated_kd

        return triton_gated_kd.backward(grad_loss, s, u, mask, weights, polarity, tau)
    return backward_torch(grad_loss, s, u, mask, weights, polarity, tau).contiguous()


@gated_kd_backward_op.register_fake
def _(grad_loss, s, u, mask, weights, polarity, tau, backend):
    return torch.empty_like(s)


def _setup_context(ctx, inputs, output):
    s, u, mask, rewards, weights, tau, delta, eps, backend = inputs
    polarity = output[2]
    ctx.save_for_backward(s, u, mask, weights, polarity)
    ctx.tau = tau
    ctx.backend = backend


def _backward(ctx, grad_loss, *unused_grads):
    s, u, mask, weights, polarity = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 9
    grad_s = gated_kd_backward_op(grad_loss, s, u, mask, weights, polarity, ctx.tau, ctx.backend)
    return grad_s, None, None, None, None, None, None, None, None


torch.library.register_autograd("sgsd::gated_kd", _backward, setup_context=_setup_context)
