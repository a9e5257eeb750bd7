"""The unit-gradient forward of ``linear_divergence`` (ops/linear_divergence.py; docs/design.md
§6): with the whole vocabulary in one block the torch/native forward also returns the
gradients of Σ_n D_n, and the backward scales them. Gradients must equal the float64
oracle for every upstream gradient: row-constant (scaled), row-varying (dW recomputed),
zero, and NaN on masked rows (those rows are never read)."""

from __future__ import annotations

import pytest
import torch

import sgsd_kernels as sk
from sgsd_kernels.ops import linear_divergence as op
from sgsd_kernels.ops.torch_backend import linear_divergence as torch_kernels

from .conftest import REL_ATOL, assert_close_to_oracle
from .test_divergence_oracle import make_case, three_ways

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# (beta, clip, top_k, separate teacher head, bias, temperature, mask)
CONFIGS = [
    (0.0, 0.05, None, False, True, 1.1, True),
    (0.5, None, 7, True, True, 1.0, False),
    (1.0, 0.05, None, True, False, 0.9, True),
    (0.0, None, 1, False, False, 1.0, True),
]
UPSTREAM = ["constant", "rows", "zero", "nan_on_masked"]


def _upstream(kind, mask, N):
    g = torch.Generator().manual_seed(11)
    if kind == "rows":
        return torch.randn(N, dtype=torch.float64, generator=g)
    c = torch.full((N,), 0.0 if kind == "zero" else -0.37, dtype=torch.float64)
    if kind == "nan_on_masked" and mask is not None:
        c[~mask] = float("nan")
    return c


def _grads(d, leaves, upstream):
    req = [x for x in leaves if x is not None]
    return torch.autograd.grad(d, req, grad_outputs=upstream.to(d.dtype))


@pytest.mark.parametrize("speculate", [True, False], ids=["unit", "recompute"])
@pytest.mark.parametrize("upstream", UPSTREAM)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 61, 1007), (37, 61, 1007)], ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_gradients_match_oracle(config, shape, dtype, upstream, speculate, monkeypatch):
    monkeypatch.setattr(op, "SPECULATE", speculate)
    beta, clip, top_k, sep, with_bias, temperature, with_mask = config
    N, H, V = shape
    assert torch_kernels.single_block(V, beta)  # the unit-gradient path runs
    case = make_case(N, H, V, dtype, sep, with_bias, with_mask)
    kw = dict(beta=beta, temperature=temperature, elementwise_clip=clip, teacher_top_k=top_k)
    up = _upstream(upstream, case[-1], N)
    (oracle, o), (eager, e), (got, gl) = three_ways(case, kw, "torch")
    for name, g_, e_, o_ in zip(
        ("d_hidden", "d_weight", "d_bias"),
        _grads(got, gl, up),
        _grads(eager, e, up),
        _grads(oracle, o, up),
    ):
        assert g_.dtype == dtype
        assert torch.isfinite(g_).all(), name
        assert_close_to_oracle(name, g_, e_, o_, rel_atol=REL_ATOL[dtype])


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_unit_terms_are_the_gradients_of_the_sum(beta, dtype):
    """dh_unit[n] = ∂D_n/∂h_n and dW_unit, db_unit = ∂(Σ_n D_n)/∂(W, b), rows masked out
    giving 0, straight from the op."""
    N, H, V = 9, 13, 301
    hs, w, ht, _, b, _, mask = make_case(N, H, V, dtype, False, True, True, seed=4)
    hs, w, b = (x.requires_grad_() for x in (hs.clone(), w.clone(), b.clone()))
    want = torch.autograd.grad(
        sk.linear_divergence(
            hs.double(), w.double(), ht.double(), bias=b.double(), beta=beta, temperature=1.2,
            elementwise_clip=0.05, mask=mask, backend="reference",
        ).sum(),
        (hs, w, b),
    )  # fmt: skip
    args = (
        hs,
        w,
        b,
        ht,
        w.detach(),
        b.detach(),
        mask,
        beta,
        1.2,
        0.05,
        None,
        None,
    )  # no top-k, cap
    with torch.no_grad():
        _, _, dh, dw, db = op._divergence(*args, True, True, "torch")
        _, _, dh_only, dw_none, db_none = op._divergence(*args, True, False, "torch")
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    for got, ref in zip((dh, dw, db), want):
        torch.testing.assert_close(got, ref.to(got.dtype), **tol)
    assert (dh[~mask] == 0).all()
    torch.testing.assert_close(dh_only, dh, rtol=0, atol=0)
    assert dw_none.numel() == 0 and db_none.numel() == 0


def test_unit_grads_need_one_vocabulary_block():
    h = torch.randn(3, 8)
    w = torch.randn(100, 8)
    with pytest.raises(ValueError, match="forward_with_unit_grads needs the vocabulary in one"):
        torch_kernels.forward_with_unit_grads(
            h, w, None, h, w, None, 0.0, 1.0, None, None, torch.float32, True, True, workspace=64
        )
