"""Launch configuration of the Triton kernels (docs/design.md §5, §8): the fp32 dot
precision, the tile tables per GPU architecture with the reason for each entry, the small-N
and large-V heuristics, and the opt-in autotune.

Everything here asks Triton's active driver for the target (``get_current_target``) and the
SM count, never ``torch.cuda`` directly: ``tools/triton_aot.py`` installs a stand-in driver
that reports sm_80 or sm_90, so the package's own dispatch picks exactly what it would
pick on that GPU, and every launch becomes a compile that the report records.

fp32 numerics follow PyTorch. ``tl.dot`` on fp32 operands defaults to TF32 in Triton
(``wgmma ... tf32`` on sm_90, ~1e-3 relative error); PyTorch's fp32 matmul default is full
fp32. So fp32 dots use ``input_precision="ieee"`` unless the user enabled TF32 for matmuls
(``torch.backends.cuda.matmul.fp32_precision == "tf32"``, which also reflects the legacy
``allow_tf32 = True`` and ``torch.set_float32_matmul_precision("high")``). The precision
is a ``tl.constexpr`` of every kernel, so it is part of the kernel cache key. fp64 dots are
fp64 (Triton ignores the precision for them); fp16/bf16 dots run on tensor cores with fp32
accumulation whatever the setting.
"""

from __future__ import annotations

import os
import re
import time

import torch
import triton
from triton.runtime import driver

from sgsd_kernels.runtime import interpreting, is_deterministic

# Opt-in shared memory per block (bytes), CUDA C Programming Guide, "Technical
# Specifications per Compute Capability": A100 163 KB, consumer Ampere/Ada 99 KB, H100/B200
# 227 KB. A kernel that needs more compiles and then fails at launch.
SHARED_LIMIT = {80: 166_912, 86: 101_376, 87: 166_912, 89: 101_376, 90: 232_448, 100: 232_448}
_SMALL_SHARED = 101_376

KINDS = ("fwd", "grad_logits")

# The interpreter runs each program in numpy: fewer, larger tiles are faster, and tl.dot
# needs every dimension >= 16.
_INTERPRET = dict(BLOCK_N=16, BLOCK_V=64, BLOCK_H=32, num_warps=1, num_stages=1)
_INTERPRET_SPACE = [_INTERPRET, dict(_INTERPRET, BLOCK_V=32)]


# One row per (kind, operands): the sm_90 space | the sm_80 space. The first config of each
# is the default, the rest the opt-in autotune space; a config is
# BLOCK_NxBLOCK_VxBLOCK_H/warps/stages. operands: "16" (fp16/bf16), "fp32" (ieee dots),
# "tf32" (fp32 with TF32 enabled by the user), "fp64". The budgets (registers, spills,
# shared bytes) are those of benchmarks/results/triton-aot/triton-aot.md, compiled with
# Triton 3.9's bundled ptxas; only the sm_90 16-bit tiles were chosen by GPU timings (on an
# H100, below), the rest by those budgets alone. sm_90: H100, 227 KB shared
# per block, 255 registers per thread, wgmma. sm_80: A100, 163 KB shared, mma.sync with
# the accumulators in registers. "#" lines give the reasons.
_TILES = """
# 16-bit on sm_90, timed on an H100 (Triton 3.6, bf16, V=151936, H=2048, N=8192;
# benchmarks/results/h100-20261126/gpu-tune.csv). Forward 64x256x64 at 8 warps (two
# warpgroups of wgmma): 12.2 ms against 18.0 for 64x128x64, 14.2 for 128x128x64 and 12.6
# for 256x128x64; no spills with Triton 3.6, 4-16 B with 3.9 (128x128x64 spills 12-152 B
# there, 128x256x64 and 256x128x64 spill 0.3-1.3 KB). Gradient tile 64x128x64: forward+
# backward 45.5 ms, within 6 % of 128x256x64 (43.0) and 256x128x64 (43.5), which spill up to
# 600 B with bias and entropy; it spills nowhere. On sm_80 64x64x64 at 4 warps spilled 16 B.
fwd          16    64x256x64/8/3 64x128x64/8/3 128x128x64/8/3 | 64x128x64/8/3 64x64x64/4/3
grad_logits  16    64x128x64/8/3 256x128x64/8/3 128x64x64/4/3 | 64x128x64/8/3 128x64x64/4/3
# fp32 (ieee): no tensor cores, FMA dots. 64x64x32 at 4 warps spilled 16 B in the sm_90
# entropy forward (no second candidate). On sm_80 the forward at 64x128x32/8/2 is at the
# edge (255 registers).
fwd          fp32  64x128x32/8/3               | 64x128x32/8/2 64x64x32/4/2
grad_logits  fp32  64x128x32/8/3 64x64x32/4/3  | 64x128x32/8/2 64x64x32/4/3
# tf32 (user opt-in): tensor-core tf32 at the fp32 tile shapes, 32-deep K steps; none
# spills.
fwd          tf32  64x128x32/8/3               | 64x128x32/8/2
grad_logits  tf32  64x128x32/8/3               | 64x128x32/8/2
# fp64: DMMA (mma.m8n8k4.f64); small tiles, an fp64 accumulator is two registers. The
# sm_90 chunked backward's gradient tile at 32x64 spilled 4 B (bias + entropy); 32x32 does
# not.
fwd          fp64  32x64x16/4/2                | 32x64x16/4/2
grad_logits  fp64  32x32x16/4/2                | 32x64x16/4/2
"""

