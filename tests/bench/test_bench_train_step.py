"""``benchmarks/bench_train_step.py`` end to end on a cut-down configuration of its CLI
(the ``cpu`` shape on a 2,048-row vocabulary, 8 completion tokens): it writes one row per
method with its phases, memory, MFU and the step-0 check. Rows and columns, not speed."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

pytest.importorskip("peft")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "bench_train_step.py")
SMALL = ["--vocab", "2048", "--K", "2", "--problems", "2", "--T", "8", "--prompt-len", "4",
         "--skill-len", "4", "--repeats", "1", "--threads", "1", "--device", "cpu"]  # fmt: skip


def _run(args, out):
    return subprocess.run(
        [sys.executable, SCRIPT, *args, "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip


def test_rows_and_columns(tmp_path):
    r = _run(SMALL, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == [
        "train-step_cpu_float32_cpu.csv",
        "train-step_cpu_float32_cpu.md",
    ]
    with open(tmp_path / "train-step_cpu_float32_cpu.csv") as f:
        rows = {row["method"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"published", "ours-torch", "ours-native"}
    # the native row runs where the extension is built, else it says why
    native = rows["ours-native"]
    assert native["status"] == "ok" or "not built" in native["note"], native
    ran = [m for m, row in rows.items() if row["status"] == "ok"]
    assert {"published", "ours-torch"} <= set(ran)
    for m in ran:
        row = rows[m]
        assert (row["shape"], row["vocab"], row["K"], row["T"]) == ("cpu", "2048", "2", "8")
        for col in ("step_ms_p50", "teacher_ms_p50", "student_ms_p50", "optimizer_ms_p50",
                    "peak_bytes", "tokens_per_s", "mfu", "gemm_flops_per_s", "loss_step0",
                    "grad_norm_step0"):  # fmt: skip
            assert float(row[col]) >= 0, (m, col, row[col])
        assert float(row["teacher_ms_p50"]) > 0 and float(row["student_ms_p50"]) > 0
        if m != "published":
            assert row["loss_check"] == "ok", row
            assert float(row["speedup_vs_published"]) > 0
            assert float(row["mem_ratio_vs_published"]) > 0
    table = (tmp_path / "train-step_cpu_float32_cpu.md").read_text()
    assert r.stdout.startswith("### One SGSD optimizer step, random-init `cpu`")
    assert "| published | reference (eager) |" in table and "V 2,048" in table
    assert "step-0 loss (rel. err vs published)" in table


def test_cuda_request_without_cuda_fails_loudly(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = _run([*SMALL[:-2], "--device", "cuda"], tmp_path)
    assert r.returncode != 0 and "sees no CUDA device" in r.stderr
    assert not os.listdir(tmp_path)
