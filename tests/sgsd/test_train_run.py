"""End-to-end runs of ``sgsd/train.py`` on CPU with the tiny model, as real processes
(python, torchrun with gloo), real tokenizer, math-verify, BM25 bank and rollouts."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "sgsd" / "train.py"

# Small and fast: a step takes about a second on two CPU cores.
FAST = [
    "--rollout-backend",
    "hf",
    "--max-completion-tokens",
    "12",
    "--problems-per-step",
    "2",
    "--rollouts-per-problem",
    "2",
    "--num-teachers",
    "2",
    "--micro-batch-size",
    "2",
    "--progress-bar",
    "false",
]


def _env() -> dict:
    return dict(
        os.environ,
        TOKENIZERS_PARALLELISM="false",
        VLLM_LOGGING_LEVEL="WARNING",
        PYTHONUNBUFFERED="1",
    )


def run_train(args: list[str], *, nproc: int | None = None, timeout: int = 300):
    """``python sgsd/train.py ARGS`` or ``torchrun --nproc_per_node=N sgsd/train.py ARGS``."""
    if nproc is None:
        cmd = [sys.executable, str(TRAIN), *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(TRAIN),
            *args,
        ]
    res = subprocess.run(
        cmd, check=False, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-4000:]}\n{res.stderr[-6000:]}"
    return res


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def checkpoints(out: Path) -> list[str]:
    root = out / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def documented_metric_keys() -> list[str]:
    """The keys docs/metrics.md documents for the default run (its first table's first
    column; keys written only with some options follow in a later section)."""
    text = (REPO / "docs" / "metrics.md").read_text().split("## Keys written only with")[0]
    return [line.split("`")[1] for line in text.splitlines() if line.startswith("| `")]


def trainable(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "trainable.safetensors"))


def test_single_process_run_then_exact_resume(tmp_path):
    """The README command (torchrun, one process): it trains, logs and checkpoints; a run
    resumed from its step-2 checkpoint logs the same losses and ends with the same weights."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    res = run_train(
        [
            *FAST,
            "--max-steps",
            "4",
            "--checkpoint-every",
            "2",
            "--keep-checkpoints",
            "0",
            "--sample-every",
            "2",
            "--output-dir",
            str(full),
        ],
        nproc=1,
    )
    rows = metrics(full)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        for key in (
            "loss",
            "reward_mean",
            "correct_frac",
            "teacher_helpful_frac",
            "teacher_harmful_frac",
            "teacher_neutral_frac",
            "gap_clipped_frac",
            "token_kept_frac",
            "teacher_support_mean",
            "teachers_per_rollout",
            "grad_norm",
            "completion_tokens_per_s",
            "step_time_s",
        ):
            assert math.isfinite(r[key]), (key, r)
        assert -1.0 <= r["reward_mean"] <= 1.0 and r["rollouts"] == 4
        fracs = ("teacher_helpful_frac", "teacher_harmful_frac", "teacher_neutral_frac")
        assert sum(r[k] for k in fracs) == pytest.approx(1.0)
        assert set(r) == set(documented_metric_keys()), "docs/metrics.md lists every key"
    assert len({r["loss"] for r in rows}) > 1  # the losses are not trivially constant
    # one console line per step, with a generation sample
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("step ")]
    assert len(lines) == 4 and "loss" in lines[0] and "tok/s" in lines[0]
    assert res.stdout.count("sample [") == 2  # --sample-every 2: steps 2 and 4, not 1
    assert sorted({json.loads(s)["step"] for s in (full / "samples.jsonl").open()}) == [2, 4]
    assert (full / "config.yaml").is_file() and (full / "samples.jsonl").stat().st_size > 0
    # checkpoints: every 2 steps (the last is also the end), complete, no temp dir left over
    assert checkpoints(full) == ["step_000002", "step_000004"]
    ck = full / "checkpoints" / "step_000004"
    for name in (
        "trainable.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "skill_bank.json",
        "trainer_state.json",
        "rng/rank0.pt",
        "adapter/adapter_config.json",
        "model/config.json",
        "model/tokenizer_config.json",
    ):
        assert (ck / name).exists(), name
    assert json.loads((ck / "trainer_state.json").read_text())["step"] == 4
    assert not (full / "checkpoints" / "step_000002" / "model").exists()  # the last one only
    # parameters moved: LoRA B starts at exactly 0, and A and B change between checkpoints
    mid, last = trainable(full / "checkpoints" / "step_000002"), trainable(ck)
    b_names = [n for n in last if "lora_B" in n]
    assert b_names and all(last[n].abs().max() > 0 for n in b_names)
    assert any(not (mid[n] == last[n]).all() for n in last)

    run_train(
        [
            *FAST,
            "--max-steps",
            "4",
            "--output-dir",
            str(resumed),
            "--resume",
            str(full / "checkpoints" / "step_000002"),
        ]
    )
    again = metrics(resumed)
    assert [r["step"] for r in again] == [3, 4]
    for key in ("loss", "reward_mean", "grad_norm", "completion_tokens", "teacher_helpful_frac"):
        assert [r[key] for r in rows[2:]] == [r[key] for r in again], key
    final = trainable(resumed / "checkpoints" / "step_000004")
    assert all((final[n] == last[n]).all() for n in last)  # bit-identical weights


