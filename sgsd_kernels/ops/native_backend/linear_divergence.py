"""The native backend of ``sgsd::linear_divergence``: the blockwise torch kernels.

The native C++ kernels cover the linear log-prob op. The divergence's element-wise terms
run in place in ATen's vectorised kernels between ATen GEMMs (``ops/torch_backend/
linear_divergence.py``), so ``backend="native"`` uses those unchanged.
"""

from sgsd_kernels.ops.torch_backend.linear_divergence import (
    backward,
    forward,
    forward_with_unit_grads,
)

__all__ = ["backward", "forward", "forward_with_unit_grads"]
