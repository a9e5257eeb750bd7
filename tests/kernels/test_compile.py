"""``torch.compile`` must not break the public ops (docs/design.md §5): a compiled function that
calls them gives the eager values and gradients, under the "eager", "aot_eager" and (when
a C++ compiler is present) "inductor" backends, with ``fullgraph=True`` as well as with
graph breaks allowed. The custom ops themselves pass ``torch.library.opcheck``.

All on the "torch" backend (the CPU path); the Triton kernels are covered elsewhere.
"""

from __future__ import annotations

import shutil

import pytest
import torch

import sgsd_kernels as sk
from sgsd_kernels.ops.gated_kd import gated_kd_op
from sgsd_kernels.ops.linear_logprobs import linear_logprobs_op, linear_logprobs_streams_op
from sgsd_kernels.ops.logprobs_from_logits import logprobs_from_logits_op

B, K, T, V, H = 2, 3, 5, 37, 13  # odd V, H
N = B * T

needs_cxx = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="inductor on CPU needs a C++ compiler",
)
EAGERISH = ["eager", "aot_eager"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# --- the functions under test: inputs -> (outputs..., scalar to differentiate) ---------------


def _linear_logprobs(hidden, weight, bias, targets, g_lp, g_ent):
    lp, ent = sk.linear_logprobs(
        hidden, weight, targets, bias=bias, temperature=0.7, return_entropy=True, backend="torch"
    )
    return lp, ent, (lp * g_lp).sum() + (ent * g_ent).sum()


def _logprobs_from_logits(logits, targets, g_lp, g_ent):
    lp, ent = sk.logprobs_from_logits(
        logits, targets, temperature=1.3, return_entropy=True, backend="torch"
    )
    return lp, ent, (lp * g_lp).sum() + (ent * g_ent).sum()


def _gated_kd_loss(s, u, mask, rewards, weights):
    out = sk.gated_kd_loss(
        s,
        u,
        mask,
        rewards,
        weights,
        gate_tau=0.8,
        clip_delta=2.0,
        confidence_threshold=0.01,
        backend="torch",
    )
    return out.support, out.polarity, out.row_loss, out.loss


def _linear_gated_kd_loss(hidden, weight, bias, targets, mask, rewards, weights, teacher_hidden):
    out = sk.linear_gated_kd_loss(
        hidden,
        weight,
        targets,
        mask,
        rewards,
        weights,
        teacher_hidden=teacher_hidden,
        bias=bias,
        temperature=0.9,
        confidence_threshold=0.01,
        backend="torch",
    )
    return out.support, out.polarity, out.row_loss, out.loss


def _linear_gated_kd_loss_precomputed(hidden, weight, targets, mask, rewards, weights, u):
    out = sk.linear_gated_kd_loss(
        hidden,
        weight,
        targets,
        mask,
        rewards,
        weights,
        teacher_logprobs=u,
        confidence_threshold=0.01,
        backend="torch",
    )
    return out.support, out.polarity, out.row_loss, out.loss


def _everything(hidden, weight, bias, targets, mask, rewards, weights, teacher_hidden):
    """All four public functions in one compiled region (for the slow inductor backend)."""
    s = sk.linear_logprobs(hidden, weight, targets, bias=bias, backend="torch")
    logits = hidden @ weight.T + bias
    s2 = sk.logprobs_from_logits(logits, targets, backend="torch")
    u = sk.linear_logprobs(
        teacher_hidden, weight, targets[:, None].expand(-1, K, -1), bias=bias, backend="torch"
    ).detach()
    a = sk.gated_kd_loss(s, u, mask, rewards, weights, confidence_threshold=0.01, backend="torch")
    b = sk.linear_gated_kd_loss(
        hidden,
        weight,
        targets,
        mask,
        rewards,
        weights,
        teacher_hidden=teacher_hidden,
        bias=bias,
        confidence_threshold=0.01,
        backend="torch",
    )
    return s, s2, a.support, b.row_loss, a.loss + 2.0 * b.loss + 1e-2 * (s + s2).sum()


def _inputs(seed=0, n_tokens=T):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, n_tokens, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    bias = torch.randn(V, generator=g)
    targets = torch.randint(0, V, (B, n_tokens), generator=g)
    targets[1, -1] = -100  # an ignored position
    mask = torch.rand(B, n_tokens, generator=g) > 0.2
    mask[1, 0] = False
    rewards = torch.tensor([1.0, -1.0])
    weights = torch.rand(B, K, generator=g)
    weights[0, 1] = 0.0  # an absent teacher
    teacher_hidden = hidden[:, None] + 0.7 * torch.randn(B, K, n_tokens, H, generator=g)
    return dict(
        hidden=hidden,
        weight=weight,
        bias=bias,
        targets=targets,
        mask=mask,
        rewards=rewards,
        weights=weights,
        teacher_hidden=teacher_hidden,
        g=g,
    )


def case(name, seed=0, n_tokens=T):
    """(function, args, indices of args that get gradients)."""
    x = _inputs(seed, n_tokens)
    g = x["g"]
    if name == "linear_logprobs":
        n = B * n_tokens
        args = (
            x["hidden"].reshape(n, H),
            x["weight"],
            x["bias"],
            x["targets"].reshape(n),
            torch.randn(n, generator=g),
            torch.randn(n, generator=g),
        )
        return _linear_logprobs, args, (0, 1, 2)
    if name == "logprobs_from_logits":
        logits = torch.randn(B, n_tokens, V, generator=g) * 4
        args = (
            logits,
            x["targets"],
            torch.randn(B, n_tokens, generator=g),
            torch.randn(B, n_tokens, generator=g),
        )
        return _logprobs_from_logits, args, (0,)
    if name == "gated_kd_loss":
        s = -torch.rand(B, n_tokens, generator=g) * 3
        u = s[:, None] + torch.randn(B, K, n_tokens, generator=g)
        args = (s, u, x["mask"], x["rewards"], x["weights"])
        return _gated_kd_loss, args, (0,)
    if name == "linear_gated_kd_loss":
        args = (
            x["hidden"],
            x["weight"],
            x["bias"],
            x["targets"],
            x["mask"],
            x["rewards"],
            x["weights"],
            x["teacher_hidden"],
        )
        return _linear_gated_kd_loss, args, (0, 1, 2)
    if name == "linear_gated_kd_loss[teacher_logprobs]":
        u = -torch.rand(B, K, n_tokens, generator=g) * 3
        args = (x["hidden"], x["weight"], x["targets"], x["mask"], x["rewards"], x["weights"], u)
        return _linear_gated_kd_loss_precomputed, args, (0, 1)
    if name == "everything":
        args = (
            x["hidden"],
            x["weight"],
            x["bias"],
            x["targets"],
            x["mask"],
            x["rewards"],
            x["weights"],
            x["teacher_hidden"],
        )
        return _everything, args, (0, 1, 2)
    raise AssertionError(name)


OPS = [
    "linear_logprobs",
    "logprobs_from_logits",
    "gated_kd_loss",
    "linear_gated_kd_loss",
    "linear_gated_kd_loss[teacher_logprobs]",
]


def run(fn, args, grad_idx):
    """Outputs (detached) and the gradients of the last output w.r.t. args[grad_idx]."""
    args = [a.detach().clone().requires_grad_(i in grad_idx) for i, a in enumerate(args)]
    outs = fn(*args)
    outs[-1].backward()
    return [o.detach() for o in outs], [args[i].grad for i in grad_idx]


def check_compiled(name, backend, fullgraph, **kw):
    fn, args, grad_idx = case(name)
    want_out, want_grad = run(fn, args, grad_idx)
    compiled = torch.compile(fn, backend=backend, fullgraph=fullgraph, **kw)
    for seed in (0, 1):  # the second call reuses the compiled graph(s) with new values
        if seed:
            fn_, args, grad_idx = case(name, seed=seed)
            want_out, want_grad = run(fn_, args, grad_idx)
        got_out, got_grad = run(compiled, args, grad_idx)
        assert len(got_out) == len(want_out)
        for i, (got, want) in enumerate(zip(got_out, want_out)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"output {i}")
        for i, (got, want) in zip(grad_idx, zip(got_grad, want_grad)):
            assert got is not None, f"no gradient for arg {i}"
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"grad of arg {i}")


