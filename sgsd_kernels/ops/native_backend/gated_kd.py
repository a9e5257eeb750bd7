"""The native backend of ``sgsd::gated_kd``: the portable torch kernels.

Native C++ kernels exist for the linear log-prob op, where the logits GEMM dominates;
this op is memory-bound elementwise work on tensors the caller already holds, and the
blockwise torch kernels (``ops/torch_backend/gated_kd.py``) already run it at ATen's
vectorised speed, so ``backend="native"`` uses them unchanged.
"""

from sgsd_kernels.ops.torch_backend.gated_kd import backward, forward

__all__ = ["backward", "forward"]
