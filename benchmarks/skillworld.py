"""The skill world's experiment: every arm from the same warm start, at the same rollout
budget, scored on held-out problems (docs/skillworld.md).

    python benchmarks/skillworld.py --quick --out runs/skillworld-quick   # ~5 min, 2 cores
    python benchmarks/skillworld.py --out runs/skillworld                 # the full grid

1. Builds (once; cached) the tiny model warm-started on the world
   (:mod:`sgsd.skillworld.warm_start`) and measures its **headroom** on the held-out split:
   plain-prompt, right-skill-context and misleading-skill-context accuracy (avg@n at the
   evaluation temperature), written to ``OUT/headroom.json``. Training is refused when the
   right skill is not at least 30 points above the plain prompt (the world would have no
   room for a method to show anything).
2. Trains each arm with ``sgsd-train`` (``python -m sgsd.train``; HF rollouts, since a
   vLLM engine per run would cost more than the run) for ``--steps`` steps from that
   model, one seed at a time, evaluating held-out plain-prompt accuracy every
   ``--eval-every`` steps with the trainer's own evaluation (avg@n). The ``warm_start``
   arm is the evaluation of the model itself.
3. Writes ``OUT/skillworld.csv`` (``arm, seed, step, accuracy, pass_at_n``),
   ``OUT/<arm>/samples.jsonl`` (the final evaluation's graded samples of every seed, the
   keys of ``sgsd.evaluate``'s ``samples.jsonl`` plus ``seed``), ``OUT/skillworld.md``
   (final and best accuracy per arm: mean and 95 % t-interval over seeds) and
   ``OUT/skillworld.png`` (held-out accuracy against step, one line per arm with its
   interval).

Arms: ``warm_start``, ``sgsd``, ``grpo``, ``opsd``, ``sgsd_no_polarity``,
``sgsd_one_teacher``, ``sgsd_local_support`` (top-4 local support), ``sgsd_frozen_teacher``.
``--quick``: ``warm_start``, ``sgsd``, ``grpo``; one seed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

#: arm -> the trainer flags that make it (on top of :data:`COMMON`).
ARMS: dict[str, list[str]] = {
    "warm_start": [],
    "sgsd": ["--loss", "sgsd"],
    "grpo": ["--loss", "grpo"],
    "opsd": ["--loss", "opsd"],
    "sgsd_no_polarity": ["--loss", "sgsd", "--polarity", "false"],
    "sgsd_one_teacher": ["--loss", "sgsd", "--num-teachers", "1"],
    "sgsd_local_support": ["--loss", "sgsd", "--local-support-top-k", "4"],
    "sgsd_frozen_teacher": ["--loss", "sgsd", "--teacher", "frozen"],
}
QUICK_ARMS = ("warm_start", "sgsd", "grpo")

#: One budget for every arm: problems x rollouts per step, the sampling temperature, the
#: optimiser. GRPO keeps its published two optimisation passes over each step's rollouts.
COMMON = [
    "--dataset", "skillworld",
    "--skill-bank", "skillworld",
    "--problems-per-step", "8",
    "--rollouts-per-problem", "4",
    "--temperature", "1.0",
    "--top-p", "1.0",
    "--top-k", "0",
    "--num-teachers", "2",
    "--max-completion-tokens", "16",
    "--max-prompt-tokens", "512",
    "--enable-thinking", "true",
    "--finetune", "full",
    "--lr", "5e-4",
    "--max-grad-norm", "1.0",
    "--warmup-steps", "0",
    "--lr-schedule", "linear",
    "--micro-batch-size", "32",
    "--teacher-micro-batch-size", "32",
    "--gradient-checkpointing", "false",
    "--rollout-backend", "hf",
    "--skill-update-every", "0",
    "--checkpoint-every", "1000",
    "--eval-datasets", "skillworld",
    "--eval-temperature", "1.0",
    "--eval-thinking", "true",
    "--eval-max-tokens", "16",
    "--progress-bar", "false",
]  # fmt: skip
#: Minimum right-skill minus plain-prompt accuracy at step 0 for the world to be usable.
MIN_HEADROOM = 0.30
#: Two-sided 95 % Student-t quantiles by degrees of freedom (intervals over seeds).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--quick", action="store_true", help="warm start, SGSD, GRPO; one seed")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per arm (default 3; quick 1)")
    ap.add_argument("--steps", type=int, default=30, help="training steps per run")
    ap.add_argument("--eval-every", type=int, default=5, help="evaluate every N steps")
    ap.add_argument("--eval-n", type=int, default=4, help="samples per held-out problem")
    ap.add_argument("--arms", default=None, help="comma list of arms (default: all / quick)")
    ap.add_argument("--force", action="store_true", help="train even without headroom")
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite skillworld.md and skillworld.png from OUT's csv and headroom.json",
    )
    ap.add_argument(
        "--model",
        default=None,
        help="a warm-started world model directory (default: build or reuse the cached one)",
    )
    args = ap.parse_args(argv)
    args.seeds = args.seeds or (1 if args.quick else 3)
    arms = args.arms.split(",") if args.arms else list(QUICK_ARMS if args.quick else ARMS)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"unknown arm(s) {', '.join(unknown)}; known: {', '.join(ARMS)}")
    for name in ("seeds", "steps", "eval_every", "eval_n"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    args.arms = arms
    return args


def measure_headroom(model_dir: Path, n: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sgsd.skillworld.warm_start import headroom

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return headroom(model, tokenizer, n=n, temperature=1.0)


def _run(cmd: list[str], log_file: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    with open(log_file, "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if done.returncode != 0:
        tail = log_file.read_text().splitlines()[-15:]
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({log_file}):\n" + "\n".join(tail))


def evaluate_warm_start(model_dir: Path, out: Path, seed: int, n: int) -> list[dict]:
    """The warm-start arm: ``sgsd.evaluate`` on the held-out split (one record, step 0)."""
    cmd = [
        sys.executable, "-m", "sgsd.evaluate", "--model", str(model_dir),
        "--datasets", "skillworld", "--n", str(n), "--temperature", "1.0",
        "--top-p", "0.95", "--max-tokens", "16", "--backend", "hf", "--seed", str(seed),
        "--output", str(out),
    ]  # fmt: skip
    _run(cmd, out.parent / f"{out.name}.log")
    summary = json.loads((out / "summary.json").read_text())
    mean = summary["mean"]
    return [{"step": 0, "mean_avg": mean["avg"], "mean_pass": mean["pass"]}]


def train_arm(arm: str, model_dir: Path, out: Path, seed: int, args) -> list[dict]:
    cmd = [
        sys.executable, "-m", "sgsd.train", "--model", str(model_dir), *COMMON, *ARMS[arm],
        "--max-steps", str(args.steps), "--eval-every", str(args.eval_every),
        "--eval-n", str(args.eval_n), "--seed", str(seed), "--output-dir", str(out),
        "--overwrite",
    ]  # fmt: skip
    _run(cmd, out.parent / f"{out.name}.log")
    return [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines() if line]


def _interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t-interval (nan for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    t = _T95.get(len(values) - 1, 1.96)
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def _pct(mean: float, half: float) -> str:
    return f"{100 * mean:.1f}" + ("" if math.isnan(half) else f" ± {100 * half:.1f}")


def write_table(rows: list[dict], head: dict, path: Path) -> str:
    """The markdown table: per arm the final, best and mean-over-evaluations (the area
    under its curve) held-out accuracy, and the final gain over the warm start; each the
    mean over seeds with its 95 % t-interval."""
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    steps = max(r["step"] for r in rows)
    n_seeds = len({r["seed"] for r in rows})
    lines = [
        "# Skill world: held-out plain-prompt accuracy (avg@n, %)",
        "",
        f"Headroom at step 0 (held-out): plain {100 * head['plain']:.1f}, right skill "
        f"{100 * head['right_skill']:.1f}, misleading skill "
        f"{100 * head['misleading_skill']:.1f}.",
        f"{steps} steps x 8 problems x 4 rollouts per arm, {n_seeds} seed(s); mean ± 95 % "
        "t-interval over seeds.",
        "",
        "| arm | final | best | mean over evaluations | gain over warm start (final) |",
        "| --- | --- | --- | --- | --- |",
    ]
    base = (
        statistics.fmean(r["accuracy"] for r in rows if r["arm"] == "warm_start")
        if any(r["arm"] == "warm_start" for r in rows)
        else math.nan
    )
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        seeds = sorted({r["seed"] for r in mine})
        per_seed = [[r for r in mine if r["seed"] == s] for s in seeds]
        final = [max(rs, key=lambda r: r["step"])["accuracy"] for rs in per_seed]
        best = [max(r["accuracy"] for r in rs) for rs in per_seed]
        area = [statistics.fmean(r["accuracy"] for r in rs) for rs in per_seed]
        gain = _interval([f - base for f in final])
        lines.append(
            f"| {arm} | {_pct(*_interval(final))} | {_pct(*_interval(best))} | "
            f"{_pct(*_interval(area))} | {'—' if arm == 'warm_start' else _pct(*gain)} |"
        )
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    base = [r["accuracy"] for r in rows if r["arm"] == "warm_start"]
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        if arm == "warm_start":
            m, h = _interval(base)
            ax.axhline(100 * m, color="grey", ls="--", lw=1, label="warm start")
            if not math.isnan(h):
                ax.axhspan(100 * (m - h), 100 * (m + h), color="grey", alpha=0.15)
            continue
        steps = sorted({r["step"] for r in mine})
        stats = [_interval([r["accuracy"] for r in mine if r["step"] == s]) for s in steps]
        xs = [0, *steps] if base else steps
        ys = ([statistics.fmean(base)] if base else []) + [m for m, _ in stats]
        (line,) = ax.plot(xs, [100 * y for y in ys], marker="o", ms=3, label=arm)
        half = [0.0 if base else math.nan] * bool(base) + [h for _, h in stats]
        if not any(math.isnan(h) for h in half):
            ax.fill_between(
                xs,
                [100 * (y - h) for y, h in zip(ys, half)],
                [100 * (y + h) for y, h in zip(ys, half)],
                color=line.get_color(),
                alpha=0.15,
            )
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out plain-prompt accuracy (avg@n, %)")
    ax.set_title("Skill world: every arm from the same warm start")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(out: Path) -> int:
    """``--report-only``: the table and the plot again from a finished run's files."""
    with open(out / "skillworld.csv") as f:
        rows = [
            {**r, "seed": int(r["seed"]), "step": int(r["step"]), "accuracy": float(r["accuracy"])}
            for r in csv.DictReader(f)
        ]
    head = json.loads((out / "headroom.json").read_text())
    print(write_table(rows, head, out / "skillworld.md"))
    plot(rows, out / "skillworld.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    out = Path(args.out)
    if args.report_only:
        return report(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {msg}", flush=True)

    from sgsd.skillworld.warm_start import save_world_model

    if args.model:
        model_dir = Path(args.model)
    else:
        say("warm start: the tiny model on the skill world (cached after the first build)")
        model_dir = save_world_model()
    head = measure_headroom(model_dir, args.eval_n)
    (out / "headroom.json").write_text(json.dumps(head, indent=2) + "\n")
    say(
        f"headroom on the held-out split: plain {head['plain']:.1%}, right skill "
        f"{head['right_skill']:.1%}, misleading skill {head['misleading_skill']:.1%}"
    )
    if head["right_skill"] - head["plain"] < MIN_HEADROOM and not args.force:
        print(
            f"the right skill is less than {MIN_HEADROOM:.0%} above the plain prompt: the "
            "world has no room for a method to show anything (--force trains anyway)",
            file=sys.stderr,
        )
        return 1

    rows: list[dict] = []
    for seed in range(args.seeds):
        for arm in args.arms:
            run_dir = out / arm / f"seed{seed}"
            if run_dir.exists():
                shutil.rmtree(run_dir)
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            if arm == "warm_start":
                records = evaluate_warm_start(model_dir, run_dir, seed, args.eval_n)
                samples = run_dir / "samples.jsonl"
            else:
                records = train_arm(arm, model_dir, run_dir, seed, args)
                last = max(r["step"] for r in records)
                samples = run_dir / "eval_samples" / f"step_{last:06d}.jsonl"
            for r in records:
                rows.append(
                    {
                        "arm": arm,
                        "seed": seed,
                        "step": r["step"],
                        "accuracy": r["mean_avg"],
                        "pass_at_n": r["mean_pass"],
                    }
                )
            with open(out / arm / "samples.jsonl", "w" if seed == 0 else "a") as f:
                for line in samples.read_text().splitlines():
                    f.write(json.dumps({**json.loads(line), "seed": seed}) + "\n")
            last = rows[-1]
            say(f"{arm} seed {seed}: held-out {last['accuracy']:.1%} at step {last['step']}")

    with open(out / "skillworld.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["arm", "seed", "step", "accuracy", "pass_at_n"])
        writer.writeheader()
        writer.writerows(rows)
    print(write_table(rows, head, out / "skillworld.md"))
    plot(rows, out / "skillworld.png")
    say(f"written to {out}/: headroom.json, skillworld.csv, skillworld.md, skillworld.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
