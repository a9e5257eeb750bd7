"""Argument checks shared by the public functions.

Every message names the argument and what was expected, so a user can fix the call
without reading this code. Checks that need the values (target range, weight sign)
synchronise with the device once; they run before any kernel launch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def tensor(name: str, value, *, kind: str) -> torch.Tensor:
    """``kind`` is "float", "int" or "bool"; "mask" accepts bool or integer 0/1."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    dt = value.dtype
    if kind == "float" and dt not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {dt}"
        )
    if kind == "int" and dt not in INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (token ids), got {dt}")
    if kind == "mask" and dt != torch.bool and dt not in INT_DTYPES:
        raise TypeError(f"{name} must be a bool (or 0/1 integer) tensor, got {dt}")
    if kind == "real" and dt not in FLOAT_DTYPES and dt not in INT_DTYPES and dt != torch.bool:
        raise TypeError(f"{name} must be a real-valued tensor, got {dt}")
    return value


def shape(name: str, value: torch.Tensor, expected: Sequence[int | None], desc: str) -> None:
    """``expected`` entries of None match any size; ``desc`` is the symbolic shape."""
    if value.dim() != len(expected) or any(
        e is not None and s != e for s, e in zip(value.shape, expected)
    ):
        raise ValueError(f"{name} must have shape {desc}, got {tuple(value.shape)}")


def same_device(**tensors: torch.Tensor | None) -> torch.device:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for n, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{n} is on {t.device} but {first_name} is on {first.device}; "
                "all tensors must be on the same device"
            )
    return first.device


