#!/usr/bin/env python
"""Speed and memory of sgsd-kernels against the published SGSD code path, CCE and Liger.

    python benchmarks/bench_gated_kd.py                      # cpu-small on CPU, qwen3-1.7b on CUDA
    python benchmarks/bench_gated_kd.py --preset cpu-qwen    # a Qwen-sized head on CPU
    python benchmarks/bench_gated_kd.py --preset qwen3-8b --providers torch,triton,cce,liger
    python benchmarks/bench_gated_kd.py --out benchmarks/results   # the committed results

Workloads (docs/design.md §6), G = 2·N·V·H FLOPs (one logits GEMM), N = B·T tokens:
  logprobs  ``linear_logprobs``: rows ``logprobs-fwd`` (floor 1 G), ``logprobs-bwd`` (3 G:
            recompute, dh, dW), ``logprobs-fwdbwd`` (4 G).
  sgsd      the whole SGSD loss from hidden states with K teachers, forward+backward: row
            ``sgsd-fwdbwd``, floor (K+4) G.

Each shape runs in its own subprocess (sgsd_bench.worker). Every provider is first checked
against a float64 oracle from ``sgsd_kernels.reference`` on a slice of the same shape; one
that disagrees is reported WRONG and not timed. Then its peak memory above the inputs and its
time (p20/p50/p80; CPU: round-robin with the other providers and the GEMM yardstick). Every
provider that cannot run says why in its row. The modules of ``sgsd_bench`` hold the parts.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import time

from sgsd_bench import env, report
from sgsd_bench.inputs import dtype_of
from sgsd_bench.plots import make_plots
from sgsd_bench.presets import PRESETS, Case, cases_for, parse_workloads
from sgsd_bench.providers import NAMES, parse_providers
from sgsd_bench.worker import run_cases

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="shapes to run (default: cpu-small on CPU, qwen3-1.7b on CUDA)",
    )
    p.add_argument(
        "--providers",
        default=None,
        help=f"comma list from {','.join(NAMES)}, or 'all' (default: all but the preset's "
        "default-off ones, whose rows then say why)",
    )
    p.add_argument(
        "--workloads",
        default="all",
        help="comma list from logprobs,logprobs-fwd,logprobs-bwd,logprobs-fwdbwd,sgsd,"
        "divergence,local-support or 'all'",
    )
    p.add_argument(
        "--tokens",
        default=None,
        help="comma list of N (tokens, B·T) to keep from the preset's shapes, e.g. 8192 "
        "(default: all of them)",
    )
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: preset's)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument(
        "--out",
        default=os.path.join(HERE, "out"),
        help="directory for the CSV, markdown table and plots (default benchmarks/out, "
        "git-ignored; the committed results: --out benchmarks/results)",
    )
    p.add_argument(
        "--mem-limit-gb",
        type=float,
        default=None,
        help="skip rows whose logits would not fit (CPU default: 70%% of MemAvailable)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU: torch.set_num_threads in every worker (default: torch's choice, "
        "one per core). On a busy machine 1 thread gives steadier numbers",
    )
    p.add_argument(
        "--worker-timeout",
        type=float,
        default=1800.0,
        help="seconds one provider call may take before its worker is killed",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_begin = time.perf_counter()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    preset = PRESETS[args.preset or ("qwen3-1.7b" if cuda else "cpu-small")]
    dtype = args.dtype or preset.dtype
    try:
        dtype_of(dtype)
        provs, explicit = parse_providers(args.providers)
        phases, do_lp, scalar_workloads = parse_workloads(args.workloads)
    except ValueError as e:
        raise SystemExit(f"bench_gated_kd.py: {e}") from None
    cases = cases_for(preset, dtype, do_lp, scalar_workloads)
    if args.tokens:
        try:
            keep = {int(n) for n in args.tokens.split(",")}
        except ValueError:
            raise SystemExit(
                f"bench_gated_kd.py: --tokens wants integers, got {args.tokens!r}"
            ) from None
        cases = [c for c in cases if c.N in keep]
        if not cases:
            raise SystemExit(
                f"bench_gated_kd.py: --tokens {args.tokens} matches none of the {preset.name} "
                "shapes for these workloads"
            )
    if args.mem_limit_gb is not None:
        mem_limit = int(args.mem_limit_gb * 2**30)
    else:  # CUDA: try, report OOM
        avail = None if cuda else env.mem_available_bytes()
        mem_limit = int(0.7 * avail) if avail else 0
    meta = env.run_meta(preset.name, device, dtype)
    meta["timestamp"] = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    print(
        f"[bench] {preset.name} on {meta['device']} ({dtype}); providers {','.join(provs)}; "
        f"{len(cases)} shapes; {meta['version']}",
        file=sys.stderr,
    )

    results: list[dict] = []
    gemm: dict = {}
    gemm_rows: list[dict] = []

    def log(msg: str) -> None:
        print(f"[bench {time.perf_counter() - t_begin:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def on_row(row):
        log(report.progress_line(row))
        if row["provider"] != "gemm":
            results.append(row)
        elif row.get("gemm"):
            c = Case(**row["case"])
            gemm[c.key()] = row["gemm"]
            gemm_rows.append({"case": c, **row["gemm"]})

    run_cases(
        cases,
        provs,
        explicit,
        preset,
        device,
        phases,
        mem_limit,
        on_row,
        log,
        args.worker_timeout,
        args.threads,
    )

    rows = report.build_rows(results, gemm)
    rows = [r for r in rows if r["workload"].split("-")[1] in phases]
    table = report.markdown_table(rows, gemm_rows, meta)
    elapsed = time.perf_counter() - t_begin
    table += f"\n\nWall time of this run: {elapsed:.0f} s.\n"
    print(table)

    os.makedirs(args.out, exist_ok=True)
    tag = "cuda-" + "".join(ch if ch.isalnum() else "-" for ch in meta["device"].lower())
    name = f"{preset.name}_{dtype}_{tag if cuda else 'cpu'}".replace("--", "-")
    prefix = os.path.join(args.out, name)
    with open(prefix + ".md", "w") as f:
        f.write(table)
    report.write_csv(prefix + ".csv", rows, gemm_rows, meta)
    plots = make_plots(rows, prefix, meta)
    written = ", ".join([prefix + ".csv", prefix + ".md", *plots])
    print(f"[bench] wrote {written} in {elapsed:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