# Spill stores per thread a default tile may have at sm_90 before the AOT report and its CI
# test call it a problem. The 16-bit forward tile sits at the register edge: 4-16 B with
# Triton 3.9's ptxas, none with 3.6, and it timed 32 % faster than the next tile that
# spills nowhere (64x128x64) on an H100. Spilling kernels that matter spill kilobytes.
SPILL_ALLOWANCE_BYTES = 32

# (family, kind, operands) -> default config, and the opt-in autotune space per key (the
# default is always its first entry).
DEFAULTS: dict[tuple[str, str, str], dict] = {}
SPACE: dict[tuple[str, str, str], list[dict]] = {}


def parse_tile(text: str) -> dict:
    """``"64x128x32/8/3"`` -> BLOCK_N=64, BLOCK_V=128, BLOCK_H=32, 8 warps, 3 stages."""
    match = re.fullmatch(r"(\d+)x(\d+)x(\d+)/(\d+)/(\d+)", text)
    if not match:
        raise ValueError(f"tile config must look like 64x128x32/8/3, got {text!r}")
    n, v, h, warps, stages = map(int, match.groups())
    return dict(BLOCK_N=n, BLOCK_V=v, BLOCK_H=h, num_warps=warps, num_stages=stages)


def _table(family, kind, operands, space):
    DEFAULTS[(family, kind, operands)] = space[0]
    SPACE[(family, kind, operands)] = space


for _row in _TILES.strip().splitlines():
    if _row.startswith("#"):
        continue
    _left, _right = _row.split("|")
    _kind, _ops, *_sm90 = _left.split()
    _table("sm90", _kind, _ops, [parse_tile(t) for t in _sm90])
    _table("sm80", _kind, _ops, [parse_tile(t) for t in _right.split()])

# --- sm_86 / sm_89 / sm_120 (99 KB shared): the sm_80 tiles at <= 2 stages. Not in the
# committed report; `tools/triton_aot.py --arch sm_86` compiles them. ----------------------
for (_fam, _kind, _ops), _cfg in list(DEFAULTS.items()):
    if _fam == "sm80":
        _table("sm86", _kind, _ops, [dict(_cfg, num_stages=min(2, _cfg["num_stages"]))])


def arch() -> int:
    """The active Triton target as an int (80 for sm_80, 90 for sm_90)."""
    return int(driver.active.get_current_target().arch)


def family(cc: int | None = None) -> str:
    """Tile family of a compute capability: sm90 (227 KB shared: Hopper, datacenter
    Blackwell), sm80 (163 KB: A100, Orin) or sm86 (99 KB: everything else, the safe one)."""
    cc = arch() if cc is None else cc
    if 90 <= cc < 120:
        return "sm90"
    if cc in (80, 87):
        return "sm80"
    return "sm86"


def shared_limit(cc: int) -> int:
    return SHARED_LIMIT.get(cc, _SMALL_SHARED)


