"""The ``sgsd::linear_divergence`` custom op (docs/design.md §3.1): per-row divergence between
the student's and the teacher's full-vocabulary distributions, straight from hidden
states, with its backward op and autograd formula. Dispatches through
``common.backend_module`` to the blockwise torch kernels
(``ops/torch_backend/linear_divergence.py``; ``native`` re-exports them) or the fused
Triton kernels (``ops/triton_backend/linear_divergence.py``).

Rows whose mask is False are dropped before any kernel runs (padding costs nothing and
its values, even NaN, never reach the outputs or the gradients). The teacher side is a
constant: only the student rows, W and the student bias receive gradients.

Unit-gradient forward (torch/native kernels, whole vocabulary in one block): when a
gradient will be needed, :func:`linear_divergence_op` asks the forward for the gradients
of Σ_n D_n as well (``forward_with_unit_grads``: 2 logits GEMMs more while the block is
in cache, instead of the backward's 4). The backward then scales them: dh = grad·dh_unit
is exact for any upstream gradient; dW = c·dW_unit is exact when the upstream gradient is
the same c on every valid row, as for the trainer's Σ m D / Σ m and for ``.sum()``. Any
other upstream gradient recomputes dW (and skips the dh GEMM). The forward speculates
whenever grad mode is on and an input needs a gradient: fwd+bwd CPU time, 1 thread,
interleaved on the loaded 2-core EPYC box (N=1024, V=32768, H=256, fp32, β=0, T=1.1, clip
0.05): masked mean 1290 ms vs 2046 ms recomputing (reference 2078 ms); a row-varying
upstream gradient 2230 ms vs 2068 ms, the 8 % that a wasted dW_unit GEMM costs.
"""

from __future__ import annotations

import torch

from sgsd_kernels.ops import common, head_grads

_OP = "linear_divergence"

# Whether the forward may compute the unit-gradient terms (read at call time; tests and
# benchmarks turn it off to run the recompute backward).
SPECULATE = True


def _rows(mask: torch.Tensor):
    """Indices of the valid rows, or None when every row is valid."""
    if bool(mask.all()):
        return None
    return mask.nonzero().squeeze(1)


def _scatter(values: torch.Tensor, idx: torch.Tensor | None, n: int, dim: int = 0):
    """``values`` (valid rows only) back into zeros of n rows along ``dim``."""
    if idx is None:
        return values
    shape = list(values.shape)
    shape[dim] = n
    return values.new_zeros(shape).index_copy_(dim, idx, values)


_SCHEMA = head_grads.schema(
    "Tensor teacher_hidden, Tensor teacher_weight, Tensor? teacher_bias, Tensor mask, "
    "float beta, float temperature, float? clip, int? top_k, float? softcap, bool unit_hidden, "
    "bool unit_weight, str backend",
    5,
)
_BACKWARD_SCHEMA = head_grads.backward_schema(
    "Tensor[] teacher, Tensor mask, Tensor[] saved, float beta, float temperature, "
    "float? clip, int? top_k, float? softcap"
)


@torch.library.custom_op("sgsd::linear_divergence", mutates_args=(), schema=_SCHEMA)
def _divergence(student_hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, mask,
                beta, temperature, clip, top_k, softcap, unit_hidden, unit_weight,
                backend):  # fmt: skip
    """student_hidden/teacher_hidden [N, H], weight/teacher_weight [V, H], mask [N] bool,
    ``softcap`` the cap on both heads' raw logits (``LinearInputs``) ->
    (D [N], saved row statistics [3, N]: Σe, lse_S, lse_T, dh_unit [N, H], dW_unit [V, H],
    db_unit [V]) in fp32 (fp64 for fp64 inputs); a unit term not asked for is [0]."""
    dtype = common.compute_dtype(student_hidden)
    (N, H), V = student_hidden.shape, weight.shape[0]
    idx = _rows(mask)
    hs, ht = student_hidden, teacher_hidden
    if idx is not None and idx.numel() == 0:  # every row masked: zeros, no kernel
        zeros = lambda *shape: hs.new_zeros(shape, dtype=dtype)  # noqa: E731
        dh, dw = zeros(N if unit_hidden else 0, H), zeros(V if unit_weight else 0, H)
        db = zeros(V if unit_weight and bias is not None else 0)
        return zeros(N), zeros(3, N), dh, dw, db
    if idx is not None:
        hs, ht = hs.index_select(0, idx), ht.index_select(0, idx)
    kernels = common.backend_module(backend, _OP)
    args = (hs, weight, bias, ht, teacher_weight, teacher_bias, beta, temperature, clip, top_k)
    if unit_hidden or unit_weight:
        *stats, dh, dw, db = kernels.forward_with_unit_grads(
            *args, dtype, unit_hidden, unit_weight, softcap=softcap
        )
        dh = None if dh is None else _scatter(dh, idx, N)
    else:
        stats, dh, dw, db = kernels.forward(*args, dtype, softcap=softcap), None, None, None
    d, *stats = (_scatter(s, idx, N) for s in stats)
    units = (common.empty_if_none(t, d) for t in (dh, dw, db))
    return d, torch.stack(stats), *units


@_divergence.register_fake
def _(student_hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, mask, beta,
      temperature, clip, top_k, softcap, unit_hidden, unit_weight, backend):  # fmt: skip
    N, dt = student_hidden.shape[0], common.compute_dtype(student_hidden)
    new = student_hidden.new_empty
    V, H = weight.shape
    return (
        new(N, dtype=dt),
        new(3, N, dtype=dt),
        new((N, H) if unit_hidden else 0, dtype=dt),
        new((V, H) if unit_weight else 0, dtype=dt),
        new(V if unit_weight and bias is not None else 0, dtype=dt),
    )


