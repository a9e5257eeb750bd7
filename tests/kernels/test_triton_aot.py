"""CI: every Triton kernel compiles for sm_80 and sm_90 at the configs the dispatcher uses
by default, fits each architecture's shared memory, spills at most
``triton_configs.SPILL_ALLOWANCE_BYTES`` per thread on sm_90, and fp32
inputs do not run as TF32 unless the user enabled TF32 (docs/design.md §8).

``tools/triton_aot.py --quick`` runs in a subprocess (one compile process per
architecture, in parallel on the 2 CI cores): this test session imports the kernels
under ``TRITON_INTERPRET=1``, which makes them interpreter functions that cannot be
compiled. No GPU is needed; Triton's bundled ptxas does the work.
"""

from __future__ import annotations

import csv
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "triton_aot.py"
ARCHS = ("sm_80", "sm_90")
# What the dispatcher launches; a kernel missing here is a kernel the tool did not reach.
# Named by module (without a "triton_" prefix) and function.
KERNELS = {
    "linear_logprobs._fwd_kernel",
    "linear_logprobs._grad_logits_kernel",
    "logprobs_from_logits._fwd_kernel",
    "logprobs_from_logits._bwd_kernel",
    "gated_kd._fwd_kernel",
    "gated_kd._bwd_kernel",
    "linear_divergence._fwd_kernel",
    "linear_divergence._grad_kernel",
}
DOT_KERNELS = {k for k in KERNELS if k.startswith(("linear_logprobs.", "linear_divergence."))}

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() != "x86_64",
    reason="Triton (and its bundled ptxas) is installed on Linux x86_64 only",
)


def _run_tool(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, str(TOOL), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _kernel_name(row) -> str:
    module, fn = row["kernel"].rsplit(".", 1)
    return f"{module.removeprefix('triton_')}.{fn}"


@pytest.fixture(scope="module")
def aot(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("aot")
    args = ("--arch", ",".join(ARCHS), "--quick", "--dump-ptx", "--jobs", "2", "--out", str(out))
    proc = _run_tool(*args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / "triton-aot.csv") as f:
        rows = list(csv.DictReader(f))
    return out, rows


def test_every_kernel_compiles_for_each_arch_and_dtype(aot):
    _, rows = aot
    for arch in ARCHS:
        seen = {_kernel_name(r) for r in rows if r["arch"] == arch}
        assert KERNELS <= seen, f"{arch}: never compiled: {sorted(KERNELS - seen)}"
        for kernel in DOT_KERNELS:
            dtypes = {r["dtype"] for r in rows if r["arch"] == arch and _kernel_name(r) == kernel}
            assert dtypes == {"fp16", "bf16", "fp32", "tf32", "fp64"}, f"{arch} {kernel}: {dtypes}"
        # The divergence's three element-wise variants (forward KL, reverse KL, β-JSD),
        # each a different register budget: all of them are compiled, so the spill test
        # below covers every one at sm_90.
        for kernel in ("linear_divergence._fwd_kernel", "linear_divergence._grad_kernel"):
            variants = {
                r["variant"] for r in rows if r["arch"] == arch and _kernel_name(r) == kernel
            }
            modes = {v.rsplit("+", 1)[-1] for v in variants}
            assert modes == {"beta_mode0", "beta_mode1", "beta_mode2"}, f"{arch} {kernel}: {modes}"
    assert all(r["default"] == "True" for r in rows)  # --quick: the default configs only


def test_shared_memory_fits_each_architecture(aot):
    sys.path.insert(0, str(ROOT / "tools"))
    from triton_aot_report import configs

    triton_configs = configs()
    _, rows = aot
    over = [
        f"{r['kernel']} {r['arch']} {r['dtype']} {r['variant']} {r['config']}: "
        f"{r['shared_bytes']} B"
        for r in rows
        if int(r["shared_bytes"]) > triton_configs.shared_limit(int(r["arch"][3:]))
    ]
    assert not over, "over the per-block shared-memory limit:\n" + "\n".join(over)


def test_no_spills_at_sm90_default_configs_beyond_the_allowance(aot):
    _, rows = aot
    sys.path.insert(0, str(ROOT / "tools"))
    from triton_aot_report import configs

    allowance = configs().SPILL_ALLOWANCE_BYTES
    spills = [
        f"{r['kernel']} {r['dtype']} {r['variant']} {r['config']}: {r['spill_bytes']} B"
        for r in rows
        if r["arch"] == "sm_90" and int(r["spill_bytes"]) > allowance
    ]
    assert not spills, f"spills over {allowance} B at sm_90:\n" + "\n".join(spills)


def _ptx(out, row) -> str:
    name = "__".join(row[c] for c in ("kernel", "arch", "dtype", "variant", "config"))
    return (out / "ptx" / f"{name}.ptx").read_text()


def _mma_lines(out, row) -> list[str]:
    return [line for line in _ptx(out, row).splitlines() if re.search(r"\b(wg)?mma\.", line)]


def test_fp32_runs_ieee_unless_tf32_is_enabled(aot):
    out, rows = aot
    fp32 = [r for r in rows if r["dtype"] == "fp32" and r["operand_precision"] != "no-dot"]
    assert fp32, "no fp32 kernel with a dot was compiled"
    for r in fp32:
        assert r["operand_precision"] == "ieee", r
        assert not [x for x in _mma_lines(out, r) if "tf32" in x], f"tf32 MMA in {r['kernel']} {r}"
    # The user's TF32 switch reaches the kernels (a distinct compile: part of the cache key).
    tf32 = [r for r in rows if r["dtype"] == "tf32" and r["operand_precision"] != "no-dot"]
    assert tf32 and all(r["operand_precision"] == "tf32" for r in tf32)
    assert all(any("tf32" in x for x in _mma_lines(out, r)) for r in tf32)


def test_fp64_dots_stay_fp64(aot):
    out, rows = aot
    fp64 = [r for r in rows if r["dtype"] == "fp64" and r["operand_precision"] != "no-dot"]
    assert fp64
    for r in fp64:
        assert r["operand_precision"] == "fp64"
        assert all(".f64" in x for x in _mma_lines(out, r)), r


def test_fp64_kernels_take_no_fp32_scalar(aot):
    """A Python float reaches a compiled kernel as an fp32 scalar (a ``.param .f32`` of the
    PTX entry), which would round 1/T, log β or the clip to ~1e-7 in fp64 math; these
    kernels take them from a tensor in the accumulation dtype. Triton's interpreter, which
    the CPU oracle tests run, does not show the rounding."""
    out, rows = aot
    fp64 = [r for r in rows if r["dtype"] == "fp64" and _kernel_name(r) in KERNELS]
    assert {_kernel_name(r) for r in fp64} == KERNELS
    for r in fp64:
        entry = re.search(r"\.entry\s+\w+\s*\(([^)]*)\)", _ptx(out, r))
        assert entry, f"no .entry in the PTX of {r}"
        params = [p.strip() for p in entry.group(1).split(",")]
        assert not [p for p in params if ".f32" in p], f"fp32 scalar parameter in {r}: {params}"


def test_tool_rejects_a_bad_arch_with_a_message():
    pytest.importorskip("triton")
    proc = _run_tool("--arch", "hopper", "--out", "unused", timeout=120)
    assert proc.returncode == 2
    assert "--arch: expected names like sm_80,sm_90, got 'hopper'" in proc.stderr
