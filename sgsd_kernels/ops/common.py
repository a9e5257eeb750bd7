"""Helpers every backend shares: the compute dtype rule and the ignore-index handling.

Compute dtype (docs/design.md §5): float64 inputs compute and return float64; every other
input dtype (float16, bfloat16, float32) accumulates and returns float32.

Ignored targets (``targets == ignore_index``) give 0 log-prob, 0 entropy and no gradient.
Kernels index the vocabulary with the target, so ignored positions are redirected to
column 0 ("safe targets") and the result is masked afterwards.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any given tensor is float64, otherwise float32 (None is skipped): the
    dtype of accumulators and outputs."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def safe_targets(targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid mask, targets with ignored positions pointing at column 0, as int64)."""
    valid = targets != ignore_index
    return valid, torch.where(valid, targets, torch.zeros_like(targets)).long()


def zero_ignored(
    valid: torch.Tensor, logprobs: torch.Tensor, entropy: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """0 log-prob and 0 entropy where the target is ignored (select, so NaN/inf there
    does not leak). ``entropy=None`` stays None."""
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    logprobs = torch.where(valid, logprobs, zero)
    if entropy is not None:
        entropy = torch.where(valid, entropy, zero)
    return logprobs, entropy


def row_scales(
    valid: torch.Tensor,
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    inv_t: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row backward scales (g, ge) in ``dtype``: the upstream gradients with the
    ignore mask and ``inv_t`` (∂z/∂logits = 1/T) folded in; ge is None without entropy."""
    zero = torch.zeros((), dtype=dtype, device=valid.device)
    g = torch.where(valid, grad_logprobs.to(dtype), zero) * inv_t
    ge = None
    if grad_entropy is not None:
        ge = torch.where(valid, grad_entropy.to(dtype), zero) * inv_t
    return g, ge


def fold_logit_scale(
    temperature: float, softcap: float | None, logit_scale: float | None
) -> tuple[float, float | None]:
    """(temperature, softcap) acting on the raw logits z = h·Wᵀ + b that equal the
    public map z ← a·z, z ← c·tanh(z/c), z ← z/T (docs/design.md §3.3) with a = logit_scale:
    c·tanh(a·z/c)/T = (c/a)·tanh(z/(c/a))/(T/a), and without a cap a·z/T = z/(T/a). So the
    kernels only know a cap on the raw logits and a temperature, and ``logit_scale=None``
    leaves both exactly as given."""
    if logit_scale is None:
        return temperature, softcap
    return temperature / logit_scale, None if softcap is None else softcap / logit_scale


def backend_module(backend: str, op: str) -> ModuleType:
    """The module ``sgsd_kernels.ops.<backend>_backend.<op>`` that implements ``op``.

    The directory layout is the dispatch table: a backend is a package of one module per
    op with the same function names (``forward``, ``backward``, ...). Imported on first
    use, so the package works without Triton installed.
    """
    return importlib.import_module(f"sgsd_kernels.ops.{backend}_backend.{op}")


def empty_if_none(value: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Custom ops cannot return None: an absent output (entropy not requested, no weight
    gradient) is returned as an empty tensor with ``like``'s dtype and device."""
    return like.new_empty(0) if value is None else value


def fake_logprob_outputs(
    rows: torch.Tensor, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shape-only outputs of a log-prob op over the N rows of ``rows`` (for
    ``register_fake``): logprobs [N], entropy [N] (or [0] without entropy), lse [N]."""
    N = rows.shape[0]
    dt = compute_dtype(rows)
    return (
        rows.new_empty(N, dtype=dt),
        rows.new_empty(N if with_entropy else 0, dtype=dt),
        rows.new_empty(N, dtype=dt),
    )
