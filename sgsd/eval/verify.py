"""Answer verification: reward +1 / -1 for a completion against a gold answer.

``verify(completion, answer)`` extracts the *last* ``\\boxed{...}`` (or ``\\fbox{...}``)
of the completion, with nested braces, and compares it with the gold answer using
math-verify (symbolic and numeric equivalence: ``\\frac{1}{2}`` = ``0.5``, ``(3, \\pi/2)``
= ``\\left( 3, \\frac{\\pi}{2} \\right)``, ``x = 2`` vs ``2``...).

**Timeouts that really bound.** math-verify's own timeouts use ``signal.alarm``: they
only work in the main thread, and no signal interrupts a long C-level computation (sympy
expanding ``10^{10^{10}}`` sits inside one big-integer multiplication). So symbolic
comparisons run in a small pool of persistent worker *processes* (plain subprocesses
speaking JSON lines, started on first use; never forked from the trainer, which holds
threads and CUDA state). A worker that does not answer within ``timeout_s`` is killed and
replaced, and the call returns ``reward = -1`` with ``timed_out = True``. This works from
any thread, and the caller's signal handlers are never touched.

**Resource limits.** Model outputs are untrusted input (docs/threat-model.md). Before each
comparison the worker caps its own address space at ``memory_mb`` (``RLIMIT_AS``,
default :data:`DEFAULT_MEMORY_MB`) and its CPU time at ``ceil(timeout_s)`` more seconds
(``RLIMIT_CPU``), so an answer whose symbolic comparison explodes (``2^{2^{40}}`` grows
the worker by ~130 MB/s on one core) fails inside the worker instead of taking the host's
memory. A worker that hits a cap answers ``-1`` and exits (or is killed by the kernel);
the result says ``resource_limited = True`` and a fresh worker serves the next call.

Fast path, no worker: when both answers are plain integers (all of AIME, DAPO-Math) or
the same string after whitespace normalisation, they are compared in-process.

Garbage in (``None``, non-strings, no box, unbalanced braces, unparsable LaTeX) gives
``reward = -1``; the functions never raise for bad *content*.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import select
import subprocess
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_MEMORY_MB",
    "MAX_ANSWER_CHARS",
    "VerifyResult",
    "extract_boxed",
    "verify",
    "verify_batch",
]

#: A boxed answer longer than this is not parsed (not an answer; protects the parser).
MAX_ANSWER_CHARS = 1000
#: Seconds a freshly started worker may take to import sympy/math-verify.
_STARTUP_TIMEOUT_S = 120.0
#: Address-space cap of a worker during a comparison. An idle worker maps ~60 MB; the
#: comparisons of MATH-500's 500 answers against their solutions stay far below this.
DEFAULT_MEMORY_MB = 2048


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of one verification.

    ``reward`` is +1.0 if correct else -1.0; ``predicted`` the extracted boxed content
    (``None`` if there was none); ``timed_out`` whether the comparison hit the timeout;
    ``resource_limited`` whether it hit the worker's memory or CPU cap (the worker was
    replaced); ``error`` a short reason when the answer could not be checked (else
    ``None``).
    """

    reward: float
    predicted: str | None
    correct: bool
    timed_out: bool = False
    error: str | None = None
    resource_limited: bool = False