def test_torchrun_two_ranks_gloo_then_resume_ddp_and_fsdp2(tmp_path):
    """The issue's acceptance command, on the default rollout backend (vLLM when installed):
    2 ranks (DDP), a checkpoint, a resume; then FSDP2 resumes the same checkpoint (one
    full-state format for both) and takes the same step as DDP."""
    out, sharded = tmp_path / "ddp", tmp_path / "fsdp2"
    common = ["--max-completion-tokens", "12", "--progress-bar", "false"]
    res = run_train([*common, "--max-steps", "2", "--output-dir", str(out)], nproc=2, timeout=420)
    assert [r["step"] for r in metrics(out)] == [1, 2]
    assert res.stdout.count("step     1 |") == 1  # rank 0 alone logs
    for noise in ("LD_PRELOAD", "reduce_op", "NUMA binding", "Loading weights", "Triton"):
        assert noise not in res.stdout + res.stderr, noise  # known noise, filtered
    ck = out / "checkpoints" / "step_000002"
    assert (ck / "rng" / "rank0.pt").is_file() and (ck / "rng" / "rank1.pt").is_file()
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["data_position"] == 2 * 4
    run_train(
        [*common, "--max-steps", "3", "--output-dir", str(out), "--resume", "latest"],
        nproc=2,
        timeout=420,
    )
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    assert "step_000003" in checkpoints(out)

    run_train(
        [
            *common,
            "--max-steps",
            "3",
            "--parallelism",
            "fsdp2",
            "--output-dir",
            str(sharded),
            "--resume",
            str(ck),
        ],
        nproc=2,
        timeout=420,
    )
    (step3,) = metrics(sharded)
    assert step3["step"] == 3
    # same samples (seeded, same pushed weights), same loss up to reduction order
    assert step3["completion_tokens"] == rows[2]["completion_tokens"]
    assert step3["loss"] == pytest.approx(rows[2]["loss"], rel=1e-5)
    assert step3["grad_norm"] == pytest.approx(rows[2]["grad_norm"], rel=1e-4)
    wa = trainable(out / "checkpoints" / "step_000003")
    wb = trainable(sharded / "checkpoints" / "step_000003")
    assert set(wa) == set(wb)
    for name in wa:  # FSDP2 saved full (unsharded) tensors
        assert wa[name].shape == wb[name].shape
        assert (wa[name] - wb[name]).abs().max() < 1e-4, name


def test_ctrl_c_under_torchrun_saves_a_checkpoint_before_exiting(tmp_path):
    """Ctrl-C = SIGINT to the whole process group (the agent forwards it to the workers as
    well): both ranks agree on the step to stop at, save one checkpoint and exit without a
    KeyboardInterrupt. (torchrun itself then exits non-zero, as it does on any signal.)"""
    out = tmp_path / "sig"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(TRAIN),
        *FAST,
        "--max-completion-tokens",
        "8",
        "--max-steps",
        "1000",
        "--checkpoint-every",
        "0",
        "--output-dir",
        str(out),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").is_file() and metrics(out):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        os.killpg(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    last = metrics(out)[-1]["step"]
    assert 1 <= last < 1000
    assert checkpoints(out) == [f"step_{last:06d}"], output[-4000:]
    assert output.count("stopping at step") == 2  # both ranks, at the same step
    assert "KeyboardInterrupt" not in output
