"""The verifier's worker process (``python -c "import sgsd.eval.verify_worker as w;
w.serve()"``, started by :mod:`sgsd.eval.verify`): reads ``{"pred", "gold", "memory_mb",
"cpu_s"}`` JSON lines, caps itself, compares with math-verify, answers one JSON line each.

Only the worker imports math-verify and sympy; the caps it sets on itself and why are in
:mod:`sgsd.eval.verify`'s docstring and docs/threat-model.md.
"""

from __future__ import annotations

import json
import math
import sys

__all__ = ["compare", "limit_self", "serve"]


def compare(pred: str, gold: str) -> tuple[bool, str | None]:
    """Symbolic comparison (runs inside a worker process)."""
    from math_verify import parse
    from math_verify import verify as mv_verify

    def _parse(s: str):
        # Wrap in \boxed{} so math-verify reads it as one LaTeX answer; fall back to
        # $...$ and to plain text for answers that are not valid inside a box.
        for candidate in (f"\\boxed{{{s}}}", f"${s}$", s):
            out = parse(candidate, parsing_timeout=None)
            if out:
                return out
        return []

    gold_parsed = _parse(gold)
    if not gold_parsed:
        return False, "gold answer could not be parsed"
    pred_parsed = _parse(pred)
    if not pred_parsed:
        return False, "predicted answer could not be parsed"
    return bool(mv_verify(gold_parsed, pred_parsed, timeout_seconds=None)), None


def limit_self(memory_mb: int, cpu_s: int) -> None:
    """Cap this process (a worker) for the next comparison: address space at
    ``memory_mb`` (0: no cap) and CPU time at ``cpu_s`` more seconds than used so far
    (the kernel ends it with SIGXCPU past that). Soft limits only: they can be raised
    again for the next request."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = memory_mb * 2**20 if memory_mb > 0 else resource.RLIM_INFINITY
    if hard != resource.RLIM_INFINITY:
        cap = hard if cap == resource.RLIM_INFINITY else min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = math.ceil(usage.ru_utime + usage.ru_stime)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = used + max(1, cpu_s)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _peak_mb() -> float:
    """This process's peak address space (VmPeak), in MiB; peak RSS where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmPeak:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _near_cap(memory_mb: int) -> bool:
    """Whether this worker's address space has come within 10 % of its cap. math-verify
    swallows the MemoryError of a failed allocation (the answer just compares unequal),
    so the cap is seen by the peak it leaves: e.g. ``2^{2^{40}}`` under a 256 MiB cap
    peaks at 255 MiB."""
    return memory_mb > 0 and _peak_mb() >= 0.9 * memory_mb


def serve() -> None:  # pragma: no cover - runs in the subprocess
    """Serve ``{"pred", "gold", "memory_mb", "cpu_s"}`` JSON lines on stdin with
    ``{"correct", "error", "limit"}`` lines. After coming near its memory cap the worker
    answers and exits (its heap is spent); the CPU cap ends it by signal."""
    import logging

    logging.disable(logging.WARNING)  # math-verify warns that timeouts are ours to handle
    import math_verify  # noqa: F401  (import cost paid before "ready")

    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        limit, memory_mb = None, 0
        try:
            req = json.loads(line)
            memory_mb = int(req.get("memory_mb", 0))
            limit_self(memory_mb, int(req.get("cpu_s", 0)))
            correct, error = compare(req["pred"], req["gold"])
        except MemoryError:
            correct, error = False, "memory cap reached"
        except Exception as e:  # noqa: BLE001 - any parser failure is a wrong answer
            correct, error = False, f"{type(e).__name__}: {e}"[:200]
        near = _near_cap(memory_mb)
        if near and not correct:
            error, limit = "memory cap reached", "memory"
        elif near:
            limit = "recycle"  # a correct answer that used the cap: a fresh worker next
        out.write(json.dumps({"correct": correct, "error": error, "limit": limit}) + "\n")
        out.flush()
        if limit is not None:
            return
