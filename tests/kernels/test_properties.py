"""Property tests (hypothesis) for the public ops on random small shapes and values.

* The "torch" backend equals the float64 reference (values and gradients) for
  linear_logprobs / logprobs_from_logits / gated_kd_loss / linear_gated_kd_loss: tightly
  for float64 inputs; for float32 inputs by the docs/design.md §8 rule (error vs the float64
  oracle ≤ 2× the error of eager PyTorch in float32, + a small atol).
* Invariances and ranges: per-row logit shifts leave log-probs unchanged; log-probs ≤ 0;
  0 ≤ entropy ≤ log V; all-zero teacher weights give exactly 0; flipping every reward flips
  the loss (and the polarity); polarity ∈ {−1, 0, 1}; |support| ≤ δ;
  0 ≤ row_loss ≤ log 2;
  garbage at masked positions is inert; duplicating the batch leaves the loss unchanged.

Shapes are small and odd (N ≥ 1, odd V and H, K ≥ 1, rows that are entirely masked);
values include large-magnitude logits. Set SGSD_PROPERTY_SCALE=20 for a longer soak.
"""

from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import sgsd_kernels as sk
from sgsd_kernels.ops import torch_backend

from .conftest import EAGER_BACKENDS

_SCALE = int(os.environ.get("SGSD_PROPERTY_SCALE", "1"))
EPS32 = torch.finfo(torch.float32).eps


pytestmark = pytest.mark.usefixtures("one_thread")


def props(n: int):
    return settings(
        max_examples=n * _SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )


odd = st.integers(0, 20).map(lambda x: 2 * x + 1)  # 1, 3, ..., 41
seeds = st.integers(0, 2**31 - 1)
# Logit magnitudes from tiny to very large (fp32 logits of 1e4 still differ by ~1e-3).
logit_scales = st.sampled_from([1e-3, 1.0, 8.0, 100.0, 1e4])
temperatures = st.sampled_from([1.0, 0.5, 2.3])
# Workspace of the torch backend (elements): None = the default (one block for these
# shapes); small ones force many vocabulary blocks / row chunks (the online-softmax merge).
workspaces = st.sampled_from([None, 1, 5, 64, 300, 2000])


@contextlib.contextmanager
def workspace(elements):
    if elements is None:
        yield
        return
    previous = torch_backend.WORKSPACE_ELEMENTS
    torch_backend.WORKSPACE_ELEMENTS = elements
    try:
        yield
    finally:
        torch_backend.WORKSPACE_ELEMENTS = previous


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def assert_rule(got, oracle, eager, atol, what=""):
    """docs/design.md §8: |got − oracle| ≤ 2·|eager − oracle| + atol (max norm)."""
    err, base = max_err(got, oracle), max_err(eager, oracle)
    assert err <= 2 * base + atol, f"{what}: error {err:.3g} > 2 x eager {base:.3g} + {atol:.3g}"