@pytest.mark.parametrize("backend", EAGERISH)
@pytest.mark.parametrize("name", OPS)
def test_compiled_matches_eager(name, backend):
    check_compiled(name, backend, fullgraph=False)


@pytest.mark.parametrize("backend", EAGERISH)
@pytest.mark.parametrize("name", OPS)
def test_compiled_fullgraph_matches_eager(name, backend):
    """No graph break: validation must not need a device sync on data under compile
    (docs/design.md §5: torch.compile must not break)."""
    check_compiled(name, backend, fullgraph=True)


@needs_cxx
def test_inductor_matches_eager():
    # Graph breaks multiply inductor's C++ compiles; one small op keeps this affordable.
    check_compiled("gated_kd_loss", "inductor", fullgraph=False)


@needs_cxx
def test_inductor_fullgraph_matches_eager():
    check_compiled("everything", "inductor", fullgraph=True)


def test_compiled_dynamic_shapes():
    """dynamic=True: one compiled function serves several numbers of tokens."""
    fn, _, _ = case("linear_logprobs")
    compiled = torch.compile(fn, backend="eager", dynamic=True)
    for n_tokens in (3, 7):
        _, args, grad_idx = case("linear_logprobs", seed=n_tokens, n_tokens=n_tokens)
        want_out, want_grad = run(fn, args, grad_idx)
        got_out, got_grad = run(compiled, args, grad_idx)
        for got, want in zip(got_out + got_grad, want_out + want_grad):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fullgraph", [False, True])
