"""sgsd.eval.metrics: avg@n / CI / pass@n / maj@n against hand counts and an independent
recomputation, and the messages for bad rows."""

from __future__ import annotations

import math
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sgsd.eval.metrics import dataset_metrics, majority_answer, summarize, summary_markdown


def _row(ds, pid, pred, reward):
    return {"dataset": ds, "problem_id": pid, "predicted": pred, "reward": reward}


def test_hand_counted_example():
    rows = [
        # p1: 2/3 correct, majority "5" (correct)
        _row("a", "p1", "5", 1.0),
        _row("a", "p1", "5", 1.0),
        _row("a", "p1", "7", -1.0),
        # p2: 1/3 correct, majority "2" (wrong) -> pass but not maj
        _row("a", "p2", "2", -1.0),
        _row("a", "p2", "3", 1.0),
        _row("a", "p2", " 2 ", -1.0),
        # p3: nothing extracted -> wrong everywhere
        _row("a", "p3", None, -1.0),
        _row("a", "p3", None, -1.0),
        _row("a", "p3", None, -1.0),
    ]
    m = dataset_metrics(rows)
    accs = [2 / 3, 1 / 3, 0.0]
    avg = sum(accs) / 3
    sd = math.sqrt(sum((a - avg) ** 2 for a in accs) / 2)
    z = statistics.NormalDist().inv_cdf(0.975)
    assert m["problems"] == 3 and m["n"] == 3 and m["samples"] == 9
    assert m["avg"] == pytest.approx(avg)
    want = [max(0.0, avg - z * sd / 3**0.5), min(1.0, avg + z * sd / 3**0.5)]  # clipped
    assert want[0] == 0.0 and m["avg_ci95"] == pytest.approx(want, rel=1e-9)
    assert m["pass"] == pytest.approx(2 / 3)
    assert m["maj"] == pytest.approx(1 / 3)
    assert m["format_rate"] == pytest.approx(6 / 9)


def test_majority_tie_goes_to_first_seen_and_none_when_nothing_extracted():
    assert majority_answer(["3", "4", "4", "3"]) == 0
    assert majority_answer([None, "4", "3", "3"]) == 2
    assert majority_answer([None, "", "  "]) is None
    assert majority_answer([]) is None


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("problems", [1, 3, 7])
def test_summary_equals_independent_recomputation(n, problems):
    rng = random.Random(n * 100 + problems)
    rows = []
    for ds in ("x", "y"):
        for p in range(problems):
            for _ in range(n):
                pred = rng.choice([None, "1", "2", "3"])
                rows.append(_row(ds, f"{ds}{p}", pred, 1.0 if pred == "2" else -1.0))
    rng.shuffle(rows)  # order of rows across problems must not matter
    s = summarize(rows, ["x", "y"])
    for ds in ("x", "y"):
        mine = [r for r in rows if r["dataset"] == ds]
        ids = sorted({r["problem_id"] for r in mine})
        per = {i: [r for r in mine if r["problem_id"] == i] for i in ids}
        acc = [sum(r["reward"] > 0 for r in g) / n for g in per.values()]
        assert s["datasets"][ds]["avg"] == pytest.approx(sum(acc) / len(acc))
        assert s["datasets"][ds]["pass"] == pytest.approx(
            sum(any(r["reward"] > 0 for r in g) for g in per.values()) / len(per)
        )
        if problems == 1:
            assert s["datasets"][ds]["avg_ci95"] is None
    for k in ("avg", "pass", "maj"):
        assert s["mean"][k] == pytest.approx((s["datasets"]["x"][k] + s["datasets"]["y"][k]) / 2)
    md = summary_markdown(s)
    assert "| x |" in md and "| **mean** |" in md


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(st.sampled_from([None, "a", "b", "c"]), min_size=3, max_size=3),
        min_size=2,
        max_size=6,
    )
)
def test_maj_matches_counter_rule(groups):
    rows = [
        _row("d", f"p{i}", pred, 1.0 if pred == "a" else -1.0)
        for i, g in enumerate(groups)
        for pred in g
    ]
    want = 0
    for g in groups:
        seen = [p for p in g if p]
        if seen:
            top = max(seen.count(p) for p in seen)
            winner = next(p for p in seen if seen.count(p) == top)
            want += winner == "a"
    assert dataset_metrics(rows)["maj"] == pytest.approx(want / len(groups))
    lo, hi = dataset_metrics(rows)["avg_ci95"]
    assert 0.0 <= lo <= dataset_metrics(rows)["avg"] <= hi <= 1.0


@pytest.mark.parametrize(
    "rows, exc, msg",
    [
        ([], ValueError, "no samples to score"),
        ([["x"]], TypeError, "sample row 0 is not a mapping"),
        ([{"dataset": "a", "problem_id": 1}], ValueError, "lacks key(s) predicted, reward"),
        ([_row("a", 1, "1", "yes")], TypeError, "reward must be a number"),
        ([_row("a", 1, "1", True)], TypeError, "reward must be a number"),
        (
            [_row("a", 1, "1", 1.0), _row("a", 1, "1", 1.0), _row("a", 2, "1", 1.0)],
            ValueError,
            "different sample counts",
        ),
    ],
)
def test_bad_rows_are_named(rows, exc, msg):
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)")):
        dataset_metrics(rows)


def test_summarize_missing_dataset_is_named():
    with pytest.raises(ValueError, match="no samples for dataset"):
        summarize([_row("a", 1, "1", 1.0)], ["a", "b"])