# --------------------------------------------------------------------------- extraction
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _brace_group(text: str, i: int) -> str | None:
    """Content of the brace group opening at ``text[i] == '{'`` (nested), else None."""
    depth = 0
    j = i
    while j < len(text):
        c = text[j]
        if c == "\\":  # an escaped brace (\{ or \}) does not open or close a group
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
        j += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text`` (nested braces
    allowed), or of a brace-less ``\\boxed 5``; ``None`` if there is none or the last one
    is unterminated (a truncated generation has no final answer)."""
    if not isinstance(text, str):
        return None
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return None
    i = matches[-1].end()
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        content = _brace_group(text, i)
        return None if content is None else content.strip()
    m = re.match(r"[^\s$]+", text[i:])  # "\boxed 5" / "\boxed5"
    return m.group(0) if m else None


# --------------------------------------------------------------------------- fast path
_INT_RE = re.compile(r"[+-]?\d{1,200}")
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+")


def _normalise(s: str) -> str:
    s = s.strip().strip("$").strip()
    s = re.sub(r"\s+", "", s)
    # "1,000" is a number; "1,2" (a list of values) is not touched.
    return s.replace(",", "") if _THOUSANDS_RE.fullmatch(s) else s


def _fast_compare(pred: str, gold: str) -> bool | None:
    """True/False when decidable without sympy (same text, or two integers), else None."""
    p, g = _normalise(pred), _normalise(gold)
    if p and p == g:
        return True
    if _INT_RE.fullmatch(p) and _INT_RE.fullmatch(g):
        return int(p) == int(g)
    return None


# --------------------------------------------------------------------------- client side
class _WorkerDied(RuntimeError):
    pass


class _Worker:
    def __init__(self) -> None:
        pkg_parent = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        # The child must import this package even when the parent got it via sys.path
        # (e.g. `torchrun sgsd/train.py` from a source checkout).
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH", "")) if p)
        env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sgsd.eval.verify_worker as w; w.serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            bufsize=0,
        )
        self._buf = b""
        if self._readline(_STARTUP_TIMEOUT_S) != b"ready":
            self.kill()
            raise _WorkerDied("verification worker failed to start")

    def _readline(self, timeout: float) -> bytes | None:
        """One line from the worker, or None on timeout. Raises _WorkerDied on EOF."""
        import time

        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if not ready:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise _WorkerDied("verification worker exited")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def ask(
        self, pred: str, gold: str, timeout: float, memory_mb: int, cpu_s: int | None = None
    ) -> dict | None:
        """The worker's answer, or None if it timed out (the worker is then dead).
        ``cpu_s``: its CPU-time cap (default: the timeout, rounded up). Raises
        _WorkerDied if the request could not be sent (a worker that died idle); a worker
        that dies while comparing was ended by one of its caps."""
        request = {"pred": pred, "gold": gold, "memory_mb": memory_mb}
        request["cpu_s"] = math.ceil(timeout) if cpu_s is None else cpu_s
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise _WorkerDied(str(e)) from None
        try:
            line = self._readline(timeout)
        except _WorkerDied:
            self.kill()
            return {"correct": False, "error": "worker ended by a resource cap", "limit": "cpu"}
        if line is None:
            self.kill()
            return None
        return json.loads(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - kill -9 does not hang
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class _Pool:
    """Idle workers, created on demand; each in-flight request owns one worker."""

    def __init__(self) -> None:
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()

    def run(self, pred: str, gold: str, timeout: float, memory_mb: int) -> dict | None:
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        for attempt in range(2):  # one retry if a stale worker had died meanwhile
            if worker is None or not worker.alive():
                worker = _Worker()
            try:
                reply = worker.ask(pred, gold, timeout, memory_mb)
            except _WorkerDied:
                worker.kill()
                worker = None
                if attempt == 1:
                    raise
                continue
            if reply is not None and reply.get("limit") is None:
                with self._lock:
                    self._idle.append(worker)
            elif reply is not None:
                worker.kill()  # it exits after a cap; reap it
            return reply
        return None  # pragma: no cover - loop always returns or raises

    def shutdown(self) -> None:
        with self._lock:
            workers, self._idle = self._idle, []
        for w in workers:
            w.kill()


_POOL = _Pool()
atexit.register(_POOL.shutdown)


def _as_text(x) -> str | None:
    if isinstance(x, str):
        return x
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return str(x)
    return None


def verify(
    completion: str,
    answer: str,
    *,
    timeout_s: float = 5.0,
    memory_mb: int = DEFAULT_MEMORY_MB,
) -> VerifyResult:
    """Check ``completion``'s last boxed answer against the gold ``answer``.

    ``answer`` is the gold answer as LaTeX or plain text (an int is accepted too).
    ``timeout_s`` bounds the symbolic comparison (wall clock, enforced by killing the
    worker process, and the worker's CPU time); ``memory_mb`` caps the worker's address
    space during it (0: no cap). The first call of a process also waits for the worker
    to start.
    """
    pred = extract_boxed(completion) if isinstance(completion, str) else None
    gold = _as_text(answer)
    if pred is None:
        return VerifyResult(-1.0, None, False, error="no complete \\boxed{} answer")
    if gold is None or not gold.strip():
        return VerifyResult(-1.0, pred, False, error="gold answer is empty or not a string")
    if not pred.strip():
        return VerifyResult(-1.0, pred, False, error="empty \\boxed{}")
    if len(pred) > MAX_ANSWER_CHARS:
        return VerifyResult(-1.0, pred, False, error="boxed answer too long")
    fast = _fast_compare(pred, gold)
    if fast is not None:
        return VerifyResult(1.0 if fast else -1.0, pred, fast)
    try:
        timeout = float(timeout_s)
        if not timeout > 0:
            timeout = 5.0
        reply = _POOL.run(pred, gold, timeout, max(0, int(memory_mb)))
    except Exception as e:  # noqa: BLE001 - worker could not start: report, never raise
        return VerifyResult(-1.0, pred, False, error=f"verifier unavailable: {e}")
    if reply is None:
        return VerifyResult(-1.0, pred, False, timed_out=True, error="timed out")
    if reply.get("limit") in ("memory", "cpu"):
        return VerifyResult(-1.0, pred, False, error=reply.get("error"), resource_limited=True)
    correct = bool(reply.get("correct"))
    return VerifyResult(1.0 if correct else -1.0, pred, correct, error=reply.get("error"))


def verify_batch(
    completions: Sequence[str],
    answers: Sequence[str],
    *,
    timeout_s: float = 5.0,
    memory_mb: int = DEFAULT_MEMORY_MB,
    max_workers: int | None = None,
) -> list[VerifyResult]:
    """:func:`verify` over pairs, in order. Symbolic checks run on up to ``max_workers``
    worker processes in parallel (default: ``min(4, cpu_count)``).

    Raises ``ValueError`` only for mismatched lengths (a caller bug, not bad content).
    """
    completions, answers = list(completions), list(answers)
    if len(completions) != len(answers):
        raise ValueError(
            f"completions and answers differ in length ({len(completions)} vs {len(answers)})"
        )
    n = max_workers or min(4, os.cpu_count() or 1)

    def one(pair):
        return verify(pair[0], pair[1], timeout_s=timeout_s, memory_mb=memory_mb)

    if n <= 1 or len(completions) <= 1:
        return [one(pair) for pair in zip(completions, answers)]
    with ThreadPoolExecutor(max_workers=n) as ex:
        return list(ex.map(one, zip(completions, answers)))
