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


def hyper(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


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
