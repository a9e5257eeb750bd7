"""pytest-benchmark suite on small CPU shapes (issue 3, item 6).

    pytest benchmarks --benchmark-only                 # not part of `python -m pytest tests`
    pytest benchmarks --benchmark-only --benchmark-json=/tmp/bench.json

Every benchmark first checks the provider against the float64 paper-reference oracle (the
same check bench_gated_kd.py does), so a fast wrong provider fails instead of timing.
Shapes: V = 4103, H = 61 (odd on purpose), N = 128 tokens, K = 4 teachers.
"""

from __future__ import annotations

import csv
import os

import bench_gated_kd as bench
import pytest
import torch

CASES = {
    "logprobs": bench.Case("logprobs", 128, 4103, 61, 0, "float32"),
    "sgsd": bench.Case("sgsd", 128, 4103, 61, 4, "float32"),
}
PROVIDERS = ("paper-reference", "reference", "torch")


@pytest.mark.parametrize("workload", sorted(CASES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_fwdbwd(benchmark, provider, workload):
    case = CASES[workload]
    try:
        fn = bench.build_provider(provider, workload, "cpu")
        err, what = bench.check_provider(fn, case, 64, "cpu")
    except bench.NotAvailable as e:
        pytest.skip(str(e))
    assert err <= bench.TOL["float32"], what
    x = bench.make_inputs(case, case.N, "cpu", torch.float32)
    go = x["grad_out"] if workload == "logprobs" else None

    def step():
        return bench._grads(fn(x), x, go)

    benchmark.group = f"{workload} fwd+bwd N={case.N} V={case.V} H={case.H} K={case.K}"
    benchmark.extra_info["floor_gflop"] = (
        (4 if workload == "logprobs" else case.K + 4) * 2 * case.N * case.V * case.H / 1e9
    )
    benchmark(step)


def test_gemm_rate(benchmark):
    """The yardstick: torch.matmul [N,H] @ [H,V] at the same shape."""
    c = CASES["logprobs"]
    a, b = torch.randn(c.N, c.H), torch.randn(c.V, c.H)
    out = torch.empty(c.N, c.V)
    benchmark.group = "gemm"
    benchmark(lambda: torch.matmul(a, b.T, out=out))


def test_harness_end_to_end(benchmark, tmp_path):
    """The whole script on the tiny preset: subprocess workers, table, CSV, plots."""
    argv = [
        "--preset",
        "tiny",
        "--providers",
        "paper-reference,reference,torch,liger",
        "--threads",
        "1",
        "--out",
        str(tmp_path),
    ]
    benchmark.group = "harness"
    benchmark.pedantic(bench.main, args=(argv,), rounds=1, iterations=1)
    files = sorted(os.listdir(tmp_path))
    assert "tiny_float32_cpu.csv" in files and "tiny_float32_cpu.md" in files, files
    assert any(f.endswith("_vs_N.png") for f in files), files
    with open(tmp_path / "tiny_float32_cpu.csv") as f:
        recs = list(csv.DictReader(f))
    provs = {r["provider"] for r in recs}
    assert {"paper-reference", "torch.matmul", "liger"} <= provs, provs
    # liger is CUDA-only: its rows must say so rather than vanish
    liger = [r for r in recs if r["provider"] == "liger"]
    assert liger and all(r["metric"] == "status" and r["status"] == "n/a" for r in liger)
    bad = [r for r in recs if r["metric"] == "status" and r["status"] in ("WRONG", "error")]
    assert not bad, bad
