"""Worker results → rows, the markdown table, the CSV and the progress lines.

Pure functions of the rows: nothing here runs a kernel (tests feed canned rows).
"""

from __future__ import annotations

import csv

from sgsd_bench.presets import LOGPROB_PHASES, WORKLOAD_ROWS, Case
from sgsd_bench.providers import BASELINE, NAMES
from sgsd_bench.yardstick import gemm_flops


def fmt_bytes(b) -> str:
    """MiB with one decimal; "—" for a missing value."""
    if b is None:
        return "—"
    return f"{b / 2**20:.1f}"


def fmt_ms(t) -> str:
    """ "p50 [p20, p80]" with 1-3 decimals by magnitude; "—" for a missing value."""
    if t is None:
        return "—"
    if len(t) != 3:
        raise ValueError(f"fmt_ms: expected [p20, p50, p80], got {t!r}")
    p20, p50, p80 = t
    d = 1 if p50 >= 100 else (2 if p50 >= 1 else 3)
    return f"{p50:.{d}f} [{p20:.{d}f}, {p80:.{d}f}]"


def _f(v, fmt="{:.2f}"):
    return "—" if v is None else fmt.format(v)


def gemm_rate(g: dict) -> float:
    """The yardstick: FLOP/s of the fastest sample of its best candidate, at that
    candidate's GEMM shape ("tile")."""
    return gemm_flops(g["tile"]) / (g["best_ms"] / 1e3)


def build_rows(results: list[dict], gemm: dict[str, dict]) -> list[dict]:
    """Flatten worker results into one dict per (provider, workload-row, case).

    ``gemm``: case key → the worker's GEMM summary (yardstick.gemm_summary: "time_ms",
    "best_ms" and "tile" of the best candidate, "source", "candidates").
    """
    rows = []
    for r in results:
        case = Case(**r["case"])
        phases = LOGPROB_PHASES if case.workload == "logprobs" else ("fwdbwd",)
        for phase in phases:
            floor = case.floor_g(phase) * case.g_flops()
            row = {
                "provider": r["provider"],
                "workload": f"{case.workload}-{phase}",
                "case": case,
                "status": r["status"],
                "note": r.get("note", ""),
                "check_err": r.get("check_err"),
                "floor_flops": floor,
                "time_ms": None,
                "peak_bytes": None,
            }
            result = r.get("result") or {}
            res = result.get(phase)
            if res is None and r["status"] == "ok":
                continue  # phase not requested
            if res:
                row["time_ms"] = res.get("time_ms")
                row["peak_bytes"] = res.get("peak_bytes")
                row["mem_method"] = result.get("mem_method")
                row["reps"] = result.get("reps")
                if phase == "bwd" and result.get("bwd_note"):
                    row["note"] = result["bwd_note"]
            g = gemm.get(case.key())  # measured in the same process, interleaved
            if row["time_ms"]:
                t = row["time_ms"][1] / 1e3
                row["flops_per_s"] = floor / t
                if g:
                    rate = gemm_rate(g)
                    row["gemm_flops_per_s"] = rate
                    row["floor_frac"] = (floor / rate) / t
            rows.append(row)
    # time and memory ratios against the one baseline, same workload and case
    idx = {(r["provider"], r["workload"], r["case"].key()): r for r in rows}
    for r in rows:
        b = idx.get((BASELINE, r["workload"], r["case"].key()))
        if b and b.get("time_ms") and r.get("time_ms"):
            r["speedup_vs_ref"] = b["time_ms"][1] / r["time_ms"][1]
        if b and b.get("peak_bytes") and r.get("peak_bytes"):
            r["mem_ratio_vs_ref"] = b["peak_bytes"] / max(r["peak_bytes"], 1)
    return rows


def _sorted(rows: list[dict]) -> list[dict]:
    order = {p: i for i, p in enumerate(NAMES)}
    wl_order = {w: i for i, w in enumerate(WORKLOAD_ROWS)}
    return sorted(
        rows,
        key=lambda r: (
            wl_order.get(r["workload"], 9),
            r["case"].N,
            r["case"].K,
            order.get(r["provider"], 99),
        ),
    )


