"""The trainer's step loss and gradients equal the one-row-per-(rollout, teacher) SGSD
formulation (docs/design.md §3), on the tiny model with real prompts, skill bank and mask.

The trainer runs ONE student forward per rollout, teacher log-probs from hidden states
through ``sgsd_kernels``, micro-batched and gradient-accumulated. The oracle below is the
naive method: for every (rollout, teacher) pair its own student forward with full logits
and its own teacher forward, the §3 formulas written out, in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from sgsd import prompts
from sgsd.config import load_config
from sgsd.engine.model import load_policy
from sgsd.engine.scoring import Rollout, forward_backward
from sgsd.methods import build_method


@pytest.fixture(scope="module", params=["lora", "full"])
def setup(request):
    """LoRA (adapters only) and full fine-tuning (the LM head's gradient then flows through
    the fused kernel's dW, the embeddings' through dh)."""
    cfg = load_config(
        [
            "--dtype",
            "float32",
            "--micro-batch-size",
            "2",
            "--teacher-micro-batch-size",
            "3",
            "--num-teachers",
            "3",
            "--kernel-backend",
            "torch",
            "--finetune",
            request.param,
        ]
    )
    torch.manual_seed(0)
    policy, tokenizer, _ = load_policy(cfg, torch.device("cpu"))
    policy.double()
    with torch.no_grad():  # LoRA B starts at 0; give the adapters a real effect
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return cfg, policy, tokenizer


def _rollouts(cfg, tokenizer, strategy=None):
    from sgsd.data import load_problems
    from sgsd.eval.verify import verify
    from sgsd.skills.bank import SkillBank

    bank = SkillBank.default()
    strategy = strategy or build_method(cfg)
    problems = load_problems("demo", limit=3)
    g = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    out = []
    for i, problem in enumerate(problems):
        prompt_ids = prompts.render_prompt_ids(tokenizer, strategy.student_messages(problem))
        teachers = [
            (prompts.render_prompt_ids(tokenizer, m), w)
            for m, w in strategy.teachers(problem, bank)
        ]
        assert len(teachers) == cfg.num_teachers
        for j, length in enumerate((7, 12)):
            completion = torch.randint(0, vocab, (length,), generator=g).tolist()
            completion[2:2] = newline  # a whitespace token the mask must drop
            completion.append(tokenizer.eos_token_id)  # a format token the mask must drop
            if i == 0 and j == 0:  # right answer, so rewards are mixed
                completion = (
                    tokenizer.encode(f"so \\boxed{{{problem.answer}}}", add_special_tokens=False)
                    + completion
                )
            text = tokenizer.decode(completion, skip_special_tokens=True)
            result = verify(text, problem.answer)
            t = teachers if (i, j) != (1, 1) else teachers[:1]  # fewer than K teachers
            out.append(
                Rollout(
                    problem,
                    prompt_ids,
                    completion,
                    strategy.token_mask(tokenizer, completion),
                    float(result.reward),
                    result.predicted,
                    t,
                )
            )
    assert {r.reward for r in out} == {1.0, -1.0}
    return out


def _seq_logprobs(policy, prefix, completion):
    ids = torch.tensor([prefix + completion])
    logits = policy.model(input_ids=ids).logits[0].double()  # full [L, V] logits: the oracle
    lp = torch.log_softmax(logits[len(prefix) - 1 : -1], -1)
    return lp.gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)


def _oracle(cfg, policy, rollouts):
    """Σ_b Σ_k w ρ L / B with one student forward per (rollout, teacher) row; with
    ``cfg.polarity`` off ρ = +1 (the paper's ablation)."""
    tau, delta, eps = cfg.gate_tau, cfg.clip_delta, cfg.confidence_threshold
    total = torch.zeros((), dtype=torch.float64)
    for r in rollouts:
        m = torch.tensor(r.token_mask, dtype=torch.float64)
        n = max(1.0, float(m.sum()))
        for teacher_ids, w in r.teachers:
            s = _seq_logprobs(policy, r.prompt_ids, r.completion_ids)  # grad
            with torch.no_grad():
                u = _seq_logprobs(policy, teacher_ids, r.completion_ids)
            d = u - s
            support = float((m * d.detach().clamp(-delta, delta)).sum()) / n
            sigma = (1.0 if support > 0 else -1.0) if abs(support) > eps else 0.0
            rho = (1.0 if r.reward > 0 else -1.0) * sigma if cfg.polarity else 1.0
            gate = math.log(2.0) - torch.nn.functional.softplus(-d * d / (2 * tau))
            total = total + w * rho * (m * gate).sum() / n
    return total / len(rollouts)


def test_trainer_loss_and_grads_equal_per_row_formulation(setup):
    cfg, policy, tokenizer = setup
    rollouts = _rollouts(cfg, tokenizer)
    strategy = build_method(cfg)
    params = {n: p for n, p in policy.named_parameters() if p.requires_grad}

    policy.zero_grad(set_to_none=True)
    loss, sums = forward_backward(
        policy, policy, strategy, rollouts, cfg, tokenizer.pad_token_id, torch.device("cpu")
    )
    ours = {n: p.grad.clone() for n, p in params.items()}

    policy.zero_grad(set_to_none=True)
    expected = _oracle(cfg, policy, rollouts)
    expected.backward()
    ref = {n: p.grad.clone() for n, p in params.items()}

    assert abs(expected.item()) > 1e-6, "degenerate case: the loss is 0"
    # Tolerances: the model runs in float64, but HF's RMSNorm computes in float32, so the
    # 1e-16-level difference between padded-batch and single-sequence attention can flip a
    # float32 rounding (~1e-7 relative). A wrong mask, position or teacher row is O(1).
    assert loss == pytest.approx(expected.item(), rel=1e-7, abs=1e-12)
    assert sum(g.abs().sum() for g in ref.values()) > 0
    if cfg.finetune == "full":
        assert ref["model.lm_head.weight"].abs().sum() > 0
    for name in params:
        scale = float(ref[name].abs().max())
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-5, atol=1e-6 * scale, msg=name)
    assert 0.0 <= sums.means()["helpful_frac"] <= 1.0
    assert sums.teachers == sum(len(r.teachers) for r in rollouts)


def test_the_ablations_reach_the_loss(setup):
    """--polarity false --clip-delta inf --token-mask false: ρ = +1 for every teacher, no
    clipping, and the format tokens the default mask drops count (docs/design.md §3)."""
    import dataclasses

    cfg, policy, tokenizer = setup
    if cfg.finetune != "lora":
        pytest.skip("one fine-tuning mode is enough for the flags")
    ablated = dataclasses.replace(cfg, polarity=False, clip_delta=math.inf, token_mask=False)
    strategy = build_method(ablated)
    rollouts = _rollouts(ablated, tokenizer, strategy)
    assert all(all(r.token_mask) for r in rollouts)  # EOS and whitespace kept
    loss, sums = forward_backward(
        policy, policy, strategy, rollouts, ablated, tokenizer.pad_token_id, torch.device("cpu")
    )
    with torch.no_grad():
        expected = _oracle(ablated, policy, rollouts)
    assert loss == pytest.approx(expected.item(), rel=1e-7, abs=1e-12)
    assert loss > 0  # every term is +w·L >= 0
    assert sums.means()["helpful_frac"] == 1.0 and sums.means()["clipped_frac"] == 0.0
