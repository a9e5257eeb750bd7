"""The native backend of ``sgsd::logprobs_from_logits``: the portable torch kernels.

Native C++ kernels exist for the linear log-prob op, where the logits GEMM dominates;
this op is memory-bound elementwise work on tensors the caller already holds, and the
blockwise torch kernels (``ops/torch_backend/logprobs_from_logits.py``) already run it at ATen's
vectorised speed, so ``backend="native"`` uses them unchanged.
"""

from sgsd_kernels.ops.torch_backend.logprobs_from_logits import backward, forward

__all__ = ["backward", "forward"]
