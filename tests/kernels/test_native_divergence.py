"""The native fused divergence kernel (``csrc/divergence.cpp``, docs/design.md §3.1 and §5):
the op on ``backend="native"`` against the float64 oracle for values and gradients (the
unit-gradient forward and the recompute backward), odd shapes, every β, clip on/off, top-k
in {1, 7, V}, masks, several row chunks and a ragged row group; the kernel itself against
a per-element formulation; bitwise determinism at 1 and 2 threads; the fallback to the
torch backend when the vocabulary does not fit one block; peak memory (slow); and the
kernel's messages.
"""

from __future__ import annotations

import pytest
import torch

import sgsd_kernels as sk
from sgsd_kernels import native
from sgsd_kernels.ops import linear_divergence as op_module
from sgsd_kernels.ops.native_backend import linear_divergence as native_kernels
from sgsd_kernels.ops.torch_backend import linear_divergence as torch_kernels

from .conftest import REL_ATOL, assert_close_to_oracle
from .test_divergence_oracle import _grads, _leaf, make_case, three_ways

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
BETAS = [0.0, 0.5, 1.0]
CLIPS = [None, 0.05]
TOP_KS = [None, 1, 7, "V"]


pytestmark = pytest.mark.usefixtures("native_built")


@pytest.fixture
def twenty_row_chunks(monkeypatch):
    """A workspace of 20 rows at V = 1007, whole vocabulary in one block: the native
    backend rounds chunks to its 16-row groups, so N = 37 runs as 16 + 16 + 5 rows (the
    last a ragged group, at an offset that is not a multiple of 16 floats)."""
    monkeypatch.setattr(torch_kernels, "WORKSPACE_ELEMENTS", 2 * 20 * 1007)
    monkeypatch.setattr(torch_kernels, "UNIT_WORKSPACE_ELEMENTS", 2 * 20 * 1007)


