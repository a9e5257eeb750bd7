"""GatedKDLoss (module form) and GatedKDOutput.metrics()."""

from __future__ import annotations

import pytest
import torch

import sgsd_kernels as sk

from .conftest import EAGER_BACKENDS


def _inputs(B=3, K=4, T=11, H=16, V=97):
    torch.manual_seed(0)
    sh = torch.randn(B, T, H, requires_grad=True)
    th = torch.randn(B, K, T, H)
    w = torch.randn(V, H) * 0.5
    tg = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.3
    r = torch.tensor([1.0, -1.0, 1.0])
    tw = torch.softmax(torch.randn(B, K), -1)
    tw[1, 0] = 0.0
    return sh, th, w, tg, mask, r, tw


@pytest.mark.parametrize("backend", EAGER_BACKENDS)
def test_module_matches_functions(backend):
    sh, th, w, tg, mask, r, tw = _inputs()
    loss_fn = sk.GatedKDLoss(
        gate_tau=0.5, clip_delta=2.0, confidence_threshold=0.01, backend=backend
    )
    assert "gate_tau=0.5" in repr(loss_fn)
    a = loss_fn.from_hidden(sh, w, tg, mask, r, tw, teacher_hidden=th)
    b = sk.linear_gated_kd_loss(
        sh,
        w,
        tg,
        mask,
        r,
        tw,
        teacher_hidden=th,
        gate_tau=0.5,
        clip_delta=2.0,
        confidence_threshold=0.01,
        backend=backend,
    )
    torch.testing.assert_close(a.loss, b.loss)
    c = loss_fn(a.student_logprobs, a.teacher_logprobs, mask, r, tw)
    torch.testing.assert_close(c.loss, a.loss)
    torch.testing.assert_close(c.polarity, a.polarity)


def test_module_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="gate_tau must be > 0"):
        sk.GatedKDLoss(gate_tau=0.0)
    with pytest.raises(ValueError, match="clip_delta must be > 0"):
        sk.GatedKDLoss(clip_delta=-1.0)
    with pytest.raises(ValueError, match="confidence_threshold must be >= 0"):
        sk.GatedKDLoss(confidence_threshold=-0.1)
    with pytest.raises(ValueError, match="backend must be one of"):
        sk.GatedKDLoss(backend="cuda")


def test_metrics_are_consistent_with_outputs():
    sh, th, w, tg, mask, r, tw = _inputs()
    out = sk.linear_gated_kd_loss(sh, w, tg, mask, r, tw, teacher_hidden=th, backend="torch")
    m = out.metrics()
    present = tw > 0
    assert m["teacher_rows"] == present.sum().item()
    assert m["helpful_frac"] + m["harmful_frac"] + m["neutral_frac"] == pytest.approx(1.0)
    assert m["helpful_frac"] == pytest.approx(
        ((out.polarity > 0) & present).sum().item() / present.sum().item()
    )
    assert m["mask_keep_frac"] == pytest.approx(mask.float().mean().item())
    assert 0.0 <= m["clipped_frac"] <= 1.0
    assert m["loss"] == pytest.approx(out.loss.item())
    assert m["mean_support"] == pytest.approx(out.support[present].mean().item(), rel=1e-5)
    assert all(isinstance(v, float) for v in m.values())


@pytest.mark.parametrize("backend", EAGER_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_teacher_rows_counts_present_rollout_teacher_pairs(backend, dtype):
    """teacher_rows sums present (w > 0) teachers over the batch, not per rollout."""
    B, K, T = 2, 8, 5
    s = torch.randn(B, T).to(dtype)
    u = torch.randn(B, K, T).to(dtype)
    mask = torch.ones(B, T, dtype=torch.bool)
    r = torch.tensor([1.0, -1.0])
    w = torch.ones(B, K, dtype=dtype)
    assert sk.gated_kd_loss(s, u, mask, r, w, backend=backend).metrics()["teacher_rows"] == 16.0
    w[0, :3] = 0.0
    w[1, 7] = 0.0
    assert sk.gated_kd_loss(s, u, mask, r, w, backend=backend).metrics()["teacher_rows"] == 12.0
