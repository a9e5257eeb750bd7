"""The ``sgsd::linear_divergence`` custom op (docs/design.md §3.1): per-row divergence between
the student's and the teacher's full-vocabulary distributions, straight from hidden
states, with its backward op and autograd formula. Dispatches to the blockwise torch
kernels (``ops/torch_backend/linear_divergence.py``) or the fused Triton kernels
(``ops/triton_backend/linear_divergence.py``); any other backend name (e.g. a CPU
``native`` backend without a divergence kernel) runs the torch kernels.

Rows whose mask is False are dropped before any kernel runs (padding costs nothing and
its values, even NaN, never reach the outputs or the gradients). The teacher side is a
constant: only the student rows, W and the student bias receive gradients.
"""

from __future__ import annotations

import torch

from sgsd_kernels.ops.torch_backend import linear_divergence as torch_kernels


def _kernels(backend: str):
    if backend == "triton":
        from sgsd_kernels.ops.triton_backend import linear_divergence as triton_kernels

        return triton_kernels
    return torch_kernels


def _out_dtype(hidden: torch.Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _rows(mask: torch.Tensor):
    """Indices of the valid rows, or None when every row is valid."""
    if bool(mask.all()):
        return None
    return mask.nonzero().squeeze(1)


@torch.library.custom_op("sgsd::linear_divergence", mutates_args=())
def linear_divergence_op(
    student_hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    mask: torch.Tensor,
    beta: float,
    temperature: float,
    clip: float | None,
    top_k: int | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """student_hidden/teacher_hidden [N, H], weight/teacher_weight [V, H], mask [N] bool ->
    (D [N], saved row statistics [3, N]: Σe, lse_S, lse_T), fp32 (fp64 for fp64 inputs)."""
    dtype = _out_dtype(student_hidden)
    N = student_hidden.shape[0]
    out = torch.zeros(N, dtype=dtype, device=student_hidden.device)
    stats = torch.zeros(3, N, dtype=dtype, device=student_hidden.device)
    idx = _rows(mask)
    hs, ht = student_hidden, teacher_hidden
    if idx is not None:
        if idx.numel() == 0:
            return out, stats
        hs, ht = hs.index_select(0, idx), ht.index_select(0, idx)
    d, sum_e, lse_s, lse_t = _kernels(backend).forward(
        hs, weight, bias, ht, teacher_weight, teacher_bias, beta, temperature, clip, top_k, dtype
    )
    if idx is None:
        return d, torch.stack([sum_e, lse_s, lse_t])
    out[idx] = d
    stats[:, idx] = torch.stack([sum_e, lse_s, lse_t])
    return out, stats


@linear_divergence_op.register_fake
def _(student_hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, mask, beta,
      temperature, clip, top_k, backend):  # fmt: skip
    N, dt = student_hidden.shape[0], _out_dtype(student_hidden)
    return student_hidden.new_empty(N, dtype=dt), student_hidden.new_empty(3, N, dtype=dt)


@torch.library.custom_op("sgsd::linear_divergence_backward", mutates_args=())
def linear_divergence_backward_op(
    grad: torch.Tensor,
    student_hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    mask: torch.Tensor,
    stats: torch.Tensor,
    beta: float,
    temperature: float,
    clip: float | None,
    top_k: int | None,
    need_weight_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (grad student_hidden [N, H], grad weight [V, H] (or [0]), grad bias [V] (or [0]))
    in the inputs' dtypes."""
    dtype = _out_dtype(student_hidden)
    idx = _rows(mask)
    hs, ht, g, st = student_hidden, teacher_hidden, grad, stats
    if idx is not None:
        if idx.numel() == 0:
            gw = torch.zeros_like(weight) if need_weight_grad else weight.new_empty(0)
            use_b = need_weight_grad and bias is not None
            gb = torch.zeros_like(bias) if use_b else weight.new_empty(0)
            return torch.zeros_like(student_hidden), gw, gb
        hs, ht = hs.index_select(0, idx), ht.index_select(0, idx)
        g, st = g.index_select(0, idx), st.index_select(1, idx)
    dh, dw, db = _kernels(backend).backward(
        g, hs, weight, bias, ht, teacher_weight, teacher_bias, st[0], st[1], st[2], beta,
        temperature, clip, top_k, dtype, need_weight_grad,
    )  # fmt: skip
    if idx is None:
        gh = dh.to(student_hidden.dtype)
    else:
        gh = torch.zeros_like(student_hidden)
        gh[idx] = dh.to(gh.dtype)
    gw = dw.to(weight.dtype) if need_weight_grad else weight.new_empty(0)
    gb = db.to(bias.dtype) if need_weight_grad and bias is not None else weight.new_empty(0)
    return gh, gw, gb


@linear_divergence_backward_op.register_fake
def _(grad, student_hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, mask,
      stats, beta, temperature, clip, top_k, need_weight_grad, backend):  # fmt: skip
    gw = torch.empty_like(weight) if need_weight_grad else weight.new_empty(0)
    gb = torch.empty_like(bias) if need_weight_grad and bias is not None else weight.new_empty(0)
    return torch.empty_like(student_hidden), gw, gb


def _setup_context(ctx, inputs, output):
    (hs, w, b, ht, tw, tb, mask, beta, temperature, clip, top_k, backend) = inputs
    ctx.save_for_backward(hs, w, b, ht, tw, tb, mask, output[1])
    ctx.hypers = (beta, temperature, clip, top_k)
    ctx.backend = backend
    ctx.has_bias = b is not None


def _backward(ctx, grad, _grad_stats):
    hs, w, b, ht, tw, tb, mask, stats = ctx.saved_tensors
    if grad is None:
        grad = torch.zeros_like(stats[0])
    need_w = ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2])
    gh, gw, gb = linear_divergence_backward_op(
        grad.contiguous(), hs, w, b, ht, tw, tb, mask, stats, *ctx.hypers, need_w, ctx.backend
    )
    return (
        gh if ctx.needs_input_grad[0] else None,
        gw if ctx.needs_input_grad[1] else None,
        gb if ctx.has_bias and ctx.needs_input_grad[2] else None,
        *([None] * 9),
    )


torch.library.register_autograd("sgsd::linear_divergence", _backward, setup_context=_setup_context)
