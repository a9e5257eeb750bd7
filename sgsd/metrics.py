"""Training metrics: how loss metrics combine, the console line, metrics.jsonl and
samples.jsonl, optional TensorBoard / W&B."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
import torch.distributed as dist

from sgsd.config import TrainConfig

__all__ = [
    "LOSS_METRIC_NAMES",
    "MetricSums",
    "MetricsLogger",
    "format_line",
    "reduce_sums",
    "step_record",
]

#: Loss metrics averaged over rollouts (fractions of a rollout's positions, the student's
#: entropy, GRPO's ratio statistics); every other loss metric is an average over present
#: teachers (weight > 0).
PER_ROLLOUT = frozenset({"mask_keep_frac", "student_entropy", "clip_frac", "ratio_mean"})
#: Loss-metric keys that are not averages (the loss is logged from its own sum).
NOT_AVERAGED = frozenset({"loss", "teacher_rows"})


class MetricSums:
    """Loss metrics held as weighted sums, so that micro-batches and ranks combine by
    addition and divide once at the end. A metric in :data:`PER_ROLLOUT` is weighted by
    its micro-batch's rollouts, every other one by its present teachers.

    ``sums`` holds ``rollouts``, ``teachers`` and ``w_<metric>`` (the weighted sums).
    """

    def __init__(self, sums: dict[str, float] | None = None):
        self.sums = {"rollouts": 0.0, "teachers": 0.0, **(sums or {})}

    @staticmethod
    def weight_key(metric: str) -> str:
        return "rollouts" if metric in PER_ROLLOUT else "teachers"

    def add(self, metrics: dict[str, float], *, rollouts: int, teachers: int) -> None:
        if rollouts < 0 or teachers < 0:
            raise ValueError(f"counts must be >= 0, got rollouts={rollouts}, teachers={teachers}")
        counts = {"rollouts": rollouts, "teachers": teachers}
        for key, value in metrics.items():
            if key not in NOT_AVERAGED:
                w = counts[self.weight_key(key)]
                self.sums[f"w_{key}"] = self.sums.get(f"w_{key}", 0.0) + value * w
        self.sums["rollouts"] += rollouts
        self.sums["teachers"] += teachers

    @property
    def teachers(self) -> float:
        return self.sums["teachers"]

    def means(self) -> dict[str, float]:
        """Each metric's weighted mean (0 when nothing was counted)."""
        out = {}
        for key, value in self.sums.items():
            if key.startswith("w_"):
                w = self.sums[self.weight_key(key[2:])]
                out[key[2:]] = value / w if w else 0.0
        return out


def reduce_sums(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum each value over ranks."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


#: metrics.jsonl names of the loss metrics (sgsd_kernels' GatedKDOutput.metrics() keys);
#: a key not listed keeps its own name. docs/metrics.md says what each counts.
LOSS_METRIC_NAMES = {
    "helpful_frac": "teacher_helpful_frac",
    "harmful_frac": "teacher_harmful_frac",
    "neutral_frac": "teacher_neutral_frac",
    "clipped_frac": "gap_clipped_frac",
    "mask_keep_frac": "token_kept_frac",
    "mean_support": "teacher_support_mean",
}


def step_record(
    step: int,
    run_id: str,
    sums: dict[str, float],
    *,
    grad_norm: float,
    lr: float,
    step_time: float,
    rollout_time: float,
    update_time: float,
) -> dict:
    """One metrics.jsonl record from the step's sums over all ranks (``loss``, ``reward``,
    ``correct``, ``tokens`` and the :class:`MetricSums` keys). Every key is documented in
    docs/metrics.md; a new key goes there too."""
    n = sums["rollouts"]
    record = {
        "step": step,
        "run_id": run_id,
        "loss": sums["loss"] / n,
        "reward_mean": sums["reward"] / n,
        "correct_frac": sums["correct"] / n,
        "rollouts": int(n),
        "grad_norm": grad_norm,
        "lr": lr,
        "completion_tokens": int(sums["tokens"]),
        "completion_tokens_per_rollout": sums["tokens"] / n,
        "completion_tokens_per_s": sums["tokens"] / step_time,
        "step_time_s": step_time,
        "rollout_time_s": rollout_time,
        "update_time_s": update_time,
        "teachers_per_rollout": sums["teachers"] / n,
        "verify_resource_kills": int(sums["verify_resource_kills"]),
    }
    for key, value in MetricSums(sums).means().items():
        record[LOSS_METRIC_NAMES.get(key, key)] = value
    return record


def format_line(r: dict) -> str:
    help_harm = ""
    if "teacher_helpful_frac" in r:
        help_harm = (
            f"help/harm/neut {r['teacher_helpful_frac']:.2f}/{r['teacher_harmful_frac']:.2f}/"
            f"{r['teacher_neutral_frac']:.2f} | "
        )
    return (
        f"step {r['step']:>5} | loss {r['loss']:+.5f} | reward {r['reward_mean']:+.3f} | "
        f"{help_harm}gnorm {r['grad_norm']:.3g} | lr {r['lr']:.2e} | "
        f"{r['completion_tokens_per_s']:.0f} tok/s | {r['step_time_s']:.2f}s "
        f"(rollout {r['rollout_time_s']:.2f}s, update {r['update_time_s']:.2f}s)"
    )


class MetricsLogger:
    """Console line per step, metrics.jsonl, samples.jsonl, optional TensorBoard / W&B.
    Only rank 0 writes."""

    def __init__(self, cfg: TrainConfig, enabled: bool, resume_step: int):
        self.enabled = enabled
        self.out = Path(cfg.output_dir)
        self.tb = self.wandb = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "samples.jsonl"):
            _truncate_after(self.out / name, resume_step)
        if cfg.tensorboard:
            SummaryWriter = _optional("torch.utils.tensorboard", "tensorboard").SummaryWriter
            self.tb = SummaryWriter(str(self.out / "tb"))
        if cfg.wandb_project:
            wandb = _optional("wandb", "wandb")
            self.wandb = wandb.init(
                project=cfg.wandb_project, config=cfg.to_dict(), dir=str(self.out), resume="allow"
            )

    def step(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in numeric.items():
                self.tb.add_scalar(k, v, record["step"])
        if self.wandb is not None:
            self.wandb.log(numeric, step=record["step"])

    def samples(self, step: int, rollouts: list, tokenizer) -> str:
        """Append this rank's rollouts (:class:`sgsd.engine.scoring.Rollout`) to samples.jsonl;
        return one for the console."""
        if not self.enabled:
            return ""
        with open(self.out / "samples.jsonl", "a") as f:
            f.writelines(
                json.dumps(
                    {
                        "step": step,
                        "problem_id": r.problem.id,
                        "answer": r.problem.answer,
                        "predicted": r.predicted,
                        "reward": r.reward,
                        "completion": tokenizer.decode(r.completion_ids, skip_special_tokens=False),
                    }
                )
                + "\n"
                for r in rollouts
            )
        r = rollouts[0]
        text = tokenizer.decode(r.completion_ids, skip_special_tokens=True).strip()
        return (
            f"  sample [{r.problem.id}] reward={r.reward:+.0f} answer={r.problem.answer!r} "
            f"predicted={r.predicted!r}\n  | " + text[:300].replace("\n", "\n  | ")
        )

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _optional(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"this logging option needs `pip install {package}`") from e


def _truncate_after(path: Path, step: int) -> None:
    """Drop records of steps > ``step`` (a resumed run rewrites them)."""
    if not path.exists():
        return
    keep = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    path.write_text("".join(line + "\n" for line in keep))