def tf32_enabled() -> bool:
    """Whether the user allowed TF32 for fp32 matmuls in PyTorch (default: no)."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # torch without the fp32_precision API
        return bool(matmul.allow_tf32)
    return precision == "tf32"


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for operands of ``dtype`` (a kernel constexpr)."""
    if dtype == torch.float32 and not interpreting() and tf32_enabled():
        return "tf32"
    return "ieee"


def operands(dtype: torch.dtype) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return "16"
    if dtype == torch.float64:
        return "fp64"
    return "tf32" if input_precision(dtype) == "tf32" else "fp32"


def candidates(kind: str, dtype: torch.dtype) -> list[dict]:
    """Configs the dispatcher may launch for ``kind``: the default first, then the rest of
    the autotune space."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if interpreting():
        return list(_INTERPRET_SPACE)
    return list(SPACE[(family(), kind, operands(dtype))])


def config(kind: str, dtype: torch.dtype) -> dict:
    """The default launch config (autotune off)."""
    return candidates(kind, dtype)[0]


_sm_counts: dict[tuple[int, int], int] = {}


def sm_count() -> int:
    """SMs of the current device, from Triton's driver (cached per driver and device)."""
    active = driver.active
    key = (id(active), active.get_current_device())
    if key not in _sm_counts:
        props = active.utils.get_device_properties(key[1])
        _sm_counts[key] = int(props["multiprocessor_count"])
    return _sm_counts[key]


def num_splits(n_rows: int, vocab: int, block_n: int, block_v: int) -> int:
    """Vocabulary splits of the forward. Few row blocks (small N) cannot fill the GPU, so V
    is split into partial online-softmax states (merged deterministically) until there
    are about 4 programs per SM. Large V: the splits stay whole BLOCK_V multiples, and with
    many row blocks there is one split, so each program sweeps all of V once and W is read
    once per row block."""
    v_blocks = triton.cdiv(vocab, block_v)
    if interpreting():
        return min(2, v_blocks)  # exercise the split combine in tests, keep it cheap
    row_blocks = triton.cdiv(n_rows, block_n)
    return max(1, min(v_blocks, triton.cdiv(4 * sm_count(), row_blocks)))


# --- opt-in autotune (off by default, as in Cut Cross-Entropy) ------------------------------
_autotune = os.environ.get("SGSD_TRITON_AUTOTUNE", "0") not in ("", "0")
_tuned: dict[tuple, dict] = {}


def set_autotune(enabled: bool) -> None:
    """Time every config of the space on the first call of each (kernel, flags, shape
    bucket) and keep the fastest. Off by default: the first call then costs one compile and
    a few runs per candidate. Also enabled by ``SGSD_TRITON_AUTOTUNE=1``."""
    global _autotune
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _autotune = enabled


def autotune_enabled() -> bool:
    return _autotune


def tuned_configs() -> dict[tuple, dict]:
    """The configs the autotune has chosen so far, by key."""
    return dict(_tuned)


def _elapsed(fn) -> float:
    if torch.cuda.is_available() and not interpreting():
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def choose(kind: str, dtype: torch.dtype, n_rows: int, key: tuple, run) -> dict:
    """The config to launch: the default, or with autotune on (and deterministic mode off)
    the fastest of the space for this key (``run(cfg)`` launches once with ``cfg`` on fresh
    outputs). Shapes are bucketed by the next power of two of N; ``key`` carries the rest
    (flags, V, H)."""
    space = candidates(kind, dtype)
    if not _autotune or len(space) == 1 or is_deterministic():
        return space[0]  # a tile picked by timing could differ between processes
    full = (
        kind,
        family() if not interpreting() else "interp",
        dtype,
        triton.next_power_of_2(max(n_rows, 1)),
        *key,
    )
    if full not in _tuned:
        times = []
        for cfg in space:
            run(cfg)  # compile and warm up
            reps = 1 if interpreting() else 3  # the interpreter only tests the mechanism
            times.append(min(_elapsed(lambda cfg=cfg: run(cfg)) for _ in range(reps)))
        _tuned[full] = space[min(range(len(space)), key=times.__getitem__)]
    return _tuned[full]
