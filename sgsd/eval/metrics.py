"""Evaluation metrics over graded samples: avg@n (with a 95% interval), pass@n, maj@n.

Input is a list of sample rows, one per (problem, sample), each a mapping with at least
``dataset``, ``problem_id``, ``predicted`` (the extracted final answer or ``None``) and
``reward`` (+1 correct / -1 wrong) -- the rows :mod:`sgsd.evaluate` writes to
``samples.jsonl``. Definitions, per dataset with P problems and n samples each:

* **avg@n** -- mean over problems of (correct samples / n): the expected accuracy of one
  sample. Its 95% interval is ``avg ± 1.96 · sd / sqrt(P)``, sd = the sample standard
  deviation of the per-problem accuracies (ddof 1): the uncertainty from the finite
  problem set *and* the finite n, treating problems as the independent units; clipped to
  [0, 1]. ``None`` when P < 2 (no spread to estimate).
* **pass@n** -- fraction of problems with at least one correct sample.
* **maj@n** -- fraction of problems whose majority answer is correct. The majority answer
  is the most frequent ``predicted`` string (whitespace-stripped) among samples that have
  one; a tie goes to the answer that appears first in sample order. It is correct when
  its samples are correct (all samples with the same extracted answer get the same
  grade, since grading is a function of (answer, gold)). A problem with no extracted
  answer at all counts as wrong.

Across datasets each metric is the unweighted mean over datasets (as the paper averages
AIME24, AIME25 and HMMT25).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["Z_95", "dataset_metrics", "majority_answer", "summarize", "summary_markdown"]

#: Two-sided 95% normal quantile.
Z_95 = 1.959963984540054

_REQUIRED = ("dataset", "problem_id", "predicted", "reward")


def majority_answer(predicted: Sequence[str | None]) -> int | None:
    """Index of the first sample carrying the majority answer, or ``None`` if no sample
    has an extracted answer. Ties go to the answer seen first."""
    keys = [p.strip() if isinstance(p, str) else None for p in predicted]
    counts = Counter(k for k in keys if k)
    if not counts:
        return None
    best = max(counts.values())
    for i, k in enumerate(keys):
        if k and counts[k] == best:
            return i
    return None  # pragma: no cover - the loop always finds the maximum


def _check_rows(rows: Sequence[Mapping]) -> None:
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping):
            raise TypeError(f"sample row {i} is not a mapping (got {type(r).__name__})")
        missing = [k for k in _REQUIRED if k not in r]
        if missing:
            raise ValueError(f"sample row {i} lacks key(s) {', '.join(missing)}")
        reward = r["reward"]
        if isinstance(reward, bool) or not isinstance(reward, (int, float)):
            raise TypeError(f"sample row {i}: reward must be a number, got {reward!r}")


def dataset_metrics(rows: Sequence[Mapping]) -> dict:
    """Metrics of one dataset's rows (see the module docstring).

    Returns ``{"problems", "n", "samples", "avg", "avg_ci95", "pass", "maj",
    "format_rate"}``; ``avg_ci95`` is ``[low, high]`` or ``None``. Every problem must have
    the same number of samples.
    """
    rows = list(rows)
    _check_rows(rows)
    if not rows:
        raise ValueError("no samples to score")
    groups: dict[str, list[Mapping]] = {}
    for r in rows:
        groups.setdefault(str(r["problem_id"]), []).append(r)
    sizes = {len(g) for g in groups.values()}
    if len(sizes) != 1:
        raise ValueError(f"problems have different sample counts ({sorted(sizes)})")
    (n,) = sizes
    accs, passes, majs = [], [], []
    for group in groups.values():
        correct = [float(r["reward"]) > 0 for r in group]
        accs.append(sum(correct) / n)
        passes.append(any(correct))
        i = majority_answer([r["predicted"] for r in group])
        majs.append(i is not None and correct[i])
    p = len(accs)
    avg = sum(accs) / p
    ci = None
    if p >= 2:
        sd = math.sqrt(sum((a - avg) ** 2 for a in accs) / (p - 1))
        half = Z_95 * sd / math.sqrt(p)
        ci = [max(0.0, avg - half), min(1.0, avg + half)]
    formatted = sum(1 for r in rows if isinstance(r["predicted"], str) and r["predicted"].strip())
    return {
        "problems": p,
        "n": n,
        "samples": len(rows),
        "avg": avg,
        "avg_ci95": ci,
        "pass": sum(passes) / p,
        "maj": sum(majs) / p,
        "format_rate": formatted / len(rows),
    }


def summarize(rows: Iterable[Mapping], datasets: Sequence[str] | None = None) -> dict:
    """``{"datasets": {name: dataset_metrics}, "mean": {"avg", "pass", "maj"}}``.

    ``datasets`` fixes the order (default: first appearance in ``rows``); each named
    dataset must have rows.
    """
    rows = list(rows)
    _check_rows(rows)
    by_name: dict[str, list[Mapping]] = {}
    for r in rows:
        by_name.setdefault(str(r["dataset"]), []).append(r)
    names = list(datasets) if datasets is not None else list(by_name)
    missing = [d for d in names if d not in by_name]
    if missing:
        raise ValueError(f"no samples for dataset(s) {', '.join(missing)}")
    per = {d: dataset_metrics(by_name[d]) for d in names}
    mean = {
        k: (sum(m[k] for m in per.values()) / len(per) if per else float("nan"))
        for k in ("avg", "pass", "maj")
    }
    return {"datasets": per, "mean": mean}


def summary_markdown(summary: Mapping, *, title: str = "Evaluation") -> str:
    """A Markdown table of :func:`summarize`'s output (percentages, one row per dataset)."""

    def pct(x: float) -> str:
        return f"{100 * x:.1f}"

    lines = [
        f"# {title}",
        "",
        "| dataset | problems | n | avg@n (%) | 95% CI | pass@n (%) | maj@n (%) | boxed (%) |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for name, m in summary["datasets"].items():
        ci = m["avg_ci95"]
        ci_text = f"[{pct(ci[0])}, {pct(ci[1])}]" if ci else "n/a"
        lines.append(
            f"| {name} | {m['problems']} | {m['n']} | {pct(m['avg'])} | {ci_text} | "
            f"{pct(m['pass'])} | {pct(m['maj'])} | {pct(m['format_rate'])} |"
        )
    mean = summary["mean"]
    lines.append(
        f"| **mean** | | | {pct(mean['avg'])} | | {pct(mean['pass'])} | {pct(mean['maj'])} | |"
    )
    lines += [
        "",
        "avg@n: mean over problems of the fraction of correct samples; 95% CI: "
        "avg ± 1.96·sd/√P over per-problem accuracies. pass@n: at least one sample correct. "
        "maj@n: the most frequent extracted answer (ties: first seen) is correct. "
        "mean: unweighted over datasets.",
        "",
    ]
    return "\n".join(lines)
