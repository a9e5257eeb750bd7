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
