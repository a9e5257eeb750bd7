"""Every backend against the float64 oracle (values and gradients), docs/design.md §8.

Inputs are drawn in float64, rounded to the dtype under test, and the oracle is the
reference run in float64 on those *rounded* inputs, so only the computation error is
measured. The bound is twice the error of eager PyTorch in the same dtype plus a small
atol (flash-attention's rule).
"""

from __future__ import annotations

import math

import pytest
import torch

import sgsd_kernels as sk
from sgsd_kernels import reference as ref

from .conftest import BACKENDS, DEVICE, REL_ATOL, assert_close_to_oracle, max_err

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# (N, H, V): odd V and H, N = 1, V spanning several Triton vocabulary blocks and splits.
LINEAR_SHAPES = [(1, 61, 1007), (37, 61, 1007), (70, 32, 300)]


def _eager_linear(h, w, b, t, temperature, ignore_index, entropy):
    """Plain PyTorch in the input dtype: low-precision GEMM, fp32 softmax."""
    logits = h @ w.T
    if b is not None:
        logits = logits + b
    return ref.logprobs_from_logits_ref(logits.float(), t, temperature, ignore_index, entropy)


def _linear_case(N, H, V, dtype, with_bias):
    h = torch.randn(N, H, dtype=torch.float64) * 0.7
    w = torch.randn(V, H, dtype=torch.float64) * 0.4
    b = torch.randn(V, dtype=torch.float64) if with_bias else None
    t = torch.randint(0, V, (N,))
    if N > 2:
        t[1] = -100
    cast = lambda x: None if x is None else x.to(dtype).to(DEVICE)  # noqa: E731
    return cast(h), cast(w), cast(b), t.to(DEVICE)


def _grads(out, inputs, entropy, seed=1):
    gen = torch.Generator().manual_seed(seed)
    lp = out[0] if entropy else out
    c1 = torch.randn(lp.shape, generator=gen, dtype=torch.float64).to(lp.device)
    loss = (lp.double() * c1).sum()
    if entropy:
        c2 = torch.randn(lp.shape, generator=gen, dtype=torch.float64).to(lp.device)
        loss = loss + (out[1].double() * c2).sum()
    req = [x for x in inputs if x is not None]
    return torch.autograd.grad(loss, req)


def _leaf(x, dtype=None):
    if x is None:
        return None
    x = x.detach() if dtype is None else x.detach().to(dtype)
    return x.clone().requires_grad_(True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: "N{}-H{}-V{}".format(*s))
@pytest.mark.parametrize(
    "with_bias,temperature,entropy",
    [(False, 1.0, False), (True, 0.7, True)],
    ids=["plain", "bias-temp-entropy"],
)
def test_linear_logprobs_matches_oracle(
    backend, dtype, shape, with_bias, temperature, entropy, small_workspace
):
    h, w, b, t = _linear_case(*shape, dtype, with_bias)
    kw = dict(bias=None, temperature=temperature, return_entropy=entropy)

    oh, ow, ob = _leaf(h, torch.float64), _leaf(w, torch.float64), _leaf(b, torch.float64)
    oracle = sk.linear_logprobs(oh, ow, t, **{**kw, "bias": ob}, backend="reference")
    oracle_grads = _grads(oracle, [oh, ow, ob], entropy)

    eh, ew, eb = _leaf(h), _leaf(w), _leaf(b)
    eager = _eager_linear(eh, ew, eb, t, temperature, -100, entropy)
    eager_grads = _grads(eager, [eh, ew, eb], entropy)

    gh, gw, gb = _leaf(h), _leaf(w), _leaf(b)
    got = sk.linear_logprobs(gh, gw, t, **{**kw, "bias": gb}, backend=backend)
    got_grads = _grads(got, [gh, gw, gb], entropy)

    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    names = ("logprobs", "entropy") if entropy else ("logprobs",)
    triples = zip(got, eager, oracle) if entropy else [(got, eager, oracle)]
    for name, (x, y, z) in zip(names, triples):
        assert x.dtype == expected_dtype and x.shape == t.shape
        assert_close_to_oracle(name, x, y, z, rel_atol=REL_ATOL[dtype])
        if shape[0] > 2:
            assert x[1].item() == 0.0  # ignore_index gives 0
    for name, g, e, o in zip(
        ("d_hidden", "d_weight", "d_bias"), got_grads, eager_grads, oracle_grads
    ):
        assert g.dtype == dtype
        assert_close_to_oracle(name, g, e, o, rel_atol=REL_ATOL[dtype])
    if shape[0] > 2:
        assert (got_grads[0][1] == 0).all()  # ignored row: no gradient


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("entropy,temperature", [(False, 1.0), (True, 1.3)])
def test_logprobs_from_logits_matches_oracle(backend, dtype, entropy, temperature, small_workspace):
    B, T, V = 3, 5, 1007
    logits = (torch.randn(B, T, V, dtype=torch.float64) * 4).to(dtype).to(DEVICE)
    t = torch.randint(0, V, (B, T), device=DEVICE)
    t[0, 2] = -100
    kw = dict(temperature=temperature, return_entropy=entropy)

    o = _leaf(logits, torch.float64)
    oracle = sk.logprobs_from_logits(o, t, **kw, backend="reference")
    (og,) = _grads(oracle, [o], entropy)
    e = _leaf(logits)
    eager = ref.logprobs_from_logits_ref(e.float(), t, temperature, -100, entropy)
    (eg,) = _grads(eager, [e], entropy)
    g = _leaf(logits)
    got = sk.logprobs_from_logits(g, t, **kw, backend=backend)
    (gg,) = _grads(got, [g], entropy)

    pairs = zip(got, eager, oracle) if entropy else [(got, eager, oracle)]
    for x, y, z in pairs:
        assert x.shape == (B, T)
        assert_close_to_oracle("value", x, y, z, rel_atol=REL_ATOL[dtype])
    assert gg.dtype == dtype and gg.shape == logits.shape
    assert_close_to_oracle("d_logits", gg, eg, og, rel_atol=REL_ATOL[dtype])
    assert (gg[0, 2] == 0).all()


