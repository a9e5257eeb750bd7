"""Time and peak memory against N (fixed K) and against K (fixed N), one line per provider."""

from __future__ import annotations

import sys

from sgsd_bench.providers import PROVIDERS


def _draw(ax, series: dict, xlabel: str, ylabel: str, key) -> None:
    for prov, pts in sorted(series.items()):
        pts.sort(key=lambda p: p[0])
        p = PROVIDERS.get(prov)
        ax.plot(
            [x for x, _ in pts],
            [key(r) for _, r in pts],
            marker="o",
            label=prov,
            color=p.color if p else None,
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)


def _time(r) -> float:
    return r["time_ms"][1]


def _mib(r) -> float:
    return max(r.get("peak_bytes") or 1, 1) / 2**20


def _panel(axes, series: dict, xlabel: str, name: str) -> None:
    _draw(axes[0], series, xlabel, "median time (ms)", _time)
    axes[0].set_title(f"{name}: time")
    with_mem = {k: [p for p in v if p[1].get("peak_bytes")] for k, v in series.items()}
    _draw(axes[1], with_mem, xlabel, "peak memory above inputs (MiB)", _mib)
    axes[1].set_title(f"{name}: peak memory")


def make_plots(rows: list[dict], out_prefix: str, meta: dict) -> list[str]:
    """Write ``<out_prefix>_vs_N.png`` (log-prob fwd+bwd, and SGSD at the largest K with
    ≥ 2 N values) and ``<out_prefix>_vs_K.png`` (SGSD at the N with the most K values),
    each when it has ≥ 2 points on its axis; returns the paths written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        print(f"[bench] no plots: matplotlib unavailable ({e})", file=sys.stderr)
        return []
    ok = [r for r in rows if r.get("time_ms")]
    paths = []
    title = f"{meta['preset']} · {meta['device']} · {meta['dtype']}"

    panels = []
    lp = [r for r in ok if r["workload"] == "logprobs-fwdbwd"]
    if len({r["case"].N for r in lp}) >= 2:
        panels.append(("logprobs fwd+bwd", lp))
    sg = [r for r in ok if r["workload"] == "sgsd-fwdbwd"]
    for K in sorted({r["case"].K for r in sg}, reverse=True):
        sel = [r for r in sg if r["case"].K == K]
        if len({r["case"].N for r in sel}) >= 2:
            panels.append((f"sgsd fwd+bwd, K={K}", sel))
            break
    if panels:
        fig, axes = plt.subplots(len(panels), 2, figsize=(11, 4 * len(panels)), squeeze=False)
        for i, (name, sel) in enumerate(panels):
            series: dict = {}
            for r in sel:
                series.setdefault(r["provider"], []).append((r["case"].N, r))
            _panel(axes[i], series, "N tokens", name)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        path = out_prefix + "_vs_N.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    byN: dict = {}
    for r in sg:
        byN.setdefault(r["case"].N, set()).add(r["case"].K)
    if byN:
        N = max(byN, key=lambda n: (len(byN[n]), n))
        if len(byN[N]) >= 2:
            series = {}
            for r in sg:
                if r["case"].N == N:
                    series.setdefault(r["provider"], []).append((r["case"].K, r))
            fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
            _panel(axes[0], series, "K teachers", f"sgsd fwd+bwd, N={N}")
            axes[0][0].legend(fontsize=8)
            fig.suptitle(title)
            fig.tight_layout()
            path = out_prefix + "_vs_K.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths
