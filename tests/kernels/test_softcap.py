"""``softcap`` and ``logit_scale`` (docs/design.md §3.3) of ``linear_logprobs``,
``linear_gated_kd_loss`` and ``linear_divergence`` on every backend against the float64
oracle: values and gradients w.r.t. hidden states, weight and bias, under the §8 tolerance
rule (bf16 against PyTorch's own bf16 error, as in test_oracle.py).

The oracle is the reference, which applies the scale and the cap literally to the logits;
the other backends fold the scale into the cap and the temperature and run their own
kernels, so agreement also checks the folding. The reference itself is checked against the
Gemma-style one-liner written out here.
"""

from __future__ import annotations

import pytest
import torch

import sgsd_kernels as sk
from sgsd_kernels import reference as ref

from .conftest import BACKENDS, DEVICE, REL_ATOL, assert_close_to_oracle, max_err
from .test_divergence_oracle import make_case, oracle_divergence

# (softcap, logit_scale, temperature): the cap alone, the scale alone, both with T != 1.
# The raw logits have a spread of ~2-3 here, so the caps act well inside tanh's bend.
HEADS = [(5.0, None, 1.0), (None, 0.5, 0.7), (3.0, 2.0, 1.3)]
HEAD_IDS = ["cap5", "scale0.5-T0.7", "cap3-scale2-T1.3"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def _shape(backend, N):
    """(N, H, V) with odd H and V: several vocabulary blocks and row chunks of the torch
    backend (small workspace) and several Triton vocabulary tiles; the Triton interpreter
    gets a narrower H."""
    return (N, 61, 601) if backend != "triton" else (N, 33, 301)


def _leaf(x, dtype=None):
    if x is None:
        return None
    return (x.detach() if dtype is None else x.detach().to(dtype)).clone().requires_grad_(True)


def _capped(z, softcap, logit_scale, temperature):
    """The public map on float logits, written out: z·a, then c·tanh(z/c), then z/T."""
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def test_reference_is_the_gemma_one_liner():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(4, 6, 9, dtype=torch.float64, generator=g)
    w = torch.randn(50, 9, dtype=torch.float64, generator=g) * 2
    b = torch.randn(50, dtype=torch.float64, generator=g)
    t = torch.randint(0, 50, (4, 6), generator=g)
    z = _capped(h @ w.T + b, 4.0, 1.5, 0.8)
    want = torch.log_softmax(z, -1).gather(-1, t[..., None]).squeeze(-1)
    got = sk.linear_logprobs(
        h, w, t, bias=b, softcap=4.0, logit_scale=1.5, temperature=0.8, backend="reference"
    )
    assert max_err(got, want) < 1e-13
    # The cap bites: without it the answer differs.
    plain = sk.linear_logprobs(h, w, t, bias=b, logit_scale=1.5, temperature=0.8)
    assert max_err(got, plain) > 1e-2


def _grads(out, leaves, entropy, seed=1):
    gen = torch.Generator().manual_seed(seed)
    lp = out[0] if entropy else out
    loss = (lp.double() * torch.randn(lp.shape, generator=gen, dtype=torch.float64)).sum()
    if entropy:
        loss = loss + (out[1].double() * torch.randn(lp.shape, generator=gen).double()).sum()
    return torch.autograd.grad(loss, [x for x in leaves if x is not None])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype,N",
    [(torch.float64, 37), (torch.float32, 1), (torch.float32, 37), (torch.bfloat16, 37)],
    ids=lambda x: str(x).replace("torch.", ""),
)
@pytest.mark.parametrize("head", HEADS, ids=HEAD_IDS)
def test_linear_logprobs_matches_oracle(backend, dtype, N, head, small_workspace):
    softcap, logit_scale, temperature = head
    entropy = logit_scale is not None  # both backward paths (with and without entropy)
    N, H, V = _shape(backend, N)
    g = torch.Generator().manual_seed(0)
    cast = lambda x: x.to(dtype).to(DEVICE)  # noqa: E731
    h = cast(torch.randn(N, H, dtype=torch.float64, generator=g) * 0.7)
    w = cast(torch.randn(V, H, dtype=torch.float64, generator=g) * 0.4)
    b = cast(torch.randn(V, dtype=torch.float64, generator=g))
    t = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    if N > 2:
        t[1] = -100
    kw = dict(
        softcap=softcap, logit_scale=logit_scale, temperature=temperature, return_entropy=entropy
    )

    oracle_leaves = [_leaf(x, torch.float64) for x in (h, w, b)]
    oh, ow, ob = oracle_leaves
    oracle = sk.linear_logprobs(oh, ow, t, bias=ob, **kw, backend="reference")
    eager_leaves = [_leaf(x) for x in (h, w, b)]
    eh, ew, eb = eager_leaves
    z = _capped((eh @ ew.T + eb).float(), softcap, logit_scale, temperature)
    eager = ref.logprobs_from_logits_ref(z, t, 1.0, -100, entropy)
    got_leaves = [_leaf(x) for x in (h, w, b)]
    gh, gw, gb = got_leaves
    got = sk.linear_logprobs(gh, gw, t, bias=gb, **kw, backend=backend)

    names = ("logprobs", "entropy") if entropy else ("logprobs",)
    triples = zip(got, eager, oracle) if entropy else [(got, eager, oracle)]
    for name, (x, y, o) in zip(names, triples):
        assert x.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_close_to_oracle(name, x, y, o, rel_atol=REL_ATOL[dtype])
    for name, x, y, o in zip(
        ("d_hidden", "d_weight", "d_bias"),
        _grads(got, got_leaves, entropy),
        _grads(eager, eager_leaves, entropy),
        _grads(oracle, oracle_leaves, entropy),
    ):
        assert x.dtype == dtype
        assert_close_to_oracle(name, x, y, o, rel_atol=REL_ATOL[dtype])
    if N > 2:
        assert got[0][1].item() == 0.0 if entropy else got[1].item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head", HEADS, ids=HEAD_IDS)
