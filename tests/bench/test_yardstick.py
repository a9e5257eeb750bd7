"""The GEMM yardstick (sgsd_bench/yardstick.py): its shapes, its candidates and the choice of
the best rate. No timing assertions: only that samples exist and the summary is their best."""

from __future__ import annotations

import math

import pytest
import torch

from sgsd_bench import yardstick
from sgsd_bench.presets import Case

V, H = 1007, 61


def test_gemm_tile_is_the_backend_tile_on_cpu():
    c = Case("sgsd", 1024, 32768, 256, 8, "float32")
    m, h, v = yardstick.gemm_tile(c, "cpu")
    assert yardstick._plan_blocks() is not None, "the torch backend's plan_blocks is not found"
    assert h == 256 and m * v <= 1 << 24 and m <= yardstick.gemm_m(c) == 9216
    big = Case("logprobs", 256, 151936, 1024, 0, "float32")
    assert yardstick.gemm_tile(big, "cuda") == (256, 1024, 151936)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize(
    ("workload", "N", "V_", "H_", "K"),
    [
        ("logprobs", 1, 1007, 61, 0),
        ("logprobs", 1024, 32768, 256, 0),
        ("logprobs", 256, 151936, 1024, 0),
        ("sgsd", 1024, 32768, 256, 8),
    ],
)
def test_whole_shape_is_the_problem_cut_to_the_output_cap(dtype, workload, N, V_, H_, K):
    c = Case(workload, N, V_, H_, K, dtype)
    m, h, v = yardstick.whole_shape(c)
    esize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    assert (m, h) == (yardstick.gemm_m(c), H_)
    if v < V_:  # cut: a multiple of 64 columns, at least 256, within the cap
        assert v % 64 == 0 and v >= 256
        assert m * v * esize <= max(yardstick.WHOLE_OUT_BYTES, m * 256 * esize)
        assert m * (v + 64) * esize > yardstick.WHOLE_OUT_BYTES
    else:
        assert v == V_ and m * V_ * esize <= yardstick.WHOLE_OUT_BYTES + m * 64 * esize


def test_fp32_whole_shape_of_the_cpu_default_rows():
    # the V = 32768, H = 256 log-prob rows: N = 1024 fits whole, N = 4096 is cut to 8192
    assert yardstick.whole_shape(Case("logprobs", 1024, 32768, 256, 0, "float32"))[2] == 32768
    assert yardstick.whole_shape(Case("logprobs", 4096, 32768, 256, 0, "float32"))[2] == 8192


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("N", [1, 40])
def test_gemm_timer_gives_every_candidate_a_positive_sample(dtype, N):
    from sgsd_kernels import native

    c = Case("logprobs", N, V, H, 0, dtype)
    shapes, one = yardstick.gemm_timer(c, "cpu")
    want = {"mm-tile", "mm-whole"} | ({"native-tile"} if native.load_if_built() else set())
    assert set(shapes) == want
    assert shapes["mm-whole"] == (N, H, V)
    samples = [one() for _ in range(3)]
    assert all(set(s) == want and all(t > 0 for t in s.values()) for s in samples)
    summary = yardstick.gemm_summary(samples, shapes, cuda=False)
    best = max(yardstick.gemm_flops(shapes[n]) / min(s[n] for s in samples) * 1e3 for n in shapes)
    assert yardstick.gemm_flops(summary["tile"]) / summary["best_ms"] * 1e3 == pytest.approx(best)
    assert summary["source"] in want and summary["candidates"].keys() == want


def test_gemm_summary_picks_the_best_rate_not_the_shortest_time():
    shapes = {"mm-tile": (4, 8, 16), "native-tile": (4, 8, 16), "mm-whole": (64, 8, 256)}
    samples = [
        {"mm-tile": 0.010, "native-tile": 0.008, "mm-whole": 3.0},
        {"mm-tile": 0.012, "native-tile": 0.020, "mm-whole": 2.0},
        {"mm-tile": 0.011, "native-tile": 0.009, "mm-whole": 2.5},
    ]
    s = yardstick.gemm_summary(samples, shapes, cuda=False)
    # 2·4·8·16 / 8 µs = 128 MFLOP/s < 2·64·8·256 / 2 ms = 131 MFLOP/s
    assert s["source"] == "mm-whole" and s["best_ms"] == 2.0 and s["tile"] == [64, 8, 256]
    assert s["time_ms"] == pytest.approx([2.2, 2.5, 2.8])
    k = s["candidates"]["native-tile"]
    assert k["best_ms"] == 0.008 and k["flops_per_s"] == pytest.approx(2 * 4 * 8 * 16 / 8e-6)
    # a faster native sample makes it the yardstick
    samples.append({"mm-tile": 0.011, "native-tile": 0.007, "mm-whole": 2.6})
    s = yardstick.gemm_summary(samples, shapes, cuda=False)
    assert s["source"] == "native-tile" and math.isclose(s["best_ms"], 0.007)


def test_gemm_summary_cuda_samples_are_do_bench_quantiles():
    shapes = {"mm-whole": (256, 64, 1024)}
    s = yardstick.gemm_summary([{"mm-whole": [0.5, 0.6, 0.7, 0.9]}], shapes, cuda=True)
    assert s["source"] == "mm-whole" and s["best_ms"] == 0.5 and s["time_ms"] == [0.6, 0.7, 0.9]


def test_gemm_summary_rejects_no_samples():
    with pytest.raises(ValueError, match="gemm_summary: no samples"):
        yardstick.gemm_summary([], {"mm-tile": (1, 1, 1)}, cuda=False)
