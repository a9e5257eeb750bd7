"""The GEMM yardstick: the best GEMM rate the machine gives for a row's dtype and work,
which turns a provider's time into a fraction of its floor (docs/design.md §6).

Candidates are timed in the same process as the row's providers, interleaved with them on
CPU (measure.cpu_interleaved_times), and the best rate over all of them is the yardstick.
"""

from __future__ import annotations

import importlib
import time

import torch

from sgsd_bench.inputs import dtype_of
from sgsd_bench.measure import on_cuda, percentiles
from sgsd_bench.presets import Case


def gemm_m(case: Case) -> int:
    """Rows of the stream the row's GEMMs cover: N for log-probs; (K+1)·N for SGSD, the
    student+teacher stream over the shared W (most of the (K+4)·G floor)."""
    if case.workload == "divergence":
        return 2 * case.N  # student and teacher rows over the shared W
    if case.workload == "local_support":
        return case.N * case.K  # the teachers' top-k pass
    if case.workload != "sgsd":
        return case.N
    # capped: at N = 16384, K = 8 on a 151936 vocabulary the full stream's output alone
    # would be 45 GB; 16384 rows already run at the device's GEMM rate
    return min(case.N * (case.K + 1), max(case.N, 16384))


def _plan_blocks():
    """The torch backend's tiling function ``plan_blocks(rows, vocab) -> (row chunk, vocab
    block)``, wherever under ``sgsd_kernels.ops`` the library keeps it (None: not found)."""
    import pkgutil

    try:
        ops = importlib.import_module("sgsd_kernels.ops")
    except ImportError:
        return None
    names = ["sgsd_kernels.ops.blockwise"]
    names += [m.name for m in pkgutil.walk_packages(ops.__path__, "sgsd_kernels.ops.")]
    for name in names:
        if "triton" in name:
            continue
        try:
            fn = getattr(importlib.import_module(name), "plan_blocks", None)
        except ImportError:
            continue
        if fn is not None:
            return fn
    return None


def _native_plan():
    """The native kernels' ``tile_plan(rows, vocab, hidden) -> (rows, vocab block)`` when
    the extension is already built (``backend="auto"`` then runs it on CPU), else None."""
    try:
        native = importlib.import_module("sgsd_kernels.native")
        if native.load_if_built():
            return native.tile_plan
    except (ImportError, AttributeError, RuntimeError):
        pass
    return None


def gemm_tile(case: Case, device) -> tuple[int, int, int]:
    """(M, H, Vb): the GEMM shape the yardstick times.

    CPU: the tile of the backend ``auto`` runs: the native kernels' ``tile_plan`` when they
    are built, otherwise the torch backend's ``plan_blocks(gemm_m, V)`` (row chunk × vocab
    block); a yardstick at another shape can be slower than the backend's own GEMMs and
    push "floor %" past 100 (the torch tile, 128×256·256×32768 fp32, runs at ~65 GFLOP/s
    per core on the AMD EPYC dev box, the native 256×256·256×256 tile at ~104).
    CUDA: the whole [M, H] @ [H, V], the device rate.
    """
    M = gemm_m(case)
    if not on_cuda(device):
        native_plan = _native_plan()
        if native_plan is not None:
            rows, vblock = native_plan(M, case.V, case.H)
            return rows, case.H, vblock
    plan = None if on_cuda(device) else _plan_blocks()
    if plan is None:
        return M, case.H, case.V
    rows, vblock = plan(M, case.V)
    return rows, case.H, vblock


def gemm_flops(tile) -> float:
    m, h, v = tile
    return 2.0 * m * h * v


# Output of the whole-shape candidate at most this large: [M, H] @ [H, V] is cut to its
# first Vc vocabulary columns beyond it (a 128 MiB fp32 output already leaves every cache,
# so a larger one runs at the same rate and only costs time and memory).
WHOLE_OUT_BYTES = 128 << 20


