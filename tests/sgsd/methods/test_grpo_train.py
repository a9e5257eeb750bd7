"""The GRPO and +Skill baselines and the teacher variants, end to end on the tiny model:
``--loss grpo`` under torchrun (2 ranks) with exact resume, ``--student-skills``, each
``--teacher`` mode (ema / periodic resume exactly), and evaluation during training."""

from __future__ import annotations

import json

import pytest
import torch
from test_train_run import checkpoints, metrics, run_train, trainable

pytestmark = pytest.mark.slow

# Small and fast: 2 problems x G rollouts of <= 64 tokens per step, HF generate. A
# constant LR: the default linear decay depends on max_steps, which the resume tests vary.
FAST = [
    "--rollout-backend",
    "hf",
    "--problems-per-step",
    "2",
    "--max-completion-tokens",
    "64",
    "--num-teachers",
    "2",
    "--micro-batch-size",
    "4",
    "--progress-bar",
    "false",
    "--checkpoint-every",
    "1",
    "--lr-schedule",
    "constant",
]


def _same_weights(a, b):
    ta, tb = trainable(a), trainable(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_grpo_torchrun_two_ranks_then_exact_resume(tmp_path):
    args = [*FAST, "--loss", "grpo", "--rollouts-per-problem", "4"]
    full, part = tmp_path / "full", tmp_path / "part"
    run_train([*args, "--max-steps", "3", "--output-dir", str(full)], nproc=2)
    run_train([*args, "--max-steps", "2", "--output-dir", str(part)], nproc=2)
    run_train([*args, "--max-steps", "3", "--output-dir", str(part), "--resume", "latest"], nproc=2)
    cfg = json.loads((full / "checkpoints" / "step_000003" / "trainer_state.json").read_text())
    assert cfg["config"]["num_iterations"] == 2 and cfg["config"]["temperature"] == 1.2
    m_full, m_part = metrics(full), metrics(part)
    assert [r["step"] for r in m_part] == [1, 2, 3]
    for key in ("loss", "reward_mean", "clip_frac", "grad_norm", "completion_tokens"):
        assert m_full[-1][key] == m_part[-1][key], key
    assert all("helpful_frac" not in r and "ratio_mean" in r for r in m_full)
    # not vacuous: the warm-started model is often right on the (memorised) train split,
    # so groups have mixed rewards, non-zero advantages and gradients
    assert any(-1 < r["reward_mean"] < 1 and r["grad_norm"] > 0 for r in m_full)
    _same_weights(full / "checkpoints" / "step_000003", part / "checkpoints" / "step_000003")


def test_grpo_plus_skill_takes_a_torchrun_step(tmp_path):
    out = tmp_path / "grpo-skill"
    args = [*FAST, "--loss", "grpo", "--rollouts-per-problem", "2", "--student-skills"]
    run_train([*args, "--max-steps", "1", "--output-dir", str(out)], nproc=1)
    cfg = json.loads((out / "checkpoints" / "step_000001" / "trainer_state.json").read_text())
    assert cfg["config"]["student_skills"] is True and cfg["config"]["student_skills_k"] == 3
    assert [r["step"] for r in metrics(out)] == [1]


@pytest.mark.parametrize("teacher", ["live", "frozen"])
def test_teacher_modes_take_a_torchrun_step(tmp_path, teacher):
    out = tmp_path / teacher
    run_train([*FAST, "--teacher", teacher, "--max-steps", "2", "--output-dir", str(out)], nproc=1)
    m = metrics(out)
    assert [r["step"] for r in m] == [1, 2] and all(r["teachers_per_rollout"] > 0 for r in m)
    assert not (out / "checkpoints" / "step_000002" / "teacher.pt").exists()


@pytest.mark.parametrize("teacher", ["ema", "periodic"])
def test_kept_teacher_state_resumes_exactly(tmp_path, teacher):
    args = [*FAST, "--teacher", teacher, "--teacher-refresh-every", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    run_train([*args, "--max-steps", "3", "--output-dir", str(full)], nproc=1)
    # all under torchrun (it sets OMP_NUM_THREADS=1: CPU float sums depend on thread count)
    run_train([*args, "--max-steps", "2", "--output-dir", str(part)], nproc=1)
    run_train([*args, "--max-steps", "3", "--output-dir", str(part), "--resume", "latest"], nproc=1)
    a = torch.load(full / "checkpoints" / "step_000003" / "teacher.pt", weights_only=True)
    b = torch.load(part / "checkpoints" / "step_000003" / "teacher.pt", weights_only=True)
    assert a["mode"] == teacher and a["refreshed_at"] == b["refreshed_at"]
    assert a["tensors"].keys() == b["tensors"].keys() and a["tensors"]
    for k in a["tensors"]:
        assert torch.equal(a["tensors"][k], b["tensors"][k]), k
    assert metrics(full)[-1]["loss"] == metrics(part)[-1]["loss"]
    _same_weights(full / "checkpoints" / "step_000003", part / "checkpoints" / "step_000003")


def test_eval_in_training_writes_eval_jsonl_and_keeps_evaluated_checkpoints(tmp_path):
    out = tmp_path / "run"
    args = [
        *FAST,
        "--eval-every",
        "2",
        "--eval-limit",
        "3",
        "--eval-n",
        "2",
        "--eval-max-tokens",
        "24",
        "--keep-checkpoints",
        "1",
        "--output-dir",
        str(out),
    ]
    run_train([*args, "--max-steps", "3"])
    records = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 3]
    for r in records:
        d = r["datasets"]["demo"]
        assert d["problems"] == 3 and d["n"] == 2 and 0.0 <= d["avg"] <= 1.0
        assert r["mean_avg"] == d["avg"]
    best = max(records, key=lambda r: (r["mean_avg"], -r["step"]))
    assert records[-1]["best_step"] == best["step"]
    # keep_checkpoints=1 prunes step 1, never an evaluated step
    assert checkpoints(out) == ["step_000002", "step_000003"]
    # a resumed run keeps the records up to its checkpoint and appends after it
    run_train([*args, "--max-steps", "4", "--resume", str(out / "checkpoints" / "step_000002")])
    steps = [json.loads(x)["step"] for x in (out / "eval.jsonl").read_text().splitlines()]
    assert steps == [2, 4]
    assert "step_000002" in checkpoints(out) and "step_000004" in checkpoints(out)
