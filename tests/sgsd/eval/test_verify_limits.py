"""The verifier against hostile answers (docs/threat-model.md): a comparison that
explodes in memory or CPU time ends inside its worker, capped, with reward -1 and
``resource_limited``; the caller's own memory stays where it was; and answers that look
like Python are parsed as LaTeX, never run."""

from __future__ import annotations

import resource
import time

import pytest

pytest.importorskip("math_verify")

from sgsd.eval import verify as V  # noqa: E402 (after the importorskip)
from sgsd.eval.verify_worker import MemoryErrorWatch  # noqa: E402

#: 2^(2^40): sympy computes the power; the worker grows ~130 MB/s until its cap.
MEMORY_BOMB = "\\boxed{2^{2^{40}}}"


def _caller_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_the_memory_cap_ends_an_exploding_comparison_and_the_caller_stays_small():
    before = _caller_peak_mb()
    start = time.perf_counter()
    results = V.verify_batch([MEMORY_BOMB] * 3, ["5"] * 3, timeout_s=60, memory_mb=256)
    assert time.perf_counter() - start < 45  # the cap, not the 60 s timeout, ended them
    for r in results:
        assert r.reward == -1.0 and not r.correct and r.resource_limited and not r.timed_out
        assert r.error == "memory cap reached"
    assert _caller_peak_mb() - before < 100  # the caller never held the blow-up
    # the capped workers were replaced: the next comparison is served and right
    ok = V.verify("\\boxed{\\frac{1}{2}}", "0.5", memory_mb=256)
    assert ok.correct and not ok.resource_limited


@pytest.mark.parametrize("memory_mb", [160, 200, 320])
def test_the_cap_is_seen_wherever_the_refused_allocation_lands(memory_mb):
    """The power doubles its operand, so the refused allocation leaves the worker's peak
    anywhere between half the cap and the cap; the cap is reported at every size."""
    r = V.verify(MEMORY_BOMB, "5", timeout_s=60, memory_mb=memory_mb)
    assert r.resource_limited and r.error == "memory cap reached" and not r.timed_out


def test_the_watch_sees_a_memory_error_that_library_code_swallows():
    def swallowing():
        try:
            bytearray(1 << 62)  # refused at once: no machine has 4 EiB
        except Exception:  # noqa: BLE001 - what math-verify and sympy do
            return False

    with MemoryErrorWatch() as watch:
        assert swallowing() is False
    assert watch.seen
    with MemoryErrorWatch() as quiet:
        sum(range(10))
    assert not quiet.seen


def test_the_cpu_cap_ends_a_worker_that_outlives_its_time():
    """Belt and braces for the wall-clock timeout: the kernel ends a worker after its
    CPU seconds even when nobody is waiting to kill it."""
    worker = V._Worker()
    try:
        start = time.perf_counter()
        reply = worker.ask("2^{2^{40}}", "5", timeout=60, memory_mb=0, cpu_s=1)
        assert time.perf_counter() - start < 20
        assert reply["limit"] == "cpu" and reply["correct"] is False
        assert not worker.alive()
    finally:
        worker.kill()


def test_default_caps_leave_ordinary_answers_alone():
    assert V.DEFAULT_MEMORY_MB >= 1024
    pairs = [("\\boxed{x+1}", "1+x"), ("\\boxed{(3, \\pi/2)}", "(3, \\frac{\\pi}{2})")]
    for completion, gold in pairs:
        r = V.verify(completion, gold)
        assert r.correct and not r.resource_limited and not r.timed_out


@pytest.mark.parametrize(
    "answer",
    [
        "__import__('os').system('touch {marker}')",
        "open('{marker}', 'w')",
        "eval(\"open('{marker}', 'w')\")",
        "().__class__.__base__.__subclasses__()[0]('{marker}')",
        "exec('import os; os.system(\"touch {marker}\")')",
    ],
)
def test_python_looking_answers_never_execute(tmp_path, answer):
    """math-verify reads answers with its LaTeX grammar (latex2sympy), never with
    Python's eval or sympy's parse_expr: these stay text and compare unequal."""
    marker = tmp_path / "ran"
    text = answer.format(marker=marker)
    for gold in ("5", "x + 1"):
        r = V.verify(f"\\boxed{{{text}}}", gold)
        assert r.reward == -1.0
    assert not marker.exists()
