"""The skill bank inside the trainer: the online-update hook with the real tiny model
(HF generate), its config fields, a 2-rank torchrun run in which updates fire and a
resumed run reproduces the bank, and the teacher style / thinking options."""

from __future__ import annotations

import json

import pytest
import torch
from test_train_run import FAST, metrics, run_train

from sgsd.config import load_config
from sgsd.data import load_problems
from sgsd.engine.scoring import Rollout
from sgsd.prompts import STUDENT_INSTRUCTION
from sgsd.skills.bank import SkillBank
from sgsd.skills.online_update import OnlineBankUpdater

BANK_KEYS = (
    "bank_update",
    "bank_update_time_s",
    "bank_added",
    "bank_evicted",
    "bank_parse_failures",
    "bank_skills",
    "bank_mistakes",
    "bank_online_skills",
    "bank_online_mistakes",
    "bank_online_teacher_frac",
    "bank_ranks_agree",
)


@pytest.fixture(scope="module")
def hf_engine():
    from sgsd.engine.model import load_policy
    from sgsd.engine.rollout import HFRolloutEngine

    cfg = load_config(["--finetune", "full"])
    policy, tok, _ = load_policy(cfg, torch.device("cpu"))
    return HFRolloutEngine(cfg, policy, tok), tok


def _rollouts(tok, rewards):
    problems = load_problems("demo", limit=len(rewards))
    ids = tok.encode("so the answer is \\boxed{5}", add_special_tokens=False)
    return [Rollout(p, [1], ids, [True] * len(ids), r, "5", []) for p, r in zip(problems, rewards)]


@pytest.mark.parametrize(
    "args, fires",
    [
        (["--skill-update-every", "1", "--skill-update-threshold", "1.0"], True),
        (["--skill-update-every", "2", "--skill-update-threshold", "1.0"], False),  # step 3
        (["--skill-update-every", "0"], False),
        (["--skill-update-every", "1", "--skill-update-threshold", "0.5"], False),  # rate 0.5
    ],
)
def test_hook_with_the_tiny_model(tmp_path, hf_engine, args, fires):
    engine, tok = hf_engine
    cfg = load_config([*args, "--skill-update-max-tokens", "8", "--skill-online-capacity", "4"])
    bank = SkillBank.default(online_capacity=cfg.skill_online_capacity)
    rollouts = _rollouts(tok, [1.0, -1.0])
    # an online item that matches the first problem's words: retrieval picks it
    bank.add_skill("Online", rollouts[0].problem.problem, "always")
    updater = OnlineBankUpdater(cfg, tmp_path, rank=0)
    new, m = updater.step(3, rollouts, bank, engine, tok, torch.device("cpu"))
    assert set(m) == set(BANK_KEYS) and m["bank_ranks_agree"] == 1.0
    assert 0 < m["bank_online_teacher_frac"] < 1
    assert m["bank_online_skills"] == 1 and m["bank_skills"] == len(bank.skills)
    saved = tmp_path / "skill_bank" / "step_000003.json"
    assert m["bank_update"] == float(fires) and saved.is_file() == fires
    if fires:
        # the random tiny model writes no JSON: both replies unparsed, the bank kept whole
        assert m["bank_parse_failures"] == 2 and m["bank_update_time_s"] > 0
        assert new.skills == bank.skills and new.mistakes == bank.mistakes
        (entry,) = SkillBank.load(saved).metadata["sgsd_online_updates"]
        assert entry["step"] == 3 and entry["records"] == 2 and entry["success_rate"] == 0.5
        log = (tmp_path / "skill_bank" / "unparsed_replies.jsonl").read_text().splitlines()
        assert len(log) == 2 and json.loads(log[0])["stage"] == "extract"
    else:
        assert new is bank and m["bank_parse_failures"] == 0


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("skill-update-every", "-1", "--skill-update-every must be >= 0, got -1"),
        ("skill-update-threshold", "1.5", r"--skill-update-threshold must be in \[0, 1\]"),
        ("skill-update-max-new", "-1", "--skill-update-max-new must be >= 0"),
        ("skill-online-capacity", "-2", "--skill-online-capacity must be >= 0"),
        ("skill-update-max-tokens", "0", "--skill-update-max-tokens must be >= 1"),
        ("teacher-style", "fancy", r"--teacher-style must be one of published\|compact"),
    ],
)
def test_config_fields(key, value, message):
    cfg = load_config([])
    assert (cfg.skill_update_every, cfg.skill_update_threshold) == (25, 0.8)
    assert (cfg.skill_update_max_new, cfg.skill_online_capacity) == (5, 30)
    assert cfg.teacher_style == "published"
    with pytest.raises(ValueError, match=message):
        load_config([f"--{key}", value])


def test_torchrun_two_ranks_update_fires_and_resume_reproduces_the_bank(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = [*FAST, "--skill-update-every", "1", "--skill-update-threshold", "1.0"]
    args += ["--checkpoint-every", "1", "--keep-checkpoints", "0", "--max-steps", "2"]
    res = run_train([*args, "--output-dir", str(full)], nproc=2, timeout=420)
    rows = metrics(full)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["bank_update"] == 1.0 and r["bank_ranks_agree"] == 1.0  # both ranks agree
        assert r["bank_parse_failures"] == 4 and r["bank_update_time_s"] > 0
        assert all(k in r for k in BANK_KEYS)
    assert (
        res.stdout.count("skill bank update at step")
        + res.stderr.count("skill bank update at step")
        == 2
    )  # logged once per update, by rank 0
    files = sorted(p.name for p in (full / "skill_bank").glob("step_*.json"))
    assert files == ["step_000001.json", "step_000002.json"]
    last = SkillBank.load(full / "skill_bank" / "step_000002.json")
    history = last.metadata["sgsd_online_updates"]
    # gathered to rank 0: 2 problems x 2 rollouts, from both ranks
    assert [(h["step"], h["records"]) for h in history] == [(1, 4), (2, 4)]
    ck = json.loads((full / "checkpoints" / "step_000002" / "skill_bank.json").read_text())
    assert SkillBank.from_state_dict(ck).to_dict() == last.to_dict()  # the checkpoint has it

    run_train(
        [*args, "--output-dir", str(resumed), "--resume", str(full / "checkpoints/step_000001")],
        nproc=2,
        timeout=420,
    )
    again = resumed / "skill_bank" / "step_000002.json"
    assert again.read_text() == (full / "skill_bank" / "step_000002.json").read_text()
    (row,) = metrics(resumed)
    for key in BANK_KEYS:
        if key != "bank_update_time_s":
            assert row[key] == rows[1][key], key


@pytest.mark.parametrize(
    "style, marker", [("published", "### General Principles"), ("compact", "Skill: ")]
)
def test_teacher_style_and_thinking_reach_the_loss(style, marker):
    from sgsd.methods import build_method

    cfg = load_config(["--teacher-style", style])
    (problem,) = load_problems("demo", limit=1)
    teachers = build_method(cfg).teachers(problem, SkillBank.default())
    assert len(teachers) == cfg.num_teachers
    assert all(marker in messages[0]["content"] for messages, _ in teachers)
    tail = problem.problem + "\n\n" + STUDENT_INSTRUCTION
    assert all(messages[0]["content"].endswith(tail) for messages, _ in teachers)
    assert cfg.teacher_thinking is False  # the tiny profile's setting (published: on)
    assert load_config(["--teacher-thinking", "true"]).teacher_thinking is True