def hyper(
    name: str, value, *, positive: bool = False, nonnegative: bool = False, infinite_ok=False
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) or (infinite_ok and value == math.inf)):
        allowed = " or +inf" if infinite_ok else ""
        raise ValueError(f"{name} must be finite{allowed}, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def logit_transform(softcap, logit_scale) -> tuple[float | None, float | None]:
    """The head's soft cap c > 0 and logit scale a > 0 (docs/design.md §3.3), each a finite
    real number or None. A scale <= 0 would flatten or reverse the distribution; no model
    ships one, so it is refused like a temperature <= 0."""
    if softcap is not None:
        softcap = hyper("softcap", softcap, positive=True)
    if logit_scale is not None:
        logit_scale = hyper("logit_scale", logit_scale, positive=True)
    return softcap, logit_scale


def integer(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def value_checks_enabled() -> bool:
    """Checks that read tensor values (a device sync and a data-dependent branch) run in
    eager mode only: under ``torch.compile`` they would break the graph, so shape/dtype
    checks still run there but value checks are skipped."""
    return not torch.compiler.is_compiling()


def targets_in_range(name: str, targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every target is in [0, vocab) or equals ignore_index."""
    if targets.numel() == 0 or not value_checks_enabled():
        return
    bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
    if bool(bad.any()):
        value = int(targets[bad].flatten()[0])
        raise ValueError(
            f"{name} must be in [0, {vocab}) or equal ignore_index={ignore_index}; found {value}"
        )


def teacher_weights_valid(weights: torch.Tensor) -> None:
    if weights.numel() and not bool((torch.isfinite(weights) & (weights >= 0)).all()):
        raise ValueError("teacher_weights must be finite and >= 0 (0 means no teacher)")


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


# --- Checks of whole argument groups, shared by the public functions ------------------


def finite_inputs(check_finite: bool, **tensors: torch.Tensor | None) -> None:
    """With ``check_finite=True`` (eager only), a ValueError names the first tensor that
    holds NaN or inf."""
    if not flag("check_finite", check_finite) or not value_checks_enabled():
        return
    for name, t in tensors.items():
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains non-finite values (NaN or inf)")


def linear_inputs(hidden, weight, targets, bias, temperature, ignore_index, hidden_name="hidden"):
    """Types, shapes, devices and dtypes of a hidden-states → log-probs call; returns the
    checked (temperature, ignore_index)."""
    tensor(hidden_name, hidden, kind="float")
    tensor("weight", weight, kind="float")
    tensor("targets", targets, kind="int")
    if bias is not None:
        tensor("bias", bias, kind="float")
    same_device(**{hidden_name: hidden, "weight": weight, "targets": targets, "bias": bias})
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must have shape [V, H] with V, H >= 1, got {tuple(weight.shape)}")
    V, H = weight.shape
    if hidden.dim() < 1 or hidden.shape[-1] != H:
        raise ValueError(
            f"{hidden_name} must have shape [..., H] with H = weight.shape[1] = {H}, "
            f"got {tuple(hidden.shape)}"
        )
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets must have shape {hidden_name}.shape[:-1] = {tuple(hidden.shape[:-1])}, "
            f"got {tuple(targets.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(
            f"weight dtype {weight.dtype} must match {hidden_name} dtype {hidden.dtype}"
        )
    if bias is not None:
        shape("bias", bias, (V,), f"[V] = [{V}]")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match weight dtype {weight.dtype}")
    temperature = hyper("temperature", temperature, positive=True)
    ignore_index = integer("ignore_index", ignore_index)
    # The target range is checked where the values are read: before the reference runs,
    # and inside the custom ops (so that it also holds under torch.compile).
    return temperature, ignore_index


def gate_hypers(gate_tau, clip_delta, confidence_threshold, use_polarity=True):
    """The gated loss's (τ > 0, δ > 0 or +inf, ε >= 0) as floats, and ``use_polarity``."""
    if not isinstance(use_polarity, bool):
        raise TypeError(f"use_polarity must be a bool, got {type(use_polarity).__name__}")
    return (
        hyper("gate_tau", gate_tau, positive=True),
        hyper("clip_delta", clip_delta, positive=True, infinite_ok=True),
        hyper("confidence_threshold", confidence_threshold, nonnegative=True),
        use_polarity,
    )


def gate_inputs(student_name, student, token_mask, rewards, teacher_weights):
    """Types, shapes and devices of the [B,T] / [B] / [B,K] gate inputs, against the
    student tensor ``student`` ([B, T, ...]) named ``student_name``; returns (B, T, K).
    Mask values are checked by :func:`mask_values`."""
    tensor("token_mask", token_mask, kind="mask")
    tensor("rewards", rewards, kind="real")
    tensor("teacher_weights", teacher_weights, kind="float")
    B, T = student.shape[0], student.shape[1]
    shape("token_mask", token_mask, (B, T), f"[B, T] = [{B}, {T}]")
    shape("rewards", rewards, (B,), f"[B] = [{B}]")
    if teacher_weights.dim() != 2 or teacher_weights.shape[0] != B:
        raise ValueError(
            f"teacher_weights must have shape [B, K] = [{B}, K], got {tuple(teacher_weights.shape)}"
        )
    K = teacher_weights.shape[1]
    if K == 0:
        raise ValueError("teacher_weights has K = 0 teachers; K must be >= 1")
    devices = {"token_mask": token_mask, "rewards": rewards, "teacher_weights": teacher_weights}
    same_device(**{student_name: student}, **devices)
    return B, T, K


def mask_values(token_mask):
    """Eager-only value check of the mask; teacher weights are checked where they are
    read (in the reference, and inside the custom op, so also under torch.compile)."""
    if not value_checks_enabled():
        return
    if token_mask.dtype != torch.bool and bool(((token_mask != 0) & (token_mask != 1)).any()):
        raise ValueError("token_mask must hold only 0/1 (or be a bool tensor)")


def _head(name, weight, V, H, dtype):
    tensor(name, weight, kind="float")
    shape(name, weight, (V, H), f"[V, H] = [{V}, {H}]")
    if weight.dtype != dtype:
        raise TypeError(f"{name} dtype {weight.dtype} must match student_hidden dtype {dtype}")


def _bias(name, bias, V, dtype):
    if bias is None:
        return
    tensor(name, bias, kind="float")
    shape(name, bias, (V,), f"[V] = [{V}]")
    if bias.dtype != dtype:
        raise TypeError(f"{name} dtype {bias.dtype} must match student_hidden dtype {dtype}")


def divergence_inputs(
    student_hidden, weight, teacher_hidden, teacher_weight, bias, teacher_bias, mask, check_finite
):
    """Checks :func:`sgsd_kernels.linear_divergence`'s tensors (shapes, dtypes, device and,
    with ``check_finite``, finiteness); returns V."""
    tensor("student_hidden", student_hidden, kind="float")
    tensor("weight", weight, kind="float")
    tensor("teacher_hidden", teacher_hidden, kind="float")
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must have shape [V, H] with V, H >= 1, got {tuple(weight.shape)}")
    V, H = weight.shape
    dtype = student_hidden.dtype
    if student_hidden.dim() < 1 or student_hidden.shape[-1] != H:
        raise ValueError(
            f"student_hidden must have shape [..., H] with H = weight.shape[1] = {H}, "
            f"got {tuple(student_hidden.shape)}"
        )
    if teacher_hidden.shape != student_hidden.shape:
        raise ValueError(
            f"teacher_hidden must have the shape of student_hidden "
            f"{tuple(student_hidden.shape)}, got {tuple(teacher_hidden.shape)}"
        )
    _head("weight", weight, V, H, dtype)
    if teacher_hidden.dtype != dtype:
        raise TypeError(
            f"teacher_hidden dtype {teacher_hidden.dtype} must match student_hidden dtype {dtype}"
        )
    if teacher_weight is not None:
        _head("teacher_weight", teacher_weight, V, H, dtype)
    _bias("bias", bias, V, dtype)
    _bias("teacher_bias", teacher_bias, V, dtype)
    if mask is not None:
        tensor("mask", mask, kind="mask")
        lead = tuple(student_hidden.shape[:-1])
        shape("mask", mask, lead, f"student_hidden.shape[:-1] = {list(lead)}")
    heads = {
        "student_hidden": student_hidden,
        "weight": weight,
        "teacher_hidden": teacher_hidden,
        "teacher_weight": teacher_weight,
        "bias": bias,
        "teacher_bias": teacher_bias,
    }
    same_device(**heads, mask=mask)
    finite_inputs(check_finite, **heads)
    return V


def divergence_hypers(beta, temperature, elementwise_clip, teacher_top_k, V):
    """β ∈ [0, 1], T > 0, clip > 0, 1 ≤ top_k ≤ V (docs/design.md §3.1), as Python numbers."""
    beta = hyper("beta", beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    temperature = hyper("temperature", temperature, positive=True)
    if elementwise_clip is not None:
        elementwise_clip = hyper("elementwise_clip", elementwise_clip, positive=True)
    if teacher_top_k is not None:
        teacher_top_k = integer("teacher_top_k", teacher_top_k)
        if not 1 <= teacher_top_k <= V:
            raise ValueError(f"teacher_top_k must be in [1, V] = [1, {V}], got {teacher_top_k}")
    return beta, temperature, elementwise_clip, teacher_top_k
