"""Tile and strategy sweep of the Triton log-prob kernels on a CUDA card, with the peers
timed alongside (docs/design.md §8).

    python benchmarks/gpu_tune.py OUT_DIR [--budget-s 200]

At the qwen3-1.7b head (V=151936, H=2048, bf16), every number the median of
``triton.testing.do_bench`` (CUDA events), written to OUT_DIR/gpu-tune.csv as it comes:

1. forward+backward at N=8192 with the default tiles, next to eager PyTorch, Cut
   Cross-Entropy and Liger (when installed);
2. the SGSD loss (K=8, N=4096);
3. forward without grad at N=8192 for each candidate forward tile;
4. forward+backward at N=8192 for each candidate gradient tile;
5. step 1 at N=2048.

The sweeps compile each tile once; a tile that fails to compile or launch gets its error
as its row. The run stops starting new rows after ``--budget-s`` seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import os
import sys
import time

import torch
import triton
import triton.testing as tt

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import sgsd_kernels as sk  # noqa: E402
from sgsd_bench.inputs import make_inputs  # noqa: E402
from sgsd_bench.measure import grads, upstream_grad  # noqa: E402
from sgsd_bench.presets import Case  # noqa: E402
from sgsd_bench.providers import NotAvailable, build_provider  # noqa: E402
from sgsd_kernels.ops.triton_backend import triton_configs as tc  # noqa: E402

V, H = 151936, 2048
FWD_TILES = ["64x128x64/8/3", "128x128x64/8/3", "128x128x64/4/4", "128x256x64/8/3",
             "64x256x64/8/3", "128x64x64/4/3", "256x128x64/8/3"]  # fmt: skip
GRAD_TILES = ["64x128x64/8/3", "128x128x64/8/3", "128x128x64/4/4", "128x256x64/8/3",
              "128x64x64/4/3", "256x128x64/8/3"]  # fmt: skip


class Sweep:
    def __init__(self, out: str, budget_s: float):
        self.path = os.path.join(out, "gpu-tune.csv")
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.fields = ["part", "what", "N", "ms", "tflops", "floor_pct", "note"]
        with open(self.path, "w", newline="") as f:
            csv.DictWriter(f, self.fields).writeheader()

    def over(self) -> bool:
        return time.perf_counter() - self.start > self.budget_s

    def row(self, part, what, N, ms=None, floor_g=None, note=""):
        flops = None if ms is None or floor_g is None else floor_g * 2 * N * V * H
        rec = dict(part=part, what=what, N=N, ms=None if ms is None else round(ms, 3),
                   tflops=None if flops is None else round(flops / ms / 1e9, 1),
                   floor_pct=None, note=note[:160])  # fmt: skip
        if flops is not None:
            rec["floor_pct"] = round(100 * flops / ms / 1e9 / self.gemm_tflops, 1)
        print(f"[{time.perf_counter() - self.start:6.1f}s] {rec}", flush=True)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow(rec)

    def timed(self, part, what, N, make_step, floor_g, *contexts):
        """Times the step ``make_step()`` returns, inside ``contexts``, and records its row;
        a provider that is not installed or a tile that fails gets the reason as its note."""
        try:
            with contextlib.ExitStack() as stack:
                for context in contexts:
                    stack.enter_context(context)
                ms = bench(make_step())
            self.row(part, what, N, ms, floor_g)
        except NotAvailable as e:
            self.row(part, what, N, note=f"n/a: {e}")
        except Exception as e:  # noqa: BLE001
            self.row(part, what, N, note=f"{type(e).__name__}: {e}")

    def measure_gemm(self):
        a = torch.randn(8192, H, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(V, H, device="cuda", dtype=torch.bfloat16)
        ms = tt.do_bench(lambda: a @ b.T, warmup=50, rep=300, return_mode="median")
        self.gemm_tflops = 2 * 8192 * V * H / ms / 1e9
        self.row("ceiling", "bf16 mm [8192,H]x[H,V]", 8192, ms, 1.0)


def bench(fn) -> float:
    return tt.do_bench(fn, warmup=30, rep=300, return_mode="median")


@contextlib.contextmanager
def with_tile(kind: str, tile: str):
    """The default ``kind`` tile for 16-bit operands replaced by ``tile``."""
    key = (tc.family(), kind, "16")
    saved = tc.SPACE[key]
    tc.SPACE[key] = [tc.parse_tile(tile)]
    try:
        yield
    finally:
        tc.SPACE[key] = saved


def inputs(N: int):
    torch.manual_seed(0)
    h = (torch.randn(N, H, device="cuda") * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(V, H, device="cuda") * 0.02).bfloat16().requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda")
    return h, w, t


def forward(h, w, t):
    return lambda: sk.linear_logprobs(h, w, t, backend="triton")


def fwd_bwd(h, w, t):
    def step():
        lp = sk.linear_logprobs(h, w, t, backend="triton")
        torch.autograd.grad(lp.sum(), [h, w])

    return step


def sweep_tiles(s: Sweep, N: int = 8192):
    """The forward (no grad) over FWD_TILES, then forward+backward over GRAD_TILES."""
    h, w, t = inputs(N)
    for kind, tiles, part, make_step, floor_g, no_grad in (
        ("fwd", FWD_TILES, "fwd tile", forward, 1.0, True),
        ("grad_logits", GRAD_TILES, "fwd+bwd, grad tile", fwd_bwd, 4.0, False),
    ):
        for tile in tiles:
            if s.over():
                return
            grad_mode = torch.no_grad() if no_grad else contextlib.nullcontext()
            step = functools.partial(make_step, h, w, t)
            s.timed(part, tile, N, step, floor_g, with_tile(kind, tile), grad_mode)


def strategies_and_peers(s: Sweep, N: int):
    h, w, t = inputs(N)
    s.timed("fwd+bwd", "triton", N, functools.partial(fwd_bwd, h, w, t), 4.0)
    del h, w, t
    case = Case("logprobs", N, V, H, 0, "bfloat16")
    x = make_inputs(case, N, "cuda", torch.bfloat16, seed=0)
    go = upstream_grad(case, x)
    for provider in ("reference", "cce", "liger"):
        if s.over():
            return

        def make_step(provider=provider):
            fn = build_provider(provider, "logprobs", "cuda")
            return lambda: grads(fn(x), x, go)

        s.timed("fwd+bwd", provider, N, make_step, 4.0)
        torch.cuda.empty_cache()


def sgsd(s: Sweep, N: int = 4096, K: int = 8):
    if s.over():
        return
    case = Case("sgsd", N, V, H, K, "bfloat16")
    x = make_inputs(case, N, "cuda", torch.bfloat16, seed=0)
    go = upstream_grad(case, x)

    def make_step():
        fn = build_provider("triton", "sgsd", "cuda")
        return lambda: grads(fn(x), x, go)

    s.timed("sgsd", f"sgsd K={K}", N, make_step, K + 4.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--budget-s", type=float, default=200.0)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_tune.py: needs a CUDA device")
    os.makedirs(args.out, exist_ok=True)
    s = Sweep(args.out, args.budget_s)
    s.measure_gemm()
    print("triton", triton.__version__, "family", tc.family(), flush=True)
    strategies_and_peers(s, 8192)
    sgsd(s)
    sweep_tiles(s)
    strategies_and_peers(s, 2048)
    print(f"gpu_tune: done in {time.perf_counter() - s.start:.0f} s; rows in {s.path}")


if __name__ == "__main__":
    main()