def test_linear_gated_kd_loss_matches_oracle(backend, dtype, head, small_workspace):
    """Student and teachers through one capped, scaled head (the streams op)."""
    softcap, logit_scale, temperature = head
    B, K, T, H, V = 2, 2, 5, 33, 301
    g = torch.Generator().manual_seed(0)
    cast = lambda x: x.to(dtype).to(DEVICE)  # noqa: E731
    sh = cast(torch.randn(B, T, H, dtype=torch.float64, generator=g) * 0.6)
    th = cast(torch.randn(B, K, T, H, dtype=torch.float64, generator=g) * 0.6)
    w = cast(torch.randn(V, H, dtype=torch.float64, generator=g) * 0.5)
    b = cast(torch.randn(V, dtype=torch.float64, generator=g))
    tg = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    tg[0, 3] = -100
    mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    mask[1, 0] = False
    r = torch.tensor([1.0, -1.0], device=DEVICE)
    tw = torch.tensor([[0.7, 0.3], [0.4, 0.6]], device=DEVICE)
    kw = dict(softcap=softcap, logit_scale=logit_scale, temperature=temperature)
    oracle_leaves = [_leaf(x, torch.float64) for x in (sh, w, b)]
    osh, ow, ob = oracle_leaves
    oracle = sk.linear_gated_kd_loss(
        osh, ow, tg, mask, r, tw.double(), teacher_hidden=th.double(), bias=ob, **kw,
        backend="reference",
    )  # fmt: skip
    got_leaves = [_leaf(x) for x in (sh, w, b)]
    gsh, gw, gb = got_leaves
    got = sk.linear_gated_kd_loss(
        gsh, gw, tg, mask, r, tw.to(dtype), teacher_hidden=th, bias=gb, **kw, backend=backend
    )
    rel = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    assert max_err(got.loss, oracle.loss) <= rel * max(1.0, abs(oracle.loss.item()))
    for name in ("student_logprobs", "teacher_logprobs"):
        want = getattr(oracle, name)
        assert max_err(getattr(got, name), want) <= rel * max(1.0, want.abs().max().item())
    for x, y in zip(
        torch.autograd.grad(got.loss, got_leaves), torch.autograd.grad(oracle.loss, oracle_leaves)
    ):
        assert x.dtype == dtype
        assert max_err(x, y) <= rel * max(1e-3, y.abs().max().item()) * 4
    # The cap and the scale reach the teachers too (the same head).
    plain = sk.linear_gated_kd_loss(
        osh, ow, tg, mask, r, tw.double(), teacher_hidden=th.double(), bias=ob,
        temperature=temperature, backend="reference",
    )  # fmt: skip
    assert max_err(plain.teacher_logprobs, oracle.teacher_logprobs) > 1e-3


