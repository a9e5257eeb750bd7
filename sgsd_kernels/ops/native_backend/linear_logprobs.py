"""Native CPU linear log-prob kernels behind the same signatures as the torch backend's
(``ops/torch_backend/linear_logprobs.py``), plus the student + K-teacher stream.

The C++ side (``sgsd_kernels/csrc/linear_logprobs.cpp``) computes in fp32 for fp32/bf16/
fp16 inputs and in fp64 for fp64 (``ops.common.compute_dtype``).
"""

from __future__ import annotations

import torch

from sgsd_kernels.ops.arguments import LinearInputs, RowGrads, RowTargets, Streams
from sgsd_kernels.ops.common import compute_dtype


def _ops():
    # Imported here, not at module level: `python -m sgsd_kernels.native` must not find the
    # module already imported by the package (runpy warns about that).
    from sgsd_kernels import native

    return native.ops()


def forward(
    row_targets: RowTargets, x: LinearInputs
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(logprobs [N], entropy [N] or None, lse [N]); 0 log-prob/entropy at ignored rows."""
    t = row_targets
    lp, ent, lse = _ops().linear_logprobs_forward(
        x.hidden, x.weight, x.bias, t.targets, 1.0 / t.temperature, t.ignore_index, t.with_entropy,
        x.softcap,
    )  # fmt: skip
    dtype = compute_dtype(x.hidden)
    return lp.to(dtype), ent.to(dtype) if t.with_entropy else None, lse.to(dtype)


def backward(
    rows: RowGrads, x: LinearInputs, need_weight_grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(dh [N,H] in hidden's dtype, dW [V,H] in weight's dtype or None, db or None)."""
    gh, gw, gb = _ops().linear_logprobs_backward(
        rows.grad_logprobs,
        rows.grad_entropy,
        x.hidden,
        x.weight,
        x.bias,
        rows.targets,
        rows.lse,
        rows.entropy,
        1.0 / rows.temperature,
        rows.ignore_index,
        need_weight_grad,
        x.softcap,
    )
    gw = gw if need_weight_grad else None
    gb = gb if need_weight_grad and x.bias is not None else None
    return gh, gw, gb


def forward_streams(streams: Streams) -> tuple[torch.Tensor, torch.Tensor]:
    """Student [N,H] and teacher [M,H] rows as ONE pass over W (each W block is converted
    and kept in cache once for all N + M rows) -> (logprobs [N + M], lse [N + M])."""
    lp, _, lse = forward(*streams.joint())
    return lp, lse