def test_triton_logprob_kernels_get_no_float_argument(monkeypatch):
    """A compiled Triton kernel receives a Python float as an fp32 scalar, which would
    round 1/T in the fp64 kernels; the interpreter the CPU runs use does not, so the oracle
    tests above cannot show it. The launch arguments can: 1/T is a tensor, never a float.
    (The compiled fp64 signatures: test_triton_aot.py.)"""
    from sgsd_kernels.ops.triton_backend import linear_logprobs, logprobs_from_logits

    floats = {}
    kernels = {
        linear_logprobs: ("_fwd_kernel", "_grad_logits_kernel"),
        logprobs_from_logits: ("_fwd_kernel", "_bwd_kernel"),
    }
    for module, names in kernels.items():
        for name in names:
            kernel, key = getattr(module, name), f"{module.__name__}.{name}"

            def run(*args, _run=kernel.run, _key=key, **kwargs):
                floats[_key] = [a for a in (*args, *kwargs.values()) if isinstance(a, float)]
                return _run(*args, **kwargs)

            monkeypatch.setattr(kernel, "run", run)
    h = torch.randn(6, 32, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(40, 32, dtype=torch.float64, device=DEVICE)
    t = torch.randint(0, 32, (6,), device=DEVICE)  # < V of both: 40 and 32 (h as logits)
    kw = dict(temperature=1.3, return_entropy=True, backend="triton")
    lp, ent = sk.linear_logprobs(h, w, t, **kw)
    (lp.sum() + ent.sum()).backward()
    lp, ent = sk.logprobs_from_logits(h, t, **kw)
    (lp.sum() + ent.sum()).backward()
    assert len(floats) == 4 and not any(floats.values()), floats


def _gated_case(B, K, T, dtype, *, all_masked_row=True, absent_teacher=True):
    s = torch.randn(B, T, dtype=torch.float64) - 2.0
    u = s.unsqueeze(1) + torch.randn(B, K, T, dtype=torch.float64) * 1.5
    mask = torch.rand(B, T) > 0.25
    if all_masked_row and B > 1:
        mask[-1] = False
    rewards = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(B)])
    w = torch.softmax(torch.randn(B, K, dtype=torch.float64), -1)
    if absent_teacher and K > 1:
        w[0, -1] = 0.0
    # Padding garbage at masked positions must be inert.
    u = torch.where(mask.unsqueeze(1), u, torch.tensor(float("-inf"), dtype=torch.float64))
    to = lambda x: x.to(DEVICE)  # noqa: E731
    return to(s.to(dtype)), to(u.to(dtype)), to(mask), to(rewards), to(w.to(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "BKT", [(1, 1, 1), (3, 1, 17), (4, 8, 33), (2, 3, 600)], ids=lambda s: "B{}-K{}-T{}".format(*s)
)
@pytest.mark.parametrize(
    "hypers",
    [(1.0, 3.0, 0.05, True), (0.5, 1.0, 0.0, True), (1.0, math.inf, 0.0, False)],
    ids=["paper", "tight", "ablated"],  # ablated: no clipping, no threshold, no polarity
)
def test_gated_kd_matches_oracle(backend, dtype, BKT, hypers):
    tau, delta, eps, use_polarity = hypers
    s, u, mask, r, w = _gated_case(*BKT, dtype)
    kw = dict(gate_tau=tau, clip_delta=delta, confidence_threshold=eps, use_polarity=use_polarity)

    so = _leaf(s, torch.float64)
    oracle = sk.gated_kd_loss(so, u.double(), mask, r, w.double(), **kw, backend="reference")
    (og,) = torch.autograd.grad(oracle.loss, so)
    sg = _leaf(s)
    got = sk.gated_kd_loss(sg, u, mask, r, w, **kw, backend=backend)
    (gg,) = torch.autograd.grad(got.loss, sg)

    atol = 1e-12 if dtype == torch.float64 else 1e-5
    assert got.loss.dim() == 0 and torch.isfinite(got.loss)
    assert max_err(got.loss, oracle.loss) <= atol * max(1.0, abs(oracle.loss.item()))
    assert max_err(got.support, oracle.support) <= atol * 10
    assert max_err(got.row_loss, oracle.row_loss) <= atol * 10
    # Polarity is a sign: it may differ only where |S| sits on the threshold within rounding.
    near = (oracle.support.abs() - eps).abs() < 1e-5
    if not use_polarity:
        near = torch.zeros_like(near)  # ρ = +1 whatever S: nothing sits on a threshold
        assert (oracle.polarity == 1).all()
    assert ((got.polarity == oracle.polarity) | near).all()
    assert gg.dtype == dtype and torch.isfinite(gg).all()
    assert max_err(gg, og) <= atol * max(1.0, og.abs().max().item()) + (
        0 if dtype in (torch.float64, torch.float32) else 1e-2 * og.abs().max().item()
    )
    if BKT[0] > 1:  # all-masked row: zero support, zero loss, zero gradient
        assert (got.support[-1] == 0).all() and (got.row_loss[-1] == 0).all()
        assert (gg[-1] == 0).all()
    m_got, m_ref = got.metrics(), oracle.metrics()
    assert m_got.keys() == m_ref.keys()
    for key in m_ref:
        assert abs(m_got[key] - m_ref[key]) <= 1e-4 * max(1.0, abs(m_ref[key])) or (
            key.endswith("_frac") and near.any()
        ), key


def test_gated_kd_loss_follows_the_formula_by_hand():
    """A hand-computed case pins the §3 conventions (signs, n, clipping, ε)."""
    import math

    f64 = dict(dtype=torch.float64, device=DEVICE)
    s = torch.tensor([[-1.0, -2.0, -3.0]], **f64, requires_grad=True)
    u = torch.tensor([[[-0.5, -2.0, 5.0], [-1.0, -2.0, -3.01]]], **f64)
    mask = torch.tensor([[True, True, False]], device=DEVICE)
    w = torch.tensor([[0.75, 0.25]], **f64)
    reward = torch.tensor([-1.0], **f64)
    for backend in BACKENDS:
        if backend == "native" and DEVICE.type != "cpu":
            continue  # the native backend is CPU-only
        out = sk.gated_kd_loss(s, u, mask, reward, w, backend=backend)
        # Teacher 0: Δ = (0.5, 0, masked); S = 0.25 > ε → σ = +1; failure → ρ = −1.
        # Teacher 1: Δ = (0, 0, masked); S = 0 → ρ = 0.
        gate = lambda d: math.log(2) - math.log1p(math.exp(-d * d / 2))  # noqa: E731
        expected = 0.75 * -1.0 * (gate(0.5) + gate(0.0)) / 2
        assert out.polarity.tolist() == [[-1.0, 0.0]]
        assert out.support[0, 0].item() == pytest.approx(0.25)
        assert out.loss.item() == pytest.approx(expected, rel=1e-9)
        (g,) = torch.autograd.grad(out.loss, s)
        dgate = 1 / (1 + math.exp(0.5**2 / 2)) * 0.5
        assert g[0, 0].item() == pytest.approx(-(0.75 * -1.0 * dgate / 2), rel=1e-9)
        assert g[0, 2].item() == 0.0
        # Polarity off: ρ = +1 for both present teachers, whatever the failure and S;
        # clip_delta = inf clips nothing (Δ = 5 would have been clipped at 3).
        off = sk.gated_kd_loss(
            s,
            u,
            torch.ones_like(mask),
            reward,
            w,
            clip_delta=math.inf,
            use_polarity=False,
            backend=backend,
        )
        assert off.polarity.tolist() == [[1.0, 1.0]]
        assert off.support[0, 0].item() == pytest.approx(8.5 / 3)
        assert off.metrics()["clipped_frac"] == 0.0
        expected = (0.75 * (gate(0.5) + gate(0.0) + gate(8.0)) + 0.25 * gate(0.01)) / 3
        assert off.loss.item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("teachers", ["hidden", "logprobs"])
@pytest.mark.parametrize("K", [1, 3])
def test_linear_gated_kd_loss_matches_oracle(backend, dtype, teachers, K, small_workspace):
    B, T, H, V = 3, 9, 61, 1007
    sh = (torch.randn(B, T, H, dtype=torch.float64) * 0.5).to(dtype).to(DEVICE)
    th = (torch.randn(B, K, T, H, dtype=torch.float64) * 0.5).to(dtype).to(DEVICE)
    w = (torch.randn(V, H, dtype=torch.float64) * 0.3).to(dtype).to(DEVICE)
    b = torch.randn(V, dtype=torch.float64).to(dtype).to(DEVICE)
    tg = torch.randint(0, V, (B, T), device=DEVICE)
    tg[0, 3] = -100
    mask = torch.rand(B, T, device=DEVICE) > 0.2
    mask[2] = False
    r = torch.tensor([1.0, -1.0, 1.0], device=DEVICE)
    tw = torch.softmax(torch.randn(B, K, dtype=torch.float64), -1).to(dtype).to(DEVICE)
    if teachers == "hidden":
        extra_for = lambda d: dict(teacher_hidden=th.to(d))  # noqa: E731
    else:
        u_targets = tg.clamp_min(0).unsqueeze(1).expand(-1, K, -1)
        u = sk.linear_logprobs(
            th.double(),
            w.double(),
            u_targets,
            bias=b.double(),
            temperature=0.9,
            backend="reference",
        )
        extra_for = lambda d: dict(teacher_logprobs=u.to(d))  # noqa: E731
    kw = dict(bias=None, temperature=0.9)

    osh, ow, ob = _leaf(sh, torch.float64), _leaf(w, torch.float64), _leaf(b, torch.float64)
    oracle = sk.linear_gated_kd_loss(
        osh,
        ow,
        tg,
        mask,
        r,
        tw.double(),
        **{**kw, "bias": ob},
        **extra_for(torch.float64),
        backend="reference",
    )
    og = torch.autograd.grad(oracle.loss, [osh, ow, ob])
    gsh, gw, gb = _leaf(sh), _leaf(w), _leaf(b)
    got = sk.linear_gated_kd_loss(
        gsh, gw, tg, mask, r, tw, **{**kw, "bias": gb}, **extra_for(dtype), backend=backend
    )
    gg = torch.autograd.grad(got.loss, [gsh, gw, gb])

    rel = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    assert got.student_logprobs.shape == (B, T) and got.teacher_logprobs.shape == (B, K, T)
    assert max_err(got.loss, oracle.loss) <= rel * max(1.0, abs(oracle.loss.item()))
    for x, y in zip(gg, og):
        assert x.dtype == dtype
        assert max_err(x, y) <= rel * max(1e-3, y.abs().max().item()) * 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_gated_kd_loss_ablations_match_oracle(backend):
    """The paper's ablations through the linear op: no polarity, no clipping, ε = 0."""
    if backend == "native" and DEVICE.type != "cpu":
        pytest.skip("the native backend is CPU-only")
    B, K, T, H, V = 2, 3, 7, 33, 301
    g = torch.Generator().manual_seed(3)
    sh = (torch.randn(B, T, H, generator=g, dtype=torch.float64) * 0.5).to(DEVICE)
    th = (torch.randn(B, K, T, H, generator=g, dtype=torch.float64) * 0.5).to(DEVICE)
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3).to(DEVICE)
    tg = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    r = torch.tensor([1.0, -1.0], device=DEVICE)
    tw = torch.full((B, K), 1.0 / K, dtype=torch.float64, device=DEVICE)
    kw = dict(clip_delta=math.inf, confidence_threshold=0.0, use_polarity=False)

    def run(dtype, be):
        leaves = _leaf(sh, dtype), _leaf(w, dtype)
        out = sk.linear_gated_kd_loss(
            leaves[0],
            leaves[1],
            tg,
            mask,
            r,
            tw.to(dtype),
            teacher_hidden=th.to(dtype),
            **kw,
            backend=be,
        )
        return out, torch.autograd.grad(out.loss, leaves)

    oracle, og = run(torch.float64, "reference")
    got, gg = run(torch.float32, backend)
    assert (got.polarity == 1).all() and (oracle.polarity == 1).all()
    # the failed rollout's teachers pull the student up, as the successful one's do
    assert oracle.loss.item() > 0
    assert max_err(got.loss, oracle.loss) <= 1e-4 * max(1.0, abs(oracle.loss.item()))
    for x, y in zip(gg, og):
        assert max_err(x, y) <= 4e-4 * max(1e-3, y.abs().max().item())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_frozen_weight_and_non_contiguous_inputs(backend):
    """A frozen LM head (LoRA) skips dW; strided inputs give the same answer."""
    N, H, V = 24, 32, 257
    base = torch.randn(H, N * 2, dtype=torch.float32, device=DEVICE)
    hidden = base.T[::2]  # non-contiguous [N, H]
    w = torch.randn(H, V, device=DEVICE).T  # non-contiguous [V, H]
    t = torch.randint(0, V, (N,), device=DEVICE)
    h1 = hidden.detach().clone().requires_grad_()
    h2 = hidden.detach().clone().requires_grad_()
    lp1 = sk.linear_logprobs(h1, w, t, backend=backend)
    lp2 = sk.linear_logprobs(h2, w.contiguous(), t, backend="reference")
    assert max_err(lp1, lp2) < 1e-4
    (g1,) = torch.autograd.grad(lp1.sum(), h1)
    (g2,) = torch.autograd.grad(lp2.sum(), h2)
    assert max_err(g1, g2) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens_give_zero_weight_and_bias_gradients(backend):
    """N = 0: empty outputs, and dW and db exactly zero (not uninitialised memory)."""
    if backend == "native" and DEVICE.type != "cpu":
        pytest.skip("the native backend is CPU-only")
    torch.manual_seed(0)
    h = torch.randn(0, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(40, 16, device=DEVICE).add_(7.0).requires_grad_()
    b = torch.randn(40, device=DEVICE).add_(7.0).requires_grad_()
    t = torch.zeros(0, dtype=torch.long, device=DEVICE)
    for _ in range(3):  # fresh gradient buffers may reuse freed, non-zero memory
        w.grad = b.grad = None
        lp, ent = sk.linear_logprobs(h, w, t, bias=b, return_entropy=True, backend=backend)
        (lp.sum() + ent.sum()).backward()
        assert lp.shape == ent.shape == (0,)
        assert torch.equal(w.grad, torch.zeros_like(w)), backend
        assert torch.equal(b.grad, torch.zeros_like(b)), backend


def test_leading_dims_are_kept():
    h = torch.randn(2, 3, 5, 16)
    w = torch.randn(40, 16)
    t = torch.randint(0, 40, (2, 3, 5))
    for backend in ("reference", "torch"):
        lp, ent = sk.linear_logprobs(h, w, t, return_entropy=True, backend=backend)
        assert lp.shape == ent.shape == (2, 3, 5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N", [1, 300])
@pytest.mark.parametrize(
    "with_bias,temperature,entropy", [(False, 1.0, False), (True, 0.7, False), (True, 1.3, True)]
)
def test_torch_backend_default_workspace(dtype, N, with_bias, temperature, entropy):
    """Default workspace: the whole vocabulary in one block takes the fused log_softmax
    path (no entropy) or the online path (entropy); both against the oracle."""
    h, w, b, t = _linear_case(N, 61, 1007, dtype, with_bias)
    oh, ow, ob = _leaf(h, torch.float64), _leaf(w, torch.float64), _leaf(b, torch.float64)
    oracle = sk.linear_logprobs(
        oh, ow, t, bias=ob, temperature=temperature, return_entropy=entropy, backend="reference"
    )
    og = _grads(oracle, [oh, ow, ob], entropy)
    eh, ew, eb = _leaf(h), _leaf(w), _leaf(b)
    eager = _eager_linear(eh, ew, eb, t, temperature, -100, entropy)
    eg = _grads(eager, [eh, ew, eb], entropy)
    gh, gw, gb = _leaf(h), _leaf(w), _leaf(b)
    got = sk.linear_logprobs(
        gh, gw, t, bias=gb, temperature=temperature, return_entropy=entropy, backend="torch"
    )
    gg = _grads(got, [gh, gw, gb], entropy)
    triples = zip(got, eager, oracle) if entropy else [(got, eager, oracle)]
    for x, y, z in triples:
        assert_close_to_oracle("value", x, y, z, rel_atol=REL_ATOL[dtype])
    for x, y, z in zip(gg, eg, og):
        assert_close_to_oracle("grad", x, y, z, rel_atol=REL_ATOL[dtype])
