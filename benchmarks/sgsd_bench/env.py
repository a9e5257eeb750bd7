"""What a run records about where it ran: device, library version, memory available."""

from __future__ import annotations

import os
import platform
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def mem_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is no /proc)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", REPO, *args], capture_output=True, text=True, timeout=10, check=False
    ).stdout.strip()


def git_version() -> str:
    """Short HEAD, "+dirty" when sgsd_kernels has uncommitted changes; "unknown" outside git.
    $SGSD_COMMIT wins: a copy of the tree on another machine names its commit there (its
    .git, if any, may be older than the files)."""
    if os.environ.get("SGSD_COMMIT"):
        return os.environ["SGSD_COMMIT"]
    try:
        sha = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "sgsd_kernels")
    except Exception:  # noqa: BLE001
        return "unknown"
    return sha + ("+dirty" if dirty else "") if sha else "unknown"


def package_version() -> str:
    try:
        import sgsd_kernels

        v = getattr(sgsd_kernels, "__version__", "?")
    except Exception:  # noqa: BLE001
        v = "not-importable"
    return f"sgsd-kernels {v} ({git_version()})"


def device_name(device) -> str:
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def run_meta(preset: str, device: str, dtype: str) -> dict:
    """The header facts of a run (the caller adds "timestamp")."""
    import torch

    cuda = str(device).startswith("cuda")
    return {
        "preset": preset,
        "device": device_name(device),
        "dtype": dtype,
        "device_is_cuda": cuda,
        "torch": torch.__version__,
        "version": package_version(),
        "mem_method": (
            "torch.cuda.max_memory_allocated after reset"
            if cuda
            else "process RSS high-water mark via /proc/self/clear_refs, "
            "MALLOC_MMAP_THRESHOLD_=65536; one subprocess per shape, its providers "
            "measured one after the other"
        ),
    }
