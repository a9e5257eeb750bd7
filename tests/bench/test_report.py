"""report.py on canned rows: the derived numbers, the markdown table and the CSV."""

from __future__ import annotations

import csv
import math

import pytest

from sgsd_bench import report
from sgsd_bench.presets import Case
from sgsd_bench.providers import BASELINE


def _rows(canned):
    results, gemm, meta = canned
    return report.build_rows(results, gemm), results, gemm, meta


def _find(rows, provider, workload, N, K=0):
    hits = [
        r
        for r in rows
        if r["provider"] == provider
        and r["workload"] == workload
        and r["case"].N == N
        and r["case"].K == K
    ]
    assert len(hits) == 1, (provider, workload, N, K, len(hits))
    return hits[0]


def test_build_rows_one_row_per_phase_and_provider(canned):
    rows, results, _, _ = _rows(canned)
    # 2 log-prob shapes × 3 providers × 3 phases + 3 SGSD shapes × 2 providers
    assert len(rows) == 2 * 3 * 3 + 3 * 2
    wls = {r["workload"] for r in rows}
    assert wls == {"logprobs-fwd", "logprobs-bwd", "logprobs-fwdbwd", "sgsd-fwdbwd"}
    liger = [r for r in rows if r["provider"] == "liger"]
    assert liger and all(r["status"] == "n/a" and r["time_ms"] is None for r in liger)


def test_build_rows_ratios_against_the_one_baseline(canned):
    rows, *_ = _rows(canned)
    ref = _find(rows, BASELINE, "sgsd-fwdbwd", 128, 4)
    fast = _find(rows, "torch", "sgsd-fwdbwd", 128, 4)
    assert ref["speedup_vs_ref"] == pytest.approx(1.0)
    assert fast["speedup_vs_ref"] == pytest.approx(ref["time_ms"][1] / fast["time_ms"][1])
    assert fast["speedup_vs_ref"] == pytest.approx(4.0)
    assert fast["mem_ratio_vs_ref"] == pytest.approx(4.0)
    assert not any("speedup_vs_paper" in r for r in rows)


def test_build_rows_floor_uses_the_best_gemm_rate(canned):
    rows, _, gemm, _ = _rows(canned)
    r = _find(rows, "torch", "logprobs-fwdbwd", 128)
    c = r["case"]
    g = gemm[c.key()]
    rate = 2.0 * math.prod(g["tile"]) / (g["best_ms"] / 1e3)
    floor = 4 * 2.0 * c.N * c.V * c.H
    assert r["gemm_flops_per_s"] == pytest.approx(rate)
    assert r["floor_frac"] == pytest.approx(floor / rate / (r["time_ms"][1] / 1e3))
    assert r["flops_per_s"] == pytest.approx(floor / (r["time_ms"][1] / 1e3))


def test_build_rows_without_a_gemm_has_no_floor(canned):
    results, _, _ = canned
    rows = report.build_rows(results, {})
    assert rows and not any("floor_frac" in r for r in rows)
    assert any(r.get("flops_per_s") for r in rows)


def test_markdown_table_columns_and_order(canned):
    rows, _, gemm, meta = _rows(canned)
    gemm_rows = [{"case": Case(**_case_of(k)), **g} for k, g in gemm.items()]
    text = report.markdown_table(rows, gemm_rows, meta)
    lines = text.splitlines()
    header = next(ln for ln in lines if ln.startswith("| workload |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[-4:] == ["floor %", f"× vs {BASELINE}", f"mem ÷ vs {BASELINE}", "status"]
    assert not any("paper" in c for c in cols)
    body = [ln for ln in lines if ln.startswith(("| logprobs-", "| sgsd-"))]
    assert len(body) == len(rows)
    # workload order, then N, then the registry's provider order (baseline first)
    assert body[0].startswith("| logprobs-fwd | N=64 ") and f"| {BASELINE} |" in body[0]
    assert body[-1].startswith("| sgsd-fwdbwd | N=128 ") and "| torch |" in body[-1]
    assert any("**n/a**: needs a CUDA device" in ln for ln in body)
    assert sum(ln.startswith(("| logprobs |", "| sgsd |")) for ln in lines) == len(gemm_rows)
    assert "GFLOP/s" in header


def test_csv_records_round_trip(canned, tmp_path):
    rows, _, gemm, meta = _rows(canned)
    gemm_rows = [{"case": Case(**_case_of(k)), **g} for k, g in gemm.items()]
    path = tmp_path / "out.csv"
    report.write_csv(str(path), rows, gemm_rows, meta)
    with open(path) as f:
        recs = list(csv.DictReader(f))
    assert set(recs[0]) == set(report.CSV_FIELDS)
    metrics = {r["metric"] for r in recs}
    assert {"time", "flops_per_s", "peak_memory", "floor_frac", "speedup_vs_ref"} <= metrics
    assert "best_flops_per_s" in metrics
    assert not any("paper" in r["metric"] for r in recs)
    status = [r for r in recs if r["provider"] == "liger"]
    assert status and all(r["metric"] == "status" and r["status"] == "n/a" for r in status)
    t = next(
        r
        for r in recs
        if r["provider"] == "torch" and r["metric"] == "time" and r["workload"] == "sgsd-fwdbwd"
    )
    assert float(t["p20"]) <= float(t["p50"]) <= float(t["p80"])


def _case_of(key: str) -> dict:
    w, N, V, H, K, dtype = key.split("|")
    return {"workload": w, "N": int(N), "V": int(V), "H": int(H), "K": int(K), "dtype": dtype}


@pytest.mark.parametrize(
    ("t", "want"),
    [([0.1, 0.12, 0.2], "0.120 [0.100, 0.200]"), ([1, 2, 3], "2.00 [1.00, 3.00]"),
     ([100, 150, 200], "150.0 [100.0, 200.0]"), (None, "—")],
)  # fmt: skip
def test_fmt_ms(t, want):
    assert report.fmt_ms(t) == want


def test_fmt_ms_rejects_a_bad_list():
    with pytest.raises(ValueError, match=r"fmt_ms: expected \[p20, p50, p80\]"):
        report.fmt_ms([1.0, 2.0])


def test_fmt_bytes():
    assert report.fmt_bytes(None) == "—"
    assert report.fmt_bytes(3 * 2**20 + 2**19) == "3.5"


def test_progress_line(canned):
    results, *_ = canned
    ok = report.progress_line(results[0])
    assert ok.startswith("reference") and "fwd+bwd" in ok and "MiB" in ok
    na = report.progress_line(results[2])
    assert "n/a: needs a CUDA device" in na
