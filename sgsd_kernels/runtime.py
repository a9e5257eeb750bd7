"""Backend resolution and process-wide switches (deterministic mode, Triton interpreter)."""

from __future__ import annotations

import contextlib
import functools
import os

import torch

# The one list of backend names: "auto" picks one of the others; "reference" is the eager,
# materialising code in ``sgsd_kernels.reference``; "torch" and "triton" are the packages
# ``sgsd_kernels/ops/<name>_backend/``.
BACKENDS = ("auto", "triton", "torch", "reference")

_deterministic = False


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install on an unsupported platform
        return False
    return True


def set_deterministic(enabled: bool) -> None:
    """Make the Triton backward bit-for-bit reproducible (no float atomics).

    Also follows ``torch.use_deterministic_algorithms(True)``.
    """
    global _deterministic
    _deterministic = bool(enabled)


def is_deterministic() -> bool:
    return _deterministic or torch.are_deterministic_algorithms_enabled()


@contextlib.contextmanager
def deterministic(enabled: bool = True):
    """Context manager form of :func:`set_deterministic`."""
    global _deterministic
    previous = _deterministic
    _deterministic = bool(enabled)
    try:
        yield
    finally:
        _deterministic = previous


def check_backend(backend: str) -> str:
    """``backend`` itself if it is one of :data:`BACKENDS`, else a ValueError naming them."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map the user's ``backend`` to a concrete one for tensors on ``device``.

    "auto": triton for CUDA tensors (when Triton imports), otherwise torch. "triton" on
    CPU tensors is allowed only under ``TRITON_INTERPRET=1`` (Triton's CPU interpreter).
    """
    check_backend(backend)
    if backend == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' requested but Triton is not importable")
        if device.type != "cuda" and not interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got device {device.type!r}); "
                "set TRITON_INTERPRET=1 to run the kernels on CPU in the interpreter"
            )
    return backend
