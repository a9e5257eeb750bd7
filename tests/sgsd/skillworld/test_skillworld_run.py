"""One real SGSD step on the skill world (``--dataset skillworld --skill-bank skillworld``)
with the paper's ablations on, an evaluation of the held-out split, and the runner's
table and interval arithmetic."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from tests.sgsd.test_train_run import FAST, metrics, run_train

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "benchmarks"))
import skillworld as runner  # noqa: E402 (benchmarks/ is not a package)

pytest.importorskip("transformers")


@pytest.mark.slow
def test_one_ablated_sgsd_step_on_the_world(tmp_path):
    out = tmp_path / "run"
    ablations = ["--polarity", "false", "--token-mask", "false", "--clip-delta", "inf"]
    world = ["--dataset", "skillworld", "--skill-bank", "skillworld"]
    evaluation = ["--eval-every", "1", "--eval-datasets", "skillworld", "--eval-limit", "4"]
    run_train(
        [*FAST, *world, *ablations, *evaluation, "--eval-n", "1", "--eval-max-tokens", "12"]
        + ["--max-steps", "1", "--output-dir", str(out)]
    )
    (row,) = metrics(out)
    assert row["teachers_per_rollout"] == 2
    assert row["teacher_helpful_frac"] == 1.0  # polarity off: ρ = +1
    assert row["gap_clipped_frac"] == 0.0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["dataset"] == "skillworld" and saved["skill_bank"] == "skillworld"
    assert (saved["polarity"], saved["token_mask"], saved["clip_delta"]) == (False, False, math.inf)
    (record,) = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    samples = [
        json.loads(x) for x in (out / "eval_samples/step_000001.jsonl").read_text().splitlines()
    ]
    assert len(samples) == 4 and {s["dataset"] for s in samples} == {"skillworld"}
    assert {"problem_id", "answer", "completion", "predicted", "reward"} <= set(samples[0])
    assert record["mean_avg"] == sum(s["reward"] > 0 for s in samples) / 4


def test_the_table_gives_means_and_t_intervals(tmp_path):
    rows = [{"arm": "warm_start", "seed": s, "step": 0, "accuracy": 0.2} for s in range(3)] + [
        {"arm": "sgsd", "seed": s, "step": step, "accuracy": acc}
        for s, accs in enumerate([(0.3, 0.5), (0.4, 0.4), (0.2, 0.6)])
        for step, acc in zip((5, 10), accs)
    ]
    head = {"plain": 0.2, "right_skill": 0.9, "misleading_skill": 0.1}
    text = runner.write_table(rows, head, tmp_path / "t.md")
    mean, half = runner._interval([0.5, 0.4, 0.6])
    assert mean == pytest.approx(0.5) and half == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    # final 50 ± t·s/√3, best the same, mean over evaluations (0.4, 0.4, 0.4) = 40 ± 0
    assert (
        f"| sgsd | 50.0 ± {100 * half:.1f} | 50.0 ± {100 * half:.1f} | 40.0 ± 0.0 | 30.0 ± " in text
    )
    assert "| warm_start | 20.0 ± 0.0 |" in text and "10 steps x 8 problems" in text
    runner.plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_report_only_rewrites_the_table_from_the_files(tmp_path):
    (tmp_path / "skillworld.csv").write_text(
        "arm,seed,step,accuracy,pass_at_n\nwarm_start,0,0,0.5,0.5\nsgsd,0,5,0.75,0.8\n"
    )
    head = {"plain": 0.5, "right_skill": 1.0, "misleading_skill": 0.4}
    (tmp_path / "headroom.json").write_text(json.dumps(head))
    assert runner.main(["--out", str(tmp_path), "--report-only"]) == 0
    assert "| sgsd | 75.0 | 75.0 | 75.0 | 25.0 |" in (tmp_path / "skillworld.md").read_text()
    assert (tmp_path / "skillworld.png").is_file()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--arms", "sgsd,nope"], "unknown arm(s) nope"),
        (["--steps", "0"], "--steps must be >= 1"),
    ],
)
def test_runner_bad_arguments(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        runner._args(["--out", str(tmp_path), *argv])
    assert message in capsys.readouterr().err