@pytest.mark.parametrize(
    "bad, exc, message",
    [
        (dict(temperature=0.0), ValueError, "temperature must be > 0, got 0.0"),
        (
            dict(hidden=torch.randn(N, H - 1)),
            ValueError,
            "hidden must have shape [..., H] with H = weight.shape[1] = 13, got (10, 12)",
        ),
        (dict(targets=torch.zeros(N)), TypeError, "targets must be an integer tensor"),
    ],
)
def test_compiled_static_checks_still_raise(bad, exc, message, fullgraph):
    """Shape/dtype/hyper-parameter checks run under compile. With graph breaks allowed the
    user gets the ValueError/TypeError itself; with fullgraph=True Dynamo (torch 2.13)
    reports it as ``Unsupported: Observed exception`` whose text quotes the original."""
    g = torch.Generator().manual_seed(0)
    args = dict(
        hidden=torch.randn(N, H, generator=g),
        weight=torch.randn(V, H, generator=g),
        targets=torch.randint(0, V, (N,), generator=g),
        temperature=1.0,
    )
    args.update(bad)
    temperature = args.pop("temperature")

    def f(hidden, weight, targets):
        return sk.linear_logprobs(hidden, weight, targets, temperature=temperature, backend="torch")

    compiled = torch.compile(f, backend="eager", fullgraph=fullgraph)
    with pytest.raises(exc if not fullgraph else Exception) as info:
        compiled(**args)
    assert message in str(info.value) or message in repr(info.value.__cause__), str(info.value)


