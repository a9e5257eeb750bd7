"""One subprocess per shape: the worker protocol and the parent's side of it.

The parent (:func:`run_case_subprocess`) starts ``python -m sgsd_bench.worker SPEC`` for one
shape; the worker builds the inputs once, then for every provider the float64 check and
the memory pass, then (CPU) interleaved timing rounds with the GEMM yardstick. It reports
on stdout: ``@@START <provider>`` before each provider call (the parent's timeout restarts
there and, after a crash, names the provider that was running) and ``@@RESULT <json>`` per
row. After a crash or a timeout the parent reports that provider and reruns the rest.
"""

from __future__ import annotations

import gc
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict

RESULT_TAG = "@@RESULT "
START_TAG = "@@START "
_PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/


def _emit(obj: dict) -> None:
    sys.stdout.write(RESULT_TAG + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _start_line(provider: str) -> None:
    sys.stdout.write(START_TAG + provider + "\n")
    sys.stdout.flush()


def _fail(row: dict, e: Exception, device) -> None:
    import torch

    oom = "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"
    first = str(e).splitlines()[0][:200] if str(e) else ""
    row.update(status="OOM" if oom else "error", note=f"{type(e).__name__}: {first}")
    if not oom:
        traceback.print_exc(file=sys.stderr)
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


def run_worker(spec: dict) -> None:
    """One shape, several providers: check, memory pass, then (interleaved on CPU) timing."""
    import logging

    import torch

    from sgsd_bench import measure, yardstick
    from sgsd_bench.inputs import dtype_of, make_inputs
    from sgsd_bench.presets import Case, Preset
    from sgsd_bench.providers import NotAvailable, build_provider, get

    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # graph-break chatter
    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    preset = Preset(**spec["preset"])
    mem_limit = spec.get("mem_limit_bytes") or 0
    case = Case(**spec["case"])
    cuda = measure.on_cuda(device)
    x = make_inputs(case, case.N, device, dtype_of(case.dtype), seed=0)
    go = measure.upstream_grad(case, x)
    gemm = {"samples": []}
    if cuda:  # measure now and free its buffers before the providers run
        gemm["shapes"], call = yardstick.gemm_timer(case, device)
        gemm["samples"].append(call())
        del call
        torch.cuda.empty_cache()
    entries = []

    # 1. build, check against the float64 oracle, warm up compiled / Triton providers
    for provider in spec["providers"]:
        _start_line(provider)
        row = {"provider": provider, "case": spec["case"], "status": "ok", "note": ""}
        try:
            fn = build_provider(provider, case.workload, device)
            est = get(provider).materialises(case)
            if mem_limit and est > mem_limit:
                row.update(
                    status="skipped",
                    note=(
                        f"skipped: materialises ~{est / 2**30:.1f} GiB of logits, over the "
                        f"{mem_limit / 2**30:.1f} GiB allowed here (--mem-limit-gb)"
                    ),
                )
                _emit(row)
                continue
            err, what = measure.check_provider(
                fn, case, min(case.N, preset.check_N), device, spec.get("cache_dir")
            )
            row["check_err"] = err
            tol = measure.TOL.get(case.dtype, 1e-2)
            if not err <= tol:
                row.update(
                    status="WRONG",
                    note=f"check failed vs the float64 reference: {what} > tol {tol:.0e}; "
                    "not timed",
                )
                _emit(row)
                continue
            if get(provider).warm_up:  # compile / autotune at the full shape, untimed
                measure.grads(fn(x), x, go)
            entries.append({"provider": provider, "fn": fn, "row": row, "tf": [], "tb": []})
        except NotAvailable as e:
            row.update(status="n/a", note=str(e))
            _emit(row)
        except Exception as e:  # noqa: BLE001
            _fail(row, e, device)
            _emit(row)
        gc.collect()

    # CPU: the yardstick's candidates once the providers are built (building the native
    # provider may have compiled the extension whose own tile GEMMs are one of them)
    if not cuda:
        gemm["shapes"], gemm["call"] = yardstick.gemm_timer(case, device)

    # 2. memory pass, one provider after the other (timed: the first sample when ≥ 0.5 s)
    for e in list(entries):
        _start_line(e["provider"])
        try:
            res, tf, tb = measure.memory_pass(e["fn"], x, case, device)
            e["row"]["result"] = res
            if cuda:
                measure.cuda_times(e["fn"], x, case, spec["phases"], res)
            elif tf + tb >= 0.5:
                e["tf"].append(tf)
                e["tb"].append(tb)
        except Exception as ex:  # noqa: BLE001
            _fail(e["row"], ex, device)
            _emit(e["row"])
            entries.remove(e)
        gc.collect()

    # 3. CPU: interleaved timing rounds
    if not cuda:
        try:
            measure.cpu_interleaved_times(entries, x, case, preset, gemm, _start_line)
        except Exception as ex:  # noqa: BLE001
            for e in entries:
                _fail(e["row"], ex, device)
                e["row"].pop("result", None)
                _emit(e["row"])
            entries = []

        def ms(xs):
            return measure.percentiles([v * 1e3 for v in xs])

        for e in entries:
            res = e["row"]["result"]
            res["fwdbwd"]["time_ms"] = ms([a + b for a, b in zip(e["tf"], e["tb"])])
            if case.workload == "logprobs":
                res["fwd"]["time_ms"] = ms(e["tf"])
                res["bwd"]["time_ms"] = ms(e["tb"])
            res["reps"] = len(e["tf"])
        if not gemm["samples"]:
            gemm["samples"].append(gemm["call"]())
    summary = yardstick.gemm_summary(gemm["samples"], gemm["shapes"], cuda)
    _emit({"provider": "gemm", "case": spec["case"], "status": "ok", "gemm": summary})
    for e in entries:
        _emit(e["row"])


def _pump(stream, q) -> None:
    for line in stream:
        q.put(line)


def run_case_subprocess(
    case,
    providers: list[str],
    device: str,
    preset,
    phases: list[str],
    mem_limit: int,
    on_row,
    timeout_s: float,
    threads: int | None = None,
    cache_dir: str | None = None,
) -> None:
    """Run one shape's providers in a fresh interpreter; after a crash (e.g. the kernel's
    OOM killer) or a timeout, report the provider that was running and rerun the rest."""
    env = dict(os.environ)
    if not device.startswith("cuda"):
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # RSS follows live blocks ≥ 64 KiB
    env.setdefault("PYTHONUNBUFFERED", "1")
    # the worker imports sgsd_bench from where this copy lives, and whatever sgsd_kernels
    # this interpreter sees (an install, or PYTHONPATH)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PKG_PARENT, env.get("PYTHONPATH", "")) if p)
    remaining = list(providers)
    while remaining:
        spec = {
            "providers": remaining,
            "case": asdict(case),
            "device": device,
            "preset": asdict(preset),
            "phases": phases,
            "mem_limit_bytes": mem_limit,
            "threads": threads,
            "cache_dir": cache_dir,
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "sgsd_bench.worker", json.dumps(spec)],
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        current = None
        done: set = set()
        lines: queue.Queue = queue.Queue()
        reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
        reader.start()
        # the limit applies to one provider call (a new call resets it)
        deadline = time.time() + timeout_s
        timed_out = False
        while True:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                if proc.poll() is not None and not reader.is_alive() and lines.empty():
                    break
                if time.time() > deadline:
                    timed_out = True
                    proc.kill()
                    break
                continue
            if line.startswith(START_TAG):
                current = line[len(START_TAG) :].strip()
                deadline = time.time() + timeout_s
            elif line.startswith(RESULT_TAG):
                row = json.loads(line[len(RESULT_TAG) :])
                done.add(row["provider"])
                on_row(row)
        rc = proc.wait()
        left = [p for p in remaining if p not in done]
        if not left:
            return
        bad = current if current in left else left[0]
        why = (
            f"timed out after {timeout_s:.0f}s (--worker-timeout)"
            if timed_out
            else f"worker died (exit {rc}"
            f"{', killed: probably out of memory' if rc in (-9, 137) else ''})"
        )
        status = "timeout" if timed_out else "crashed"
        on_row({"provider": bad, "case": asdict(case), "status": status, "note": why})
        remaining = [p for p in left if p != bad]


def run_cases(
    cases: list,
    providers: list[str],
    explicit: bool,
    preset,
    device: str,
    phases: list[str],
    mem_limit: int,
    on_row,
    log,
    timeout_s: float,
    threads: int | None = None,
) -> None:
    """Every shape in its own worker; providers that cannot run, or that the preset leaves
    out (unless ``explicit``), get their row here, with the reason, without a worker."""
    from sgsd_bench.presets import skip_reason
    from sgsd_bench.providers import static_unavailable

    cuda = device.startswith("cuda")
    # CPU: the float64 oracle is shared across a shape's workers through files; on CUDA the
    # float64 dW of a 151936 × 4096 head is 5 GB per shape, so it stays in memory only
    cache_dir = None if cuda else tempfile.mkdtemp(prefix="sgsd-bench-oracle-")
    try:
        for c in cases:
            run = []
            for prov in providers:
                na = static_unavailable(prov, c.workload, cuda)
                why = None if explicit else skip_reason(preset, prov, c, cuda)
                if na or why:
                    status = "n/a" if na else "skipped"
                    on_row(
                        {"provider": prov, "case": asdict(c), "status": status, "note": na or why}
                    )
                else:
                    run.append(prov)
            log(f"{c.workload} {c.shape()}: {', '.join(run) or 'nothing to run'}")
            run_case_subprocess(
                c, run, device, preset, phases, mem_limit, on_row, timeout_s, threads, cache_dir
            )
    finally:
        if cache_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)


if __name__ == "__main__":
    run_worker(json.loads(sys.argv[1]))