def amax(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def round32(c: dict) -> dict:
    """The case with its floating tensors rounded to float32 (kept in float64), so that the
    float64 oracle is exact for the very values the float32 runs see."""
    return {
        k: (v.float().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
        for k, v in c.items()
    }


# --- log-prob inputs ---------------------------------------------------------------------------


@st.composite
def logits_cases(draw):
    n = draw(st.integers(1, 7))
    v = draw(odd)
    scale = draw(logit_scales)
    g = torch.Generator().manual_seed(draw(seeds))
    logits = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    targets = torch.randint(0, v, (n,), generator=g)
    ignored = torch.rand(n, generator=g) < draw(st.sampled_from([0.0, 0.3]))
    targets[ignored] = -100
    return dict(
        logits=logits,
        targets=targets,
        temperature=draw(temperatures),
        workspace=draw(workspaces),
        g_lp=torch.randn(n, generator=g, dtype=torch.float64),
        g_ent=torch.randn(n, generator=g, dtype=torch.float64),
    )


@st.composite
def linear_cases(draw):
    n = draw(st.integers(1, 7))
    v, h = draw(odd), draw(odd)
    scale = draw(logit_scales)
    g = torch.Generator().manual_seed(draw(seeds))
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    # logits ~ scale: each of the H products has std scale/sqrt(H)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * (scale / math.sqrt(h))
    bias = None
    if draw(st.booleans()):
        bias = torch.randn(v, generator=g, dtype=torch.float64) * scale
    targets = torch.randint(0, v, (n,), generator=g)
    ignored = torch.rand(n, generator=g) < draw(st.sampled_from([0.0, 0.3]))
    targets[ignored] = -100
    return dict(
        hidden=hidden,
        weight=weight,
        bias=bias,
        targets=targets,
        temperature=draw(temperatures),
        workspace=draw(workspaces),
        g_lp=torch.randn(n, generator=g, dtype=torch.float64),
        g_ent=torch.randn(n, generator=g, dtype=torch.float64),
    )


def _logits_run(c, dtype, backend, entropy=True):
    """(lp, ent, grad_logits) of logprobs_from_logits on ``c`` cast to ``dtype``."""
    z = c["logits"].detach().to(dtype).clone().requires_grad_(True)
    with workspace(c["workspace"]):
        lp, ent = sk.logprobs_from_logits(
            z, c["targets"], temperature=c["temperature"], return_entropy=True, backend=backend
        )
        loss = (lp * c["g_lp"].to(lp.dtype)).sum()
        if entropy:
            loss = loss + (ent * c["g_ent"].to(ent.dtype)).sum()
        loss.backward()
    return lp.detach(), ent.detach(), z.grad


def _logits_eager32(c, entropy=True):
    """Plain eager PyTorch in float32: the baseline of the tolerance rule."""
    z = c["logits"].detach().float().clone().requires_grad_(True)
    logp = torch.log_softmax(z / c["temperature"], -1)
    valid = c["targets"] != -100
    lp = logp.gather(-1, torch.where(valid, c["targets"], 0)[:, None]).squeeze(-1)
    lp = torch.where(valid, lp, 0.0)
    ent = torch.where(valid, -(logp.exp() * logp).sum(-1), 0.0)
    loss = (lp * c["g_lp"].float()).sum()
    if entropy:
        loss = loss + (ent * c["g_ent"].float()).sum()
    loss.backward()
    return lp.detach(), ent.detach(), z.grad


def _linear_run(c, dtype, backend, entropy=True):
    leaves = {
        k: c[k].detach().to(dtype).clone().requires_grad_(True)
        for k in ("hidden", "weight", "bias")
        if c[k] is not None
    }
    with workspace(c["workspace"]):
        lp, ent = sk.linear_logprobs(
            leaves["hidden"],
            leaves["weight"],
            c["targets"],
            bias=leaves.get("bias"),
            temperature=c["temperature"],
            return_entropy=True,
            backend=backend,
        )
        loss = (lp * c["g_lp"].to(lp.dtype)).sum()
        if entropy:
            loss = loss + (ent * c["g_ent"].to(ent.dtype)).sum()
        loss.backward()
    return lp.detach(), ent.detach(), {k: v.grad for k, v in leaves.items()}


def _linear_eager32(c, entropy=True):
    leaves = {
        k: c[k].detach().float().clone().requires_grad_(True)
        for k in ("hidden", "weight", "bias")
        if c[k] is not None
    }
    z = leaves["hidden"] @ leaves["weight"].T
    if "bias" in leaves:
        z = z + leaves["bias"]
    logp = torch.log_softmax(z / c["temperature"], -1)
    valid = c["targets"] != -100
    lp = torch.where(
        valid, logp.gather(-1, torch.where(valid, c["targets"], 0)[:, None]).squeeze(-1), 0.0
    )
    ent = torch.where(valid, -(logp.exp() * logp).sum(-1), 0.0)
    loss = (lp * c["g_lp"].float()).sum()
    if entropy:
        loss = loss + (ent * c["g_ent"].float()).sum()
    loss.backward()
    return lp.detach(), ent.detach(), {k: v.grad for k, v in leaves.items()}


def _scale_of(c) -> float:
    """Largest |scaled logit| of the case, in float64."""
    if "logits" in c:
        z = c["logits"]
    else:
        z = c["hidden"] @ c["weight"].T + (0 if c["bias"] is None else c["bias"])
    return max(1.0, amax(z) / c["temperature"])


# --- torch backend == float64 oracle ---------------------------------------------------------


@props(60)
@given(c=logits_cases())
def test_logprobs_from_logits_float64_matches_reference(c):
    want = _logits_run(c, torch.float64, "reference")
    got = _logits_run(c, torch.float64, "torch")
    tol = 1e-12 * _scale_of(c)
    for w, g, what in zip(want, got, ("logprobs", "entropy", "grad")):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, w, rtol=1e-10, atol=tol, msg=what)


@props(60)
@given(c=logits_cases(), entropy=st.booleans())
def test_logprobs_from_logits_float32_within_rule(c, entropy):
    c = round32(c)
    oracle = _logits_run(c, torch.float64, "reference", entropy)
    eager = _logits_eager32(c, entropy)
    got = _logits_run(c, torch.float32, "torch", entropy)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.float32
    # The fused path subtracts one stored lse = m + log Σ (error ~ eps·|z|) where eager
    # log_softmax subtracts m and log Σ separately: the atol is eps·|z|-sized.
    atol = 8 * EPS32 * _scale_of(c)
    # Gradient terms g·onehot and g·p can cancel (p → 1): scale by the terms, not the result.
    g = amax(c["g_lp"]) + (amax(c["g_ent"]) * _scale_of(c) if entropy else 0.0)
    g /= c["temperature"]
    for got_t, o, e, what in zip(got, oracle, eager, ("logprobs", "entropy", "grad")):
        assert_rule(got_t, o, e, atol * g if what == "grad" else atol, what)


@props(60)
@given(c=linear_cases())
def test_linear_logprobs_float64_matches_reference(c):
    want = _linear_run(c, torch.float64, "reference")
    got = _linear_run(c, torch.float64, "torch")
    tol = 1e-11 * _scale_of(c)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=tol)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=tol)
    for k in want[2]:
        gw = want[2][k]
        torch.testing.assert_close(
            got[2][k], gw, rtol=1e-9, atol=1e-11 * max(1.0, amax(gw)), msg=f"grad {k}"
        )


