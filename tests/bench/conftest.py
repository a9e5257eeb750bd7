"""Canned benchmark rows for the report and plot tests: no kernel runs."""

from __future__ import annotations

import pytest

from sgsd_bench.yardstick import gemm_summary

# (dtype, V, H): the preset dtypes, odd vocabulary and hidden sizes included.
SHAPES = [("float32", 4103, 61), ("bfloat16", 151936, 1024), ("float16", 32768, 255)]


def _case(workload, N, V, H, K, dtype):
    return {"workload": workload, "N": N, "V": V, "H": H, "K": K, "dtype": dtype}


def _gemm(M: int, V: int, H: int, whole_ms: list[float]) -> dict:
    """A CPU yardstick summary from canned samples: a 64×H·H×64 tile at 1 ms per GEMM for
    torch.mm (slower than the whole shape) and 0.5 ms for the native engine."""
    shapes = {"mm-tile": (64, H, 64), "native-tile": (64, H, 64), "mm-whole": (M, H, V)}
    samples = [{"mm-tile": 1.0, "native-tile": 0.5, "mm-whole": t} for t in whole_ms]
    return gemm_summary(samples, shapes, cuda=False)


def canned_results(dtype: str, V: int, H: int) -> tuple[list[dict], dict]:
    """Worker results as the worker emits them (JSON-shaped) and the GEMM summaries.

    Log-probs at N = 64 and 128 for reference (the baseline), torch and liger (n/a);
    SGSD at N = 64 with K = 1 and 4, and at N = 128 with K = 4, for reference and torch.
    """
    results, gemm = [], {}
    for N in (64, 128):
        c = _case("logprobs", N, V, H, 0, dtype)
        for prov, t, peak in (("reference", 10.0, 4 << 20), ("torch", 4.0, 1 << 20)):
            scale = N / 64
            res = {
                "mem_method": "rss-hwm(clear_refs)",
                "reps": 5,
                "fwd": {
                    "peak_bytes": peak,
                    "time_ms": [0.9 * t * scale, t * scale, 1.2 * t * scale],
                },
                "bwd": {"peak_bytes": peak, "time_ms": [2 * t * scale] * 3},
                "fwdbwd": {"peak_bytes": peak, "time_ms": [3 * t * scale] * 3},
            }
            results.append(
                {
                    "provider": prov,
                    "case": c,
                    "status": "ok",
                    "note": "",
                    "check_err": 1e-7,
                    "result": res,
                }
            )
        results.append(
            {"provider": "liger", "case": c, "status": "n/a", "note": "needs a CUDA device"}
        )
        gemm[f"logprobs|{N}|{V}|{H}|0|{dtype}"] = _gemm(N, V, H, [1.0, 0.8, 1.3])
    for N, K in ((64, 1), (64, 4), (128, 4)):
        c = _case("sgsd", N, V, H, K, dtype)
        for prov, t in (("reference", 40.0 * K), ("torch", 10.0 * K)):
            res = {
                "mem_method": "rss-hwm(clear_refs)",
                "fwdbwd": {"peak_bytes": int(t) << 20, "time_ms": [t, t * N / 64, t * 2]},
            }
            results.append(
                {
                    "provider": prov,
                    "case": c,
                    "status": "ok",
                    "note": "",
                    "check_err": 2e-7,
                    "result": res,
                }
            )
        gemm[f"sgsd|{N}|{V}|{H}|{K}|{dtype}"] = _gemm(N * (K + 1), V, H, [2.0, 2.5, 3.0])
    return results, gemm


def canned_meta(dtype: str) -> dict:
    return {
        "preset": "canned",
        "device": "test CPU (2 threads)",
        "dtype": dtype,
        "device_is_cuda": False,
        "torch": "2.x",
        "version": "sgsd-kernels 0.1.0 (test)",
        "timestamp": "2026-01-01T00:00:00+00:00",
        "mem_method": "rss",
    }


@pytest.fixture(params=SHAPES, ids=[f"{d}-V{v}-H{h}" for d, v, h in SHAPES])
def canned(request):
    dtype, V, H = request.param
    results, gemm = canned_results(dtype, V, H)
    return results, gemm, canned_meta(dtype)
