"""The argument bundles the op layer hands to the backends, and the custom-op schemas
written from them (docs/design.md §4).

A backend's functions take an op's arguments in groups: the logits operand
(:class:`LinearInputs`, or a logits tensor), the per-row inputs of the forward
(:class:`RowTargets`) or of the backward (:class:`RowGrads`), or the student and teacher
rows of the streams op (:class:`Streams`). A custom op's schema lists every argument with
its type; :func:`op_schema` writes that list from a bundle's fields, so each group is
spelled once, in its dataclass, and :func:`op_args` flattens a bundle back into the op's
positional arguments::

    op_schema("Tensor logits, str backend", RowGrads, returns="Tensor")
    == "(Tensor logits, str backend, Tensor grad_logprobs, Tensor? grad_entropy, ...) -> Tensor"
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from sgsd_kernels.ops.common import row_scales, safe_targets


@dataclass(frozen=True)
class LinearInputs:
    """The logits operand of a linear op, never materialised: hidden rows [N, H] through
    the LM head, weight [V, H] and bias [V] or None (z = hidden @ weight.T + bias), then
    the soft cap z ← softcap·tanh(z / softcap) when ``softcap`` is set (docs/design.md §3.3;
    a ``logit_scale`` is already folded into the cap and the temperature, see
    ``ops.common.fold_logit_scale``). The temperature divides the capped logits."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None = None


@dataclass(frozen=True)
class RowTargets:
    """The per-row inputs of a log-prob op's forward, beside those of the logits: targets
    [N] int64, temperature, ignore index and whether the entropy is wanted. Every
    backend's ``forward`` takes one (the forward twin of :class:`RowGrads`)."""

    targets: torch.Tensor
    temperature: float
    ignore_index: int
    with_entropy: bool


@dataclass(frozen=True)
class RowGrads:
    """The per-row inputs of a log-prob op's backward, beside those of the logits: the
    upstream gradients, the forward's targets, lse and entropy (None without entropy), its
    temperature and ignore index. Every backend's ``backward`` takes one, so the op builds
    it once from its typed arguments."""

    grad_logprobs: torch.Tensor
    grad_entropy: torch.Tensor | None
    targets: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor | None
    temperature: float
    ignore_index: int

    def scales(
        self, dtype: torch.dtype, inv_t: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(safe targets, g, ge): ``row_scales`` with ``inv_t`` folded in (1.0 where a
        kernel applies 1/T itself)."""
        valid, safe_t = safe_targets(self.targets, self.ignore_index)
        g, ge = row_scales(valid, self.grad_logprobs, self.grad_entropy, inv_t, dtype)
        return safe_t, g, ge


def upstream_grads(
    grad_logprobs: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A log-prob op's autograd formula's upstream (grad_logprobs, grad_entropy), made
    contiguous: a missing log-prob gradient counts as 0, and the entropy gradient is None
    when the forward kept no entropy (``entropy`` None)."""
    if grad_logprobs is None:
        grad_logprobs = torch.zeros_like(lse)
    if entropy is None or grad_entropy is None:
        return grad_logprobs.contiguous(), None
    return grad_logprobs.contiguous(), grad_entropy.contiguous()


@dataclass(frozen=True)
class Streams:
    """The inputs of a backend's ``forward_streams``: student rows [N, H] and teacher rows
    [M, H] with their int64 targets, through one LM head (weight [V, H], bias [V] or
    None, soft cap or None) at one temperature and ignore index. The op builds it once
    from its typed arguments."""

    student_hidden: torch.Tensor
    teacher_hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    student_targets: torch.Tensor
    teacher_targets: torch.Tensor
    temperature: float
    ignore_index: int
    softcap: float | None = None

    def targets(self) -> torch.Tensor:
        """Student then teacher targets, [N + M]."""
        return torch.cat([self.student_targets, self.teacher_targets])

    def student(self) -> tuple[RowTargets, LinearInputs]:
        """The student rows as a backend ``forward``'s arguments (no entropy)."""
        return self._forward_args(self.student_hidden, self.student_targets)

    def teacher(self) -> tuple[RowTargets, LinearInputs]:
        """The teacher rows as a backend ``forward``'s arguments (no entropy)."""
        return self._forward_args(self.teacher_hidden, self.teacher_targets)

    def joint(self) -> tuple[RowTargets, LinearInputs]:
        """Student then teacher rows as one stream of N + M rows (teacher rows cast to the
        student's dtype), as a backend ``forward``'s arguments (no entropy)."""
        hidden = torch.cat([self.student_hidden, self.teacher_hidden.to(self.student_hidden.dtype)])
        return self._forward_args(hidden, self.targets())

    def _forward_args(self, hidden, targets) -> tuple[RowTargets, LinearInputs]:
        rows = RowTargets(targets, self.temperature, self.ignore_index, False)
        return rows, LinearInputs(hidden, self.weight, self.bias, self.softcap)


# Field annotations (strings under ``from __future__ import annotations``) -> schema
# types, as ``torch.library.custom_op`` infers them from type hints (int is SymInt).
_SCHEMA_TYPES = {
    "torch.Tensor": "Tensor",
    "torch.Tensor | None": "Tensor?",
    "float": "float",
    "float | None": "float?",
    "int": "SymInt",
    "bool": "bool",
    "str": "str",
}


def op_schema(*params: str | type, returns: str) -> str:
    """``"(params) -> returns"``: a string param is taken as written ("Tensor logits"), a
    dataclass contributes its fields in order."""
    parts: list[str] = []
    for p in params:
        if isinstance(p, str):
            parts.append(p)
            continue
        for f in dataclasses.fields(p):
            if f.type not in _SCHEMA_TYPES:
                raise TypeError(
                    f"op_schema: field {p.__name__}.{f.name} has type {f.type!r}; a custom-op "
                    f"argument must be one of {', '.join(_SCHEMA_TYPES)}"
                )
            parts.append(f"{_SCHEMA_TYPES[f.type]} {f.name}")
    return f"({', '.join(parts)}) -> {returns}"


def sgsd_op(name: str, *params: str | type, returns: str):
    """``torch.library.custom_op`` for ``sgsd::<name>`` (no mutated arguments) with the
    schema ``op_schema(*params, returns=returns)``."""
    schema = op_schema(*params, returns=returns)
    return torch.library.custom_op(f"sgsd::{name}", mutates_args=(), schema=schema)