@props(60)
@given(c=linear_cases(), entropy=st.booleans())
def test_linear_logprobs_float32_within_rule(c, entropy):
    c = round32(c)
    oracle = _linear_run(c, torch.float64, "reference", entropy)
    eager = _linear_eager32(c, entropy)
    got = _linear_run(c, torch.float32, "torch", entropy)
    n, h = c["hidden"].shape
    atol = 8 * EPS32 * _scale_of(c) * math.sqrt(h)
    assert_rule(got[0], oracle[0], eager[0], atol, "logprobs")
    assert_rule(got[1], oracle[1], eager[1], atol, "entropy")
    # Gradients are sums of terms that can cancel exactly (V = 1: onehot − p = 0), so the
    # atol scales with the size of the terms, not of the result.
    g = amax(c["g_lp"]) + (amax(c["g_ent"]) * _scale_of(c) if entropy else 0.0)
    partner = {
        "hidden": max(1.0, amax(c["weight"])),
        "weight": n * max(1.0, amax(c["hidden"])),
        "bias": n,
    }
    for k, o in oracle[2].items():
        assert got[2][k].dtype == torch.float32
        assert_rule(got[2][k], o, eager[2][k], atol * g * partner[k], f"grad {k}")


# --- log-prob invariances and ranges ------------------------------------------------------------