def test_gated_local_support_takes_the_scale_as_a_temperature():
    """``local_support_top_k`` with ``logit_scale`` a equals the same loss at T/a."""
    B, K, T, H, V = 1, 2, 4, 9, 40
    g = torch.Generator().manual_seed(0)
    sh = torch.randn(B, T, H, dtype=torch.float64, generator=g, requires_grad=True)
    th = torch.randn(B, K, T, H, dtype=torch.float64, generator=g)
    w = torch.randn(V, H, dtype=torch.float64, generator=g)
    tg = torch.randint(0, V, (B, T), generator=g)
    args = (sh, w, tg, torch.ones(B, T, dtype=torch.bool), torch.ones(B), torch.full((B, K), 0.5))
    for backend in ("reference", "torch"):
        a = sk.linear_gated_kd_loss(
            *args, teacher_hidden=th, local_support_top_k=5, logit_scale=2.0, temperature=1.2,
            backend=backend,
        )  # fmt: skip
        b = sk.linear_gated_kd_loss(
            *args, teacher_hidden=th, local_support_top_k=5, temperature=0.6, backend=backend
        )
        assert max_err(a.loss, b.loss) < 1e-12


# (beta, clip, top_k, separate teacher head, bias, head, upstream gradient): every β, the
# clip, the top-k (on capped logits), both head layouts; a row-constant upstream gradient
# takes the unit-gradient forward of the torch and native backends.
DIV_CONFIGS = [
    (0.0, 0.05, None, False, True, HEADS[0], "sum"),
    (0.5, None, 7, True, True, HEADS[2], "random"),
    (1.0, None, None, True, False, HEADS[1], "random"),
    (0.3, 0.05, None, False, True, HEADS[2], "random"),
]


def _div_ids(c):
    beta, clip, k, sep, bias, head, upstream = c
    layout = "sep" if sep else "shared"
    return f"b{beta}-c{clip}-k{k}-{layout}-{HEAD_IDS[HEADS.index(head)]}-{upstream}"


def _small_div_workspace(monkeypatch, backend):
    """Several row chunks and vocabulary blocks, as in test_divergence_oracle.py, for the
    torch and Triton kernels. The native backend keeps its default budget, so that its
    fused path (the cap in ATen passes around the C++ element-wise kernel) runs rather
    than the torch kernels it falls back to when the vocabulary does not fit."""
    from sgsd_kernels.ops.torch_backend import linear_divergence
    from sgsd_kernels.ops.triton_backend import linear_divergence as triton_kernels

    if backend != "native":
        monkeypatch.setattr(linear_divergence, "WORKSPACE_ELEMENTS", 4096)
    else:  # the fused path must run, not the blockwise torch kernels

        def refuse(*args, **kwargs):
            raise AssertionError("the native backend fell back to the torch kernels")

        for name in ("forward", "forward_with_unit_grads", "backward"):
            monkeypatch.setattr(linear_divergence, name, refuse)
    monkeypatch.setattr(triton_kernels, "WORKSPACE_ELEMENTS", 20 * 1007)


