"""Correctness check, peak memory and timing of one row (the GEMM yardstick: yardstick.py).

The check compares each provider with a float64 oracle built from ``sgsd_kernels.reference``
(the one published-style implementation). Peak memory is measured for real: CUDA through
``max_memory_allocated``; CPU through the process's resident-set high-water mark, reset via
/proc/self/clear_refs, with glibc told to return every freed block ≥ 64 KiB to the OS (the
worker's environment sets MALLOC_MMAP_THRESHOLD_) so that RSS follows the live tensors.
"""

from __future__ import annotations

import gc
import os
import time

import numpy as np
import torch

from sgsd_bench.inputs import dtype_of, make_inputs, upcast
from sgsd_bench.presets import (
    DIVERGENCE_HYPER,
    IGNORE_INDEX,
    LOCAL_SUPPORT_TOP_K,
    SGSD_HYPER,
    Case,
    Preset,
)

# Relative error (‖a−b‖/‖b‖, worst of output, d hidden, d weight) allowed against float64.
TOL = {"float32": 2e-4, "float16": 1e-2, "bfloat16": 3e-2}


def on_cuda(device) -> bool:
    return str(device).startswith("cuda")


def _proc_status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class MemMeter:
    """Peak memory above a baseline.

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats.
    CPU: VmHWM/VmRSS from /proc/self/status; the high-water mark is reset by writing "5" to
    /proc/self/clear_refs (Linux ≥ 4.0). Fallback (no /proc): ru_maxrss, which only sees
    peaks above every earlier peak.
    """

    def __init__(self, device):
        self.cuda = on_cuda(device)
        self.method = "cuda.max_memory_allocated"
        if not self.cuda:
            ok = _proc_status_kib("VmHWM") is not None
            if ok:
                try:
                    with open("/proc/self/clear_refs", "w") as f:
                        f.write("5")
                except OSError:
                    ok = False
            self.method = "rss-hwm(clear_refs)" if ok else "ru_maxrss"
        self.base = 0

    def _current(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated()
        if self.method == "ru_maxrss":
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return _proc_status_kib("VmRSS") * 1024

    def _peak(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        if self.method == "ru_maxrss":
            return self._current()
        return _proc_status_kib("VmHWM") * 1024

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self.method != "ru_maxrss":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def start(self) -> None:
        gc.collect()
        self.reset_peak()
        self.base = self._current()

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
        return max(0, self._peak() - self.base)


def upstream_grad(case: Case, x: dict):
    """The gradient fed to backward: grad_out for log-probs, None (scalar loss) for sgsd."""
    return x.get("grad_out") if case.workload == "logprobs" else None


def grads(out, x: dict, grad_out):
    return torch.autograd.grad(out, [x["hidden"], x["weight"]], grad_out)


def rel_err(a, b) -> float:
    a = a.detach().double().cpu()
    b = b.detach().double().cpu()
    if a.shape != b.shape or not torch.isfinite(a).all():
        return float("inf")
    den = max(b.norm().item(), 1e-3 if b.numel() == 1 else 1e-12)
    return (a - b).norm().item() / den


def oracle_output(case: Case, x: dict):
    """The row's output from ``sgsd_kernels.reference`` on inputs ``x`` (any dtype), called
    directly or through the public functions with ``backend="reference"``.

    SGSD: the student's log-probs are computed once and broadcast over the K teachers
    (``gated_kd_ref``): the same value as the replicated published path, K× cheaper.
    """
    import sgsd_kernels as sk
    from sgsd_kernels import reference as ref

    if case.workload == "logprobs":
        return ref.linear_logprobs_ref(
            x["hidden"], x["weight"], x["targets"], ignore_index=IGNORE_INDEX
        )
    if case.workload == "divergence":
        d = sk.linear_divergence(
            x["hidden"], x["weight"], x["teacher_hidden"], mask=x["token_mask"],
            backend="reference", **DIVERGENCE_HYPER,
        )  # fmt: skip
        return d.sum() / x["token_mask"].sum().clamp(min=1)
    if case.workload == "local_support":
        return sk.linear_gated_kd_loss(
            x["hidden"], x["weight"], x["targets"], x["token_mask"], x["rewards"],
            x["teacher_weights"], teacher_hidden=x["teacher_hidden"], backend="reference",
            local_support_top_k=LOCAL_SUPPORT_TOP_K, **SGSD_HYPER,
        ).loss  # fmt: skip
    valid = x["targets"] != IGNORE_INDEX
    s = ref.linear_logprobs_ref(x["hidden"], x["weight"], x["targets"], ignore_index=IGNORE_INDEX)
    B, K, T, _ = x["teacher_hidden"].shape
    with torch.no_grad():
        u = ref.linear_logprobs_ref(
            x["teacher_hidden"],
            x["weight"].detach(),
            x["targets"].unsqueeze(1).expand(B, K, T),
            ignore_index=IGNORE_INDEX,
        )
    mask = x["token_mask"] & valid
    return ref.gated_kd_ref(s, u, mask, x["rewards"], x["teacher_weights"], **SGSD_HYPER)["loss"]


_ORACLE: dict = {}


def oracle(case: Case, N: int, device, cache_dir: str | None = None) -> list:
    """[output, d hidden, d weight] in float64 on the check slice, on the host.

    Computed once per worker (one shape per worker) and shared by its providers;
    ``cache_dir`` (optional) also keeps it across workers.
    """
    key = (case.key(), N)
    if key in _ORACLE:
        return _ORACLE[key]
    path = None
    if cache_dir:
        path = os.path.join(cache_dir, f"oracle_{case.key().replace('|', '_')}_{N}.pt")
        if os.path.exists(path):
            _ORACLE[key] = torch.load(path)
            return _ORACLE[key]
    x64 = upcast(make_inputs(case, N, device, dtype_of(case.dtype), seed=1), torch.float64)
    out64 = oracle_output(case, x64)
    want = [out64.detach(), *grads(out64, x64, upstream_grad(case, x64))]
    want = [t.detach().cpu() for t in want]
    del x64, out64
    _ORACLE[key] = want
    if path:
        torch.save(want, path + ".tmp")
        os.replace(path + ".tmp", path)
    return want


def check_provider(
    fn, case: Case, N: int, device, cache_dir: str | None = None
) -> tuple[float, str]:
    """Relative error (max over output, dh, dW) of ``fn`` against the float64 oracle."""
    x = make_inputs(case, N, device, dtype_of(case.dtype), seed=1)
    out = fn(x)
    got = [out, *grads(out, x, upstream_grad(case, x))]
    want = oracle(case, N, device, cache_dir)
    names = ("out", "dhidden", "dweight")
    errs = {n: rel_err(a, b) for n, a, b in zip(names, got, want)}
    worst = max(errs, key=errs.get)
    return errs[worst], f"{worst} rel err {errs[worst]:.2e}"


def percentiles(xs: list[float]) -> list[float]:
    """[p20, p50, p80] of ``xs``."""
    if not xs:
        raise ValueError("percentiles: no samples")
    return [float(v) for v in np.percentile(np.asarray(xs), [20, 50, 80])]


def memory_pass(fn, x: dict, case: Case, device) -> tuple[dict, float, float]:
    """One forward+backward with the peak memory above the inputs measured for each phase.

    Returns ({phase: {"peak_bytes"}}, forward seconds, backward seconds).
    """
    go = upstream_grad(case, x)
    meter = MemMeter(device)
    meter.start()
    t0 = time.perf_counter()
    out = fn(x)
    if meter.cuda:
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    peak_f = meter.peak()
    meter.reset_peak()
    t2 = time.perf_counter()
    g = grads(out, x, go)
    if meter.cuda:
        torch.cuda.synchronize()
    t3 = time.perf_counter()
    peak_b = meter.peak()
    del out, g
    res: dict = {"mem_method": meter.method}
    if case.workload == "logprobs":
        res["fwd"] = {"peak_bytes": peak_f}
        res["bwd"] = {"peak_bytes": peak_b}
    res["fwdbwd"] = {"peak_bytes": max(peak_f, peak_b)}
    return res, t1 - t0, t3 - t2


def cuda_times(fn, x: dict, case: Case, phases: list[str], res: dict) -> None:
    """triton.testing.do_bench p20/p50/p80 for the requested phases (into ``res``), over
    $SGSD_BENCH_CUDA_REP_MS milliseconds of repetitions per phase (default 2000)."""
    import triton.testing as tt

    go = upstream_grad(case, x)
    rep_ms = float(os.environ.get("SGSD_BENCH_CUDA_REP_MS", "2000"))
    kw = {"quantiles": [0.2, 0.5, 0.8], "warmup": min(200.0, rep_ms / 4), "rep": rep_ms}

    def fwdbwd():
        grads(fn(x), x, go)

    if "fwdbwd" in phases or case.workload != "logprobs":
        res["fwdbwd"]["time_ms"] = list(tt.do_bench(fwdbwd, **kw))
    if case.workload != "logprobs":
        return
    if "fwd" in phases:
        res["fwd"]["time_ms"] = list(tt.do_bench(lambda: fn(x), **kw))
    if "bwd" in phases:
        out = fn(x)
        try:
            res["bwd"]["time_ms"] = list(
                tt.do_bench(
                    lambda: torch.autograd.grad(
                        out, [x["hidden"], x["weight"]], go, retain_graph=True
                    ),
                    **kw,
                )
            )
        except RuntimeError as e:  # e.g. a backward that cannot be replayed
            fb = res["fwdbwd"].get("time_ms") or list(tt.do_bench(fwdbwd, **kw))
            fw = res["fwd"].get("time_ms") or list(tt.do_bench(lambda: fn(x), **kw))
            res["bwd"]["time_ms"] = [max(a - b, 0.0) for a, b in zip(fb, fw)]
            res["bwd_note"] = f"bwd = fwd+bwd − fwd (backward not replayable: {e})"[:200]
        del out


def cpu_interleaved_times(
    entries: list, x: dict, case: Case, preset: Preset, gemm, on_call=None
) -> None:
    """Round-robin timing on CPU: every round calls each provider once (and the GEMM).

    A shared, noisy machine then slows every provider alike, so the ratios hold even when
    the absolute times drift. ``entries``: dicts with "provider", "fn", "tf", "tb" (sample
    lists, seeded by the memory pass when it was long enough to count). Stops when every
    provider has ``min_reps`` samples and ``row_budget_s`` per provider has passed, or at
    ``max_reps``. ``on_call(provider)`` runs before each call (the worker's progress line).
    """
    go = upstream_grad(case, x)
    t_start = time.perf_counter()
    budget = preset.row_budget_s * max(1, len(entries))
    while entries or gemm is not None:
        todo = [e for e in entries if len(e["tf"]) < preset.max_reps]
        enough = all(len(e["tf"]) >= preset.min_reps for e in entries)
        if not todo or (enough and time.perf_counter() - t_start >= budget):
            break
        for e in todo:
            if on_call is not None:
                on_call(e["provider"])
            t0 = time.perf_counter()
            out = e["fn"](x)
            t1 = time.perf_counter()
            g = grads(out, x, go)
            t2 = time.perf_counter()
            del out, g
            e["tf"].append(t1 - t0)
            e["tb"].append(t2 - t1)
        if gemm is not None:
            gemm["samples"].append(gemm["call"]())
