"""The soft cap of docs/design.md §3.3 inside the Triton kernels: z = (c/T)·tanh(z_raw/c).

Triton 3.9's interpreter has no ``tanh`` (``libdevice.tanh`` returns None there), so it is
built from one exponential, and the same code runs on the GPU as in the tests. Where the
slope is needed (the log-prob gradient tile), with e = exp(−2|x|) ∈ (0, 1]:
tanh(x) = sign(x)·(1 − e)/(1 + e) and 1 − tanh²(x) = 4e/(1 + e)², which has no
cancellation where tanh saturates; elsewhere tanh(x) = 1 − 2/(exp(2x) + 1), which needs
fewer registers. Near x = 0 the absolute error of either is about one unit of the compute
dtype, i.e. the capped logit is off by ~eps·c, the size of the rounding error the uncapped
logits carry anyway.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sgsd_kernels.ops.common import compute_dtype


@triton.jit
def tanh(x):
    """tanh(x) = 1 − 2/(exp(2x) + 1) element-wise, for tiles that need no slope: one chain
    of operations with a single live temporary (exp(2x) = inf gives 1, 0 gives −1). In the
    divergence tiles, which sit at the register file's edge, it spilled in 12 soft-capped
    sm_80/sm_90 variants against 13 with :func:`tanh_and_slope` (the biased fp32 β-JSD and
    fp64 reverse-KL forwards at sm_90 went from 12 B to none); the rest, up to 28 B in the
    fp32 forwards without biases at sm_90, is within the 32 B allowance
    (benchmarks/results/triton-aot)."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def tanh_and_slope(x):
    """(tanh(x), 1 − tanh²(x)) element-wise; ±inf give (±1, 0) and NaN stays NaN."""
    e = tl.exp(-2.0 * tl.abs(x))
    d = 1.0 + e
    t = (1.0 - e) / d
    return tl.where(x < 0, -t, t), 4.0 * e / (d * d)


@triton.jit
def load_cap(Cap):
    """(1/c, c/T) stored by :func:`cap_scalars`."""
    return tl.load(Cap), tl.load(Cap + 1)


def cap_scalars(softcap: float | None, temperature: float, like: torch.Tensor) -> torch.Tensor:
    """[1/c, c/T] in the compute dtype of ``like`` on its device, for :func:`load_cap` (a
    tensor, not float arguments, for the reason ``inv_temperature`` gives); [1, 1/T]
    without a cap (the kernels then never read it)."""
    values = [1.0, 1.0 / temperature] if softcap is None else [1.0 / softcap, softcap / temperature]
    return torch.tensor(values, dtype=compute_dtype(like), device=like.device)
