"""Reports of ``tools/triton_aot.py``: the CSV (one row per kernel, arch, dtype, variant,
config), the markdown summary (problems first, then the default configs, then every
compile) and the PTX files."""

from __future__ import annotations

import csv
import importlib
from pathlib import Path

COLUMNS = [
    "kernel",
    "arch",
    "dtype",
    "variant",
    "config",
    "default",
    "registers",
    "spill_bytes",
    "shared_bytes",
    "mma",
    "operand_precision",
    "compile_s",
]


def write_reports(rows: list[dict], ptx: dict, out: Path, dump_ptx: bool, archs: list[int]) -> None:
    """DIR/triton-aot.csv, DIR/triton-aot.md and, with ``dump_ptx``, DIR/ptx/*.ptx."""
    triton_configs = configs()

    out.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: tuple(str(r[c]) for c in COLUMNS[:5]))
    with open(out / "triton-aot.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "# Triton AOT compile report",
        "",
        "`python tools/triton_aot.py --arch "
        + ",".join(f"sm_{cc}" for cc in archs)
        + "` (Triton's bundled ptxas, no GPU). "
        "dtype `tf32` = fp32 inputs with TF32 enabled by the user in PyTorch. "
        "Shared-memory limits per block: "
        + ", ".join(f"sm_{cc} {triton_configs.shared_limit(cc):,} B" for cc in archs)
        + ".",
        "",
        f"{len(rows)} compiles, {sum(r['compile_s'] for r in rows):.0f} s in all.",
        "",
    ]

    def name(r):
        return f"- {r['kernel']} {r['arch']} {r['dtype']} {r['variant']} {r['config']}: "

    problems = [name(r) + f"{r['shared_bytes']:,} B shared" for r in rows if _over(r)]
    allowance = configs().SPILL_ALLOWANCE_BYTES
    problems += [
        name(r) + f"{r['spill_bytes']} B spilled"
        for r in rows
        if _spills(r, True) and r["spill_bytes"] > allowance
    ]
    problems += [
        name(r) + f"operand precision {r['operand_precision']}"
        for r in rows
        if r["dtype"] == "fp32" and r["operand_precision"] not in ("ieee", "no-dot")
    ]
    lines += [
        f"## Problems (over shared memory; default configs that spill over {allowance} B;"
        " fp32 not ieee)",
        "",
    ]
    lines += problems or ["None."]
    edge = [
        name(r) + f"{r['spill_bytes']} B spilled"
        for r in rows
        if _spills(r, True) and r["spill_bytes"] <= allowance
    ]
    lines += ["", f"## Default configs at the register edge (1-{allowance} B spilled)", ""]
    lines += edge or ["None."]
    space = [name(r) + f"{r['spill_bytes']} B spilled" for r in rows if _spills(r, False)]
    lines += ["", "## Autotune candidates (not defaults) that spill", "", *(space or ["None."])]
    lines += ["", "## Default configs (largest variant per kernel, arch, dtype)", ""]
    lines += _table(_headline(rows), COLUMNS)
    lines += ["", "## All compiles", ""]
    lines += _table(rows, COLUMNS)
    (out / "triton-aot.md").write_text("\n".join(lines) + "\n")
    if dump_ptx:
        (out / "ptx").mkdir(exist_ok=True)
        for name, text in ptx.items():
            (out / "ptx" / f"{name}.ptx").write_text(text)


def _over(row) -> bool:
    triton_configs = configs()

    return row["shared_bytes"] > triton_configs.shared_limit(int(row["arch"].removeprefix("sm_")))


def _spills(row, default: bool) -> bool:
    return row["spill_bytes"] > 0 and row["default"] == default


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row.update(
            default=row["default"] == "True",
            registers=int(row["registers"]),
            spill_bytes=int(row["spill_bytes"]),
            shared_bytes=int(row["shared_bytes"]),
            compile_s=float(row["compile_s"]),
        )
    return rows


def _headline(rows):
    best = {}
    for r in rows:
        if not r["default"]:
            continue
        key = (r["kernel"], r["arch"], r["dtype"])
        if key not in best or (r["shared_bytes"], r["registers"]) > (
            best[key]["shared_bytes"],
            best[key]["registers"],
        ):
            best[key] = r
    return [best[k] for k in sorted(best)]


def _table(rows, columns):
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return out


def configs():
    """sgsd_kernels' launch-configuration module (imported late: under the stand-in driver)."""
    return importlib.import_module("sgsd_kernels.ops.triton_backend.triton_configs")
