"""The CLI's flag parsing, and one end-to-end run of ``benchmarks/bench_gated_kd.py``."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from sgsd_bench.presets import parse_workloads
from sgsd_bench.providers import NAMES, parse_providers

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "bench_gated_kd.py")


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ("all", (["fwd", "bwd", "fwdbwd"], True, ("sgsd", "divergence", "local_support"))),
        ("logprobs", (["fwd", "bwd", "fwdbwd"], True, ())),
        ("logprobs-bwd", (["bwd"], True, ())),
        ("logprobs-fwd,sgsd", (["fwd", "fwdbwd"], True, ("sgsd",))),
        ("sgsd", (["fwdbwd"], False, ("sgsd",))),
        ("divergence,local-support", (["fwdbwd"], False, ("divergence", "local_support"))),
        ("local_support,sgsd,sgsd", (["fwdbwd"], False, ("local_support", "sgsd"))),
    ],
)
def test_parse_workloads(spec, want):
    assert parse_workloads(spec) == want


@pytest.mark.parametrize(
    ("spec", "msg"),
    [("logprobs-xyz", "unknown workload 'logprobs-xyz'; choose from all, logprobs, "),
     (" , ", "no workload in ' , '")],
)  # fmt: skip
def test_parse_workloads_bad(spec, msg):
    with pytest.raises(ValueError, match=msg):
        parse_workloads(spec)


def test_parse_providers():
    assert parse_providers(None) == (list(NAMES), False)
    assert parse_providers("all") == (list(NAMES), True)
    assert parse_providers("torch, cce") == (["torch", "cce"], True)
    with pytest.raises(ValueError, match=r"unknown provider\(s\) \['paper-reference'\]"):
        parse_providers("torch,paper-reference")


def _run(args, out, timeout=900):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, SCRIPT, *args, "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=REPO,
    )


def test_cli_rejects_a_bad_flag(tmp_path):
    r = _run(["--workloads", "logits"], tmp_path)
    assert r.returncode != 0
    assert "bench_gated_kd.py: unknown workload 'logits'" in r.stderr


@pytest.mark.parametrize(
    "tokens, msg",
    [
        ("x", "bench_gated_kd.py: --tokens wants integers, got 'x'"),
        ("5", "bench_gated_kd.py: --tokens 5 matches none of the tiny shapes"),
    ],
)
def test_cli_rejects_bad_tokens(tmp_path, tokens, msg):
    r = _run(["--preset", "tiny", "--tokens", tokens], tmp_path)
    assert r.returncode != 0
    assert msg in r.stderr


@pytest.mark.slow
def test_end_to_end_tiny(tmp_path):
    """The script on a cut-down tiny preset: subprocess workers, table, CSV, plots."""
    r = _run(
        ["--preset", "tiny", "--workloads", "logprobs-fwdbwd,sgsd",
         "--providers", "reference,torch,liger,native", "--threads", "1"],
        tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(os.listdir(tmp_path))
    assert {"tiny_float32_cpu.csv", "tiny_float32_cpu.md"} <= set(files), files
    assert "tiny_float32_cpu_vs_N.png" in files and "tiny_float32_cpu_vs_K.png" in files
    with open(tmp_path / "tiny_float32_cpu.csv") as f:
        recs = list(csv.DictReader(f))
    want = {"reference", "torch", "liger", "native", "yardstick", "mm-tile", "mm-whole"}
    assert want | {"native-tile"} <= {r["provider"] for r in recs}
    liger = [r for r in recs if r["provider"] == "liger"]
    assert liger and all(r["metric"] == "status" and r["status"] == "n/a" for r in liger)
    bad = [r for r in recs if r["metric"] == "status" and r["status"] not in ("n/a",)]
    assert not bad, bad
    ok = {(r["provider"], r["workload"], r["N"], r["K"]) for r in recs if r["metric"] == "time"}
    for N, K in ((64, 1), (64, 4), (128, 4)):
        assert ("torch", "sgsd-fwdbwd", str(N), str(K)) in ok
    table = (tmp_path / "tiny_float32_cpu.md").read_text()
    assert "× vs reference" in table and "paper" not in table
    assert r.stdout.startswith("### tiny on ")
