"""``torch.compile`` over ``linear_divergence`` and the local-support loss (the ``torch``
backend): compiled results and gradients equal eager ones, without graph breaks, and the
custom ops pass ``torch.library.opcheck``."""

from __future__ import annotations

import pytest
import torch

import sgsd_kernels as sk
from sgsd_kernels.ops.linear_divergence import _divergence
from sgsd_kernels.ops.local_support import local_support_op

N, H, V, B, K, T = 6, 12, 57, 2, 2, 3


def _divergence_rows(hs, w, b, ht, mask):
    """Row-varying upstream gradient: the backward recomputes dW."""
    d = sk.linear_divergence(
        hs, w, ht, bias=b, beta=0.5, temperature=1.1, elementwise_clip=0.05, teacher_top_k=7,
        mask=mask, backend="torch",
    )  # fmt: skip
    return d, (d * torch.arange(1, N + 1, dtype=d.dtype)).sum()


def _divergence_mean(hs, w, b, ht, mask):
    """OPSD's Σ m D / Σ m: the same upstream gradient on every valid row, so dW comes from
    the forward's unit-gradient terms."""
    d = sk.linear_divergence(
        hs, w, ht, bias=b, beta=0.0, temperature=1.1, elementwise_clip=0.05, mask=mask,
        backend="torch",
    )  # fmt: skip
    return d, d.sum() / mask.sum()


def _local(hs, w, b, th, targets, mask, rewards, tw):
    out = sk.linear_gated_kd_loss(
        hs, w, targets, mask, rewards, tw, teacher_hidden=th, bias=b, local_support_top_k=5,
        confidence_threshold=0.0, backend="torch",
    )  # fmt: skip
    return out.support, out.loss


def _case(name, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, H, generator=g) * 0.5
    b = torch.randn(V, generator=g)
    if name.startswith("divergence"):
        mask = torch.rand(N, generator=g) > 0.3
        mask[0] = True
        args = (torch.randn(N, H, generator=g), w, b, torch.randn(N, H, generator=g), mask)
        fn = _divergence_mean if name == "divergence_mean" else _divergence_rows
        return fn, args, (0, 1, 2)
    hs = torch.randn(B, T, H, generator=g)
    th = hs.unsqueeze(1) + 0.5 * torch.randn(B, K, T, H, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    args = (hs, w, b, th, targets, mask, torch.tensor([1.0, -1.0]), torch.rand(B, K, generator=g))
    return _local, args, (0, 1, 2)


def _run(fn, args, grad_idx):
    args = [a.detach().clone().requires_grad_(i in grad_idx) for i, a in enumerate(args)]
    outs = fn(*args)
    outs[-1].backward()
    return [o.detach() for o in outs], [args[i].grad for i in grad_idx]


@pytest.mark.parametrize("fullgraph", [False, True])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("name", ["divergence", "divergence_mean", "local_support"])
def test_compiled_matches_eager(name, backend, fullgraph):
    fn, args, grad_idx = _case(name)
    compiled = torch.compile(fn, backend=backend, fullgraph=fullgraph)
    for seed in (0, 1):
        fn, args, grad_idx = _case(name, seed)
        want_out, want_grad = _run(fn, args, grad_idx)
        got_out, got_grad = _run(compiled, args, grad_idx)
        for got, want in zip(got_out, want_out):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for got, want in zip(got_grad, want_grad):
            assert got is not None
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_opcheck_linear_divergence():
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(N, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    b = torch.randn(V, generator=g, requires_grad=True)
    ht, tw = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    mask = torch.tensor([True, False, True, True, True, False])
    # (beta, temperature, clip, top_k, softcap)
    for hypers in [(0.0, 1.1, 0.05, None, None), (0.5, 1.0, None, 7, 2.5), (1.0, 0.9, 0.1, 3, 4.0)]:
        for units in [(False, False), (True, True), (True, False)]:
            torch.library.opcheck(
                _divergence, (hs, w, b, ht, tw, None, mask, *hypers, *units, "torch")
            )


def test_opcheck_local_support():
    g = torch.Generator().manual_seed(0)
    M = B * K * T
    hs = torch.randn(B * T, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    b = torch.randn(V, generator=g, requires_grad=True)
    ht = torch.randn(M, H, generator=g)
    student_row = torch.arange(M) % (B * T)
    targets = torch.randint(0, V, (M,), generator=g)
    valid = torch.rand(M, generator=g) > 0.3
    torch.library.opcheck(
        local_support_op, (hs, w, b, ht, student_row, targets, valid, 5, 1.1, "torch")
    )