def markdown_table(rows: list[dict], gemm_rows: list[dict], meta: dict) -> str:
    """The results table (and the GEMM yardstick table above it) as markdown."""
    unit, scale = ("TFLOP/s", 1e12) if meta["device_is_cuda"] else ("GFLOP/s", 1e9)
    out = [
        (
            f"### {meta['preset']} on {meta['device']} — {meta['dtype']}, {meta['version']}, "
            f"torch {meta['torch']}, {meta['timestamp']}"
        ),
        "",
    ]
    if gemm_rows:
        out += [
            (
                "GEMM yardstick: the best rate this machine gave for the row's dtype, over "
                "every candidate and sample, timed in the same process as the row's providers "
                "(interleaved with them on CPU): `mm-tile` = torch.mm(a [M,H], b [H,Vb], "
                "out=preallocated) at the tile of the CPU backend `auto` runs (the native "
                "kernels' tile when they are built, timed on one thread × the thread count, "
                "else the torch backend's); `native-tile` = the native engine's own GEMMs at "
                "that tile (logits, dh and dW; every thread at once); `mm-whole` = torch.mm "
                "at the whole [M,H]@[H,V] (V cut to a 128 MiB output; all threads; the only "
                "candidate on CUDA). Since no provider's GEMMs outrun the best of these, "
                "floor % stays at or under ~100 (timing noise aside)."
            ),
            "",
            (
                f"| rows | shape | best of | GEMM M×H·H×Vb | time ms (p50 [p20, p80]) | "
                f"best {unit} | candidates (best {unit}) |"
            ),
            "|---|---|---|---|---|---|---|",
        ]
        for g in gemm_rows:
            c = g["case"]
            m, h, v = g["tile"]
            rate = gemm_rate(g) / scale
            cands = " · ".join(
                f"{name} {k['flops_per_s'] / scale:.1f}"
                for name, k in (g.get("candidates") or {}).items()
            )
            out.append(
                f"| {c.workload} | {c.shape()} | {g.get('source', '—')} | {m}×{h}·{h}×{v} | "
                f"{fmt_ms(g['time_ms'])} | {rate:.1f} | {cands or '—'} |"
            )
        out.append("")
    out += [
        (
            f"| workload | shape | provider | time ms (p50 [p20, p80]) | peak MiB | {unit} | "
            f"floor % | × vs {BASELINE} | mem ÷ vs {BASELINE} | status |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in _sorted(rows):
        c = r["case"]
        status = r["status"] if r["status"] == "ok" else f"**{r['status']}**"
        if r["note"]:
            status += f": {r['note']}"
        elif r.get("check_err") is not None:
            status += f" (check {r['check_err']:.0e})"
        out.append(
            f"| {r['workload']} | {c.shape()} | {r['provider']} | {fmt_ms(r['time_ms'])} | "
            f"{fmt_bytes(r['peak_bytes'])} | "
            f"{_f(r.get('flops_per_s') and r['flops_per_s'] / scale, '{:.1f}')} | "
            f"{_f(r.get('floor_frac') and 100 * r['floor_frac'], '{:.0f}')} | "
            f"{_f(r.get('speedup_vs_ref'))} | {_f(r.get('mem_ratio_vs_ref'), '{:.1f}')} | "
            f"{status} |"
        )
    out += [
        "",
        (
            f"{unit}: useful work = the floor FLOPs ((K+4)·G for sgsd; 4 G divergence; K·G "
            "local_support; 1/3/4 G for "
            "logprobs fwd/bwd/fwd+bwd; G = 2·N·V·H) divided by the median time. floor % = time at "
            "the yardstick's best GEMM rate for the floor FLOPs ÷ median time. peak MiB: memory "
            f"above the inputs ({meta['mem_method']}). × / mem ÷ vs {BASELINE}: the median time "
            f"/ peak of `{BASELINE}` (the published code path: one row per (rollout, teacher), "
            "logits materialised) divided by this row's (> 1 = better than the published path)."
        ),
    ]
    return "\n".join(out)


CSV_FIELDS = (
    "provider",
    "workload",
    "shape",
    "N",
    "K",
    "V",
    "H",
    "dtype",
    "device",
    "metric",
    "unit",
    "p20",
    "p50",
    "p80",
    "status",
    "note",
    "timestamp",
    "version",
    "torch",
)


def csv_records(rows: list[dict], gemm_rows: list[dict], meta: dict) -> list[dict]:
    """Long format: one record per (provider, workload, shape, metric)."""
    recs = []

    def rec(provider, workload, c, metric, unit, p20, p50, p80, status="ok", note=""):
        recs.append(
            {
                "provider": provider,
                "workload": workload,
                "shape": c.shape(),
                "N": c.N,
                "K": c.K,
                "V": c.V,
                "H": c.H,
                "dtype": c.dtype,
                "device": meta["device"],
                "metric": metric,
                "unit": unit,
                "p20": p20,
                "p50": p50,
                "p80": p80,
                "status": status,
                "note": note,
                "timestamp": meta["timestamp"],
                "version": meta["version"],
                "torch": meta["torch"],
            }
        )

    for g in gemm_rows:
        c, wl = g["case"], f"gemm@{g['case'].workload}"
        for name, k in (g.get("candidates") or {}).items():
            shape = "{}x{}x{}".format(*k["tile"])
            rec(name, wl, c, "time", "ms", *k["time_ms"], note=shape)
            rec(name, wl, c, "best_flops_per_s", "FLOP/s", None, k["flops_per_s"], None, note=shape)
        note = "best of {}: {}x{}x{}".format(g.get("source", "—"), *g["tile"])
        rec("yardstick", wl, c, "time", "ms", *g["time_ms"], note=note)
        rec("yardstick", wl, c, "best_flops_per_s", "FLOP/s", None, gemm_rate(g), None, note=note)
    for r in rows:
        c, p, w = r["case"], r["provider"], r["workload"]
        if r["status"] != "ok":
            rec(p, w, c, "status", "", None, None, None, r["status"], r["note"])
            continue
        t = r["time_ms"]
        if t:
            rec(p, w, c, "time", "ms", *t)
            # p20 of the rate comes from p80 of the time and vice versa
            rec(p, w, c, "flops_per_s", "FLOP/s", *[r["floor_flops"] / (v / 1e3) for v in t[::-1]])
        if r.get("peak_bytes") is not None:
            note = r.get("mem_method") or ""
            rec(p, w, c, "peak_memory", "bytes", None, r["peak_bytes"], None, note=note)
        for m, u in (
            ("floor_frac", "fraction"),
            ("speedup_vs_ref", "x"),
            ("mem_ratio_vs_ref", "x"),
            ("check_err", "rel"),
        ):
            if r.get(m) is not None:
                rec(p, w, c, m, u, None, r[m], None)
    return recs


def write_csv(path: str, rows: list[dict], gemm_rows: list[dict], meta: dict) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for rec in csv_records(rows, gemm_rows, meta):
            w.writerow(rec)


def progress_line(row: dict) -> str:
    """One stderr line per worker result."""
    c = Case(**row["case"])
    if row["provider"] == "gemm":
        g = row.get("gemm", {})
        return f"gemm            {c.shape():42s} {fmt_ms(g.get('time_ms'))} ms ({g.get('source')})"
    res = row.get("result") or {}
    t = (res.get("fwdbwd") or {}).get("time_ms")
    pk = (res.get("fwdbwd") or {}).get("peak_bytes")
    s = f"{row['provider']:15s} {c.workload:8s} {c.shape():42s} "
    if row["status"] == "ok":
        return s + f"fwd+bwd {fmt_ms(t)} ms, peak {fmt_bytes(pk)} MiB"
    return s + f"{row['status']}: {row['note'][:110]}"
