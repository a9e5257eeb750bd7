#!/usr/bin/env python
"""Speed and memory of sgsd-kernels against the paper's code path, CCE and Liger (issue 3).

    python benchmarks/bench_gated_kd.py                      # cpu-small on CPU, qwen3-1.7b on CUDA
    python benchmarks/bench_gated_kd.py --preset qwen3-8b --providers torch,triton,cce,liger
    python benchmarks/bench_gated_kd.py --workloads sgsd --dtype bfloat16 --out /tmp/bench

Workloads (DESIGN §6):
  logprobs  ``linear_logprobs`` (per-token log-prob of the target from hidden states and the LM
            head): rows ``logprobs-fwd``, ``logprobs-bwd``, ``logprobs-fwdbwd``.
            Floor: 1 G forward, 3 G backward (recompute, dh, dW), 4 G forward+backward.
  sgsd      the whole SGSD loss from hidden states with K teachers (``teacher_hidden`` given),
            forward+backward: row ``sgsd-fwdbwd``. Floor: (K+4) G.
  G = 2·N·V·H FLOPs (one logits GEMM); N = B·T tokens.

Providers:
  paper-reference  the published code path, written here in eager PyTorch: one row per
                   (rollout, teacher) — the student forward replicated K times — with the full
                   log_softmax over student and teacher logits materialised, then a gather and
                   the §3 loss. This is what we beat.
  reference        sgsd_kernels, backend="reference" (eager, materialising; DESIGN §5).
  torch            sgsd_kernels, backend="torch" (blockwise, no N×V buffer).
  triton           sgsd_kernels, backend="triton" (CUDA only).
  torch-compile    torch.compile(dynamic=True) of the backend="reference" call.
  cce              Apple's Cut Cross-Entropy, linear_cross_entropy(reduction="none") = −log-prob
                   (impl "cce" on CUDA, "torch_compile" on CPU). Log-prob workload only.
  liger            Liger-Kernel's fused linear cross-entropy, reduction="none" (CUDA only).
                   Log-prob workload only.

Each provider runs in its own subprocess. For every row it is first checked against a float64
paper-reference oracle on a small slice of the same shape (same V, H, K, dtype; fewer tokens);
a provider that disagrees is reported as WRONG and is not timed. Then at the full shape:
peak memory (CUDA: max_memory_allocated after a reset; CPU: the process's resident-set
high-water mark, reset through /proc/self/clear_refs, with glibc's malloc told to return every
block ≥ 64 KiB to the OS so RSS follows live memory), then the time (CUDA:
triton.testing.do_bench; CPU: perf_counter around each phase of repeated calls after a
warm-up) as the 20th/50th/80th percentiles. "Peak" is the memory above the inputs
(hidden states, weight, teacher hidden states), i.e. activations, outputs and gradients.
The GEMM rate (torch.matmul, same dtype/device, [N,H]@[H,V]) is measured in the same run and
turns times into a fraction of the FLOP floor.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import json
import math
import os
import platform
import queue
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:  # a clean clone works without `pip install -e .`; an install wins
    sys.path.append(REPO)

PROVIDERS = ("paper-reference", "reference", "torch", "triton", "torch-compile", "cce", "liger")
LOGPROB_PHASES = ("fwd", "bwd", "fwdbwd")
WORKLOAD_ROWS = ("logprobs-fwd", "logprobs-bwd", "logprobs-fwdbwd", "sgsd-fwdbwd")
# Floor in units of G = 2·N·V·H (DESIGN §6); sgsd: K + 4.
LOGPROB_FLOOR = {"fwd": 1.0, "bwd": 3.0, "fwdbwd": 4.0}
SGSD_HYPER = {"gate_tau": 1.0, "clip_delta": 3.0, "confidence_threshold": 0.05}
IGNORE_INDEX = -100
RESULT_TAG = "@@RESULT "
START_TAG = "@@START "

# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


@dataclass
class Preset:
    name: str
    dtype: str
    V: int
    H: int
    logprobs_N: list[int]
    sgsd: list[tuple[int, int]]  # (N, K)
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
    "not in the default CPU run: a cold torch.compile costs tens of seconds per graph on 2 "
    "cores (> the 3-minute budget); add it with --providers"
)

PRESETS: dict[str, Preset] = {
    # DESIGN §6 CPU target: SGSD K=8, B·T=1024, V=32768, H=256, fp32 (the (1024, 8) row).
    "cpu-small": Preset(
        "cpu-small",
        "float32",
        V=32768,
        H=256,
        logprobs_N=[256, 1024],
        sgsd=[(128, 1), (128, 4), (128, 8), (1024, 8)],
        default_off={"torch-compile": _CPU_COMPILE_OFF, "cce": _CPU_COMPILE_OFF},
        skip=[
            (
                "paper-reference",
                "sgsd",
                1024,
                8,
                (
                    "not in the default run: ~4K·G per step (the student replicated K times) takes "
                    "most of the 3-minute budget on 2 cores; --preset cpu-full or --providers "
                    "paper-reference runs it"
                ),
            )
        ],
        check_N=64,
        note="DESIGN §6 CPU target row: sgsd-fwdbwd N=1024 K=8",
    ),
    # Same head, K swept at the target N, a longer N sweep, torch.compile and CCE
    # (≈ 15-25 minutes on 2 cores).
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
            for p in ("paper-reference", "reference", "torch-compile")
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
        check_N=32,
        row_budget_s=0.3,
        min_reps=3,
        max_reps=5,
    ),
    # GPU presets (DESIGN §6 GPU target: qwen3-1.7b, N=16384, K=8, bf16).
    "qwen3-1.7b": Preset(
        "qwen3-1.7b",
        "bfloat16",
        V=151936,
        H=2048,
        logprobs_N=[4096, 8192, 16384],
        sgsd=[(16384, 1), (16384, 4), (16384, 8), (4096, 8), (8192, 8)],
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
    workload: str  # "logprobs" | "sgsd"
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
        if self.workload == "sgsd":
            s += f" K={self.K} (B={self.B} T={self.T})"
        return s

    def key(self) -> str:
        return f"{self.workload}|{self.N}|{self.V}|{self.H}|{self.K}|{self.dtype}"


def split_bt(N: int) -> tuple[int, int]:
    """B rollouts × T positions for N tokens (B = 4 from N = 1024 up)."""
    B = 4 if N >= 1024 and N % 4 == 0 else (2 if N >= 64 and N % 2 == 0 else 1)
    return B, N // B


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _torch():
    import torch

    return torch


def dtype_of(name: str):
    torch = _torch()
    return {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "float64": torch.float64,
    }[name]


def make_inputs(case: Case, N: int, device, dtype, seed: int = 0) -> dict:
    """Deterministic inputs for one row; ``N`` may be the small correctness slice.

    logprobs: hidden [N, H], weight [V, H] (both leaves with grad), targets [N] (≈3 %
    ignore_index), grad_out [N] (the upstream gradient of the per-token log-probs).
    sgsd: student_hidden [B, T, H], weight, targets [B, T], token_mask [B, T] (padded tails),
    rewards [B] (±1), teacher_weights [B, K] (softmax), teacher_hidden [B, K, T, H]: the
    student's states plus noise plus a push of strength α_k ∈ [−1, 1] along the target's
    weight row (a logit change of about 1.5·α_k), so that some teachers support the rollout
    and others suppress it. Generated on ``device`` (CUDA: fast for the big heads).
    """
    torch = _torch()
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + N)
    V, H, K = case.V, case.H, case.K

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=dev) * scale

    weight = randn(V, H, scale=H**-0.5)
    out = {}
    if case.workload == "logprobs":
        hidden = randn(N, H)
        targets = torch.randint(0, V, (N,), generator=g, device=dev)
        drop = torch.rand(N, generator=g, device=dev) < 0.03
        targets[drop] = IGNORE_INDEX
        out.update(hidden=hidden, targets=targets, grad_out=randn(N))
    else:
        B, T = split_bt(N)
        hidden = randn(B, T, H)
        targets = torch.randint(0, V, (B, T), generator=g, device=dev)
        lengths = torch.randint(max(1, (3 * T) // 4), T + 1, (B,), generator=g, device=dev)
        token_mask = torch.arange(T, device=dev)[None, :] < lengths[:, None]
        rewards = torch.tensor([1.0 if b % 2 == 0 else -1.0 for b in range(B)], device=dev)
        teacher_weights = torch.softmax(randn(B, K), dim=-1)
        alpha = (torch.linspace(-1.0, 1.0, K) if K > 1 else torch.tensor([0.7])).to(dev)
        teacher_hidden = hidden[:, None] + randn(B, K, T, H, scale=0.3)
        teacher_hidden += alpha.view(1, K, 1, 1) * (1.5 * weight[targets])[:, None]
        out.update(
            hidden=hidden,
            targets=targets,
            token_mask=token_mask,
            rewards=rewards,
            teacher_weights=teacher_weights,
            teacher_hidden=teacher_hidden,
        )
    out["weight"] = weight
    for k, v in list(out.items()):
        if v.is_floating_point() and k not in ("rewards", "teacher_weights", "grad_out"):
            out[k] = v.to(dtype)
    out["hidden"].requires_grad_(True)
    out["weight"].requires_grad_(True)
    return out


def upcast(x: dict, dtype) -> dict:
    """The same inputs in ``dtype`` (the oracle sees exactly the values the provider sees)."""
    y = {k: (v.detach().to(dtype) if v.is_floating_point() else v) for k, v in x.items()}
    y["hidden"].requires_grad_(True)
    y["weight"].requires_grad_(True)
    return y


def input_bytes(case: Case) -> int:
    el = dtype_of(case.dtype).itemsize
    b = (case.V * case.H + case.N * case.H) * el
    if case.workload == "sgsd":
        b += case.K * case.N * case.H * el
    return b


# --------------------------------------------------------------------------------------------
# The paper's code path (the baseline we beat) — also the float64 oracle for the checks
# --------------------------------------------------------------------------------------------


def paper_logprobs(hidden, weight, targets, temperature: float = 1.0):
    """Materialise logits, full log_softmax in fp32, gather (TRL / HF-trainer style)."""
    torch = _torch()
    logits = (hidden @ weight.T).float() / temperature  # [..., V]
    logp = torch.log_softmax(logits, dim=-1)
    valid = targets != IGNORE_INDEX
    lp = logp.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    return lp * valid


def paper_sgsd_loss(
    student_hidden,
    weight,
    targets,
    token_mask,
    rewards,
    teacher_weights,
    teacher_hidden,
    *,
    gate_tau=1.0,
    clip_delta=3.0,
    confidence_threshold=0.05,
    temperature: float = 1.0,
    replicate: bool = True,
):
    """The SGSD loss the way the published TRL-based code computes it.

    One training row per (rollout, teacher): the student forward is replicated K times
    (``repeat_interleave`` of the student's hidden states — in the real trainer the whole
    student model runs K times), full-vocabulary log_softmax over the student's and the
    teacher's logits, gather at the rollout tokens, then DESIGN §3 over the B·K rows.
    """
    torch = _torch()
    F = torch.nn.functional
    B, T, H = student_hidden.shape
    K = teacher_weights.shape[1]
    tgt = targets.repeat_interleave(K, dim=0)  # [B*K, T]
    mask = token_mask.repeat_interleave(K, dim=0).to(torch.float32)
    with torch.no_grad():  # teacher: same weights, no gradient
        u = paper_logprobs(teacher_hidden.reshape(B * K, T, H), weight, tgt, temperature)
    if replicate:
        s_rows = student_hidden.repeat_interleave(K, dim=0)  # replicated student forward
        s = paper_logprobs(s_rows, weight, tgt, temperature)  # [B*K, T]
    else:
        s = paper_logprobs(student_hidden, weight, targets, temperature).repeat_interleave(K, 0)
    d = u - s
    n = mask.sum(-1).clamp(min=1.0)
    support = (mask * d.detach().clamp(-clip_delta, clip_delta)).sum(-1) / n
    sigma = torch.where(
        support.abs() > confidence_threshold, torch.sign(support), torch.zeros_like(support)
    )
    sgn_r = torch.where(rewards > 0, 1.0, -1.0).to(support.dtype).repeat_interleave(K)
    rho = sgn_r * sigma
    gate = math.log(2.0) - F.softplus(-(d * d) / (2.0 * gate_tau))
    row = (mask * gate).sum(-1) / n
    w = teacher_weights.reshape(-1).to(row.dtype)
    return (w * rho * row).sum() / B


# --------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------


class NotAvailable(Exception):
    """The provider cannot run this row here; the message says why."""


def _sk():
    try:
        import sgsd_kernels as sk
    except Exception as e:
        raise NotAvailable(f"sgsd_kernels does not import: {type(e).__name__}: {e}") from e
    return sk


def _has_cuda(device) -> bool:
    return str(device).startswith("cuda")


_COMPILED: dict = {}


def static_unavailable(name: str, workload: str, cuda: bool) -> str | None:
    """Why ``name`` cannot run ``workload`` on this kind of device (None: it can)."""
    if name == "triton" and not cuda:
        return (
            "the triton backend needs a CUDA device (TRITON_INTERPRET=1 runs it on CPU for "
            "tests only, far too slow to time)"
        )
    if name == "cce" and workload != "logprobs":
        return (
            "Cut Cross-Entropy computes (linear) cross-entropy only; it has no SGSD "
            "(multi-teacher gated) loss"
        )
    if name == "liger" and workload != "logprobs":
        return "Liger-Kernel's fused linear cross-entropy has no SGSD (multi-teacher gated) loss"
    if name == "liger" and not cuda:
        return "Liger-Kernel's fused linear cross-entropy is Triton-only and needs a CUDA device"
    return None


def build_provider(name: str, workload: str, device):
    """Return fn(inputs) -> output: [N] float32 log-probs (logprobs) or the scalar loss (sgsd).

    Raises NotAvailable with the reason when the provider cannot run this workload here.
    """
    torch = _torch()
    cuda = _has_cuda(device)
    if name == "paper-reference":
        if workload == "logprobs":
            return lambda x: paper_logprobs(x["hidden"], x["weight"], x["targets"])
        return lambda x: paper_sgsd_loss(
            x["hidden"],
            x["weight"],
            x["targets"],
            x["token_mask"],
            x["rewards"],
            x["teacher_weights"],
            x["teacher_hidden"],
            **SGSD_HYPER,
        )

    if name in ("reference", "torch", "triton", "torch-compile"):
        sk = _sk()
        backend = "reference" if name == "torch-compile" else name
        if name == "triton" and not cuda:
            raise NotAvailable(static_unavailable(name, workload, cuda))
        if workload == "logprobs":

            def fn(x, _b=backend):
                return sk.linear_logprobs(
                    x["hidden"], x["weight"], x["targets"], ignore_index=IGNORE_INDEX, backend=_b
                )
        else:

            def fn(x, _b=backend):
                return sk.linear_gated_kd_loss(
                    x["hidden"],
                    x["weight"],
                    x["targets"],
                    x["token_mask"],
                    x["rewards"],
                    x["teacher_weights"],
                    teacher_hidden=x["teacher_hidden"],
                    backend=_b,
                    **SGSD_HYPER,
                ).loss

        if name != "torch-compile":
            return fn
        key = (workload, str(device))
        if key not in _COMPILED:  # one dynamic-shape graph per workload: compile once
            _COMPILED[key] = torch.compile(fn, dynamic=True)
        return _COMPILED[key]

    if name == "cce":
        if workload != "logprobs":
            raise NotAvailable(static_unavailable(name, workload, cuda))
        try:
            from cut_cross_entropy import linear_cross_entropy
        except Exception as e:
            raise NotAvailable(
                f"cut-cross-entropy not installed ({type(e).__name__}: {e}); "
                "pip install cut-cross-entropy"
            ) from e
        impl = "cce" if cuda else "torch_compile"

        def fn(x):
            nll = linear_cross_entropy(
                x["hidden"],
                x["weight"],
                x["targets"],
                ignore_index=IGNORE_INDEX,
                reduction="none",
                impl=impl,
            )
            return -nll.float()

        return fn

    if name == "liger":
        if workload != "logprobs":
            raise NotAvailable(static_unavailable(name, workload, cuda))
        if not cuda:
            raise NotAvailable(static_unavailable(name, workload, cuda))
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        except Exception as e:
            raise NotAvailable(
                f"liger-kernel not installed ({type(e).__name__}: {e}); pip install liger-kernel"
            ) from e

        def fn(x):
            nll = liger_fused_linear_cross_entropy(
                x["hidden"], x["weight"], x["targets"], ignore_index=IGNORE_INDEX, reduction="none"
            )
            return -nll.float()

        return fn
    raise ValueError(f"unknown provider {name!r}; choose from {', '.join(PROVIDERS)}")


def est_materialised_bytes(name: str, case: Case) -> int:
    """Rough peak of the providers that materialise logits (for skipping rows that cannot fit)."""
    nv = case.N * case.V * 4
    if name in ("torch", "triton", "liger"):
        return 0
    if case.workload == "logprobs":
        return 4 * nv
    if name == "paper-reference":
        return (4 * case.K + 2) * nv
    return (case.K + 4) * nv  # reference / torch-compile / cce(torch_compile)


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


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
    """Peak memory above a baseline, measured for real.

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats.
    CPU: VmHWM/VmRSS from /proc/self/status; the high-water mark is reset by writing "5" to
    /proc/self/clear_refs (Linux ≥ 4.0). The worker runs with MALLOC_MMAP_THRESHOLD_=65536 so
    freed blocks ≥ 64 KiB go back to the OS and RSS follows the live tensors.
    Fallback (no /proc): ru_maxrss, which only sees peaks above every earlier peak.
    """

    def __init__(self, device):
        self.torch = _torch()
        self.cuda = _has_cuda(device)
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
            return self.torch.cuda.memory_allocated()
        if self.method == "ru_maxrss":
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return _proc_status_kib("VmRSS") * 1024

    def _peak(self) -> int:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated()
        if self.method == "ru_maxrss":
            return self._current()
        return _proc_status_kib("VmHWM") * 1024

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        elif self.method != "ru_maxrss":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def start(self) -> None:
        gc.collect()
        self.reset_peak()
        self.base = self._current()

    def peak(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize()
        return max(0, self._peak() - self.base)


def _grads(out, x, grad_out):
    torch = _torch()
    return torch.autograd.grad(out, [x["hidden"], x["weight"]], grad_out)


def _rel_err(a, b) -> float:
    torch = _torch()
    a = a.detach().double().cpu()
    b = b.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    den = max(b.norm().item(), 1e-3 if b.numel() == 1 else 1e-12)
    return (a - b).norm().item() / den


TOL = {"float32": 2e-4, "float16": 1e-2, "bfloat16": 3e-2}


_ORACLE: dict = {}


def oracle(case: Case, N: int, device, cache_dir: str | None = None) -> list:
    """[output, d hidden, d weight] of the paper-reference in float64 on the check slice,
    on the host (the comparison runs there).

    SGSD: the student is computed once and broadcast to the K teachers (same value as the
    replicated path, K× cheaper). Computed once per worker (one shape per worker) and
    shared by its providers; ``cache_dir`` (optional) also keeps it across workers.
    """
    torch = _torch()
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
    if case.workload == "logprobs":
        out64 = paper_logprobs(x64["hidden"], x64["weight"], x64["targets"])
    else:
        out64 = paper_sgsd_loss(
            x64["hidden"],
            x64["weight"],
            x64["targets"],
            x64["token_mask"],
            x64["rewards"],
            x64["teacher_weights"],
            x64["teacher_hidden"],
            replicate=False,
            **SGSD_HYPER,
        )
    want = [
        out64.detach(),
        *_grads(out64, x64, x64.get("grad_out") if case.workload == "logprobs" else None),
    ]
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
    """Relative error (max over output, dh, dW) of ``fn`` vs the float64 paper-reference."""
    x = make_inputs(case, N, device, dtype_of(case.dtype), seed=1)
    go = x["grad_out"] if case.workload == "logprobs" else None
    out = fn(x)
    got = [out, *_grads(out, x, go)]
    want = oracle(case, N, device, cache_dir)
    names = ("out", "dhidden", "dweight")
    errs = {n: _rel_err(a, b) for n, a, b in zip(names, got, want)}
    worst = max(errs, key=errs.get)
    return errs[worst], f"{worst} rel err {errs[worst]:.2e}"


def _percentiles(xs: list[float]) -> list[float]:
    import numpy as np

    return [float(v) for v in np.percentile(np.asarray(xs), [20, 50, 80])]


def memory_pass(fn, x: dict, case: Case, device) -> tuple[dict, float, float]:
    """One forward+backward with the peak memory above the inputs measured for each phase.

    Returns ({phase: {"peak_bytes"}}, forward seconds, backward seconds).
    """
    go = x.get("grad_out") if case.workload == "logprobs" else None
    meter = MemMeter(device)
    meter.start()
    t0 = time.perf_counter()
    out = fn(x)
    if meter.cuda:
        _torch().cuda.synchronize()
    t1 = time.perf_counter()
    peak_f = meter.peak()
    meter.reset_peak()
    t2 = time.perf_counter()
    g = _grads(out, x, go)
    if meter.cuda:
        _torch().cuda.synchronize()
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
    """triton.testing.do_bench p20/p50/p80 for the requested phases (into ``res``)."""
    import triton.testing as tt

    torch = _torch()
    go = x.get("grad_out") if case.workload == "logprobs" else None
    kw = {"quantiles": [0.2, 0.5, 0.8], "warmup": 200, "rep": 2000}

    def fwdbwd():
        _grads(fn(x), x, go)

    if "fwdbwd" in phases or case.workload == "sgsd":
        res["fwdbwd"]["time_ms"] = list(tt.do_bench(fwdbwd, **kw))
    if case.workload == "sgsd":
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


def cpu_interleaved_times(entries: list, x: dict, case: Case, preset: Preset, gemm) -> None:
    """Round-robin timing on CPU: every round calls each provider once (and the GEMM).

    A shared, noisy machine then slows every provider alike, so the ratios hold even when
    the absolute times drift. ``entries``: dicts with "fn", "tf", "tb" (sample lists, seeded
    by the memory pass when it was long enough to count). Stops when every provider has
    ``min_reps`` samples and ``row_budget_s`` per provider has passed, or at ``max_reps``.
    """
    go = x.get("grad_out") if case.workload == "logprobs" else None
    t_start = time.perf_counter()
    budget = preset.row_budget_s * max(1, len(entries))
    while entries or gemm is not None:
        todo = [e for e in entries if len(e["tf"]) < preset.max_reps]
        enough = all(len(e["tf"]) >= preset.min_reps for e in entries)
        if not todo or (enough and time.perf_counter() - t_start >= budget):
            break
        for e in todo:
            _start_line(e["provider"])
            t0 = time.perf_counter()
            out = e["fn"](x)
            t1 = time.perf_counter()
            g = _grads(out, x, go)
            t2 = time.perf_counter()
            del out, g
            e["tf"].append(t1 - t0)
            e["tb"].append(t2 - t1)
        if gemm is not None:
            gemm["samples"].append(gemm["call"]())


def gemm_m(case: Case) -> int:
    """Rows of the yardstick GEMM: N for log-probs; (K+1)·N for SGSD, the student+teacher
    stream over the shared W (most of the (K+4)·G floor, and the shape at which a fused
    implementation runs it). A larger M is the faster, i.e. the stricter, yardstick: at
    small N the [N,H]@[H,V] GEMM alone runs far below the machine's rate."""
    if case.workload != "sgsd":
        return case.N
    # capped: at N = 16384, K = 8 on a 151936 vocabulary the full stream's output alone
    # would be 45 GB; 16384 rows already run at the device's GEMM rate
    return min(case.N * (case.K + 1), max(case.N, 16384))