def _row_constant(grad: torch.Tensor) -> bool:
    """Whether every entry equals the first (NaN never does: it takes the exact path)."""
    return grad.numel() == 0 or bool((grad == grad[0]).all())


@torch.library.custom_op(
    "sgsd::linear_divergence_backward", mutates_args=(), schema=_BACKWARD_SCHEMA
)
def linear_divergence_backward_op(grad, student_hidden, weight, bias, teacher, mask, saved, beta,
                                  temperature, clip, top_k, softcap, need_weight_grad,
                                  backend):  # fmt: skip
    """``teacher`` = [teacher_hidden, teacher_weight] (+ [teacher_bias]); ``saved`` = the
    forward's [stats, dh_unit, dW_unit, db_unit] -> (grad student_hidden [N, H], grad
    weight [V, H] (or [0]), grad bias [V] (or [0])) in the inputs' dtypes."""
    dtype = common.compute_dtype(student_hidden)
    stats, dh_unit, dw_unit, db_unit = saved
    idx = _rows(mask)
    g = grad if idx is None else grad.index_select(0, idx)
    gh = gw = gb = None
    if dh_unit.numel():  # exact for any upstream gradient; masked rows stay 0 (even if NaN)
        gh = torch.where(mask[:, None], grad[:, None].to(dtype) * dh_unit, 0.0)
    if need_weight_grad and dw_unit.numel() and _row_constant(g):
        c = g[0].to(dtype) if g.numel() else 0.0
        gw, gb = dw_unit * c, (db_unit * c if bias is not None else None)
    elif (need_weight_grad or gh is None) and (idx is None or idx.numel()):
        hs, ht, st = student_hidden, teacher[0], stats
        if idx is not None:
            hs, ht, st = hs.index_select(0, idx), ht.index_select(0, idx), st.index_select(1, idx)
        args = (g, hs, weight, bias, ht, teacher[1], teacher[2] if len(teacher) > 2 else None)
        args += (st[0], st[1], st[2], beta, temperature, clip, top_k, dtype, need_weight_grad)
        kernels = common.backend_module(backend, _OP)
        if gh is None:
            dh, gw, gb = kernels.backward(*args, softcap=softcap)
            gh = _scatter(dh, idx, student_hidden.shape[0])
        else:  # only the torch kernels make dh_unit, and only they skip dh
            _, gw, gb = kernels.backward(*args, need_hidden_grad=False, softcap=softcap)
    return head_grads.outputs(gh, gw, gb, student_hidden, weight, bias, need_weight_grad)


@linear_divergence_backward_op.register_fake
def _(grad, student_hidden, weight, bias, teacher, mask, saved, beta, temperature, clip, top_k,
      softcap, need_weight_grad, backend):  # fmt: skip
    return head_grads.fake_outputs(student_hidden, weight, bias, need_weight_grad)


def _setup_context(ctx, inputs, output):
    (hs, w, b, ht, tw, tb, mask, beta, temperature, clip, top_k, softcap, _, _, backend) = inputs
    ctx.save_for_backward(hs, w, b, ht, tw, tb, mask, *output[1:])
    # The outputs besides the one differentiated get no gradient: with materialisation on,
    # autograd would allocate zeros for each (a V×H one for dW_unit) in the backward.
    ctx.set_materialize_grads(False)
    ctx.hypers = (beta, temperature, clip, top_k, softcap)
    ctx.backend = backend
    ctx.has_bias = b is not None


def _backward(ctx, grad, *_grad_saved):
    hs, w, b, ht, tw, tb, mask, *saved = ctx.saved_tensors
    if grad is None:
        grad = torch.zeros_like(saved[0][0])
    teacher = [ht, tw] if tb is None else [ht, tw, tb]
    grads = linear_divergence_backward_op(
        grad.contiguous(), hs, w, b, teacher, mask, saved, *ctx.hypers,
        head_grads.need_weight_grad(ctx), ctx.backend,
    )  # fmt: skip
    return head_grads.for_inputs(ctx, grads, 15)


torch.library.register_autograd("sgsd::linear_divergence", _backward, setup_context=_setup_context)


def _speculates(backend: str, vocab: int, beta: float, softcap: float | None) -> bool:
    if not SPECULATE or backend == "triton":  # the Triton kernels have no unit-gradient pass
        return False
    from sgsd_kernels.ops.torch_backend.linear_divergence import single_block

    return single_block(vocab, beta, softcap=softcap)


def linear_divergence_op(
    student_hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, mask, beta,
    temperature, clip, top_k, backend, softcap=None,
):  # fmt: skip
    """(D [N], row statistics [3, N]) from :func:`_divergence`, asking for the unit-gradient
    terms of the inputs that will get a gradient (see the module docstring). ``softcap``
    caps both heads' raw logits (``LinearInputs``)."""
    unit_h = unit_w = False
    if torch.is_grad_enabled() and _speculates(backend, weight.shape[0], beta, softcap):
        unit_h = student_hidden.requires_grad
        unit_w = weight.requires_grad or (bias is not None and bias.requires_grad)
    d, stats, *_ = _divergence(
        student_hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, mask, beta,
        temperature, clip, top_k, softcap, unit_h, unit_w, backend,
    )  # fmt: skip
    return d, stats
