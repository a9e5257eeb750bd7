"""``linear_gated_kd_loss(..., local_support_top_k=k)`` (docs/design.md §3.2) on every backend
against the float64 oracle (loss, support, polarity, row loss, metrics and gradients), and
the reference against an independent per-token formulation written with Python sets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import sgsd_kernels as sk
from sgsd_kernels import native

from .conftest import BACKENDS, DEVICE, EAGER_BACKENDS, REL_ATOL, assert_close_to_oracle

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# (B, K, T, H, V): odd V and H, K = 1, T = 1.
SHAPES = [(3, 2, 7, 61, 1007), (1, 1, 1, 61, 1007), (2, 3, 5, 16, 40)]


def make_case(B, K, T, H, V, dtype, with_bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=g)
    hs = torch.randn(B, T, H, **f64) * 0.8
    w = torch.randn(V, H, **f64) * 0.4
    # Teachers near the student: a mix of gaps on either side of the thresholds.
    th = hs.unsqueeze(1) + torch.randn(B, K, T, H, **f64) * 0.5
    b = torch.randn(V, **f64) if with_bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0, 0] = True
    if T > 2:
        targets[0, 1] = -100
    if B > 2:
        mask[2] = False  # an all-masked rollout
    rewards = torch.tensor([1.0, -1.0, 1.0][:B], dtype=torch.float64)
    tw = torch.rand(B, K, **f64) + 0.1
    if K > 1:
        tw[0, 1] = 0.0  # an absent teacher
    cast = lambda x: None if x is None else x.to(dtype).to(DEVICE)  # noqa: E731
    to = lambda x: x.to(DEVICE)  # noqa: E731
    return cast(hs), cast(w), cast(th), cast(b), to(targets), to(mask), to(rewards), to(tw)


def _leaf(x, dtype=None):
    if x is None:
        return None
    return (x.detach() if dtype is None else x.detach().to(dtype)).clone().requires_grad_(True)


def _run(hs, w, th, b, targets, mask, rewards, tw, k, backend, **kw):
    leaves = [_leaf(hs), _leaf(w), _leaf(b)]
    out = sk.linear_gated_kd_loss(
        leaves[0], leaves[1], targets, mask, rewards, tw, teacher_hidden=th, bias=leaves[2],
        local_support_top_k=k, backend=backend, **kw,
    )  # fmt: skip
    req = [x for x in leaves if x is not None]
    return out, torch.autograd.grad(out.loss, req)


def _eager_gated(hs, w, th, b, targets, mask, rewards, tw, k, **kw):
    """PyTorch in the input dtype: GEMMs in that dtype, fp32 local-support math."""
    leaves = [_leaf(hs), _leaf(w), _leaf(b)]
    zs = leaves[0] @ leaves[1].T + (0 if b is None else leaves[2])
    zt = (th @ w.T + (0 if b is None else b)).detach()
    eye_h = zs.shape[-1]
    out = sk.linear_gated_kd_loss(
        zs.float(), torch.eye(eye_h, device=zs.device), targets, mask, rewards, tw.float(),
        teacher_hidden=zt.float(), local_support_top_k=k, backend="reference", **kw,
    )  # fmt: skip
    req = [x for x in leaves if x is not None]
    return out, torch.autograd.grad(out.loss, req)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-K{}-T{}-H{}-V{}".format(*s))
@pytest.mark.parametrize("k", [1, 7, "V"])
def test_local_support_matches_oracle(backend, dtype, shape, k, one_thread):
    if backend == "triton" and dtype != torch.float32 and shape[0] > 1:
        pytest.skip("interpreter time: low precision Triton runs on the smallest case")
    B, K, T, H, V = shape
    k = V if k == "V" else k
    with_bias = shape[0] != 1
    case = make_case(B, K, T, H, V, dtype, with_bias)
    hs, w, th, b, targets, mask, rewards, tw = case
    kw = dict(temperature=1.1, gate_tau=0.7, clip_delta=1.0, confidence_threshold=0.01)
    f64 = lambda x: None if x is None else x.double()  # noqa: E731
    oracle, og = _run(
        f64(hs), f64(w), f64(th), f64(b), targets, mask, rewards, tw.double(), k, "reference", **kw
    )
    eager, eg = _eager_gated(*case, k, **kw)
    got, gg = _run(*case, k, backend, **kw)
    rel = REL_ATOL[dtype]
    assert got.loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_to_oracle("loss", got.loss, eager.loss, oracle.loss, rel_atol=rel)
    assert_close_to_oracle("support", got.support, eager.support, oracle.support, rel_atol=rel)
    assert_close_to_oracle("row_loss", got.row_loss, eager.row_loss, oracle.row_loss, rel_atol=rel)
    if dtype in (torch.float64, torch.float32):
        assert torch.equal(got.polarity.cpu(), oracle.polarity.cpu())
    for name, a, e, o in zip(("d_hidden", "d_weight", "d_bias"), gg, eg, og):
        assert a.dtype == dtype
        assert_close_to_oracle(name, a, e, o, rel_atol=rel)
    gm, om = got.metrics(), oracle.metrics()
    assert gm["local_support_size"] == pytest.approx(om["local_support_size"])
    tol = 1e-9 if dtype == torch.float64 else 5e-2
    assert gm["local_support_divergence"] == pytest.approx(om["local_support_divergence"], rel=tol)
    assert 0 < gm["local_support_size"] <= min(k, V) + 1


def _loop_oracle(hs, w, th, targets, mask, rewards, tw, k, temperature, tau, delta, eps):
    """docs/design.md §3.2 token by token, with the support as a Python set."""
    B, K, T = th.shape[:3]
    loss = 0.0
    support = torch.zeros(B, K, dtype=torch.float64)
    for b_ in range(B):
        n = max(1, int(mask[b_].sum()))
        for k_ in range(K):
            s_sum, l_sum = 0.0, 0.0
            for t in range(T):
                if not mask[b_, t]:
                    continue
                zs = (w @ hs[b_, t]) / temperature
                zt = (w @ th[b_, k_, t]) / temperature
                y = int(targets[b_, t])
                keep = set(zt.topk(min(k, len(zt))).indices.tolist()) | {y}
                cols = torch.tensor(sorted(keep))
                ls = zs[cols] - torch.logsumexp(zs[cols], 0)
                lt = zt[cols] - torch.logsumexp(zt[cols], 0)
                pos = sorted(keep).index(y)
                s_sum += float((lt[pos] - ls[pos]).clamp(-delta, delta))
                kl = float((lt.exp() * (lt - ls)).sum())
                gate_in = torch.tensor(-(kl**2) / (2 * tau), dtype=torch.float64)
                l_sum += math.log(2.0) - float(F.softplus(gate_in))
            s = s_sum / n
            support[b_, k_] = s
            sigma = (1.0 if s > 0 else -1.0) if abs(s) > eps else 0.0
            rho = (1.0 if rewards[b_] > 0 else -1.0) * sigma
            loss += float(tw[b_, k_]) * rho * l_sum / n
    return loss / B, support


@pytest.mark.parametrize("k", [1, 3, 40])
def test_reference_matches_per_token_loop(k):
    B, K, T, H, V = 2, 2, 4, 8, 40
    hs, w, th, _, targets, mask, rewards, tw = make_case(B, K, T, H, V, torch.float64, False, 4)
    hypers = dict(temperature=0.9, gate_tau=0.5, clip_delta=0.8, confidence_threshold=0.02)
    out = sk.linear_gated_kd_loss(
        hs, w, targets, mask, rewards, tw, teacher_hidden=th, local_support_top_k=k,
        backend="reference", **hypers,
    )  # fmt: skip
    valid = mask & (targets != -100)
    loss, support = _loop_oracle(hs, w, th, targets, valid, rewards, tw, k, *hypers.values())
    assert out.loss.item() == pytest.approx(loss, rel=1e-10, abs=1e-12)
    torch.testing.assert_close(out.support.cpu(), support, rtol=1e-10, atol=1e-12)


def test_k_at_least_v_is_full_vocabulary_kl_gate():
    """With k ≥ V the support is the whole vocabulary: Δ̃ = Δ and the gate sees the full KL."""
    B, K, T, H, V = 2, 2, 5, 16, 40
    hs, w, th, _, targets, mask, rewards, tw = make_case(B, K, T, H, V, torch.float64, False)
    out = sk.linear_gated_kd_loss(
        hs, w, targets, mask, rewards, tw, teacher_hidden=th, local_support_top_k=V + 5,
        backend="torch",
    )  # fmt: skip
    full = sk.linear_gated_kd_loss(
        hs, w, targets, mask, rewards, tw, teacher_hidden=th, backend="torch"
    )
    torch.testing.assert_close(out.support, full.support)
    valid = (mask & (targets != -100)).unsqueeze(1).expand(B, K, T)
    kl = sk.linear_divergence(hs.unsqueeze(1).expand(B, K, T, H), w, th, mask=valid)
    torch.testing.assert_close(out._local_divergence, kl)
    assert out.metrics()["local_support_size"] == V


def test_gradient_reaches_only_the_student():
    B, K, T, H, V = 2, 2, 5, 16, 40
    hs, w, th, _, targets, mask, rewards, tw = make_case(B, K, T, H, V, torch.float32, False)
    th = th.clone().requires_grad_(True)
    hs = hs.clone().requires_grad_(True)
    out = sk.linear_gated_kd_loss(
        hs, w, targets, mask, rewards, tw, teacher_hidden=th, local_support_top_k=3,
        confidence_threshold=0.0, backend="torch",
    )  # fmt: skip
    out.loss.backward()
    assert th.grad is None
    assert hs.grad.abs().sum() > 0
    assert (hs.grad[~(mask & (targets != -100))] == 0).all()


@pytest.mark.parametrize("backend", EAGER_BACKENDS)
def test_nan_teacher_row_gives_nan_gradient_as_the_reference(backend):
    """A NaN teacher row keeps its support in the backward: its loss and its student
    gradient are NaN (as in the reference), never a silent zero."""
    if backend == "native" and not native.is_built():
        pytest.skip("the native extension is not built (python -m sgsd_kernels.native build)")
    B, K, T, H, V = 1, 1, 4, 8, 50
    hs, w, th, _, targets, mask, rewards, tw = make_case(B, K, T, H, V, torch.float64, False)
    th, mask = th.clone(), mask.clone()
    mask[0, 2] = True  # a valid position (position 1 is ignore_index)
    th[0, 0, 2] = float("nan")
    hs = hs.clone().requires_grad_(True)
    out = sk.linear_gated_kd_loss(
        hs, w, targets, mask, rewards, tw, teacher_hidden=th, local_support_top_k=5,
        confidence_threshold=0.0, backend=backend,
    )  # fmt: skip
    out.loss.backward()
    assert out.loss.isnan()
    assert hs.grad[0, 2].isnan().any()
    assert not hs.grad[0, 0].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("k", [1, 7, 300])
def test_blocked_teacher_pass_matches_oracle(dtype, k, monkeypatch, one_thread):
    """The torch kernels' teacher top-k pass over many row chunks and vocabulary blocks
    (a running top-k across blocks) gives the same loss and gradients."""
    from sgsd_kernels.ops.torch_backend import local_support

    monkeypatch.setattr(local_support, "TOPK_ELEMENTS", 3000)  # 16 rows × 187 columns
    test_local_support_matches_oracle("torch", dtype, (3, 2, 7, 61, 1007), k, one_thread)
