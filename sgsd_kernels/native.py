"""Build and load the native CPU kernels (docs/design.md §5, the ``native`` backend).

The C++ sources ship inside the package (``sgsd_kernels/csrc/``), so an installed wheel can
build them; nothing is compiled at ``pip install`` time. The extension is compiled on the
first ``backend="native"`` call (or ahead of time with ``python -m sgsd_kernels.native
build``) with ``torch.utils.cpp_extension.load`` and ninja into a per-user cache:

    $SGSD_CACHE/native-<key>            when SGSD_CACHE is set
    ~/.cache/sgsd_kernels/native-<key>  otherwise (XDG_CACHE_HOME is honoured)

``<key>`` hashes the sources, the flags, the torch version, the compiler and the CPU's
feature flags (the build uses ``-march=native``, so a cache shared between machines must
not hand one CPU's binary to another). It needs a C++ compiler (``$CXX`` or ``c++``) and
torch's C++ headers (in every torch wheel); no Python headers (the ops register through
``TORCH_LIBRARY``, not pybind11).

``backend="auto"`` never compiles: it uses native only when :func:`is_built` (see
``sgsd_kernels/runtime.py`` for the rule).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import sys
import threading
from pathlib import Path

import torch

NAME = "sgsd_native"
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("registration.cpp", "linear_logprobs.cpp", "divergence.cpp", "local_support.cpp")
HEADERS = ("ops.h", "tiles.h", "reused.h", "engines.h", "probe.h")  # part of the cache key
CFLAGS = (
    "-O3",
    "-march=native",
    # at::parallel_for's OpenMP body is inlined from ATen's headers: without -fopenmp its
    # `#pragma omp parallel` compiles away and every task runs on one thread. The library
    # links libgomp.so.1, the soname torch has already loaded, so no second runtime starts.
    "-fopenmp",
    "-fno-trapping-math",
    "-fno-math-errno",
    "-DNDEBUG",
)

_lock = threading.Lock()
_loaded = False
_error: str | None = None


class NativeUnavailable(RuntimeError):
    """The native CPU extension cannot be built or loaded; the message says why."""


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sources() -> list[Path]:
    return [CSRC / s for s in SOURCES]


def cache_root() -> Path:
    if os.environ.get("SGSD_CACHE"):
        return Path(os.environ["SGSD_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sgsd_kernels"


def build_dir() -> Path:
    """Where the extension for this machine, torch, compiler and source version lives."""
    return cache_root() / f"native-{_key()}"


@functools.cache
def _key() -> str:
    # Cached: "auto" asks for it on every CPU call until the extension is loaded.
    h = hashlib.sha256()
    for src in _sources() + [CSRC / name for name in HEADERS]:
        h.update(src.name.encode())
        h.update(src.read_bytes() if src.exists() else b"<missing>")
    for part in (torch.__version__, _compiler(), " ".join(CFLAGS), _cpu_flags(), sys.platform):
        h.update(part.encode())
    return h.hexdigest()[:16]


def _library_path() -> Path:
    return build_dir() / f"{NAME}.so"


def _missing_requirement() -> str | None:
    """What is missing to build, in words, or None."""
    missing = [str(s) for s in _sources() + [CSRC / n for n in HEADERS] if not s.exists()]
    if missing:
        return f"the C++ sources are missing from the installed package: {', '.join(missing)}"
    cxx = _compiler()
    if shutil.which(cxx) is None:
        return (
            f"no C++ compiler: {cxx!r} is not on PATH (install g++ or clang++, or point CXX at one)"
        )
    from torch.utils import cpp_extension

    headers = [Path(p) / "torch" / "library.h" for p in cpp_extension.include_paths()]
    if not any(p.exists() for p in headers):
        return (
            "torch's C++ headers (torch/library.h) are missing from the torch install "
            f"(looked in {', '.join(str(p.parent) for p in headers)})"
        )
    try:
        import ninja  # noqa: F401
    except ImportError:
        if shutil.which("ninja") is None:
            return "ninja is missing: pip install ninja"
    return None


def _register_ops(path: Path) -> None:
    if not hasattr(torch.ops.sgsd_native, "linear_logprobs_forward"):
        torch.ops.load_library(str(path))


def loaded() -> bool:
    """True once the extension is loaded in this process."""
    return _loaded


def is_built() -> bool:
    """True when the extension is loaded or already compiled in the cache (no build)."""
    return _loaded or _library_path().exists()


def build(verbose: bool = False) -> Path:
    """Compile (if needed) and load the extension; returns its build directory.

    Raises :class:`NativeUnavailable` naming what is missing (compiler, headers, sources)
    or, when the compiler fails, the path of the build log.
    """
    global _loaded, _error
    with _lock:
        if _loaded:
            return build_dir()
        if _error is not None:
            raise NativeUnavailable(_error)
        why = _missing_requirement()
        if why is not None:
            raise NativeUnavailable(f"sgsd_kernels native backend unavailable: {why}")
        directory = build_dir()
        directory.mkdir(parents=True, exist_ok=True)
        log = directory / "build.log"
        from torch.utils import cpp_extension

        try:
            cpp_extension.load(
                name=NAME,
                sources=[str(s) for s in _sources()],
                extra_cflags=list(CFLAGS),
                extra_ldflags=["-fopenmp"],
                build_directory=str(directory),
                is_python_module=False,
                verbose=verbose,
            )
        except Exception as exc:  # compiler error, link error, bad torch install
            log.write_text(f"{type(exc).__name__}: {exc}\n")
            _error = (
                "sgsd_kernels native backend unavailable: building the C++ extension with "
                f"{_compiler()!r} failed; the compiler output is in {log}"
            )
            raise NativeUnavailable(_error) from exc
        _register_ops(_library_path())
        _loaded = True
        return directory


def load_if_built() -> bool:
    """Load the extension when it is already compiled for this machine; never compiles."""
    global _loaded
    if _loaded:
        return True
    if not _library_path().exists():
        return False
    with _lock:
        try:
            _register_ops(_library_path())
        except Exception:  # a stale or foreign binary: treat as not built
            return False
        _loaded = True
    return True


@functools.cache
def ops():
    """``torch.ops.sgsd_native`` after building/loading the extension."""
    build()
    return torch.ops.sgsd_native


def tile_plan(n: int, v: int, h: int) -> tuple[int, int]:
    """(rows, vocabulary entries) of the kernels' GEMM tile for N rows, vocabulary V and
    hidden size H (builds/loads the extension)."""
    rows, vblock = ops().tile_plan(n, v, h)
    return int(rows), int(vblock)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["build"]:
        try:
            directory = build(verbose="-v" in argv)
        except NativeUnavailable as exc:
            print(exc, file=sys.stderr)
            return 1
        print(directory)
        return 0
    if argv[:1] == ["where"]:
        print(build_dir())
        return 0
    print(
        "usage: python -m sgsd_kernels.native build [-v]   compile into the cache, print it\n"
        "       python -m sgsd_kernels.native where        print the cache directory",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