def gemm_timer(case: Case, device):
    """torch.matmul [N,H] @ [H,V] into a preallocated output, same dtype/device: the GEMM
    rate that turns times into a fraction of the floor. Returns a callable giving one
    sample in ms (CPU) or the do_bench p20/p50/p80 list (CUDA)."""
    torch = _torch()
    dt = dtype_of(case.dtype)
    M = gemm_m(case)
    a = torch.randn(M, case.H, device=device).to(dt)
    b = torch.randn(case.V, case.H, device=device).to(dt)
    c = torch.empty(M, case.V, device=device, dtype=dt)
    torch.matmul(a, b.T, out=c)  # warm-up
    if _has_cuda(device):
        import triton.testing as tt

        return lambda: list(
            tt.do_bench(lambda: torch.matmul(a, b.T, out=c), quantiles=[0.2, 0.5, 0.8])
        )

    def one() -> float:
        t0 = time.perf_counter()
        torch.matmul(a, b.T, out=c)
        return (time.perf_counter() - t0) * 1e3

    return one


# --------------------------------------------------------------------------------------------
# Worker: one subprocess per provider
# --------------------------------------------------------------------------------------------


def _emit(obj: dict) -> None:
    sys.stdout.write(RESULT_TAG + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _start_line(provider: str) -> None:
    sys.stdout.write(START_TAG + provider + "\n")
    sys.stdout.flush()


def _fail(row: dict, e: Exception, device) -> None:
    oom = "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"
    first = str(e).splitlines()[0][:200] if str(e) else ""
    row.update(status="OOM" if oom else "error", note=f"{type(e).__name__}: {first}")
    if not oom:
        traceback.print_exc(file=sys.stderr)
    if _has_cuda(device):
        _torch().cuda.empty_cache()


def run_worker(spec: dict) -> None:
    """One shape, several providers: check, memory pass, then (interleaved on CPU) timing."""
    import logging

    torch = _torch()
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # graph-break chatter
    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    preset = Preset(**spec["preset"])
    phases = spec["phases"]
    mem_limit = spec.get("mem_limit_bytes") or 0
    case = Case(**spec["case"])
    cuda = _has_cuda(device)
    x = make_inputs(case, case.N, device, dtype_of(case.dtype), seed=0)
    gemm = {"call": gemm_timer(case, device), "samples": []}
    if cuda:  # measure now and free its buffers before the providers run
        gemm["samples"] = gemm.pop("call")()
        torch.cuda.empty_cache()
    entries = []

    # 1. build, check against the float64 oracle, warm up compiled / Triton providers
    for provider in spec["providers"]:
        _start_line(provider)
        row = {"provider": provider, "case": spec["case"], "status": "ok", "note": ""}
        try:
            fn = build_provider(provider, case.workload, device)
            est = est_materialised_bytes(provider, case)
            if mem_limit and est > mem_limit:
                row.update(
                    status="skipped",
                    note=(
                        f"skipped: materialises ~{est / 2**30:.1f} GiB of logits, over the "
                        f"{mem_limit / 2**30:.1f} GiB allowed here (--mem-limit-gb)"
                    ),
                )
                _emit(row)
                continue
            err, what = check_provider(
                fn, case, min(case.N, preset.check_N), device, spec.get("cache_dir")
            )
            row["check_err"] = err
            tol = TOL.get(case.dtype, 1e-2)
            if not err <= tol:
                row.update(
                    status="WRONG",
                    note=f"check failed vs float64 paper-reference: "
                    f"{what} > tol {tol:.0e}; not timed",
                )
                _emit(row)
                continue
            if provider in ("torch-compile", "triton", "cce", "liger"):
                o = fn(x)  # compile / autotune at the full shape, outside the measurement
                _grads(o, x, x.get("grad_out") if case.workload == "logprobs" else None)
                del o
            entries.append({"provider": provider, "fn": fn, "row": row, "tf": [], "tb": []})
        except NotAvailable as e:
            row.update(status="n/a", note=str(e))
            _emit(row)
        except Exception as e:  # noqa: BLE001
            _fail(row, e, device)
            _emit(row)
        gc.collect()

    # 2. memory pass, one provider after the other (timed: the first sample when ≥ 0.5 s)
    for e in list(entries):
        _start_line(e["provider"])
        try:
            res, tf, tb = memory_pass(e["fn"], x, case, device)
            e["row"]["result"] = res
            if cuda:
                cuda_times(e["fn"], x, case, phases, res)
            elif tf + tb >= 0.5:
                e["tf"].append(tf)
                e["tb"].append(tb)
        except Exception as ex:  # noqa: BLE001
            _fail(e["row"], ex, device)
            _emit(e["row"])
            entries.remove(e)
        gc.collect()

    # 3. CPU: interleaved timing rounds
    if not cuda:
        try:
            cpu_interleaved_times(entries, x, case, preset, gemm)
        except Exception as ex:  # noqa: BLE001
            for e in entries:
                _fail(e["row"], ex, device)
                e["row"].pop("result", None)
                _emit(e["row"])
            entries = []

        def ms(xs):
            return _percentiles([v * 1e3 for v in xs])

        for e in entries:
            res = e["row"]["result"]
            res["fwdbwd"]["time_ms"] = ms([a + b for a, b in zip(e["tf"], e["tb"])])
            if case.workload == "logprobs":
                res["fwd"]["time_ms"] = ms(e["tf"])
                res["bwd"]["time_ms"] = ms(e["tb"])
            res["reps"] = len(e["tf"])
        if not gemm["samples"]:
            gemm["samples"].append(gemm["call"]())
        gemm_ms = _percentiles(gemm["samples"])
    else:
        gemm_ms = gemm["samples"]
    _emit({"provider": "gemm", "case": spec["case"], "status": "ok", "gemm": {"time_ms": gemm_ms}})
    for e in entries:
        _emit(e["row"])


# --------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------


def _mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _git_version() -> str:
    try:
        sha = subprocess.run(
            ["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "-C",
                REPO,
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                "sgsd_kernels",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "") if sha else "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


def _package_version() -> str:
    try:
        import sgsd_kernels

        v = getattr(sgsd_kernels, "__version__", "?")
    except Exception:  # noqa: BLE001
        v = "not-importable"
    return f"sgsd-kernels {v} ({_git_version()})"


def _device_name(device) -> str:
    torch = _torch()
    if _has_cuda(device):
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def _pump(stream, q) -> None:
    for line in stream:
        q.put(line)


def run_case_subprocess(
    case: Case,
    providers: list[str],
    device: str,
    preset: Preset,
    phases: list[str],
    mem_limit: int,
    on_row,
    timeout_s: float,
    threads: int | None = None,
    cache_dir: str | None = None,
) -> None:
    """Run one shape's providers in a fresh interpreter; after a crash (e.g. the kernel's
    OOM killer) or a timeout, report the provider that was running and rerun the rest."""
    env = dict(os.environ)
    if not device.startswith("cuda"):
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # RSS follows live blocks ≥ 64 KiB
    env.setdefault("PYTHONUNBUFFERED", "1")
    remaining = list(providers)
    while remaining:
        spec = {
            "providers": remaining,
            "case": asdict(case),
            "device": device,
            "preset": asdict(preset),
            "phases": phases,
            "mem_limit_bytes": mem_limit,
            "threads": threads,
            "cache_dir": cache_dir,
        }
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--_worker", json.dumps(spec)],
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            cwd=REPO,
        )
        current = None
        done: set = set()
        lines: queue.Queue = queue.Queue()
        reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
        reader.start()
        # the limit applies to one provider call (a new call resets it); the budget for the
        # whole shape is len(providers) × that
        deadline = time.time() + timeout_s
        timed_out = False
        while True:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                if proc.poll() is not None and not reader.is_alive() and lines.empty():
                    break
                if time.time() > deadline:
                    timed_out = True
                    proc.kill()
                    break
                continue
            if line.startswith(START_TAG):
                current = line[len(START_TAG) :].strip()
                deadline = time.time() + timeout_s
            elif line.startswith(RESULT_TAG):
                row = json.loads(line[len(RESULT_TAG) :])
                done.add(row["provider"])
                on_row(row)
        rc = proc.wait()
        left = [p_ for p_ in remaining if p_ not in done]
        if not left:
            return
        bad = current if current in left else left[0]
        why = (
            f"timed out after {timeout_s:.0f}s (--worker-timeout)"
            if timed_out
            else f"worker died (exit {rc}"
            f"{', killed: probably out of memory' if rc in (-9, 137) else ''})"
        )
        on_row(
            {
                "provider": bad,
                "case": asdict(case),
                "status": "timeout" if timed_out else "crashed",
                "note": why,
            }
        )
        remaining = [p_ for p_ in left if p_ != bad]


def fmt_bytes(b) -> str:
    if b is None:
        return "—"
    return f"{b / 2**20:.1f}"


def fmt_ms(t) -> str:
    if t is None:
        return "—"
    p20, p50, p80 = t
    d = 1 if p50 >= 100 else (2 if p50 >= 1 else 3)
    return f"{p50:.{d}f} [{p20:.{d}f}, {p80:.{d}f}]"


def build_rows(results: list[dict], gemm: dict[tuple, dict], device_is_cuda: bool) -> list[dict]:
    """Flatten worker results into one dict per (provider, workload-row, case)."""
    rows = []
    for r in results:
        case = Case(**r["case"])
        subs = (
            [f"logprobs-{p}" for p in LOGPROB_PHASES]
            if case.workload == "logprobs"
            else ["sgsd-fwdbwd"]
        )
        for wl in subs:
            phase = wl.split("-", 1)[1]
            floor_g = LOGPROB_FLOOR[phase] if case.workload == "logprobs" else case.K + 4
            G = 2.0 * case.N * case.V * case.H
            row = {
                "provider": r["provider"],
                "workload": wl,
                "case": case,
                "status": r["status"],
                "note": r.get("note", ""),
                "check_err": r.get("check_err"),
                "floor_flops": floor_g * G,
                "time_ms": None,
                "peak_bytes": None,
            }
            res = (r.get("result") or {}).get(phase)
            if res is None and r["status"] == "ok":
                continue  # phase not requested
            if res:
                row["time_ms"] = res.get("time_ms")
                row["peak_bytes"] = res.get("peak_bytes")
                row["mem_method"] = (r.get("result") or {}).get("mem_method")
                row["reps"] = (r.get("result") or {}).get("reps")
                if phase == "bwd" and r["result"].get("bwd_note"):
                    row["note"] = r["result"]["bwd_note"]
            g = gemm.get(case.key())  # measured in the same process, interleaved
            if row["time_ms"]:
                t = row["time_ms"][1] / 1e3
                row["flops_per_s"] = floor_g * G / t
                if g:
                    rate = 2.0 * gemm_m(case) * case.V * case.H / (g["time_ms"][1] / 1e3)
                    row["gemm_flops_per_s"] = rate
                    row["floor_frac"] = (floor_g * G / rate) / t
            rows.append(row)
    # ratios vs the library reference and vs the paper's path, same workload and case
    idx = {(r["provider"], r["workload"], r["case"].key()): r for r in rows}
    for r in rows:
        for base, tag in (("reference", "ref"), ("paper-reference", "paper")):
            b = idx.get((base, r["workload"], r["case"].key()))
            if b and b.get("time_ms") and r.get("time_ms"):
                r[f"speedup_vs_{tag}"] = b["time_ms"][1] / r["time_ms"][1]
            if b and b.get("peak_bytes") and r.get("peak_bytes"):
                r[f"mem_ratio_vs_{tag}"] = b["peak_bytes"] / max(r["peak_bytes"], 1)
    return rows


def _f(v, fmt="{:.2f}"):
    return "—" if v is None else fmt.format(v)


def markdown_table(rows: list[dict], gemm_rows: list[dict], meta: dict) -> str:
    cuda = meta["device_is_cuda"]
    unit, scale = ("TFLOP/s", 1e12) if cuda else ("GFLOP/s", 1e9)
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
                "GEMM rate (torch.matmul [M,H]@[H,V], M = N for log-probs and (K+1)·N for "
                "SGSD, into a preallocated output, same dtype and device, timed in the same "
                "process as the row's providers, interleaved with them on CPU): the floor's "
                "yardstick."
            ),
            "",
            f"| rows | shape | M | time ms (p50 [p20, p80]) | {unit} |",
            "|---|---|---|---|---|",
        ]
        for g in gemm_rows:
            c = g["case"]
            t = g["time_ms"]
            rate = 2.0 * gemm_m(c) * c.V * c.H / (t[1] / 1e3) / scale if t else None
            out.append(
                f"| {c.workload} | {c.shape()} | {gemm_m(c)} | {fmt_ms(t)} | {_f(rate, '{:.1f}')} |"
            )
        out.append("")
    out += [
        (
            f"| workload | shape | provider | time ms (p50 [p20, p80]) | peak MiB | {unit} | "
            "floor % | × vs ref | mem ÷ vs ref | × vs paper | mem ÷ vs paper | status |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {p: i for i, p in enumerate(("paper-reference", *PROVIDERS[1:]))}
    wl_order = {w: i for i, w in enumerate(WORKLOAD_ROWS)}
    rows = sorted(
        rows,
        key=lambda r: (
            wl_order.get(r["workload"], 9),
            r["case"].N,
            r["case"].K,
            order.get(r["provider"], 99),
        ),
    )
    for r in rows:
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
            f"{_f(r.get('speedup_vs_paper'))} | {_f(r.get('mem_ratio_vs_paper'), '{:.1f}')} | "
            f"{status} |"
        )
    out += [
        "",
        (
            f"{unit}: useful work = the floor FLOPs ((K+4)·G for sgsd; 1/3/4 G for "
            "logprobs fwd/bwd/fwd+bwd; G = 2·N·V·H) divided by the median time. floor % = time at "
            "the measured GEMM rate for the floor FLOPs ÷ median time. peak MiB: memory above the "
            f"inputs ({meta['mem_method']}). × / mem ÷: reference's (or paper-reference's) median "
            "time / peak divided by this row's (> 1 = better than the baseline)."
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
        c = g["case"]
        t = g["time_ms"]
        if t:
            rec("torch.matmul", f"gemm@{c.workload}", c, "time", "ms", *t)
            rate = [2.0 * gemm_m(c) * c.V * c.H / (v / 1e3) for v in reversed(t)]
            rec("torch.matmul", f"gemm@{c.workload}", c, "flops_per_s", "FLOP/s", *rate)
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
            rec(
                p,
                w,
                c,
                "peak_memory",
                "bytes",
                None,
                r["peak_bytes"],
                None,
                note=r.get("mem_method") or "",
            )
        for m, u in (
            ("floor_frac", "fraction"),
            ("speedup_vs_ref", "x"),
            ("mem_ratio_vs_ref", "x"),
            ("speedup_vs_paper", "x"),
            ("mem_ratio_vs_paper", "x"),
            ("check_err", "rel"),
        ):
            if r.get(m) is not None:
                rec(p, w, c, m, u, None, r[m], None)
    return recs


COLORS = {
    "paper-reference": "tab:blue",
    "reference": "tab:orange",
    "torch": "tab:green",
    "triton": "tab:red",
    "torch-compile": "tab:purple",
    "cce": "tab:brown",
    "liger": "tab:pink",
}


def make_plots(rows: list[dict], out_prefix: str, meta: dict) -> list[str]:
    """time and peak memory vs N (fixed K) and vs K (fixed N), one line per provider."""
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

    def draw(ax, series, xlabel, ylabel, key):
        for prov, pts in sorted(series.items()):
            pts.sort()
            xs = [p[0] for p in pts]
            ys = [key(p[1]) for p in pts]
            ax.plot(xs, ys, marker="o", label=prov, color=COLORS.get(prov))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)

    # vs N: logprobs-fwdbwd, and sgsd at the largest K that has ≥ 2 N values
    panels = []
    lp = [r for r in ok if r["workload"] == "logprobs-fwdbwd"]
    if lp:
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
            draw(axes[i][0], series, "N tokens", "median time (ms)", lambda r: r["time_ms"][1])
            axes[i][0].set_title(f"{name}: time")
            mseries = {k: [p for p in v if p[1].get("peak_bytes")] for k, v in series.items()}
            draw(
                axes[i][1],
                mseries,
                "N tokens",
                "peak memory above inputs (MiB)",
                lambda r: max(r["peak_bytes"], 1) / 2**20,
            )
            axes[i][1].set_title(f"{name}: peak memory")
        axes[0][0].legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        p = out_prefix + "_vs_N.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    # vs K: sgsd at the N with the most K values
    if sg:
        byN: dict = {}
        for r in sg:
            byN.setdefault(r["case"].N, set()).add(r["case"].K)
        N = max(byN, key=lambda n: (len(byN[n]), n))
        sel = [r for r in sg if r["case"].N == N]
        if len(byN[N]) >= 2:
            fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
            series = {}
            for r in sel:
                series.setdefault(r["provider"], []).append((r["case"].K, r))
            draw(axes[0][0], series, "K teachers", "median time (ms)", lambda r: r["time_ms"][1])
            axes[0][0].set_title(f"sgsd fwd+bwd, N={N}: time")
            draw(
                axes[0][1],
                series,
                "K teachers",
                "peak memory above inputs (MiB)",
                lambda r: max(r["peak_bytes"] or 1, 1) / 2**20,
            )
            axes[0][1].set_title(f"sgsd fwd+bwd, N={N}: peak memory")
            axes[0][0].legend(fontsize=8)
            fig.suptitle(title)
            fig.tight_layout()
            p = out_prefix + "_vs_K.png"
            fig.savefig(p, dpi=110)
            plt.close(fig)
            paths.append(p)
    return paths


def _progress_line(row: dict) -> str:
    c = Case(**row["case"])
    if row["provider"] == "gemm":
        t = row.get("gemm", {}).get("time_ms")
        return f"gemm            {c.shape():42s} {fmt_ms(t)} ms"
    res = row.get("result") or {}
    t = (res.get("fwdbwd") or {}).get("time_ms")
    pk = (res.get("fwdbwd") or {}).get("peak_bytes")
    s = f"{row['provider']:15s} {c.workload:8s} {c.shape():42s} "
    if row["status"] == "ok":
        return s + f"fwd+bwd {fmt_ms(t)} ms, peak {fmt_bytes(pk)} MiB"
    return s + f"{row['status']}: {row['note'][:110]}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="shapes to run (default: cpu-small on CPU, qwen3-1.7b on CUDA)",
    )
    p.add_argument(
        "--providers",
        default=None,
        help=f"comma list from {','.join(PROVIDERS)}, or 'all' (default: all but, "
        "on CPU with cpu-small, torch-compile and cce, whose rows then say why)",
    )
    p.add_argument(
        "--workloads",
        default="all",
        help="comma list from logprobs,logprobs-fwd,logprobs-bwd,logprobs-fwdbwd,sgsd or 'all'",
    )
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: preset's)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument(
        "--out",
        default=os.path.join(HERE, "results"),
        help="directory for the CSV, markdown table and plots",
    )
    p.add_argument(
        "--mem-limit-gb",
        type=float,
        default=None,
        help="skip rows whose logits would not fit (CPU default: 70%% of MemAvailable)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU: torch.set_num_threads in every worker (default: torch's choice, "
        "one per core). On a busy machine 1 thread gives steadier numbers",
    )
    p.add_argument(
        "--worker-timeout",
        type=float,
        default=1800.0,
        help="seconds one row may take before its worker is killed",
    )
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def select(args, preset: Preset):
    if args.providers in (None, "all"):
        provs = list(PROVIDERS)
        explicit = args.providers == "all"
    else:
        provs = [s.strip() for s in args.providers.split(",") if s.strip()]
        bad = [s for s in provs if s not in PROVIDERS]
        if bad:
            raise SystemExit(f"unknown provider(s) {bad}; choose from {','.join(PROVIDERS)}")
        explicit = True
    wls = {s.strip() for s in args.workloads.split(",")} if args.workloads != "all" else {"all"}
    phases: list[str] = []
    do_lp = do_sgsd = False
    for w in wls:
        if w in ("all", "logprobs"):
            phases = list(LOGPROB_PHASES)
            do_lp = True
        elif w.startswith("logprobs-") and w[9:] in LOGPROB_PHASES:
            do_lp = True
            if w[9:] not in phases:
                phases.append(w[9:])
        elif w != "sgsd":
            raise SystemExit(f"unknown workload {w!r}")
        if w in ("all", "sgsd"):
            do_sgsd = True
    if do_sgsd and "fwdbwd" not in phases:
        phases.append("fwdbwd")
    return provs, explicit, phases, do_lp, do_sgsd


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._worker is not None:
        run_worker(json.loads(args._worker))
        return 0
    t_begin = time.perf_counter()
    torch = _torch()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    preset = PRESETS[args.preset or ("qwen3-1.7b" if cuda else "cpu-small")]
    dtype = args.dtype or preset.dtype
    dtype_of(dtype)  # validate
    provs, explicit, phases, do_lp, do_sgsd = select(args, preset)
    cases: list[Case] = []
    if do_lp:
        cases += [Case("logprobs", N, preset.V, preset.H, 0, dtype) for N in preset.logprobs_N]
    if do_sgsd:
        cases += [Case("sgsd", N, preset.V, preset.H, K, dtype) for N, K in preset.sgsd]
    if args.mem_limit_gb is not None:
        mem_limit = int(args.mem_limit_gb * 2**30)
    elif not cuda:
        avail = _mem_available_bytes()
        mem_limit = int(0.7 * avail) if avail else 0
    else:
        mem_limit = 0  # CUDA: try, report OOM

    meta = {
        "preset": preset.name,
        "device": _device_name(device),
        "dtype": dtype,
        "device_is_cuda": cuda,
        "torch": torch.__version__,
        "version": _package_version(),
        "timestamp": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "mem_method": (
            "torch.cuda.max_memory_allocated after reset"
            if cuda
            else "process RSS high-water mark via /proc/self/clear_refs, "
            "MALLOC_MMAP_THRESHOLD_=65536; one subprocess per shape, its providers "
            "measured one after the other"
        ),
    }
    print(
        f"[bench] {preset.name} on {meta['device']} ({dtype}); providers "
        f"{','.join(provs)}; {len(cases)} shapes; {meta['version']}",
        file=sys.stderr,
    )

    results: list[dict] = []
    gemm: dict = {}
    gemm_rows: list[dict] = []

    def on_row(row):
        print(
            f"[bench {time.perf_counter() - t_begin:6.1f}s] {_progress_line(row)}",
            file=sys.stderr,
            flush=True,
        )
        if row["provider"] == "gemm":
            if row.get("gemm"):
                c = Case(**row["case"])
                gemm[c.key()] = row["gemm"]
                gemm_rows.append({"case": c, "time_ms": row["gemm"]["time_ms"]})
        else:
            results.append(row)

    import shutil
    import tempfile

    # on CUDA the float64 dW of a 151936 × 4096 head is 5 GB per shape: keep it in memory only
    cache_dir = None if cuda else tempfile.mkdtemp(prefix="sgsd-bench-oracle-")
    # One subprocess per shape: every provider's check and memory pass, then interleaved
    # timing rounds (with the GEMM) so that a busy machine slows all providers alike.
    for c in cases:
        run = []
        for prov in provs:
            na = static_unavailable(prov, c.workload, cuda)
            why = None
            if not explicit and not cuda and prov in preset.default_off:
                why = preset.default_off[prov]
            why = why or next(
                (
                    r
                    for p_, w_, n_, k_, r in preset.skip
                    if (p_, w_, n_, k_) == (prov, c.workload, c.N, c.K)
                ),
                None,
            )
            if na:
                on_row({"provider": prov, "case": asdict(c), "status": "n/a", "note": na})
            elif why and not explicit:
                on_row({"provider": prov, "case": asdict(c), "status": "skipped", "note": why})
            else:
                run.append(prov)
        print(
            f"[bench {time.perf_counter() - t_begin:6.1f}s] {c.workload} {c.shape()}: "
            f"{', '.join(run) or 'nothing to run'}",
            file=sys.stderr,
            flush=True,
        )
        run_case_subprocess(
            c,
            run,
            device,
            preset,
            phases,
            mem_limit,
            on_row,
            args.worker_timeout,
            args.threads,
            cache_dir,
        )

    if cache_dir:
        shutil.rmtree(cache_dir, ignore_errors=True)
    rows = build_rows(results, gemm, cuda)
    rows = [
        r for r in rows if r["workload"] == "sgsd-fwdbwd" or r["workload"].split("-")[1] in phases
    ]
    table = markdown_table(rows, gemm_rows, meta)
    elapsed = time.perf_counter() - t_begin
    table += f"\n\nWall time of this run: {elapsed:.0f} s.\n"
    print(table)

    os.makedirs(args.out, exist_ok=True)
    tag = (
        "cuda-" + "".join(ch if ch.isalnum() else "-" for ch in meta["device"].lower())
        if cuda
        else "cpu"
    )
    prefix = os.path.join(args.out, f"{preset.name}_{dtype}_{tag}".replace("--", "-"))
    with open(prefix + ".md", "w") as f:
        f.write(table)
    with open(prefix + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for rec in csv_records(rows, gemm_rows, meta):
            w.writerow(rec)
    plots = make_plots(rows, prefix, meta)
    print(
        f"[bench] wrote {prefix}.csv, {prefix}.md"
        + "".join(f", {p}" for p in plots)
        + f" in {elapsed:.0f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