@props(40)
@given(
    c=logits_cases(),
    shift_scale=st.sampled_from([1.0, 1e3, 1e6]),
    backend=st.sampled_from(EAGER_BACKENDS),
)
def test_logprobs_invariant_to_per_row_shift(c, shift_scale, backend):
    n = c["logits"].shape[0]
    shift = torch.randn(n, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    shifted = dict(c, logits=c["logits"] + shift * shift_scale)
    a = _logits_run(c, torch.float64, backend)
    b = _logits_run(shifted, torch.float64, backend)
    tol = 1e-13 * (_scale_of(c) + shift_scale / c["temperature"]) * 8
    for x, y, what in zip(a, b, ("logprobs", "entropy", "grad")):
        torch.testing.assert_close(y, x, rtol=0, atol=tol, msg=what)


@props(40)
@given(c=linear_cases(), backend=st.sampled_from(EAGER_BACKENDS))
def test_linear_logprobs_invariant_to_per_row_shift(c, backend):
    """An extra hidden unit with weight 1 for every vocab entry adds a per-row constant
    to the logits: the log-probs, entropy and the original gradients do not change."""
    n = c["hidden"].shape[0]
    shift = torch.randn(n, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(n)) * 50
    v = c["weight"].shape[0]
    shifted = dict(
        c,
        hidden=torch.cat([c["hidden"], shift], 1),
        weight=torch.cat([c["weight"], torch.ones(v, 1, dtype=torch.float64)], 1),
    )
    a = _linear_run(c, torch.float64, backend)
    b = _linear_run(shifted, torch.float64, backend)
    tol = 1e-12 * (_scale_of(c) + amax(shift) / c["temperature"])
    torch.testing.assert_close(b[0], a[0], rtol=0, atol=tol)
    torch.testing.assert_close(b[1], a[1], rtol=0, atol=tol)
    torch.testing.assert_close(
        b[2]["hidden"][:, :-1],
        a[2]["hidden"],
        rtol=1e-9,
        # dh = g·(W[y] − Σ p·W): a recomputed logit one ulp off moves p by ~ulp(z) and dh by
        # that times |W|, even where dh itself is ~0 (V = 1, |W| = 1e4).
        atol=tol * max(1.0, amax(a[2]["hidden"]), amax(c["weight"])),
    )
    # Σ_v ∂/∂z_v = 0 per row, so the shift unit's gradient is ~0.
    assert amax(b[2]["hidden"][:, -1]) <= tol * max(1.0, amax(c["weight"])) * v


@props(60)
@given(
    c=logits_cases(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    backend=st.sampled_from(EAGER_BACKENDS),
)
def test_logprobs_nonpositive_and_entropy_in_range(c, dtype, backend):
    z = c["logits"].to(dtype)
    v = z.shape[1]
    with workspace(c["workspace"]):
        lp, ent = sk.logprobs_from_logits(
            z, c["targets"], temperature=c["temperature"], return_entropy=True, backend=backend
        )
    assert (lp <= 0).all(), lp
    assert (lp[c["targets"] == -100] == 0).all()
    assert (ent >= 0).all(), ent
    slack = 1e-6 if dtype == torch.float32 else 1e-12
    assert (ent <= math.log(v) * (1 + slack) + slack).all(), (ent, math.log(v))


@props(60)
@given(
    c=linear_cases(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    backend=st.sampled_from(EAGER_BACKENDS),
)
def test_linear_logprobs_nonpositive_and_entropy_in_range(c, dtype, backend):
    v = c["weight"].shape[0]
    with workspace(c["workspace"]):
        lp, ent = sk.linear_logprobs(
            c["hidden"].to(dtype),
            c["weight"].to(dtype),
            c["targets"],
            bias=None if c["bias"] is None else c["bias"].to(dtype),
            temperature=c["temperature"],
            return_entropy=True,
            backend=backend,
        )
    assert (lp <= 0).all(), lp
    assert (ent >= 0).all(), ent
    slack = 1e-6 if dtype == torch.float32 else 1e-12
    assert (ent <= math.log(v) * (1 + slack) + slack).all(), (ent, math.log(v))


# --- gated loss ----------------------------------------------------------------------------------

ALL_REWARDS = st.sampled_from([1.0, -1.0, 0.0, 0.5, -2.0])


@st.composite
def gated_cases(draw, rewards=ALL_REWARDS):
    b = draw(st.integers(1, 4))
    k = draw(st.integers(1, 4))
    t = draw(st.integers(1, 9))
    g = torch.Generator().manual_seed(draw(seeds))
    gap = draw(st.sampled_from([1e-3, 0.1, 1.0, 4.0, 60.0]))  # 60 >> δ: heavy clipping
    s_scale = draw(st.sampled_from([0.1, 3.0, 30.0]))
    s = -torch.rand(b, t, generator=g, dtype=torch.float64) * s_scale
    u = s[:, None] + torch.randn(b, k, t, generator=g, dtype=torch.float64) * gap
    if draw(st.booleans()):  # some teachers agree on average (support ≈ ±|bias|)
        u = u + torch.randn(b, k, 1, generator=g, dtype=torch.float64) * gap
    density = draw(st.sampled_from([0.3, 0.8, 1.0]))
    mask = torch.rand(b, t, generator=g) < density
    all_masked = torch.tensor(draw(st.lists(st.booleans(), min_size=b, max_size=b)))
    mask[all_masked] = False
    r = torch.tensor(draw(st.lists(rewards, min_size=b, max_size=b)), dtype=torch.float64)
    w = torch.rand(b, k, generator=g, dtype=torch.float64)
    w[torch.rand(b, k, generator=g) < 0.25] = 0.0  # absent teachers
    if draw(st.booleans()):
        w = torch.softmax(torch.randn(b, k, generator=g, dtype=torch.float64), -1)
    return dict(
        student_logprobs=s,
        teacher_logprobs=u,
        token_mask=mask,
        rewards=r,
        teacher_weights=w,
        gate_tau=draw(st.sampled_from([0.1, 1.0, 4.0])),
        clip_delta=draw(st.sampled_from([0.5, 3.0, 100.0])),
        confidence_threshold=draw(st.sampled_from([0.0, 0.05, 0.5])),
    )


def _gated_run(c, dtype, backend):
    s = c["student_logprobs"].detach().to(dtype).clone().requires_grad_(True)
    args = dict(
        c,
        student_logprobs=s,
        teacher_logprobs=c["teacher_logprobs"].to(dtype),
        teacher_weights=c["teacher_weights"].to(dtype),
    )
    out = sk.gated_kd_loss(**args, backend=backend)
    out.loss.backward()
    return out, s.grad


def _gated_fields(out, grad):
    return dict(
        loss=out.loss.detach(),
        support=out.support,
        polarity=out.polarity,
        row_loss=out.row_loss,
        grad=grad,
    )


@props(80)
@given(c=gated_cases())
def test_gated_kd_loss_float64_matches_reference(c):
    want = _gated_fields(*_gated_run(c, torch.float64, "reference"))
    got = _gated_fields(*_gated_run(c, torch.float64, "torch"))
    for k in want:
        assert got[k].dtype == torch.float64, k
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12, msg=k)


@props(80)
@given(c=gated_cases())
def test_gated_kd_loss_float32_within_rule(c):
    oracle = _gated_fields(*_gated_run(c, torch.float64, "reference"))
    # Rounding can flip σ when |S| sits on the threshold ε: keep such cases out.
    S = oracle["support"]
    eps = c["confidence_threshold"]
    assume(bool(((S == 0) | ((S.abs() - eps).abs() > 1e-4)).all()))
    c32 = round32(c)
    oracle = _gated_fields(*_gated_run(c32, torch.float64, "reference"))
    assume(bool(((oracle["support"] == 0) | ((oracle["support"].abs() - eps).abs() > 1e-4)).all()))
    eager = _gated_fields(*_gated_run(c32, torch.float32, "reference"))
    got = _gated_fields(*_gated_run(c32, torch.float32, "torch"))
    torch.testing.assert_close(got["polarity"], oracle["polarity"].float())
    mag = max(1.0, amax(c32["teacher_logprobs"]), amax(c32["student_logprobs"]))
    for k in ("loss", "support", "row_loss", "grad"):
        atol = 16 * EPS32 * mag * max(1.0, amax(c32["teacher_weights"]))
        if k == "grad":
            atol *= max(1.0, 1.0 / c["gate_tau"])
        assert got[k].dtype == torch.float32, k
        assert_rule(got[k], oracle[k], eager[k], atol, k)


@props(60)
@given(c=gated_cases(), backend=st.sampled_from(EAGER_BACKENDS))
def test_gated_kd_loss_ranges(c, backend):
    out, grad = _gated_run(c, torch.float64, backend)
    S, P, L = out.support, out.polarity, out.row_loss
    delta, eps = c["clip_delta"], c["confidence_threshold"]
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    assert set(P.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert (S.abs() <= delta * (1 + 1e-12)).all()
    assert (L >= 0).all() and (L <= math.log(2) * (1 + 1e-12)).all()
    outcome = torch.where(c["rewards"] > 0, 1.0, -1.0).double()[:, None]
    confident = S.abs() > eps
    assert (P[~confident] == 0).all()
    assert (P[confident] == (outcome * S.sign()).expand_as(P)[confident]).all()
    rows_off = ~c["token_mask"].any(1)
    assert (S[rows_off] == 0).all() and (P[rows_off] == 0).all() and (L[rows_off] == 0).all()
    assert (grad[~c["token_mask"]] == 0).all()


@props(40)
@given(c=gated_cases(), backend=st.sampled_from(EAGER_BACKENDS))
def test_gated_kd_loss_zero_weights_give_zero(c, backend):
    c = dict(c, teacher_weights=torch.zeros_like(c["teacher_weights"]))
    out, grad = _gated_run(c, torch.float64, backend)
    assert out.loss.item() == 0.0
    assert (grad == 0).all()


@props(60)
@given(
    c=gated_cases(rewards=st.sampled_from([1.0, -1.0, 0.7, -3.0])),
    backend=st.sampled_from(EAGER_BACKENDS),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_gated_kd_loss_flipping_rewards_flips_sign(c, backend, dtype):
    a, ga = _gated_run(c, dtype, backend)
    b, gb = _gated_run(dict(c, rewards=-c["rewards"]), dtype, backend)
    assert b.loss.item() == -a.loss.item()
    torch.testing.assert_close(gb, -ga, rtol=0, atol=0)
    torch.testing.assert_close(b.support, a.support, rtol=0, atol=0)
    torch.testing.assert_close(b.row_loss, a.row_loss, rtol=0, atol=0)
    torch.testing.assert_close(b.polarity, -a.polarity, rtol=0, atol=0)
    m = a.metrics(), b.metrics()
    assert m[0]["helpful_frac"] == m[1]["harmful_frac"]
    assert m[0]["neutral_frac"] == m[1]["neutral_frac"]


@props(40)
@given(
    c=gated_cases(),
    backend=st.sampled_from(EAGER_BACKENDS),
    garbage=st.sampled_from([math.nan, math.inf, -math.inf, 1e30]),
)
def test_gated_kd_loss_masked_positions_are_inert(c, backend, garbage):
    a, ga = _gated_run(c, torch.float64, backend)
    off = ~c["token_mask"]
    s = c["student_logprobs"].clone()
    u = c["teacher_logprobs"].clone()
    s[off] = garbage
    u[off[:, None].expand_as(u)] = -garbage
    b, gb = _gated_run(dict(c, student_logprobs=s, teacher_logprobs=u), torch.float64, backend)
    for x, y in (
        (a.loss, b.loss),
        (a.support, b.support),
        (a.polarity, b.polarity),
        (a.row_loss, b.row_loss),
        (ga, gb),
    ):
        torch.testing.assert_close(y, x, rtol=0, atol=0)


@props(40)
@given(c=gated_cases(), backend=st.sampled_from(EAGER_BACKENDS))
def test_gated_kd_loss_teacher_permutation_and_batch_duplication(c, backend):
    a, ga = _gated_run(c, torch.float64, backend)
    k = c["teacher_weights"].shape[1]
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(k))
    p = dict(
        c,
        teacher_logprobs=c["teacher_logprobs"][:, perm],
        teacher_weights=c["teacher_weights"][:, perm],
    )
    b, gb = _gated_run(p, torch.float64, backend)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(b.support, a.support[:, perm])
    torch.testing.assert_close(b.polarity, a.polarity[:, perm])
    torch.testing.assert_close(gb, ga, rtol=1e-12, atol=1e-15)
    # The loss is a mean over rollouts: the batch concatenated with itself has the same loss.
    d = {key: (torch.cat([v, v]) if isinstance(v, torch.Tensor) else v) for key, v in c.items()}
    dd, gd = _gated_run(d, torch.float64, backend)
    torch.testing.assert_close(dd.loss, a.loss, rtol=1e-12, atol=1e-15)
    B = c["rewards"].shape[0]
    torch.testing.assert_close(gd[:B] * 2, ga, rtol=1e-12, atol=1e-15)


# --- the gated loss from hidden states ------------------------------------------------------------


@st.composite
def linear_gated_cases(draw):
    c = draw(gated_cases())
    b, k, t = c["teacher_logprobs"].shape
    v, h = draw(odd), draw(odd)
    g = torch.Generator().manual_seed(draw(seeds))
    scale = draw(st.sampled_from([1.0, 8.0, 100.0]))
    hidden = torch.randn(b, t, h, generator=g, dtype=torch.float64)
    teacher_hidden = hidden[:, None] + draw(st.sampled_from([0.01, 0.5, 3.0])) * torch.randn(
        b, k, t, h, generator=g, dtype=torch.float64
    )
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * (scale / math.sqrt(h))
    bias = torch.randn(v, generator=g, dtype=torch.float64) if draw(st.booleans()) else None
    targets = torch.randint(0, v, (b, t), generator=g)
    targets[torch.rand(b, t, generator=g) < 0.15] = -100
    del c["student_logprobs"], c["teacher_logprobs"]
    return dict(
        c,
        student_hidden=hidden,
        weight=weight,
        targets=targets,
        teacher_hidden=teacher_hidden,
        bias=bias,
        temperature=draw(temperatures),
        workspace=draw(workspaces),
    )


def _linear_gated_run(c, backend, **over):
    c = dict(c, **over)
    ws = c.pop("workspace")
    leaves = {
        k: c[k].clone().requires_grad_(True)
        for k in ("student_hidden", "weight", "bias")
        if c[k] is not None
    }
    with workspace(ws):
        out = sk.linear_gated_kd_loss(**{**c, **leaves}, backend=backend)
        out.loss.backward()
    return out, {k: v.grad for k, v in leaves.items()}


@props(50)
@given(c=linear_gated_cases())
def test_linear_gated_kd_loss_float64_matches_reference(c):
    want, gw = _linear_gated_run(c, "reference")
    got, gg = _linear_gated_run(c, "torch")
    for name in ("loss", "support", "polarity", "row_loss"):
        torch.testing.assert_close(
            getattr(got, name).detach(),
            getattr(want, name).detach(),
            rtol=1e-10,
            atol=1e-11,
            msg=name,
        )
    for k in gw:
        torch.testing.assert_close(
            gg[k], gw[k], rtol=1e-9, atol=1e-11 * max(1.0, amax(gw[k])), msg=f"grad {k}"
        )
    # Precomputed teacher log-probs give the same result as teacher hidden states.
    pre, gp = _linear_gated_run(
        c, "torch", teacher_hidden=None, teacher_logprobs=got.teacher_logprobs
    )
    torch.testing.assert_close(pre.loss, got.loss, rtol=1e-12, atol=1e-15)
    for k in gg:
        torch.testing.assert_close(gp[k], gg[k], rtol=1e-12, atol=1e-15)


@props(30)
@given(c=linear_gated_cases())
def test_linear_gated_kd_loss_reported_logprobs_match_reference(c):
    """GatedKDOutput.student_logprobs / teacher_logprobs agree across backends everywhere
    (linear_logprobs semantics: log p(target), 0.0 where targets == ignore_index),
    including positions that token_mask drops."""
    want, _ = _linear_gated_run(c, "reference")
    got, _ = _linear_gated_run(c, "torch")
    for name in ("student_logprobs", "teacher_logprobs"):
        torch.testing.assert_close(
            getattr(got, name), getattr(want, name), rtol=1e-10, atol=1e-11, msg=name
        )
    k = c["teacher_weights"].shape[1]
    expect_s = sk.linear_logprobs(
        c["student_hidden"],
        c["weight"],
        c["targets"],
        bias=c["bias"],
        temperature=c["temperature"],
        backend="reference",
    )
    expect_u = sk.linear_logprobs(
        c["teacher_hidden"],
        c["weight"],
        c["targets"][:, None].expand(-1, k, -1),
        bias=c["bias"],
        temperature=c["temperature"],
        backend="reference",
    )
    for out in (want, got):
        torch.testing.assert_close(out.student_logprobs, expect_s, rtol=1e-10, atol=1e-11)
        torch.testing.assert_close(out.teacher_logprobs, expect_u, rtol=1e-10, atol=1e-11)


@props(30)
@given(c=linear_gated_cases(), backend=st.sampled_from(EAGER_BACKENDS))
def test_linear_gated_kd_loss_zero_weights_and_reward_flip(c, backend):
    c = dict(c, rewards=torch.where(c["rewards"] == 0, 1.0, c["rewards"]))  # r = 0 is a failure
    z, gz = _linear_gated_run(c, backend, teacher_weights=torch.zeros_like(c["teacher_weights"]))
    assert z.loss.item() == 0.0
    for k, g in gz.items():
        assert (g == 0).all(), k
    a, ga = _linear_gated_run(c, backend)
    b, gb = _linear_gated_run(c, backend, rewards=-c["rewards"])
    assert b.loss.item() == -a.loss.item()
    torch.testing.assert_close(b.polarity, -a.polarity, rtol=0, atol=0)
    for k in ga:
        torch.testing.assert_close(gb[k], -ga[k], rtol=0, atol=0)
