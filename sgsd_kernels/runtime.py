"""Backend resolution and process-wide switches (deterministic mode, Triton interpreter)."""

from __future__ import annotations

import contextlib
import functools
import os

import torch

# The one list of backend names: "auto" picks one of the others; "reference" is the eager,
# materialising code in ``sgsd_kernels.reference``; "torch", "triton" and "native" are the
# packages ``sgsd_kernels/ops/<name>_backend/`` (native's C++ sources in ``sgsd_kernels/csrc``).
BACKENDS = ("auto", "triton", "torch", "native", "reference")

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
    """Bit-for-bit reproducible results across runs and processes.

    The Triton and native kernels have no float atomics, so a fixed configuration gives
    the same bits; what can change between processes is the Triton tile an opt-in autotune
    picks by timing (:func:`sgsd_kernels.ops.triton_backend.triton_configs.set_autotune`).
    Deterministic mode keeps the default tiles even with autotune on. The ``torch``
    backend on CUDA adds the target columns with ``index_add_`` (and the local-support op
    scatters), which CUDA runs with atomics unless PyTorch's own switch is on: turn on
    ``torch.use_deterministic_algorithms(True)`` for that backend, which this mode also
    follows.
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

    "auto": triton for CUDA tensors (when Triton imports); on CPU the native C++ kernels
    when they are already built for this machine (``python -m sgsd_kernels.native build``;
    "auto" never compiles), otherwise the blockwise torch path. Native beat torch at every
    shape measured, so no shape rule: fwd+bwd, interleaved in one process on the loaded
    2-core AMD EPYC dev box, native/torch speed-up 1.5x at N=256 and 1024, V=32768,
    H=256 fp32; 2.0x in bf16 at N=256; 2.4x at N=8, V=151936, H=1024; 1.3x in fp64;
    2.2-8.9x at N=1 (V=1007 to 32768).
    "triton" on CPU tensors is allowed only under ``TRITON_INTERPRET=1`` (that is how the
    kernels are tested without a GPU). "native" builds the extension on first use and
    raises ``NativeUnavailable`` saying what is missing.
    """
    check_backend(backend)
    if backend == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        if device.type == "cpu":
            from sgsd_kernels import native

            # Under torch.compile only the loaded flag is read (finding a built library
            # means file I/O, which Dynamo cannot trace); the first eager call loads it.
            if native.loaded() or (not torch.compiler.is_compiling() and native.load_if_built()):
                return "native"
        return "torch"
    if backend == "native":
        if device.type != "cpu":
            raise ValueError(f"backend='native' needs CPU tensors (got device {device.type!r})")
        from sgsd_kernels import native

        if not native.loaded():  # a plain flag read: traceable under torch.compile
            native.build()
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' requested but Triton is not importable")
        if device.type != "cuda" and not interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got device {device.type!r}); "
                "set TRITON_INTERPRET=1 to run the kernels on CPU in the interpreter"
            )
    return backend
