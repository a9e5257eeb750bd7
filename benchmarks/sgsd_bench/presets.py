"""Shapes the benchmark runs (presets) and one row's shape (``Case``).

Floors and workloads are those of docs/design.md §6: G = 2·N·V·H FLOPs (one logits GEMM),
N = B·T tokens; log-probs cost 1 G forward, 3 G backward, 4 G forward+backward; the SGSD
loss with K teachers costs (K+4) G forward+backward. The full-vocabulary divergence
(``linear_divergence``, docs/design.md §3.1) costs 4 G forward+backward (student and teacher
logits, then dh and dW); the top-k local-support SGSD loss (docs/design.md §3.2) K G (the
teachers' no-grad top-k pass; the student's k + 1 gathered columns are negligible).
"""

from __future__ import annotations

from dataclasses import dataclass, field

LOGPROB_PHASES = ("fwd", "bwd", "fwdbwd")
WORKLOAD_ROWS = (
    "logprobs-fwd",
    "logprobs-bwd",
    "logprobs-fwdbwd",
    "sgsd-fwdbwd",
    "divergence-fwdbwd",
    "local_support-fwdbwd",
)
# Workloads whose output is one scalar loss, timed forward+backward only.
SCALAR_WORKLOADS = ("sgsd", "divergence", "local_support")
# Floor in units of G = 2·N·V·H (docs/design.md §6); sgsd: K + 4.
LOGPROB_FLOOR = {"fwd": 1.0, "bwd": 3.0, "fwdbwd": 4.0}
SGSD_HYPER = {"gate_tau": 1.0, "clip_delta": 3.0, "confidence_threshold": 0.05}
# OPSD's published settings (docs/design.md §3.1): forward KL, temperature 1.1, element clip.
DIVERGENCE_HYPER = {"beta": 0.0, "temperature": 1.1, "elementwise_clip": 0.05}
LOCAL_SUPPORT_TOP_K = 100  # the paper's "Top-100 local support" ablation
IGNORE_INDEX = -100


@dataclass
class Preset:
    name: str
    dtype: str
    V: int
    H: int
    logprobs_N: list[int]
    sgsd: list[tuple[int, int]]  # (N, K)
    divergence_N: list[int] = field(default_factory=list)  # linear_divergence rows
    local_support: list[tuple[int, int]] = field(default_factory=list)  # (N, K)
    check_N: int = 128  # tokens in the correctness slice
    row_budget_s: float = 2.0  # time spent on the timed repetitions of one row (CPU)
    min_reps: int = 3
    max_reps: int = 15
    # providers that are not run unless named in --providers, with the reason printed in the row
    default_off: dict[str, str] = field(default_factory=dict)
    # (provider, workload, N, K, reason): rows left out of this preset unless --providers names
    # the provider explicitly; the row is still printed, with the reason
    skip: list = field(default_factory=list)
    note: str = ""


_CPU_COMPILE_OFF = (
    "not in the default CPU run: a cold torch.compile of the materialising reference costs "
    "tens of seconds per graph on 2 cores; add it with --providers"
)

PRESETS: dict[str, Preset] = {
    # docs/design.md §6 CPU target: SGSD K=8, B·T=1024, V=32768, H=256, fp32 (the (1024, 8)
    # row). Cut Cross-Entropy runs here: it is the log-prob peer to beat.
    "cpu-small": Preset(
        "cpu-small",
        "float32",
        V=32768,
        H=256,
        logprobs_N=[256, 1024, 4096],  # the log-prob target shapes against CCE (§6)
        sgsd=[(128, 1), (128, 4), (128, 8), (1024, 8)],
        divergence_N=[1024],  # the §6 CPU shape, where the >= 10x memory target is stated
        local_support=[(1024, 1)],
        default_off={"torch-compile": _CPU_COMPILE_OFF},
        check_N=64,
        note="docs/design.md §6 CPU target row: sgsd-fwdbwd N=1024 K=8",
    ),
    # A Qwen-sized head (V=151936, H=1024) on CPU: log-probs forward and backward only.
    "cpu-qwen": Preset(
        "cpu-qwen",
        "float32",
        V=151936,
        H=1024,
        logprobs_N=[256],
        sgsd=[],
        default_off={"torch-compile": _CPU_COMPILE_OFF},
        check_N=64,
    ),
    # Same head as cpu-small, K swept at the target N, a longer N sweep, torch.compile and
    # CCE (≈ 15-25 minutes on 2 cores).
    "cpu-full": Preset(
        "cpu-full",
        "float32",
        V=32768,
        H=256,
        logprobs_N=[256, 1024, 2048],
        sgsd=[(1024, 1), (1024, 4), (1024, 8), (256, 8), (2048, 8)],
        row_budget_s=4.0,
        check_N=64,
        skip=[
            (
                p,
                "sgsd",
                2048,
                8,
                "left out of cpu-full: the K-replicated student materialises ~9 GiB of logits "
                "and takes minutes per step on 2 cores; --providers " + p + " runs it",
            )
            for p in ("reference", "torch-compile")
        ],
    ),
    # Tiny shapes for the smoke test and the pytest-benchmark suite (V, H deliberately odd).
    "tiny": Preset(
        "tiny",
        "float32",
        V=4103,
        H=61,
        logprobs_N=[64, 128],
        sgsd=[(64, 1), (64, 4), (128, 4)],
        divergence_N=[128],
        local_support=[(64, 2)],
        check_N=32,
        row_budget_s=0.3,
        min_reps=3,
        max_reps=5,
    ),
    # GPU presets (docs/design.md §6 GPU target: qwen3-1.7b, N=16384, K=8, bf16).
    "qwen3-1.7b": Preset(
        "qwen3-1.7b",
        "bfloat16",
        V=151936,
        H=2048,
        logprobs_N=[4096, 8192, 16384],
        sgsd=[(16384, 1), (16384, 4), (16384, 8), (4096, 8), (8192, 8)],
        divergence_N=[4096, 16384],
        local_support=[(16384, 1), (16384, 8)],
        check_N=256,
    ),
    "qwen3-8b": Preset(
        "qwen3-8b",
        "bfloat16",
        V=151936,
        H=4096,
        logprobs_N=[4096, 8192, 16384],
        sgsd=[(16384, 1), (16384, 4), (16384, 8), (4096, 8), (8192, 8)],
        check_N=256,
    ),
}


