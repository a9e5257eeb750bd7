"""sgsd.engine.teacher_weights on the tiny Qwen3 policy: which weights each teacher mode
scores with, the EMA / periodic updates, exact state round trips, and bad inputs."""

from __future__ import annotations

import pytest
import torch

from sgsd.config import TrainConfig
from sgsd.engine.teacher_weights import TeacherWeights

pytest.importorskip("peft")


def _policy(finetune: str):
    from sgsd.engine.model import load_policy

    cfg = TrainConfig(
        model="tiny", finetune=finetune, lora_r=4, lora_alpha=8, gradient_checkpointing=False
    )
    policy, _, _ = load_policy(cfg, torch.device("cpu"))
    return policy


IDS = torch.tensor([[5, 17, 301, 42, 9, 77]])


def _hidden(policy):
    with torch.no_grad():
        return policy(IDS, torch.ones_like(IDS)).clone()


def _move(policy, seed: int, scale: float = 0.05):
    """Stand-in for an optimiser step: change every trainable parameter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


@pytest.fixture(scope="module", params=["lora", "full"])
def policy(request):
    return _policy(request.param)


def _trainable(policy):
    return {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}


def _restore(policy, saved):
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if n in saved:
                p.copy_(saved[n])


def test_live_is_the_current_weights_and_frozen_the_initial_ones(policy):
    start = _trainable(policy)
    h0 = _hidden(policy)
    live, frozen = TeacherWeights("live", policy), TeacherWeights("frozen", policy)
    _move(policy, 1)
    h1 = _hidden(policy)
    assert not torch.allclose(h0, h1)
    with live.active(policy):
        torch.testing.assert_close(_hidden(policy), h1)
    with frozen.active(policy):
        torch.testing.assert_close(_hidden(policy), h0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_hidden(policy), h1)  # live weights are back
    _restore(policy, start)


def test_ema_follows_the_formula_in_float32(policy):
    start = _trainable(policy)
    ema = TeacherWeights("ema", policy, ema_decay=0.9)
    want = {n: t.double() for n, t in start.items()}
    for step in (1, 2, 3):
        _move(policy, step)
        ema.after_optimizer_step(policy, step)
        now = _trainable(policy)
        want = {n: 0.9 * want[n] + 0.1 * now[n].double() for n in want}
    for n, t in ema.kept.items():
        assert t.dtype == torch.float32
        torch.testing.assert_close(t.double(), want[n], rtol=1e-6, atol=1e-7)
    with ema.active(policy):  # the model computes with the average
        for n, p in policy.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.detach(), ema.kept[n].to(p.dtype))
    _restore(policy, start)


def test_periodic_refreshes_every_n_steps(policy):
    start = _trainable(policy)
    per = TeacherWeights("periodic", policy, every=2)
    _move(policy, 1)
    per.after_optimizer_step(policy, 1)
    assert per.refreshed_at == 0
    for n, t in per.kept.items():
        torch.testing.assert_close(t, start[n])
    _move(policy, 2)
    per.after_optimizer_step(policy, 2)
    assert per.refreshed_at == 2
    for n, t in _trainable(policy).items():
        torch.testing.assert_close(per.kept[n], t)
    _restore(policy, start)


@pytest.mark.parametrize("mode", ["ema", "periodic"])
def test_state_round_trip_resumes_exactly(policy, mode):
    start = _trainable(policy)
    a = TeacherWeights(mode, policy, ema_decay=0.99, every=2)
    for step in (1, 2, 3):
        _move(policy, 10 + step)
        a.after_optimizer_step(policy, step)
    state = a.state_dict()
    b = TeacherWeights(mode, policy, ema_decay=0.99, every=2)  # a fresh run's object
    b.load_state_dict(state)
    for step in (4, 5):
        _move(policy, 10 + step)
        a.after_optimizer_step(policy, step)
        b.after_optimizer_step(policy, step)
    assert a.refreshed_at == b.refreshed_at == (4 if mode == "periodic" else 0)
    for n in a.kept:
        assert torch.equal(a.kept[n], b.kept[n])
    _restore(policy, start)


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"mode": "best"}, "teacher mode must be one of"),
        ({"mode": "ema", "ema_decay": 1.0}, r"ema_decay must be a float in \(0, 1\)"),
        ({"mode": "periodic", "every": 0}, "refresh interval must be an int >= 1"),
    ],
)
def test_bad_arguments_are_named(policy, kwargs, msg):
    kwargs = dict(kwargs)  # parametrize shares the dict between the policy params
    mode = kwargs.pop("mode")
    with pytest.raises(ValueError, match=msg):
        TeacherWeights(mode, policy, **kwargs)


def test_loading_a_mismatched_state_is_named(policy):
    ema = TeacherWeights("ema", policy)
    with pytest.raises(ValueError, match="is for teacher='periodic'"):
        ema.load_state_dict({"mode": "periodic", "tensors": {}})
    with pytest.raises(ValueError, match="does not match the trainable parameters"):
        ema.load_state_dict({"mode": "ema", "tensors": {}})