def _div_eager(hs, w, ht, tw, b, tb, mask, kw):
    """PyTorch in the input dtype: the logits GEMMs in that dtype, then the float32
    reference on those logits (an identity head), cap and scale included."""
    tw_, tb_ = (w, b) if tw is None else (tw, tb)
    zs = hs @ w.T + (0 if b is None else b)
    zt = (ht @ tw_.detach().T + (0 if tb_ is None else tb_.detach())).detach()
    eye = torch.eye(zs.shape[-1], dtype=torch.float32, device=zs.device)
    return sk.linear_divergence(zs.float(), eye, zt.float(), mask=mask, backend="reference", **kw)


def _div_grads(d, leaves, upstream):
    c = torch.randn(d.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    c = torch.ones_like(c) if upstream == "sum" else c
    return torch.autograd.grad(
        (d.double() * c.to(d.device)).sum(), [x for x in leaves if x is not None]
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", DIV_CONFIGS, ids=_div_ids)
def test_linear_divergence_matches_oracle(backend, dtype, config, monkeypatch):
    _small_div_workspace(monkeypatch, backend)
    beta, clip, top_k, sep, with_bias, head, upstream = config
    softcap, logit_scale, temperature = head
    N, H, V = _shape(backend, 37 if backend != "triton" or dtype == torch.float32 else 1)
    case = make_case(N, H, V, dtype, sep, with_bias, True)
    hs, w, ht, tw, b, tb, mask = case
    kw = dict(
        beta=beta, temperature=temperature, elementwise_clip=clip, teacher_top_k=top_k,
        softcap=softcap, logit_scale=logit_scale,
    )  # fmt: skip
    oracle, oracle_leaves = oracle_divergence(hs, w, ht, tw, b, tb, mask, kw)
    eager_leaves = [_leaf(x) for x in (hs, w, b)]
    eager = _div_eager(eager_leaves[0], eager_leaves[1], ht, tw, eager_leaves[2], tb, mask, kw)
    got_leaves = [_leaf(x) for x in (hs, w, b)]
    got = sk.linear_divergence(
        got_leaves[0], got_leaves[1], ht, teacher_weight=tw, bias=got_leaves[2],
        teacher_bias=tb, mask=mask, backend=backend, **kw,
    )  # fmt: skip
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_to_oracle("D", got, eager, oracle, rel_atol=REL_ATOL[dtype])
    for name, x, y, o in zip(
        ("d_hidden", "d_weight", "d_bias"),
        _div_grads(got, got_leaves, upstream),
        _div_grads(eager, eager_leaves, upstream),
        _div_grads(oracle, oracle_leaves, upstream),
    ):
        assert x.dtype == dtype
        assert_close_to_oracle(name, x, y, o, rel_atol=REL_ATOL[dtype])


def test_divergence_reference_caps_before_the_top_k_and_the_temperature():
    """D by hand from the capped logits: the teacher's top-k is taken on them."""
    g = torch.Generator().manual_seed(5)
    hs, ht = (torch.randn(3, 8, dtype=torch.float64, generator=g) for _ in range(2))
    w = torch.randn(30, 8, dtype=torch.float64, generator=g) * 2
    zs, zt = (_capped(x @ w.T, 2.5, 1.7, 0.9) for x in (hs, ht))
    top = zt.topk(6, -1).indices
    a, c = (z.gather(-1, top).log_softmax(-1) for z in (zs, zt))
    want = (c.exp() * (c - a)).sum(-1)
    got = sk.linear_divergence(
        hs, w, ht, teacher_top_k=6, softcap=2.5, logit_scale=1.7, temperature=0.9,
        backend="reference",
    )  # fmt: skip
    assert max_err(got, want) < 1e-13


def test_compiles_with_the_cap_and_the_scale():
    """The folded cap reaches the custom op as a schema argument: torch.compile traces it
    (aot_eager) and gives the eager values and gradients."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 16, generator=g, requires_grad=True)
    w = torch.randn(40, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 40, (6,), generator=g)

    def f(h, w):
        lp = sk.linear_logprobs(h, w, t, softcap=2.0, logit_scale=1.5, backend="torch")
        return lp.sum()

    want = f(h, w)
    want_grads = torch.autograd.grad(want, [h, w])
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(h, w)
    got_grads = torch.autograd.grad(got, [h, w])
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)
