"""The Triton β-JSD against the float64 oracle where the mixture is hard: logits spread
over hundreds of nats, so p_S and p_T underflow (in fp32 and in fp64) on most of the
vocabulary and the two distributions barely overlap. The kernels compute log M from the
two log-masses (docs/design.md §3.1); the direct form log((1 − β)p_S + β p_T) would give
log 0 there. Runs under the Triton interpreter on CPU (tests/kernels/conftest.py)."""

from __future__ import annotations

import pytest
import torch

import sgsd_kernels as sk

from .conftest import DEVICE, REL_ATOL, assert_close_to_oracle


def _case(dtype, N=3, H=16, V=97, scale=40.0):
    g = torch.Generator().manual_seed(7)
    hs = torch.randn(N, H, generator=g, dtype=torch.float64) * scale / H**0.5
    ht = torch.randn(N, H, generator=g, dtype=torch.float64) * scale / H**0.5
    w = torch.randn(V, H, generator=g, dtype=torch.float64)
    return [x.to(dtype).to(DEVICE) for x in (hs, w, ht)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_beta_jsd_with_disjoint_distributions(dtype, beta, clip):
    hs, w, ht = _case(dtype)
    zs = (hs.double() @ w.double().T).softmax(-1)
    assert (zs < 1e-38).float().mean() > 0.5, "the case must underflow p_S on most of V"
    kw = dict(beta=beta, temperature=1.0, elementwise_clip=clip)

    def run(backend, h, weight, teacher):
        leaf = h.detach().clone().requires_grad_(True)
        d = sk.linear_divergence(leaf, weight, teacher, backend=backend, **kw)
        scale = torch.arange(1.0, 4.0, device=d.device)
        (grad,) = torch.autograd.grad((d.double() * scale).sum(), leaf)
        return d.detach(), grad

    oracle = run("reference", hs.double(), w.double(), ht.double())
    eager = run("reference", hs, w, ht)
    got = run("triton", hs, w, ht)
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    assert (got[0] > 0).all()  # the two distributions differ: D > 0
    for name, g_, e_, o_ in zip(("D", "d_hidden"), got, eager, oracle, strict=True):
        assert_close_to_oracle(name, g_, e_, o_, rel_atol=REL_ATOL[dtype])