def whole_shape(case: Case) -> tuple[int, int, int]:
    """(M, H, Vc): the whole problem's GEMM [gemm_m, H] @ [H, V], V cut so that the output
    stays within :data:`WHOLE_OUT_BYTES` (a multiple of 64 columns, at least 256)."""
    M = gemm_m(case)
    esize = torch.empty(0, dtype=dtype_of(case.dtype)).element_size()
    vc = max(256, WHOLE_OUT_BYTES // (M * esize) // 64 * 64)
    return M, case.H, min(case.V, vc)


def _time_mm(a, layouts, c, one_thread: bool) -> float:
    """Best seconds of torch.mm(a, b, out=c) over the layouts (on one thread if asked)."""
    threads = torch.get_num_threads()
    if one_thread:
        torch.set_num_threads(1)
    best = float("inf")
    try:
        for b in layouts:
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return best


def gemm_timer(case: Case, device):
    """The GEMM yardstick's candidates, each timed in the same process as the providers.

    Returns ``(shapes, call)``: ``shapes`` maps each candidate's name to its (M, H, Vb);
    ``call()`` gives one sample, name → ms that one GEMM of that shape takes at the rate the
    whole machine reaches (CUDA: name → do_bench's [min, p20, p50, p80]). The yardstick is
    the best rate over every candidate and sample (:func:`gemm_summary`), so that no
    provider's own GEMMs can outrun it. CPU candidates:

    * ``mm-tile``: torch.mm(a, b, out=preallocated) at :func:`gemm_tile`, the faster of b
      contiguous [H, Vb] and b the transposed view of W[:Vb] (the backend's layout); at the
      native tile timed on one thread and divided by the thread count (each thread runs its
      own tiles; a 0.3 ms GEMM split over threads measures fork-join, not the machine);
    * ``native-tile`` (when the native kernels are built): their own engine's GEMMs at that
      tile (``tile_gemm_seconds``: the logits GEMM and the dh + dW GEMMs, every thread at
      once), the faster of the two per GEMM;
    * ``mm-whole``: torch.mm at the whole problem's shape :func:`whole_shape`, all threads,
      b the transposed view of W (the layout of CCE's and eager's logits GEMM).

    CUDA: ``mm-whole`` at the full [M, H] @ [H, V].
    """
    dt = dtype_of(case.dtype)
    g = torch.Generator().manual_seed(0)
    native_plan = None if on_cuda(device) else _native_plan()
    shapes = {}
    if on_cuda(device):
        shapes["mm-whole"] = (gemm_m(case), case.H, case.V)
    else:
        shapes["mm-tile"] = gemm_tile(case, device)
        if native_plan is not None:
            shapes["native-tile"] = shapes["mm-tile"]
        shapes["mm-whole"] = whole_shape(case)
    bufs = {}
    for name, (m, h, v) in shapes.items():
        a = torch.randn(m, h, generator=g).to(device=device, dtype=dt)
        w = torch.randn(v, h, generator=g).to(device=device, dtype=dt)
        c = torch.empty(m, v, device=device, dtype=dt) if name != "native-tile" else None
        layouts = (w.T, w.T.contiguous()) if name == "mm-tile" else (w.T,)
        bufs[name] = (a, w, c, layouts)
        if c is not None:
            for b in layouts:  # warm-up
                torch.mm(a, b, out=c)

    if on_cuda(device):
        import triton.testing as tt

        a, _, c, layouts = bufs["mm-whole"]

        def bench() -> dict:
            q = [0.0, 0.2, 0.5, 0.8]
            return {
                "mm-whole": list(tt.do_bench(lambda: torch.mm(a, layouts[0], out=c), quantiles=q))
            }

        return shapes, bench

    def one() -> dict:
        threads = torch.get_num_threads()
        out = {}
        a, _, c, layouts = bufs["mm-tile"]
        per_thread = native_plan is not None
        out["mm-tile"] = _time_mm(a, layouts, c, per_thread) * 1e3 / (threads if per_thread else 1)
        if native_plan is not None:
            from sgsd_kernels import native

            a, w, _, _ = bufs["native-tile"]
            s_logits, s_grads = native.ops().tile_gemm_seconds(a, w, 3)
            out["native-tile"] = min(s_logits, s_grads / 2) * 1e3 / threads
        a, _, c, layouts = bufs["mm-whole"]
        out["mm-whole"] = _time_mm(a, layouts, c, False) * 1e3
        return out

    return shapes, one


def gemm_summary(samples: list[dict], shapes: dict, cuda: bool) -> dict:
    """The yardstick from the samples of :func:`gemm_timer`.

    Every candidate gets {"tile", "best_ms", "time_ms": [p20, p50, p80], "flops_per_s"};
    the fastest (highest best rate) is the yardstick: its name as "source", and its "tile",
    "best_ms" and "time_ms" at the top level, next to "candidates".
    """
    if not samples:
        raise ValueError("gemm_summary: no samples")
    cands = {}
    for name, tile in shapes.items():
        xs = [s[name] for s in samples if name in s]
        if not xs:
            continue
        if cuda:
            best, times = xs[0][0], list(xs[0][1:])
        else:
            best, times = min(xs), percentiles(xs)
        cands[name] = {
            "tile": list(tile),
            "best_ms": best,
            "time_ms": times,
            "flops_per_s": gemm_flops(tile) / (best / 1e3),
        }
    source = max(cands, key=lambda n: cands[n]["flops_per_s"])
    top = cands[source]
    return {
        "source": source,
        "tile": top["tile"],
        "best_ms": top["best_ms"],
        "time_ms": top["time_ms"],
        "candidates": cands,
    }
