"""sgsd-kernels: fused full-vocabulary log-probs and the SGSD gated self-distillation loss.

    import sgsd_kernels as sk
    out = sk.linear_gated_kd_loss(student_hidden, lm_head.weight, targets, mask, rewards,
                                  teacher_weights, teacher_hidden=teacher_hidden)
    out.loss.backward()

See docs/design.md §4 for the API and ``sgsd_kernels.reference`` for the eager equivalents.
"""

from sgsd_kernels.functional import (
    GatedKDLoss,
    gated_kd_loss,
    linear_gated_kd_loss,
    linear_logprobs,
    logprobs_from_logits,
)
from sgsd_kernels.output import GatedKDOutput
from sgsd_kernels.runtime import BACKENDS, deterministic, set_deterministic

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "GatedKDLoss",
    "GatedKDOutput",
    "deterministic",
    "gated_kd_loss",
    "linear_gated_kd_loss",
    "linear_logprobs",
    "logprobs_from_logits",
    "set_deterministic",
    "__version__",
]
