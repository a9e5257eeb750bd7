"""The card's two ceilings, and the Triton log-prob op in each operand precision, on CUDA.

    python benchmarks/gpu_precision_modes.py OUT_DIR [--tokens 8192]

Part of ``benchmarks/gpu_check.sh`` (docs/design.md §8). It prints and writes to
OUT_DIR/precision-modes.csv:

1. the ceilings the floor percentages are read against: a device-to-device copy (bytes read
   plus written per second) and a bf16 8192³ ``torch.mm`` on random data (TFLOP/s);
2. ``linear_logprobs(backend="triton")`` forward+backward at the qwen3-1.7b head
   (V=151936, H=2048) in bf16, fp32 with full-precision dots and fp32 with TF32 dots:
   median of 5 event-timed calls after one warm-up, the rate over the 4-GEMM floor, and
   whether a second call gives bitwise the same gradients;
3. registers, spills and shared memory of every kernel as the driver loaded it.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import os
import pkgutil

import torch

import sgsd_kernels as sk


def event_ms(fn, reps: int = 5) -> float:
    """Median of ``reps`` event-timed calls after one untimed warm-up."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def copy_ms(n: int) -> float:
    src = torch.randn(n // 4, device="cuda")
    dst = torch.empty_like(src)
    return event_ms(lambda: dst.copy_(src), reps=10)


def mm_ms(n: int) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    return event_ms(lambda: torch.mm(a, b, out=c), reps=10)


def ceilings() -> list[dict]:
    n = 1 << 30  # 1 GiB each way
    copy = copy_ms(n)
    mm = mm_ms(8192)
    return [
        dict(what="d2d copy 1 GiB", ms=round(copy, 3), rate=round(2 * n / copy / 1e6, 1),
             unit="GB/s read+written"),
        dict(what="bf16 mm 8192^3", ms=round(mm, 3), rate=round(2 * 8192**3 / mm / 1e9, 1),
             unit="TFLOP/s"),
    ]  # fmt: skip


def fwd_bwd(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> None:
    h.grad = w.grad = None
    sk.linear_logprobs(h, w, t, backend="triton").sum().backward()


def one_mode(label: str, dtype: torch.dtype, N: int, V: int, H: int) -> dict:
    torch.manual_seed(0)
    h = (torch.randn(N, H, device="cuda") * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(V, H, device="cuda") * 0.02).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda")
    ms = event_ms(lambda: fwd_bwd(h, w, t))
    first = (h.grad.clone(), w.grad.clone())
    fwd_bwd(h, w, t)
    same = torch.equal(first[0], h.grad) and torch.equal(first[1], w.grad)
    tflops = round(8 * N * V * H / ms / 1e9, 1)
    row = dict(mode=label, N=N, V=V, H=H, fwd_bwd_ms=round(ms, 2), tflops=tflops,
               bitwise_reproducible=same)  # fmt: skip
    print(row, flush=True)
    return row


def precision_modes(N: int, V: int = 151936, H: int = 2048) -> list[dict]:
    rows = []
    for label, dtype, tf32 in (
        ("bf16", torch.bfloat16, False),
        ("fp32", torch.float32, False),
        ("fp32+tf32", torch.float32, True),
    ):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        rows.append(one_mode(label, dtype, N, V, H))
        torch.cuda.empty_cache()
    torch.backends.cuda.matmul.allow_tf32 = False
    return rows


def loaded_kernels() -> None:
    from triton.runtime.jit import JITFunction

    import sgsd_kernels.ops as ops

    for info in pkgutil.walk_packages(ops.__path__, "sgsd_kernels.ops."):
        mod = importlib.import_module(info.name)
        for name, fn in vars(mod).items():
            if not isinstance(fn, JITFunction):
                continue
            for cache in fn.device_caches.values():
                for kernel in cache[0].values():
                    kernel._init_handles()
                    print(f"loaded {info.name.rsplit('.', 1)[-1]}.{name}: {kernel.n_regs} "
                          f"registers, {kernel.n_spills} spills, {kernel.metadata.shared} B "
                          "shared")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--tokens", type=int, default=8192)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_precision_modes.py: needs a CUDA device")
    os.makedirs(args.out, exist_ok=True)
    for row in ceilings():
        print("ceiling", row, flush=True)
    rows = precision_modes(args.tokens)
    with open(os.path.join(args.out, "precision-modes.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    try:  # Triton's loaded-kernel attributes are not a stable API
        loaded_kernels()
    except Exception as e:  # noqa: BLE001
        print(f"loaded kernels: not readable with this Triton ({type(e).__name__}: {e})")
    from sgsd_kernels.ops.triton_backend import triton_configs

    print("family", triton_configs.family())


if __name__ == "__main__":
    main()