def _bad_value_cases():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    for name, value in (("target == V", V), ("target == -1", -1)):
        t = targets.clone()
        t[3] = value

        def ll(h, w, t):
            return sk.linear_logprobs(h, w, t, backend="torch")

        def lfl(h, w, t):
            return sk.logprobs_from_logits(h @ w.T, t, backend="torch")

        yield pytest.param(ll, (hidden, weight, t), 3, id=f"linear_logprobs-{name}")
        yield pytest.param(lfl, (hidden, weight, t), 3, id=f"logprobs_from_logits-{name}")
    x = case("gated_kd_loss")[1]
    neg = x[4].clone()
    neg[1, 2] = -1.0

    def gated(s, u, m, r, w):
        return sk.gated_kd_loss(s, u, m, r, w, confidence_threshold=0.0, backend="torch").loss

    yield pytest.param(gated, (*x[:4], neg), None, id="gated_kd_loss-negative teacher weight")
    h = hidden.clone()
    h[1, 0] = float("nan")

    def finite(h, w, t):
        return sk.linear_logprobs(h, w, t, backend="torch", check_finite=True)

    yield pytest.param(finite, (h, weight, targets), 1, id="linear_logprobs-check_finite NaN")


@pytest.mark.parametrize("fn, args, position", list(_bad_value_cases()))
def test_compiled_bad_values_are_never_silent(fn, args, position):
    """Under compile the value-reading checks may be skipped (no device sync / data-dependent
    branch in the graph), but bad values must still never give a finite-looking answer:
    the call raises, or the affected output is NaN (docs/design.md §4)."""
    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    try:
        out = compiled(*args)
    except Exception:  # raised: not silent  # noqa: BLE001
        return
    bad = out if position is None else out[position]
    assert torch.isnan(bad).all(), f"bad input gave a finite answer under compile: {out}"


# --- the custom ops themselves: schema, fake impl, autograd registration -----------------------


def _opcheck_cases():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    b = torch.randn(V, generator=g, requires_grad=True)
    t = torch.randint(0, V, (N,), generator=g)
    t[2] = -100
    s = torch.randn(B, T, dtype=torch.float64, generator=g, requires_grad=True)
    u = torch.randn(B, K, T, dtype=torch.float64, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    r = torch.tensor([1.0, -1.0], dtype=torch.float64)
    wk = torch.rand(B, K, dtype=torch.float64, generator=g)
    return {
        "linear_logprobs+entropy": (
            linear_logprobs_op,
            (h, w, b, None, t, 0.7, -100, True, "torch"),
        ),
        "linear_logprobs-no-bias": (
            linear_logprobs_op,
            (h, w, None, None, t, 1.0, -100, False, "torch"),
        ),
        "linear_logprobs-softcap": (
            linear_logprobs_op,
            (h, w, b, 2.5, t, 0.7, -100, True, "torch"),
        ),
        "logprobs_from_logits": (
            logprobs_from_logits_op,
            (torch.randn(N, V, generator=g, requires_grad=True), t, 1.3, -100, True, "torch"),
        ),
        "linear_logprobs_streams": (
            linear_logprobs_streams_op,
            (h, torch.randn(K * N, H, generator=g), w, b, t, t.repeat(K), 1.0, -100, None, "torch"),
        ),
        "linear_logprobs_streams-softcap": (
            linear_logprobs_streams_op,
            (h, torch.randn(K * N, H, generator=g), w, b, t, t.repeat(K), 0.9, -100, 3.0, "torch"),
        ),
        "gated_kd": (gated_kd_op, (s, u, mask, r, wk, 1.0, 3.0, 0.05, True, "torch")),
    }


@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_opcheck(name):
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", ["linear_logprobs", "gated_kd"])
def test_custom_ops_compile_fullgraph(name):
    """The ops alone trace without a graph break (so any break in the public functions
    comes from the Python around them)."""
    cases = _opcheck_cases()
    op, args = cases["linear_logprobs+entropy" if name == "linear_logprobs" else "gated_kd"]
    leaves = [
        a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
        for a in args
    ]

    def f(*xs):
        out = op(*xs)
        return out[0].sum() + (out[1].sum() if name == "linear_logprobs" else 0.0)

    want = f(*leaves)
    want.backward()
    want_grads = [a.grad for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad]
    got_leaves = [
        a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
        for a in args
    ]
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(*got_leaves)
    got.backward()
    got_grads = [a.grad for a in got_leaves if isinstance(a, torch.Tensor) and a.requires_grad]
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)
