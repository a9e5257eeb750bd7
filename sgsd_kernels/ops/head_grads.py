"""Gradient plumbing shared by the ops whose differentiable inputs are the student rows
and the LM head, ``(student_hidden, weight, bias, ...)`` first (``sgsd::linear_divergence``,
``sgsd::local_support``): their backward ops return (grad student_hidden, grad weight,
grad bias) in the inputs' dtypes, with [0] for a weight/bias gradient not asked for
(custom ops cannot return None). Their schemas are built here, so the head inputs keep
the same names, types and positions in every such op."""

from __future__ import annotations

import torch

_HEAD = "Tensor student_hidden, Tensor weight, Tensor? bias"


def schema(rest: str, n_outputs: int) -> str:
    """The forward op's schema: the head inputs, then ``rest`` (its other arguments)."""
    return f"({_HEAD}, {rest}) -> ({', '.join(['Tensor'] * n_outputs)})"


def backward_schema(rest: str) -> str:
    """The backward op's schema: the upstream gradient, the head inputs, ``rest``, then the
    weight-gradient flag and the backend; it returns the three head gradients."""
    return (
        f"(Tensor grad, {_HEAD}, {rest}, bool need_weight_grad, str backend) "
        "-> (Tensor, Tensor, Tensor)"
    )


def outputs(gh, gw, gb, student_hidden, weight, bias, need_weight_grad: bool):
    """A backward op's outputs from kernel results in the compute dtype; None means zeros
    (every row masked) when the gradient is needed."""
    gh = torch.zeros_like(student_hidden) if gh is None else gh.to(student_hidden.dtype)
    if not need_weight_grad:
        return gh, weight.new_empty(0), weight.new_empty(0)
    gw = torch.zeros_like(weight) if gw is None else gw.to(weight.dtype)
    if bias is None:
        return gh, gw, weight.new_empty(0)
    return gh, gw, torch.zeros_like(bias) if gb is None else gb.to(bias.dtype)


def fake_outputs(student_hidden, weight, bias, need_weight_grad: bool):
    """Shape-only outputs of such a backward op (its ``register_fake``)."""
    gw = torch.empty_like(weight) if need_weight_grad else weight.new_empty(0)
    gb = torch.empty_like(bias) if need_weight_grad and bias is not None else weight.new_empty(0)
    return torch.empty_like(student_hidden), gw, gb


def need_weight_grad(ctx) -> bool:
    """Whether the weight or the bias (inputs 1 and 2) needs a gradient."""
    return ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2])


def for_inputs(ctx, grads, n_inputs: int):
    """The autograd formula's return value: (gh, gw, gb) where the inputs need them, None
    for the other ``n_inputs - 3`` inputs."""
    need = ctx.needs_input_grad
    gh, gw, gb = grads
    return (
        gh if need[0] else None,
        gw if need[1] else None,
        gb if ctx.has_bias and need[2] else None,
        *([None] * (n_inputs - 3)),
    )