@dataclass
class Case:
    workload: str  # "logprobs" | "sgsd" | "divergence" | "local_support"
    N: int
    V: int
    H: int
    K: int  # 0 for logprobs
    dtype: str

    @property
    def B(self) -> int:
        return split_bt(self.N)[0]

    @property
    def T(self) -> int:
        return split_bt(self.N)[1]

    def shape(self) -> str:
        s = f"N={self.N} V={self.V} H={self.H}"
        if self.workload in ("sgsd", "local_support"):
            s += f" K={self.K} (B={self.B} T={self.T})"
        return s

    def key(self) -> str:
        return f"{self.workload}|{self.N}|{self.V}|{self.H}|{self.K}|{self.dtype}"

    def floor_g(self, phase: str) -> float:
        """The FLOP floor of ``phase`` in units of G (docs/design.md §6)."""
        if self.workload == "logprobs":
            return LOGPROB_FLOOR[phase]
        if self.workload == "divergence":
            return 4.0
        if self.workload == "local_support":
            return float(self.K)
        return self.K + 4.0

    def g_flops(self) -> float:
        """G = 2·N·V·H, one logits GEMM."""
        return 2.0 * self.N * self.V * self.H


def split_bt(N: int) -> tuple[int, int]:
    """B rollouts × T positions for N tokens (B = 4 from N = 1024 up)."""
    if N < 1:
        raise ValueError(f"split_bt: N must be ≥ 1, got {N}")
    B = 4 if N >= 1024 and N % 4 == 0 else (2 if N >= 64 and N % 2 == 0 else 1)
    return B, N // B


def cases_for(preset: Preset, dtype: str, do_logprobs: bool, scalar=()) -> list[Case]:
    """The shapes of ``preset`` for the selected workloads, log-probs first. ``scalar``: the
    scalar-loss workloads to run (names from SCALAR_WORKLOADS; True means "sgsd")."""
    scalar = ("sgsd",) if scalar is True else tuple(scalar or ())
    V, H = preset.V, preset.H
    cases = []
    if do_logprobs:
        cases += [Case("logprobs", N, V, H, 0, dtype) for N in preset.logprobs_N]
    if "sgsd" in scalar:
        cases += [Case("sgsd", N, V, H, K, dtype) for N, K in preset.sgsd]
    if "divergence" in scalar:
        cases += [Case("divergence", N, V, H, 0, dtype) for N in preset.divergence_N]
    if "local_support" in scalar:
        cases += [Case("local_support", N, V, H, K, dtype) for N, K in preset.local_support]
    return cases


def skip_reason(preset: Preset, provider: str, case: Case, on_cuda: bool) -> str | None:
    """Why ``preset`` leaves ``provider`` out of ``case`` by default (None: it runs)."""
    if not on_cuda and provider in preset.default_off:
        return preset.default_off[provider]
    for p, w, n, k, why in preset.skip:
        if (p, w, n, k) == (provider, case.workload, case.N, case.K):
            return why
    return None


def parse_workloads(spec: str) -> tuple[list[str], bool, tuple[str, ...]]:
    """(log-prob phases to time, run log-probs, scalar-loss workloads to run) from
    ``--workloads``: "all", or a comma list of logprobs, logprobs-fwd, logprobs-bwd,
    logprobs-fwdbwd, sgsd, divergence, local_support (or local-support)."""
    phases: list[str] = []
    do_lp = False
    scalar: list[str] = []
    for w in [s.strip() for s in spec.split(",") if s.strip()]:
        w = "local_support" if w == "local-support" else w
        if w in ("all", "logprobs"):
            phases, do_lp = list(LOGPROB_PHASES), True
        elif w.startswith("logprobs-") and w[9:] in LOGPROB_PHASES:
            do_lp = True
            phases += [] if w[9:] in phases else [w[9:]]
        elif w not in SCALAR_WORKLOADS:
            raise ValueError(
                f"unknown workload {w!r}; choose from all, logprobs, "
                + ", ".join(f"logprobs-{p}" for p in LOGPROB_PHASES)
                + ", "
                + ", ".join(SCALAR_WORKLOADS)
            )
        for name in SCALAR_WORKLOADS if w == "all" else (w,):
            if name in SCALAR_WORKLOADS and name not in scalar:
                scalar.append(name)
    if not (do_lp or scalar):
        raise ValueError(f"no workload in {spec!r}")
    if scalar and "fwdbwd" not in phases:
        phases.append("fwdbwd")  # the scalar-loss rows are forward+backward
    return phases, do_lp, tuple(scalar)
