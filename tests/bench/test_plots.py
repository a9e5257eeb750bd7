"""plots.py on canned rows: the figures are written and hold what they should."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")
import matplotlib.image as mpimg  # noqa: E402
import numpy as np  # noqa: E402

from sgsd_bench import plots, report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _read(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    return mpimg.imread(path)


def test_make_plots_writes_vs_n_and_vs_k(canned, tmp_path):
    results, gemm, meta = canned
    rows = report.build_rows(results, gemm)
    prefix = str(tmp_path / "canned")
    paths = plots.make_plots(rows, prefix, meta)
    assert paths == [prefix + "_vs_N.png", prefix + "_vs_K.png"]
    vs_n, vs_k = (_read(p) for p in paths)
    # vs N: two panel rows (log-probs, and SGSD at K = 4, the largest K with ≥ 2 N values),
    # two panels each, at dpi 110: 11 × 8 inches; vs K: one row, 11 × 4 inches
    assert vs_n.shape[:2] == (8 * 110, 11 * 110)
    assert vs_k.shape[:2] == (4 * 110, 11 * 110)
    for img in (vs_n, vs_k):
        rgb = img[..., :3]
        assert rgb.std() > 0.01  # not a blank canvas
        # the providers' lines are drawn in their registry colours (tab:blue, tab:green)
        blue = np.array([0x1F, 0x77, 0xB4]) / 255
        green = np.array([0x2C, 0xA0, 0x2C]) / 255
        for colour in (blue, green):
            assert (np.abs(rgb - colour).max(-1) < 0.02).sum() > 50


def test_make_plots_skips_axes_with_one_point(canned, tmp_path):
    results, gemm, meta = canned
    rows = [r for r in report.build_rows(results, gemm) if r["case"].N == 64]
    rows = [r for r in rows if r["workload"] != "sgsd-fwdbwd" or r["case"].K == 4]
    # one N for every workload and one K: nothing to draw a line through
    assert plots.make_plots(rows, str(tmp_path / "one"), meta) == []
    assert list(tmp_path.iterdir()) == []


def test_make_plots_ignores_rows_without_times(canned, tmp_path):
    results, gemm, meta = canned
    rows = report.build_rows(results, gemm)
    for r in rows:
        if r["provider"] == "torch":
            r["time_ms"] = None
    paths = plots.make_plots(rows, str(tmp_path / "partial"), meta)
    assert len(paths) == 2
    rgb = _read(paths[0])[..., :3]
    green = np.array([0x2C, 0xA0, 0x2C]) / 255
    assert (np.abs(rgb - green).max(-1) < 0.02).sum() == 0
