"""The ``triton`` backend: fused Triton kernels and their host-side launchers, one module
per op. Imported lazily by ``sgsd_kernels.ops.<op>`` so that the package works without
Triton."""

from __future__ import annotations

import torch
import triton.language as tl

from sgsd_kernels.ops.common import compute_dtype


def tl_compute_dtype(*tensors: torch.Tensor | None):
    """The Triton twin of :func:`sgsd_kernels.ops.common.compute_dtype`: ``tl.float64``
    when a tensor is float64, ``tl.float32`` otherwise (the kernels' ``ACC`` constexpr)."""
    return tl.float64 if compute_dtype(*tensors) == torch.float64 else tl.float32


def inv_temperature(temperature: float, like: torch.Tensor) -> torch.Tensor:
    """1/T as a 1-element tensor in the compute dtype of ``like``, on its device, for a
    kernel to ``tl.load``. Not a float argument: Triton passes a Python float to a compiled
    kernel as an fp32 scalar, which would round 1/T by up to 6e-8 relative in the fp64
    kernels. ``torch.full`` fills on the device (no host-to-device copy)."""
    return torch.full((1,), 1.0 / temperature, dtype=compute_dtype(like), device=like.device)
