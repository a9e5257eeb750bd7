"""The ``torch`` backend of ``sgsd::logprobs_from_logits``: log-probs (and entropy) of
targets from an existing logits tensor [N, V], in row chunks of at most
``torch_backend.WORKSPACE_ELEMENTS`` elements (no full-size log_softmax copy).
"""

from __future__ import annotations

import torch

from sgsd_kernels.ops import torch_backend
from sgsd_kernels.ops.arguments import RowGrads, RowTargets
from sgsd_kernels.ops.common import compute_dtype, safe_targets, zero_ignored


def forward(
    row_targets: RowTargets, logits: torch.Tensor, workspace: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(logprobs, entropy or None, lse) from a logits tensor [N, V], streaming row chunks
    (never a full-size log_softmax copy: at most ``workspace`` elements in ``dtype``)."""
    with_entropy = row_targets.with_entropy
    N, V = logits.shape
    device = logits.device
    inv_t = 1.0 / row_targets.temperature
    dtype = compute_dtype(logits)
    valid, safe_t = safe_targets(row_targets.targets, row_targets.ignore_index)
    rows = max(1, min(N, (workspace or torch_backend.WORKSPACE_ELEMENTS) // max(V, 1)))
    lse = torch.empty(N, dtype=dtype, device=device)
    picked = torch.empty(N, dtype=dtype, device=device)
    entropy = torch.empty(N, dtype=dtype, device=device) if with_entropy else None
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        z = logits[r0:r1].to(dtype) * inv_t  # a fresh buffer: modified in place below
        m = z.amax(1, keepdim=True)
        z.sub_(m)
        shifted_t = z.gather(1, safe_t[r0:r1].unsqueeze(1)).squeeze(1)
        if with_entropy:
            e = torch.exp(z)
            s = e.sum(1)
            entropy[r0:r1] = torch.log(s) - (e * z).sum(1) / s
        else:
            s = z.exp_().sum(1)
        log_s = torch.log(s)
        lse[r0:r1] = m.squeeze(1) + log_s
        picked[r0:r1] = shifted_t - log_s  # (z_t − max) − log Σ, as eager log_softmax
    return *zero_ignored(valid, picked, entropy), lse


def backward(
    grad_rows: RowGrads, logits: torch.Tensor, workspace: int | None = None
) -> torch.Tensor:
    """∂loss/∂logits [N, V] in the logits' dtype, written row chunk by row chunk."""
    N, V = logits.shape
    inv_t = 1.0 / grad_rows.temperature
    dtype = compute_dtype(logits)
    safe_t, g, ge = grad_rows.scales(dtype, inv_t)
    lse, entropy = grad_rows.lse, grad_rows.entropy
    grad = torch.empty_like(logits)
    rows = max(1, min(N, (workspace or torch_backend.WORKSPACE_ELEMENTS) // max(V, 1)))
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        z = logits[r0:r1].to(dtype) * inv_t
        z.sub_(lse[r0:r1].to(dtype).unsqueeze(1))  # log p
        g_c = g[r0:r1].unsqueeze(1)
        if ge is None:
            G = z.exp_().mul_(-g_c)
        else:
            p = torch.exp(z)
            coef = z.add_(entropy[r0:r1].to(dtype).unsqueeze(1)).mul_(ge[r0:r1].unsqueeze(1))
            G = p.mul_(coef.add_(g_c)).neg_()
        G.scatter_add_(1, safe_t[r0:r1].unsqueeze(1), g_c)
        grad[r0:r1] = G.to(logits.dtype)
    return grad
