"""Verifier: boxed extraction, symbolic comparison, hard timeouts, real answer files."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("math_verify")

from sgsd.eval.verify import MAX_ANSWER_CHARS, VerifyResult, extract_boxed, verify, verify_batch

# Would take far longer than any timeout (sympy evaluates a power tower in C).
PATHOLOGICAL = "The answer is \\boxed{10^{10^{10^{10}}}}."


def _rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{2}", "2"),  # the last one
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),  # nested braces
        ("\\fbox{7}", "7"),
        ("\\boxed {  x+1 }", "x+1"),
        ("\\boxed 5$", "5"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not close the group
        ("$\\boxed{3}$ and \\boxed{4", None),  # the last box is unterminated (truncated)
        ("no box here: 42", None),
        ("\\boxedx{3}", None),  # not the \boxed command
        ("", None),
        (None, None),
        (17, None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("\\frac{1}{2}", "0.5"),
        ("\\dfrac{14}{3}", "\\frac{14}{3}"),
        ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("2\\sqrt{2}", "\\sqrt{8}"),
        ("10\\pi", "10 \\pi"),
        ("1{,}000", "1000"),
        ("1,000", "1000"),
        ("x = 5", "5"),
        ("204", "204"),
        ("-3", "-3"),
        ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt 3}{2}"),
    ],
)
def test_equivalent_answers_are_accepted(pred, gold):
    res = verify(f"We get $\\boxed{{{pred}}}$.", gold)
    assert res.correct and res.reward == 1.0 and res.predicted == pred.strip(), res
    assert isinstance(res, VerifyResult) and not res.timed_out


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("\\frac{1}{3}", "0.5"),
        ("205", "204"),
        ("1,2", "12"),
        ("x^2", "x^3"),
        ("\\pi", "3.14"),
        ("(1, 2)", "(2, 1)"),
    ],
)
def test_wrong_answers_are_rejected(pred, gold):
    res = verify(f"\\boxed{{{pred}}}", gold)
    assert res.reward == -1.0 and not res.correct and res.predicted == pred


@pytest.mark.parametrize(
    ("completion", "answer", "error"),
    [
        (None, "1", "no complete"),
        (123, "1", "no complete"),
        ("no box", "1", "no complete"),
        ("\\boxed{1", "1", "no complete"),
        ("\\boxed{}", "1", "empty"),
        ("\\boxed{1}", None, "gold answer"),
        ("\\boxed{1}", "   ", "gold answer"),
        ("\\boxed{1}", ["1"], "gold answer"),
        ("\\boxed{" + "9" * (MAX_ANSWER_CHARS + 1) + "}", "9", "too long"),
        ("\\boxed{\\frac{}{}}", "1", None),
        ("\\boxed{\\left(}", "\\frac{1}{2}", None),
        ("\\boxed{}}}{{\\\\}", "1", None),
    ],
)
def test_garbage_gives_minus_one_never_an_exception(completion, answer, error):
    res = verify(completion, answer)
    assert res.reward == -1.0 and res.correct is False
    if error is not None:
        assert error in res.error


def test_int_gold_answer_accepted():
    assert verify("\\boxed{204}", 204).correct


def test_timeout_really_bounds_pathological_input():
    t0 = time.monotonic()
    res = verify(PATHOLOGICAL, "2", timeout_s=1.0)
    elapsed = time.monotonic() - t0
    assert res.timed_out and res.reward == -1.0 and res.predicted == "10^{10^{10^{10}}}"
    # Worker startup is not charged to the timeout; allow it on top of 1 s.
    assert elapsed < 1.0 + 8.0
    # The killed worker is replaced: the next symbolic check works.
    assert verify("\\boxed{\\frac{2}{4}}", "0.5").correct


def test_works_and_times_out_in_worker_threads():
    assert threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGALRM)
    with ThreadPoolExecutor(max_workers=2) as ex:
        good = ex.submit(verify, "\\boxed{\\sqrt{4}}", "2")
        bad = ex.submit(verify, PATHOLOGICAL, "2", timeout_s=1.0)
        assert good.result().correct
        assert bad.result().timed_out
    assert signal.getsignal(signal.SIGALRM) is handler  # caller's signal state untouched


def test_verify_batch_keeps_order_and_checks_lengths():
    comps = ["\\boxed{\\frac{1}{2}}", "\\boxed{3}", "nothing", "\\boxed{2\\pi}"]
    golds = ["0.5", "4", "1", "2\\pi"]
    res = verify_batch(comps, golds)
    assert [r.correct for r in res] == [True, False, False, True]
    assert verify_batch([], []) == []
    with pytest.raises(ValueError, match="differ in length"):
        verify_batch(["\\boxed{1}"], [])


@pytest.mark.parametrize("name", ["aime24.jsonl", "aime25.jsonl"])
def test_every_aime_gold_answer_verifies_and_wrong_ones_are_rejected(shared_file, name):
    from sgsd.data import load_problems

    problems = load_problems(shared_file(name))
    assert len(problems) == 30
    right = verify_batch(
        [f"Thus the answer is $\\boxed{{{p.answer}}}$." for p in problems],
        [p.answer for p in problems],
    )
    assert all(r.correct and r.reward == 1.0 for r in right), [
        (p.answer, r) for p, r in zip(problems, right) if not r.correct
    ]
    assert all(re.fullmatch(r"\d+", p.answer) for p in problems)  # AIME: integers 0-999
    wrong = verify_batch(
        [f"\\boxed{{{int(p.answer) + 1}}}" for p in problems], [p.answer for p in problems]
    )
    assert all(r.reward == -1.0 for r in wrong)
    swapped = verify_batch(["\\boxed{\\frac{1}{7}}"] * len(problems), [p.answer for p in problems])
    assert not any(r.correct for r in swapped)


def test_math500_answers_verify_against_their_own_solutions(shared_file):
    """MATH-500's `answer` vs the last \\boxed{} of its worked `solution`.

    The raw pairs are almost always string-identical (the answers were taken from those
    boxes), so the symbolic path is exercised separately with rewritten LaTeX
    (\\frac -> \\dfrac, \\left/\\right dropped, comma spacing, integers n as \\frac{2n}{2})
    and with mismatched pairs.
    """
    rows = _rows(shared_file("math500.jsonl"))
    assert len(rows) == 500
    golds = [r["answer"] for r in rows]
    res = verify_batch([r["solution"] for r in rows], golds)
    rate = sum(r.correct for r in res) / len(rows)
    failures = [(g, r.predicted, r.error) for g, r in zip(golds, res) if not r.correct]
    print(
        f"\nMATH-500 self-verification: {rate:.1%} ({len(rows) - len(failures)}/{len(rows)});"
        f" failures: {failures[:10]}"
    )
    assert rate >= 0.98

    def rewrite(s):
        if re.fullmatch(r"-?\d+", s.strip()):  # integers: an unsimplified fraction
            return f"\\frac{{{2 * int(s)}}}{{2}}"
        s = s.replace("\\dfrac", "\\frac").replace("\\frac", "\\dfrac")
        s = s.replace("\\left", "").replace("\\right", "")
        return re.sub(r",\s*", ", ", s)

    changed = [(rewrite(extract_boxed(r["solution"])), g) for r, g in zip(rows, golds)]
    changed = [(p, g) for p, g in changed if p.replace(" ", "") != g.replace(" ", "")]
    res2 = verify_batch([f"So $\\boxed{{{p}}}$." for p, _ in changed], [g for _, g in changed])
    rate2 = sum(r.correct for r in res2) / len(changed)
    print(f"MATH-500 rewritten answers (symbolic path): {rate2:.1%} of {len(changed)}")
    assert len(changed) >= 300 and rate2 >= 0.95

    shifted = list(zip(golds[1:101], golds[:100]))  # each answer vs a different problem's
    shifted = [(p, g) for p, g in shifted if p.replace(" ", "") != g.replace(" ", "")]
    res3 = verify_batch([f"\\boxed{{{p}}}" for p, _ in shifted], [g for _, g in shifted])
    false_pos = [(p, g) for (p, g), r in zip(shifted, res3) if r.correct]
    print(f"MATH-500 mismatched pairs accepted: {len(false_pos)}/{len(shifted)} {false_pos}")
    assert len(false_pos) <= 0.03 * len(shifted)
