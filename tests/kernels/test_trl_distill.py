"""sgsd_kernels.integrations.trl.LinearDivergenceLoss against TRL GKD's own
``generalized_jsd_loss`` on the same logits (float64): values, reductions and gradients."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.gkd import GKDTrainer  # noqa: E402

import sgsd_kernels as sk  # noqa: E402
from sgsd_kernels import hf  # noqa: E402
from sgsd_kernels.integrations.trl import LinearDivergenceLoss  # noqa: E402

B, T, H, V = 2, 5, 16, 61


def _inputs():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(B, T, H, dtype=torch.float64, generator=g).requires_grad_()
    w = (torch.randn(V, H, dtype=torch.float64, generator=g) * 0.5).requires_grad_()
    t = torch.randn(B, T, H, dtype=torch.float64, generator=g)
    tw = torch.randn(V, H, dtype=torch.float64, generator=g) * 0.5
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100
    labels[1, -1] = -100
    return s, w, t, tw, labels


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("reduction", [("token", "batchmean"), ("mean", "mean"), ("sum", "sum")])
def test_matches_gkd_generalized_jsd_loss(beta, temperature, reduction):
    ours_name, trl_name = reduction
    s, w, t, tw, labels = _inputs()
    loss_fn = LinearDivergenceLoss(beta, temperature, reduction=ours_name)
    got = loss_fn(s, w, t, teacher_weight=tw, mask=labels != -100)
    (gs, gw) = torch.autograd.grad(got, [s, w])
    want = GKDTrainer.generalized_jsd_loss(
        s @ w.T, t @ tw.T, labels, beta=beta, temperature=temperature, reduction=trl_name
    )
    (ws, ww) = torch.autograd.grad(want, [s, w])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gs, ws, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gw, ww, rtol=1e-9, atol=1e-12)


def test_per_token_and_per_sequence_reductions():
    s, w, t, tw, labels = _inputs()
    mask = labels != -100
    elements = GKDTrainer.generalized_jsd_loss(  # [B, T, V] without labels, "none"
        s @ w.T, t @ tw.T, None, beta=0.3, reduction="none"
    )
    per_token = elements.sum(-1) * mask
    got = LinearDivergenceLoss(0.3, reduction="none")(s, w, t, teacher_weight=tw, mask=mask)
    torch.testing.assert_close(got, per_token.detach(), rtol=1e-10, atol=1e-12)
    seq = LinearDivergenceLoss(0.3, reduction="sequence")(s, w, t, teacher_weight=tw, mask=mask)
    want = (per_token.sum(1) / mask.sum(1)).mean()
    torch.testing.assert_close(seq, want, rtol=1e-10, atol=1e-12)
    n = LinearDivergenceLoss(0.3)(s, w, t, teacher_weight=tw, mask=mask, num_items_in_batch=7)
    torch.testing.assert_close(n, per_token.sum() / 7, rtol=1e-10, atol=1e-12)


def test_top_k_and_clip_reach_the_kernel():
    s, w, t, tw, labels = _inputs()
    mask = labels != -100
    got = LinearDivergenceLoss(0.0, top_k=5, elementwise_clip=0.05, reduction="none")(
        s, w, t, teacher_weight=tw, mask=mask
    )
    want = sk.linear_divergence(
        s, w, t, teacher_weight=tw, beta=0.0, teacher_top_k=5, elementwise_clip=0.05, mask=mask
    )
    full = LinearDivergenceLoss(0.0, reduction="none")(s, w, t, teacher_weight=tw, mask=mask)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(got, full)


def test_from_models_matches_gkd_on_the_models_logits():
    transformers = pytest.importorskip("transformers")
    from tests.kernels.test_hf import _inputs as _ids
    from tests.kernels.test_hf import _tiny_qwen3

    student, teacher = _tiny_qwen3(0), _tiny_qwen3(1)
    ids, mask = _ids()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # the prompt
    got = LinearDivergenceLoss(0.5).from_models(student, teacher, ids, mask, labels)
    with torch.no_grad():
        zt = teacher(ids, attention_mask=mask).logits
    zs = student(ids, attention_mask=mask).logits
    want = GKDTrainer.generalized_jsd_loss(zs[:, :-1], zt[:, :-1], labels[:, 1:], beta=0.5)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert isinstance(hf.unwrap_causal_lm(student), transformers.Qwen3ForCausalLM)


def test_bad_reduction_is_named():
    with pytest.raises(ValueError, match="reduction must be one of"):
        LinearDivergenceLoss(reduction="batchmean")
