"""sgsd.metrics.MetricSums: the one rule for combining loss metrics over micro-batches and
ranks (per-rollout metrics weighted by rollouts, the rest by present teachers)."""

from __future__ import annotations

import pytest

from sgsd.metrics import MetricSums


def test_teacher_and_rollout_weighted_means():
    sums = MetricSums()
    sums.add(
        {"helpful_frac": 1.0, "mask_keep_frac": 0.5, "loss": 9.0, "teacher_rows": 6.0},
        rollouts=2,
        teachers=6,
    )
    sums.add({"helpful_frac": 0.0, "mask_keep_frac": 1.0, "loss": 9.0}, rollouts=6, teachers=2)
    means = sums.means()
    assert means["helpful_frac"] == pytest.approx(6 / 8)  # by teachers: (1*6 + 0*2) / 8
    assert means["mask_keep_frac"] == pytest.approx((0.5 * 2 + 1.0 * 6) / 8)  # by rollouts
    assert "loss" not in means and "teacher_rows" not in means
    assert sums.teachers == 8 and sums.sums["rollouts"] == 8


@pytest.mark.parametrize("split", [1, 2, 3])
def test_sums_add_like_one_batch(split):
    """Adding the raw sums of two halves (what the cross-rank all-reduce does) gives the
    same means as accumulating everything in one object."""
    parts = [({"mean_support": 0.1 * i, "mask_keep_frac": 0.2 * i}, i + 1, i) for i in range(4)]
    whole, left, right = MetricSums(), MetricSums(), MetricSums()
    for i, (m, r, t) in enumerate(parts):
        whole.add(m, rollouts=r, teachers=t)
        (left if i < split else right).add(m, rollouts=r, teachers=t)
    combined = {k: left.sums.get(k, 0.0) + right.sums.get(k, 0.0) for k in whole.sums}
    assert MetricSums(combined).means() == pytest.approx(whole.means())


def test_no_teachers_gives_zero_not_nan():
    sums = MetricSums()
    sums.add({"helpful_frac": 0.0, "mask_keep_frac": 1.0}, rollouts=3, teachers=0)
    assert sums.means() == {"helpful_frac": 0.0, "mask_keep_frac": 1.0}


def test_negative_counts_are_rejected():
    with pytest.raises(ValueError, match="counts must be >= 0, got rollouts=1, teachers=-2"):
        MetricSums().add({"helpful_frac": 1.0}, rollouts=1, teachers=-2)
