"""The divergence and local-support benchmark rows: presets, inputs, providers, the float64
check and the report on canned rows (tiny shapes, no timing)."""

from __future__ import annotations

import pytest
import torch

from sgsd_bench import measure, providers, report, yardstick
from sgsd_bench.inputs import dtype_of, input_bytes, make_inputs
from sgsd_bench.presets import PRESETS, Case, cases_for, split_bt
from sgsd_bench.providers import BASELINE

V, H = 1031, 37  # odd on purpose; V > the local support's k = 100


def _case(workload, dtype="float32", N=40, K=2):
    return Case(workload, N, V, H, K if workload == "local_support" else 0, dtype)


def test_presets_carry_the_new_rows():
    small, gpu = PRESETS["cpu-small"], PRESETS["qwen3-1.7b"]
    assert small.divergence_N == [1024] and small.local_support == [(1024, 1)]
    assert (small.V, small.H) == (32768, 256)
    assert gpu.divergence_N and gpu.local_support and gpu.dtype == "bfloat16"
    cases = cases_for(small, "float32", False, ("divergence", "local_support"))
    assert [(c.workload, c.N, c.K) for c in cases] == [
        ("divergence", 1024, 0),
        ("local_support", 1024, 1),
    ]
    assert cases_for(small, "float32", False, True) == cases_for(small, "float32", False, ["sgsd"])
    assert cases_for(small, "float32", False, ()) == []


@pytest.mark.parametrize(
    ("workload", "K", "floor"), [("divergence", 0, 4.0), ("local_support", 8, 8.0)]
)
def test_floor_and_shape(workload, K, floor):
    c = Case(workload, 1024, V, H, K, "float32")
    assert c.floor_g("fwdbwd") == floor
    assert ("K=8 (B=4 T=256)" in c.shape()) == (workload == "local_support")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_make_inputs_divergence(dtype):
    case = _case("divergence", dtype, N=999)
    x = make_inputs(case, case.N, "cpu", dtype_of(dtype))
    assert x["hidden"].shape == x["teacher_hidden"].shape == (999, H)
    assert x["teacher_hidden"].dtype == dtype_of(dtype) and x["token_mask"].dtype == torch.bool
    assert 0.9 < x["token_mask"].float().mean().item() < 0.995
    assert input_bytes(case) == (V * H + 2 * 999 * H) * dtype_of(dtype).itemsize


def test_make_inputs_local_support_is_the_sgsd_layout():
    x = make_inputs(_case("local_support", N=64, K=3), 64, "cpu", torch.float32)
    B, T = split_bt(64)
    assert x["teacher_hidden"].shape == (B, 3, T, H) and x["targets"].shape == (B, T)
    with pytest.raises(ValueError, match="a local_support case needs K ≥ 1 teachers, got K=0"):
        make_inputs(Case("local_support", 8, V, H, 0, "float32"), 8, "cpu", torch.float32)


@pytest.mark.parametrize(
    ("name", "workload", "cuda", "words"),
    [
        ("liger", "divergence", False, "needs a CUDA device"),
        ("liger", "local_support", True, "no top-k local support"),
        ("cce", "divergence", True, "no divergence"),
        ("triton", "local_support", False, "needs a CUDA device"),
    ],
)
def test_static_unavailable_says_why(name, workload, cuda, words):
    assert words in providers.static_unavailable(name, workload, cuda)


@pytest.mark.parametrize("name", ["reference", "torch", "torch-compile", "triton"])
@pytest.mark.parametrize("workload", ["divergence", "local_support"])
def test_new_rows_run_on_the_library_providers(name, workload):
    assert providers.static_unavailable(name, workload, True) is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("workload", ["divergence", "local_support"])
@pytest.mark.parametrize("name", ["reference", "torch"])
def test_library_providers_pass_the_float64_check(name, workload, dtype):
    fn = providers.build_provider(name, workload, "cpu")
    err, what = measure.check_provider(fn, _case(workload, dtype), 40, "cpu")
    assert err <= measure.TOL[dtype], what


@pytest.mark.parametrize("workload", ["divergence", "local_support"])
def test_check_catches_a_wrong_provider(workload):
    good = providers.build_provider("torch", workload, "cpu")
    err, what = measure.check_provider(lambda x: good(x) * 1.01, _case(workload), 40, "cpu")
    assert err > measure.TOL["float32"] and "rel err 1.0" in what


def test_gemm_m_counts_the_streamed_rows():
    assert yardstick.gemm_m(Case("divergence", 512, V, H, 0, "float32")) == 1024
    assert yardstick.gemm_m(Case("local_support", 512, V, H, 4, "float32")) == 2048


def _canned(workload, K):
    """Worker results for one row: the baseline at 30 ms / 64 MiB, torch at 10 ms / 4 MiB."""
    c = Case(workload, 128, V, H, K, "float32")
    out = []
    for prov, t, peak in ((BASELINE, 30.0, 64 << 20), ("torch", 10.0, 4 << 20)):
        res = {"mem_method": "rss", "reps": 3, "fwdbwd": {"peak_bytes": peak, "time_ms": [t] * 3}}
        out.append({"provider": prov, "case": c.__dict__, "status": "ok", "result": res})
    out.append({"provider": "liger", "case": c.__dict__, "status": "n/a", "note": "needs CUDA"})
    gemm = {c.key(): {"time_ms": [1.0] * 3, "best_ms": 1.0, "tile": [128, H, V]}}
    return out, gemm


@pytest.mark.parametrize(
    ("workload", "K", "floor_g"), [("divergence", 0, 4), ("local_support", 2, 2)]
)
def test_report_rows_ratios_and_floor(workload, K, floor_g):
    results, gemm = _canned(workload, K)
    rows = report.build_rows(results, gemm)
    assert {r["workload"] for r in rows} == {f"{workload}-fwdbwd"}
    fast = next(r for r in rows if r["provider"] == "torch")
    assert fast["speedup_vs_ref"] == pytest.approx(3.0)
    assert fast["mem_ratio_vs_ref"] == pytest.approx(16.0)
    assert fast["floor_flops"] == pytest.approx(floor_g * 2.0 * 128 * V * H)
    meta = dict(preset="canned", device="test CPU", dtype="float32", version="t", torch="2.x")
    meta.update(timestamp="now", mem_method="rss", device_is_cuda=False)
    table = report.markdown_table(rows, [], meta)
    assert f"| {workload}-fwdbwd |" in table
