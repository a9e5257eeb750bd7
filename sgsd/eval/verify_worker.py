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

__all__ = ["MemoryErrorWatch", "compare", "limit_self", "serve"]


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


class MemoryErrorWatch:
    """Notices a ``MemoryError`` anywhere in a comparison, even one that is caught.

    math-verify and sympy catch ``Exception`` in many places and report a failed
    allocation as "unequal", so the cap cannot be seen from the result; neither from the
    peak it leaves, since an exploding power doubles its operand and the refused
    allocation can leave the peak anywhere between half the cap and the cap. A trace
    function sees the exception in every frame it unwinds through. Line events are
    switched off, so the cost is one Python call per function call (an ordinary
    comparison: ~0.02 s -> ~0.06 s on the 2-core CPU box).

    Use as a context manager around one comparison; ``seen`` tells the outcome.
    """

    def __init__(self) -> None:
        self.seen = False

    def _on_call(self, frame, event, arg):
        frame.f_trace_lines = False
        return self._in_frame

    def _in_frame(self, frame, event, arg):
        if event == "exception" and issubclass(arg[0], MemoryError):
            self.seen = True
        return self._in_frame

    def __enter__(self) -> MemoryErrorWatch:
        sys.settrace(self._on_call)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        sys.settrace(None)
        if exc_type is not None and issubclass(exc_type, MemoryError):
            self.seen = True


def serve() -> None:  # pragma: no cover - runs in the subprocess
    """Serve ``{"pred", "gold", "memory_mb", "cpu_s"}`` JSON lines on stdin with
    ``{"correct", "error", "limit"}`` lines. After an allocation was refused the worker
    answers and exits (its heap may be fragmented); the CPU cap ends it by signal."""
    import logging

    logging.disable(logging.WARNING)  # math-verify warns that timeouts are ours to handle
    import math_verify  # noqa: F401  (import cost paid before "ready")

    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        limit, watch = None, MemoryErrorWatch()
        try:
            req = json.loads(line)
            limit_self(int(req.get("memory_mb", 0)), int(req.get("cpu_s", 0)))
            with watch:
                correct, error = compare(req["pred"], req["gold"])
        except MemoryError:
            correct, error = False, "memory cap reached"
        except Exception as e:  # noqa: BLE001 - any parser failure is a wrong answer
            correct, error = False, f"{type(e).__name__}: {e}"[:200]
        if watch.seen and not correct:
            error, limit = "memory cap reached", "memory"
        elif watch.seen:
            limit = "recycle"  # a correct answer despite a refused allocation: fresh worker
        out.write(json.dumps({"correct": correct, "error": error, "limit": limit}) + "\n")
        out.flush()
        if limit is not None:
            return
