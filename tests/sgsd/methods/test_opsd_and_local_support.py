"""The trainer's OPSD step (``--loss opsd``) and local-support SGSD step
(``--local-support-top-k``) equal float64 eager formulations on the tiny model, values and
gradients (docs/design.md §3.1-§3.2).

The trainer runs one no-grad forward per (rollout, teacher) for the teacher hidden states
and ONE student forward per rollout, then the fused ops. The oracles below run a full
forward per (rollout, teacher) pair, take the full [T, V] logits and write the formulas
out in float64: for OPSD the fixed teacher is the base model (LoRA disabled) reading the
reference solution in thinking mode; for SGSD the teachers are the live model.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sgsd import prompts
from sgsd.config import load_config
from sgsd.engine.model import load_policy
from sgsd.engine.scoring import Rollout, forward_backward
from sgsd.methods import build_method
from sgsd.methods.local_support import LocalSupportSGSDLoss
from sgsd.methods.opsd import OPSDLoss, opsd_reference

COMMON = ["--dtype", "float32", "--kernel-backend", "torch", "--teacher-micro-batch-size", "2"]


def _policy(cfg):
    torch.manual_seed(0)
    policy, tokenizer, _ = load_policy(cfg, torch.device("cpu"))
    policy.double()
    with torch.no_grad():  # LoRA B starts at 0: give the adapters (student vs base) an effect
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return policy, tokenizer


def _rollouts(cfg, tokenizer, strategy):
    from sgsd.data import load_problems
    from sgsd.eval.verify import verify
    from sgsd.skills.bank import SkillBank

    bank = SkillBank.default()
    thinking = getattr(strategy, "teacher_enable_thinking", cfg.teacher_thinking)
    g = torch.Generator().manual_seed(0)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    out = []
    for i, problem in enumerate(load_problems("demo", limit=3)):
        prompt_ids = prompts.render_prompt_ids(tokenizer, strategy.student_messages(problem))
        teachers = [
            (prompts.render_prompt_ids(tokenizer, m, enable_thinking=thinking), w)
            for m, w in strategy.teachers(problem, bank)
        ]
        for j, length in enumerate((6, 11)):
            completion = torch.randint(0, len(tokenizer), (length,), generator=g).tolist()
            completion[2:2] = newline  # a whitespace token (format-masked in SGSD only)
            completion.append(tokenizer.eos_token_id)
            if i == 0 and j == 0:
                answer = tokenizer.encode(
                    f"so \\boxed{{{problem.answer}}}", add_special_tokens=False
                )
                completion = answer + completion
            result = verify(tokenizer.decode(completion, skip_special_tokens=True), problem.answer)
            t = teachers if (i, j) != (1, 1) else teachers[:1]
            mask = prompts.format_token_mask(tokenizer, completion)
            out.append(
                Rollout(problem, prompt_ids, completion, mask, float(result.reward), None, t)
            )
    return out


def _logits(policy, prefix, completion, temperature):
    ids = torch.tensor([prefix + completion])
    logits = policy.model(input_ids=ids).logits[0].double()  # full [L, V]: the oracle
    return logits[len(prefix) - 1 : -1] / temperature


def _check_step(cfg, policy, tokenizer, strategy, rollouts, oracle):
    params = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    policy.zero_grad(set_to_none=True)
    loss, metrics = forward_backward(
        policy, policy, strategy, rollouts, cfg, tokenizer.pad_token_id, torch.device("cpu")
    )
    ours = {n: p.grad.clone() for n, p in params.items()}
    policy.zero_grad(set_to_none=True)
    expected = oracle()
    expected.backward()
    ref = {n: p.grad.clone() for n, p in params.items()}
    assert abs(expected.item()) > 1e-6, "degenerate case: the loss is 0"
    # HF's RMSNorm computes in float32 even for a float64 model (see test_train_loss.py).
    assert loss == pytest.approx(expected.item(), rel=1e-6, abs=1e-12)
    assert sum(g.abs().sum() for g in ref.values()) > 0
    for name in params:
        scale = float(ref[name].abs().max())
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-5, atol=1e-6 * scale, msg=name)
    return metrics


@pytest.mark.slow
def test_opsd_step_equals_float64_eager_formulation():
    cfg = load_config([*COMMON, "--loss", "opsd", "--micro-batch-size", "8"])
    assert (cfg.divergence_beta, cfg.divergence_temperature, cfg.divergence_clip) == (
        0.0,
        1.1,
        0.05,
    )
    policy, tokenizer = _policy(cfg)
    strategy = build_method(cfg)
    assert isinstance(strategy, OPSDLoss) and strategy.num_teachers == 1
    rollouts = _rollouts(cfg, tokenizer, strategy)
    T, c = cfg.divergence_temperature, cfg.divergence_clip

    def oracle():
        total, tokens = torch.zeros((), dtype=torch.float64), 0
        for r in rollouts:
            ((teacher_ids, _),) = r.teachers
            log_s = torch.log_softmax(_logits(policy, r.prompt_ids, r.completion_ids, T), -1)
            with torch.no_grad(), policy.model.disable_adapter():  # fixed base teacher
                log_t = torch.log_softmax(_logits(policy, teacher_ids, r.completion_ids, T), -1)
            d = torch.minimum(log_t.exp() * (log_t - log_s), torch.tensor(c, dtype=torch.float64))
            total = total + d.sum()  # every completion token counts (no format mask)
            tokens += len(r.completion_ids)
        return total / tokens

    sums = _check_step(cfg, policy, tokenizer, strategy, rollouts, oracle)
    assert sums.teachers == len(rollouts)  # one present (fixed) teacher per rollout
    assert sums.means()["divergence_mean"] > 0


def test_opsd_teacher_sees_reference_in_thinking_mode(tiny_tokenizer):
    from sgsd.data import Problem

    cfg = load_config(["--loss", "opsd"])
    strategy = build_method(cfg)
    p = Problem(id="x", problem="What is 2+3?", answer="5")
    ((messages, w),) = strategy.teachers(p, bank=None)
    assert w == 1.0 and "The answer is \\boxed{5}." in messages[0]["content"]
    assert opsd_reference(Problem("y", "q", "5", "Add them: 5.")) == "Add them: 5."
    assert strategy.teacher_enable_thinking
    assert strategy.student_messages(p) == prompts.student_messages(p.problem)


@pytest.mark.parametrize("loss", ["opsd", "grpo", "sgsd"])
def test_plus_skill_student_prompt_is_the_guided_prompt(tiny_tokenizer, loss):
    """--student-skills (OPSD+Skill, GRPO+Skill, ...): every method trains on the Base+Skill
    prompt, the top student_skills_k skills and mistakes before the problem."""
    from sgsd.engine.problems import load_problem_set
    from sgsd.skills.bank import SkillBank

    cfg = load_config(["--loss", loss, "--student-skills", "--dataset-limit", "3"])
    bank = SkillBank.default()
    problems, ids = load_problem_set(cfg, tiny_tokenizer, build_method(cfg), bank)
    for p, row in zip(problems, ids):
        messages = prompts.skill_guided_messages(p, bank, cfg.student_skills_k)
        assert row == prompts.render_prompt_ids(tiny_tokenizer, messages)
        text = messages[0]["content"]
        assert text.endswith(prompts.student_text(p.problem)) and "Mistakes" in text


def _local_terms(log_s, log_t, y, k):
    """§3.2 for one position, with the support as a Python set."""
    keep = sorted(set(log_t.topk(min(k, len(log_t))).indices.tolist()) | {y})
    cols = torch.tensor(keep)
    ls = log_s[cols] - torch.logsumexp(log_s[cols], 0)
    lt = log_t[cols] - torch.logsumexp(log_t[cols], 0)
    pos = keep.index(y)
    return (lt[pos] - ls[pos]).detach(), (lt.exp() * (lt - ls)).sum()


@pytest.mark.slow
@pytest.mark.parametrize("top_k", [16])
def test_local_support_sgsd_step_equals_float64_eager_formulation(top_k):
    cfg = load_config(
        [*COMMON, "--local-support-top-k", str(top_k), "--num-teachers", "3",
         "--micro-batch-size", "2"]
    )  # fmt: skip
    policy, tokenizer = _policy(cfg)
    strategy = build_method(cfg)
    assert isinstance(strategy, LocalSupportSGSDLoss)
    rollouts = _rollouts(cfg, tokenizer, strategy)
    tau, delta, eps = cfg.gate_tau, cfg.clip_delta, cfg.confidence_threshold
    temp = cfg.logprob_temperature

    def oracle():
        total = torch.zeros((), dtype=torch.float64)
        for r in rollouts:
            m = r.token_mask
            n = max(1, sum(m))
            for teacher_ids, w in r.teachers:
                zs = _logits(policy, r.prompt_ids, r.completion_ids, temp)
                with torch.no_grad():
                    zt = _logits(policy, teacher_ids, r.completion_ids, temp)
                support, row = 0.0, torch.zeros((), dtype=torch.float64)
                for t, y in enumerate(r.completion_ids):
                    if not m[t]:
                        continue
                    d, kl = _local_terms(zs[t], zt[t], y, top_k)
                    support += float(d.clamp(-delta, delta))
                    row = row + math.log(2.0) - F.softplus(-kl * kl / (2 * tau))
                support /= n
                sigma = (1.0 if support > 0 else -1.0) if abs(support) > eps else 0.0
                rho = (1.0 if r.reward > 0 else -1.0) * sigma
                total = total + w * rho * row / n
        return total / len(rollouts)

    metrics = _check_step(cfg, policy, tokenizer, strategy, rollouts, oracle).means()
    assert top_k <= metrics["local_support_size"] <= top_k + 1
    assert metrics["local_support_divergence"] > 0
