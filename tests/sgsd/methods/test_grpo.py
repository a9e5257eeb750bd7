"""GRPO on hidden states (sgsd.methods.grpo) against a float64 eager formulation with full logits:
loss and gradients for several group sizes, dtypes and backends; first and later passes;
zero advantage for equal rewards; bad inputs."""

from __future__ import annotations

import pytest
import torch

from sgsd.methods.grpo import group_advantages, grpo_loss

V, H, T = 1007, 61, 6  # odd vocabulary and hidden sizes (docs/design.md §8)


def eager_grpo(hidden, weight, bias, targets, mask, adv, old, clip_eps, temperature):
    """Reference: full [B, T, V] logits, log_softmax, the published per-token PPO term."""
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    lp = torch.log_softmax(z / temperature, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    lp = lp * mask
    old = lp.detach() if old is None else torch.where(mask, old.to(lp.dtype), lp.detach())
    ratio = torch.exp(lp - old)
    a = adv.to(lp.dtype).unsqueeze(1)
    per_tok = -torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    m = mask.to(lp.dtype)
    return ((per_tok * m).sum(1) / m.sum(1).clamp(min=1)).mean()


def make_case(groups, g, seed, with_bias=True):
    gen = torch.Generator().manual_seed(seed)
    b = groups * g
    hidden = torch.randn(b, T, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) * 0.3
    bias = torch.randn(V, generator=gen, dtype=torch.float64) if with_bias else None
    targets = torch.randint(0, V, (b, T), generator=gen)
    mask = torch.rand(b, T, generator=gen) > 0.25
    mask[0] = False  # a row with nothing to learn from
    rewards = torch.where(torch.rand(b, generator=gen) > 0.5, 1.0, -1.0).double()
    return hidden, weight, bias, targets, mask, rewards


def grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


def leaf(x, dtype):
    return None if x is None else x.detach().to(dtype).requires_grad_(True)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size", [1, 2, 4, 8])
@pytest.mark.parametrize("second_pass", [False, True])
def test_loss_and_grads_match_float64_eager(backend, dtype, group_size, second_pass):
    hidden, weight, bias, targets, mask, rewards = make_case(2, group_size, seed=group_size)
    adv = group_advantages(rewards, group_size)
    old = None
    if second_pass:  # old log-probs a little away from the current ones: some ratios clip
        with torch.no_grad():
            ref_lp = torch.log_softmax(hidden @ weight.T + bias, -1)
            ref_lp = ref_lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        noise = torch.randn(ref_lp.shape, generator=torch.Generator().manual_seed(1)) * 0.3
        old = (ref_lp + noise).float()
    # float64 oracle
    o = [leaf(x, torch.float64) for x in (hidden, weight, bias)]
    loss64 = eager_grpo(*o, targets, mask, adv, old, 0.2, 0.9)
    g64 = grads(loss64, o)
    # ours in `dtype`
    x = [leaf(t, dtype) for t in (hidden, weight, bias)]
    out = grpo_loss(
        x[0], x[1], targets, mask, adv, old, bias=x[2], temperature=0.9, backend=backend
    )
    g = grads(out.loss, x)
    if dtype == torch.float64:
        torch.testing.assert_close(out.loss, loss64, rtol=1e-10, atol=1e-12)
        for a, b in zip(g, g64):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
        return
    # low precision: error vs the oracle at most 2x eager PyTorch's in the same dtype + atol
    e = [leaf(t, dtype) for t in (hidden, weight, bias)]
    loss_e = eager_grpo(*[t.float() for t in e], targets, mask, adv, old, 0.2, 0.9)
    if dtype != torch.float32:  # eager in bf16: the logits GEMM itself in bf16
        loss_e = eager_grpo(*e, targets, mask, adv, old, 0.2, 0.9)
    g_e = grads(loss_e, e)
    atol = 1e-6 if dtype == torch.float32 else 1e-3
    err = (out.loss.double() - loss64).abs()
    assert err <= 2 * (loss_e.double() - loss64).abs() + atol
    for a, b, c in zip(g, g64, g_e):
        assert (a.double() - b).abs().max() <= 2 * (c.double() - b).abs().max() + atol


@pytest.mark.parametrize("group_size", [2, 3, 8])
def test_equal_rewards_give_zero_advantage_loss_and_gradient(group_size):
    hidden, weight, bias, targets, mask, _ = make_case(3, group_size, seed=7)
    for value in (1.0, -1.0):
        rewards = torch.full((3 * group_size,), value, dtype=torch.float64)
        adv = group_advantages(rewards, group_size)
        assert torch.equal(adv, torch.zeros_like(adv))
        h = leaf(hidden, torch.float32)
        out = grpo_loss(h, weight.float(), targets, mask, adv, backend="torch")
        (gh,) = torch.autograd.grad(out.loss, [h])
        assert out.loss.item() == 0.0 and gh.abs().max().item() == 0.0


def test_group_advantages_formula_and_group_of_one():
    r = torch.tensor([1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0, -1.0], dtype=torch.float64)
    adv = group_advantages(r, 4)
    for grp in range(2):
        x = r[grp * 4 : grp * 4 + 4]
        want = (x - x.mean()) / (x.std() + 1e-4)
        torch.testing.assert_close(adv[grp * 4 : grp * 4 + 4], want)
    torch.testing.assert_close(
        group_advantages(r, 4, scale=False), r - r.view(2, 4).mean(1).repeat_interleave(4)
    )
    assert torch.equal(group_advantages(r, 1), torch.zeros_like(r))


def test_first_pass_is_the_policy_gradient_and_clipping_kicks_in_later():
    hidden, weight, bias, targets, mask, rewards = make_case(2, 4, seed=3, with_bias=False)
    adv = group_advantages(rewards, 4)
    w = leaf(weight, torch.float32)
    first = grpo_loss(hidden.float(), w, targets, mask, adv, backend="torch")
    assert first.ratio_mean == pytest.approx(1.0) and first.clip_frac == 0.0
    (gw,) = torch.autograd.grad(first.loss, [w])
    with torch.no_grad():
        w2 = (w - 50.0 * gw).requires_grad_(True)  # a big step: ratios leave [0.8, 1.2]
    second = grpo_loss(hidden.float(), w2, targets, mask, adv, first.logprobs, backend="torch")
    assert second.clip_frac > 0 and second.ratio_mean != pytest.approx(1.0)
    want = eager_grpo(hidden.float(), w2, None, targets, mask, adv, first.logprobs, 0.2, 1.0)
    torch.testing.assert_close(second.loss, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        ({"rewards": torch.ones(2, 2)}, ValueError, "rewards must be a 1-D tensor"),
        ({"rewards": torch.ones(4, dtype=torch.long)}, TypeError, "floating point"),
        ({"group_size": 0}, ValueError, "group_size must be an int >= 1"),
        ({"group_size": 3}, ValueError, "not a multiple of group_size=3"),
        ({"eps": 0.0}, ValueError, "eps must be > 0"),
    ],
)
def test_group_advantages_bad_inputs(kwargs, exc, msg):
    args = {"rewards": torch.ones(4), "group_size": 2, **kwargs}
    eps = args.pop("eps", 1e-4)
    with pytest.raises(exc, match=msg):
        group_advantages(args["rewards"], args["group_size"], eps=eps)