@pytest.fixture
def no_blockwise(monkeypatch):
    """Fail if the torch backend's blockwise functions run (the fused path must)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the native backend fell back to the blockwise torch kernels")

    for name in ("forward", "forward_with_unit_grads", "backward"):
        monkeypatch.setattr(torch_kernels, name, refuse)


def _check(dtype, shape, beta, clip, top_k, sep, with_bias, with_mask, temperature, speculate,
           monkeypatch):  # fmt: skip
    monkeypatch.setattr(op_module, "SPECULATE", speculate)
    N, H, V = shape
    top_k = V if top_k == "V" else top_k
    case = make_case(N, H, V, dtype, sep, with_bias, with_mask)
    mask = case[-1]
    kw = dict(beta=beta, temperature=temperature, elementwise_clip=clip, teacher_top_k=top_k)
    (oracle, o), (eager, e), (got, gl) = three_ways(case, kw, "native")
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.shape == (N,)
    assert_close_to_oracle("D", got, eager, oracle, rel_atol=REL_ATOL[dtype])
    # A unit upstream gradient (the unit-gradient forward's dW) and a row-varying one
    # (recomputed dW, and with SPECULATE off the whole recompute backward).
    for weighting in ("sum", "random"):
        if weighting == "sum":
            reduce = lambda d, leaves: torch.autograd.grad(  # noqa: E731
                d.double().sum(), [x for x in leaves if x is not None], retain_graph=True
            )
        else:
            reduce = lambda d, leaves: _grads(d, leaves)  # noqa: E731
        names = ("d_hidden", "d_weight", "d_bias")
        for name, g_, e_, o_ in zip(names, reduce(got, gl), reduce(eager, e), reduce(oracle, o)):
            assert g_.dtype == dtype
            assert_close_to_oracle(f"{weighting} {name}", g_, e_, o_, rel_atol=REL_ATOL[dtype])
    if mask is not None and not bool(mask.all()):
        assert (got[~mask] == 0).all()


@pytest.mark.parametrize("top_k", TOP_KS, ids=str)
@pytest.mark.parametrize("clip", CLIPS, ids=str)
@pytest.mark.parametrize("beta", BETAS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_divergence_matches_oracle(
    dtype, beta, clip, top_k, twenty_row_chunks, no_blockwise, monkeypatch
):
    """N = 37 in chunks of 20 rows (ragged row groups), shared head with bias, masked rows."""
    for speculate in (True, False):
        _check(dtype, (37, 61, 1007), beta, clip, top_k, False, True, True, 1.1, speculate,
               monkeypatch)  # fmt: skip


@pytest.mark.parametrize(
    "shape,beta,clip,top_k,sep,with_bias,temperature",
    [
        ((1, 61, 1007), 0.0, 0.05, None, False, False, 1.0),
        ((1, 61, 1007), 0.5, None, 7, True, True, 0.8),
        ((5, 3, 1), 1.0, None, None, True, False, 1.3),  # V = 1: D = 0
        ((5, 3, 1), 0.5, 0.05, 1, False, True, 1.0),
        ((17, 9, 2), 0.3, 0.05, "V", True, True, 1.1),
        ((33, 13, 129), 1.0, 0.02, 1, False, True, 0.7),
        ((16, 70, 300), 0.0, None, 7, True, False, 1.1),
        ((150, 17, 300), 0.5, 0.05, None, False, True, 1.1),  # one chunk, padded to 160 rows
        ((150, 17, 300), 0.0, None, 7, True, True, 1.0),
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_native_divergence_odd_shapes(
    dtype, shape, beta, clip, top_k, sep, with_bias, temperature, no_blockwise, monkeypatch
):
    for speculate in (True, False):
        _check(dtype, shape, beta, clip, top_k, sep, with_bias, shape[0] > 1, temperature,
               speculate, monkeypatch)  # fmt: skip


@pytest.mark.parametrize("sep", [False, True], ids=["shared", "sep"])
@pytest.mark.parametrize("beta", [0.0, 0.5], ids=str)
def test_native_divergence_padded_tail_chunk(beta, sep, no_blockwise, monkeypatch):
    """Chunks of 80 rows: N = 230 runs as 80 + 80 + 70, the last padded to 80 rows."""
    monkeypatch.setattr(torch_kernels, "WORKSPACE_ELEMENTS", 2 * 80 * 211)
    monkeypatch.setattr(torch_kernels, "UNIT_WORKSPACE_ELEMENTS", 2 * 80 * 211)
    assert native_kernels._rows(230, 211, None) == 80
    for speculate in (True, False):
        _check(torch.float32, (230, 19, 211), beta, 0.05, 7, sep, True, False, 1.1, speculate,
               monkeypatch)  # fmt: skip


def _logits(V, r, dtype, fused, seed=0):
    """Vocabulary-major [V, r] student and teacher logits (two halves of one [V, 2r] buffer
    when ``fused``, as the shared-head GEMM writes them)."""
    g = torch.Generator().manual_seed(seed)
    both = torch.randn(V, 2 * r, generator=g, dtype=torch.float64).mul_(2.0).to(dtype)
    if fused:
        return both[:, :r], both[:, r:]
    return both[:, :r].contiguous(), both[:, r:].contiguous()


def _per_element(zs, zt, beta, clip, top):
    """docs/design.md §3.1 on [r, V] logits in float64 with autograd: (D, Σ_v ∂D/∂a_v with
    a = log p_S taken as free, ∂D/∂z_S, lse_S, lse_T). With ``top`` only those columns
    count (gathered, so no −inf reaches autograd); the others get a zero gradient."""
    zs_full = zs.double().clone().requires_grad_(True)
    zs_k, zt_k = zs_full, zt.double()
    if top is not None:
        zs_k, zt_k = zs_k.gather(1, top), zt_k.gather(1, top)
    lse_s, lse_t = zs_k.logsumexp(-1), zt_k.logsumexp(-1)
    a_free = (zs_k - lse_s[:, None]).detach().requires_grad_(True)

    def divergence(a):
        c = zt_k - lse_t[:, None]
        ps, pt = a.exp(), c.exp()
        if beta == 0.0:
            d = pt * (c - a)
        elif beta == 1.0:
            d = ps * (a - c)
        else:
            m = (beta * pt + (1 - beta) * ps).log()
            d = beta * pt * (c - m) + (1 - beta) * ps * (a - m)
        if clip is not None:
            d = torch.where(d > clip, torch.full_like(d, clip), d)
        return d.sum(-1)

    (e,) = torch.autograd.grad(divergence(a_free).sum(), a_free)
    D = divergence(zs_k.log_softmax(-1))
    (gz,) = torch.autograd.grad(D.sum(), zs_full)
    return D.detach(), e.sum(-1), gz, lse_s.detach(), lse_t


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "separate"])
@pytest.mark.parametrize("top_k", TOP_KS, ids=str)
@pytest.mark.parametrize("clip", CLIPS, ids=str)
@pytest.mark.parametrize("beta", BETAS + [0.25], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_kernel_matches_per_element_formula(dtype, beta, clip, top_k, fused):
    V, r = 1007, 37
    zs, zt = _logits(V, r, dtype, fused)
    k = V if top_k == "V" else top_k
    top = None if k is None else zt.T.topk(k, dim=-1).indices.contiguous()
    want_d, want_se, want_gz, want_lse_s, want_lse_t = _per_element(zs.T, zt.T, beta, clip, top)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-6)

    out = native.ops().divergence_forward(zs.clone(), zt.clone(), top, beta, clip, False)
    assert out.shape == (4, r) and out.dtype == dtype
    for got, want in zip(out, (want_d, want_se, want_lse_s, want_lse_t)):
        torch.testing.assert_close(got.double(), want, **tol)

    gs, gt = zs.clone(), zt.clone()
    out_u = native.ops().divergence_forward(gs, gt, top, beta, clip, True)
    torch.testing.assert_close(out_u, out, **tol)  # the write-back leaves the statistics
    torch.testing.assert_close(gs.T.double(), want_gz, **tol)

    # The recompute backward's one-sweep gradient from the saved statistics.
    gb = zs.clone()
    native.ops().divergence_grad(gb, zt.clone(), top, out[2], out[3], out[1], beta, clip)
    torch.testing.assert_close(gb.T.double(), want_gz, **tol)


@pytest.mark.parametrize("beta", BETAS, ids=str)
@pytest.mark.parametrize("top_k", [None, 7], ids=str)
def test_kernel_bitwise_identical_at_one_and_two_threads(beta, top_k):
    V, r = 3001, 45  # two full row groups and a ragged one
    zs, zt = _logits(V, r, torch.float32, True, seed=4)
    top = None if top_k is None else zt.T.topk(top_k, dim=-1).indices.contiguous()
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            s, t = zs.clone(), zt.clone()
            out = native.ops().divergence_forward(s, t, top, beta, 0.05, True)
            g = zs.clone()
            native.ops().divergence_grad(g, zt, top, out[2], out[3], out[1], beta, 0.05)
            results.append((out, s, t, g))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        for x, y in zip(results[0], other):
            assert torch.equal(x, y)


def test_op_bitwise_reproducible():
    hs, w, ht, tw, b, tb, mask = make_case(50, 40, 700, torch.float32, False, True, True)
    runs = []
    for _ in range(2):
        leaves = [_leaf(x) for x in (hs, w, b)]
        d = sk.linear_divergence(
            leaves[0], leaves[1], ht, bias=leaves[2], mask=mask, beta=0.5, temperature=1.1,
            elementwise_clip=0.05, teacher_top_k=7, backend="native",
        )  # fmt: skip
        runs.append((d, *torch.autograd.grad(d.sum(), leaves)))
    for x, y in zip(*runs):
        assert torch.equal(x, y)


@pytest.mark.parametrize("beta", [0.0, 0.5], ids=str)
def test_falls_back_to_blockwise_when_vocabulary_needs_several_blocks(beta, monkeypatch):
    """A workspace too small for one whole-vocabulary block: the torch backend's two-pass
    functions run, with the same results as backend="torch"."""
    monkeypatch.setattr(torch_kernels, "WORKSPACE_ELEMENTS", 4096)
    monkeypatch.setattr(torch_kernels, "UNIT_WORKSPACE_ELEMENTS", 4096)
    assert native_kernels._rows(37, 1007, None) is None
    hs, w, ht, tw, b, tb, mask = make_case(37, 61, 1007, torch.float64, True, True, True)
    res = {}
    for backend in ("torch", "native"):
        leaves = [_leaf(x) for x in (hs, w, b)]
        d = sk.linear_divergence(
            leaves[0], leaves[1], ht, teacher_weight=tw, bias=leaves[2], teacher_bias=tb,
            mask=mask, beta=beta, temperature=1.1, elementwise_clip=0.05, teacher_top_k=7,
            backend=backend,
        )  # fmt: skip
        res[backend] = (d, *_grads(d, leaves))
    for x, y in zip(res["torch"], res["native"]):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_native_path_allocates_nothing_proportional_to_n_times_v():
    """Peak memory in a fresh subprocess, as for the torch path in test_divergence_memory."""
    from .test_divergence_memory import flat_peaks

    flat_peaks("divergence", "native", 1 / 2)


def _bad(zs, zt, top=None, beta=0.0, clip=None):
    return native.ops().divergence_forward(zs, zt, top, beta, clip, False)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda z: _bad(z[0].T, z[1].T.contiguous()), "vocabulary-major"),
        (lambda z: _bad(z[0], z[1][:, :5]), r"must both be \[V, r\]"),
        (lambda z: _bad(z[0].contiguous()[0], z[1].contiguous()[0]), r"must both be \[V, r\]"),
        (lambda z: _bad(z[0].half(), z[1].half()), "float32 or both float64"),
        (lambda z: _bad(z[0], z[1].double()), "float32 or both float64"),
        (lambda z: _bad(z[0], z[1], beta=1.5), r"beta must be in \[0, 1\]"),
        (lambda z: _bad(z[0], z[1], beta=-0.1), r"beta must be in \[0, 1\]"),
        (lambda z: _bad(z[0], z[1], clip=0.0), "clip must be > 0"),
        (lambda z: _bad(z[0], z[1], top=torch.zeros(6, 2, dtype=torch.long)), r"\[r, k\]"),
        (lambda z: _bad(z[0], z[1], top=torch.zeros(8, 2, dtype=torch.int32)), r"\[r, k\]"),
        (lambda z: _bad(z[0], z[1], top=torch.zeros(8, 12, dtype=torch.long)), "1 <= k <= V"),
        (
            lambda z: _bad(z[0], z[1], top=torch.full((8, 2), 11, dtype=torch.long)),
            r"top-k index 11 outside \[0, 11\)",
        ),  # fmt: skip
        (
            lambda z: native.ops().divergence_grad(
                z[0], z[1], None, torch.zeros(8), torch.zeros(8), torch.zeros(7), 0.0, None
            ),
            r"sum_e must be \[r\]",
        ),  # fmt: skip
        (
            lambda z: native.ops().divergence_grad(
                z[0], z[1], None, torch.zeros(8).double(), torch.zeros(8), torch.zeros(8), 0.0, None
            ),
            r"in the logits' dtype",
        ),  # fmt: skip
    ],
)
def test_kernel_rejects_bad_input(make, message):
    z = _logits(11, 8, torch.float32, True)
    with pytest.raises(RuntimeError, match=message):
        make(z)