@pytest.mark.parametrize(
    "change, exc, msg",
    [
        ({"hidden": torch.zeros(2, 3)}, ValueError, r"hidden must be \[B, T, H\]"),
        (
            {"targets": torch.zeros(2, 4, dtype=torch.long)},
            ValueError,
            r"targets must be \[B, T\] = \[2, 3\]",
        ),
        ({"mask": torch.ones(2, 3)}, TypeError, "mask must be bool"),
        ({"advantages": torch.zeros(3)}, ValueError, r"advantages must be \[B\] = \[2\]"),
        ({"old_logprobs": torch.zeros(2)}, ValueError, r"old_logprobs must be \[B, T\]"),
        ({"clip_eps": 1.5}, ValueError, r"clip_eps must be in \(0, 1\)"),
    ],
)
def test_grpo_loss_bad_inputs(change, exc, msg):
    args = {
        "hidden": torch.zeros(2, 3, 5),
        "weight": torch.zeros(11, 5),
        "targets": torch.zeros(2, 3, dtype=torch.long),
        "mask": torch.ones(2, 3, dtype=torch.bool),
        "advantages": torch.zeros(2),
        "old_logprobs": None,
        **change,
    }
    clip = args.pop("clip_eps", 0.2)
    with pytest.raises(exc, match=msg):
        grpo_loss(**args, clip_eps=clip, backend="torch")
