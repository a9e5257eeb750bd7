"""Evaluation during training: the rollout engine the trainer already has, evaluation
sampling settings swapped in for the call, avg@n / pass@n / maj@n per set (sgsd.evaluate).

Every ``eval_every`` steps (and at the last step) each rank samples its share of the
evaluation problems (problem ``i`` goes to rank ``i mod world_size``) with the weights
just pushed into its engine, the rows are gathered on rank 0, and rank 0 appends one
record to ``OUTPUT/eval.jsonl``::

    {"step": 25, "mean_avg": ..., "mean_pass": ..., "mean_maj": ...,
     "datasets": {name: dataset_metrics}, "best_step": 25, "best_mean_avg": ...}

and logs ``eval/<set>/avg`` etc. to TensorBoard / W&B. The graded samples of each
evaluation go to ``OUTPUT/eval_samples/step_NNNNNN.jsonl`` (the rows of ``sgsd.evaluate``'s
``samples.jsonl``), so any number can be regraded. The best step is the one with the
highest mean avg@n (the earliest on ties). The trainer checkpoints every evaluated step
and never prunes those checkpoints (:attr:`TrainingEval.protected`). A resumed run reads
eval.jsonl back (dropping records after the resume step), so the best step and the
protected set survive restarts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from sgsd import prompts
from sgsd.engine.rollout import SamplingConfig
from sgsd.eval.evaluator import (
    evaluate_problems,
    load_eval_sets,
    problem_messages,
    sampling_swapped,
)
from sgsd.eval.metrics import summarize

__all__ = ["EVAL_SEED_OFFSET", "TrainingEval"]

#: Evaluation sampling seeds use steps ``EVAL_SEED_OFFSET * step + chunk``, far from the
#: training steps' seeds.
EVAL_SEED_OFFSET = 1_000_000


class TrainingEval:
    def __init__(
        self, cfg, tokenizer, out_dir: Path, *, rank: int, world_size: int, resume_step: int
    ):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.rank, self.world_size = rank, world_size
        self.path = Path(out_dir) / "eval.jsonl"
        self.enabled = cfg.eval_every > 0
        self.records: list[dict] = []
        self.sets: dict = {}
        if not self.enabled:
            return
        names = [d.strip() for d in cfg.eval_datasets.split(",") if d.strip()]
        full = load_eval_sets(names, limit=cfg.eval_limit)
        self.names = list(full)
        self.sets = {k: v[rank::world_size] for k, v in full.items()}
        self.sampling = SamplingConfig(cfg.eval_temperature, 0.95, 0, cfg.eval_max_tokens)
        if self.path.is_file():  # read only: setup writes nothing (see start)
            for line in self.path.read_text().splitlines():
                if line.strip() and json.loads(line)["step"] <= resume_step:
                    self.records.append(json.loads(line))

    def start(self) -> None:
        """Once the run has started (rank 0): rewrite eval.jsonl without the records after
        the resumed step (a resumed run evaluates those steps again)."""
        if self.enabled and self.rank == 0 and (self.records or self.path.exists()):
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def max_model_len(self) -> int:
        """Longest evaluation prompt plus the evaluation completion cap (0 when off)."""
        if not self.enabled:
            return 0
        longest = max(
            len(
                prompts.render_prompt_ids(
                    self.tokenizer, problem_messages(p), enable_thinking=self.cfg.eval_thinking
                )
            )
            for ps in self.sets.values()
            for p in ps
        )
        return longest + self.cfg.eval_max_tokens

    def due(self, step: int) -> bool:
        return self.enabled and (step % self.cfg.eval_every == 0 or step == self.cfg.max_steps)

    @property
    def protected(self) -> frozenset[int]:
        return frozenset(r["step"] for r in self.records)

    @property
    def best(self) -> dict | None:
        return self.records[-1] if self.records else None

    def run(self, step: int, engine, logger=None) -> dict | None:
        """Evaluate with ``engine`` (weights already pushed); all ranks call it. Returns
        the record on rank 0, None elsewhere."""
        rows: list[dict] = []
        if any(self.sets.values()):
            local = {k: v for k, v in self.sets.items() if v}
            with sampling_swapped(engine, self.sampling):
                rows, _ = evaluate_problems(
                    engine,
                    self.tokenizer,
                    local,
                    self.cfg.eval_n,
                    enable_thinking=self.cfg.eval_thinking,
                    seed_step=EVAL_SEED_OFFSET * step,
                    verify_timeout_s=self.cfg.verify_timeout_s,
                    verify_memory_mb=self.cfg.verify_memory_mb,
                )
        if dist.is_available() and dist.is_initialized():
            gathered: list = [None] * self.world_size
            dist.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        summary = summarize(rows, self.names)
        prev = self.records[-1] if self.records else None
        mean = summary["mean"]
        better = prev is None or mean["avg"] > prev["best_mean_avg"]
        record = {
            "step": step,
            "mean_avg": mean["avg"],
            "mean_pass": mean["pass"],
            "mean_maj": mean["maj"],
            "datasets": summary["datasets"],
            "best_step": step if better else prev["best_step"],
            "best_mean_avg": mean["avg"] if better else prev["best_mean_avg"],
        }
        self.records.append(record)
        if self.rank != 0:
            return None
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        samples = self.path.parent / "eval_samples" / f"step_{step:06d}.jsonl"
        samples.parent.mkdir(exist_ok=True)
        samples.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        if logger is not None:
            scalars = {
                "eval/mean_avg": mean["avg"],
                "eval/mean_pass": mean["pass"],
                "eval/mean_maj": mean["maj"],
                "eval/best_mean_avg": record["best_mean_avg"],
            }
            for name, m in summary["datasets"].items():
                for k in ("avg", "pass", "maj"):
                    scalars[f"eval/{name}/{k}"] = m[k]
            if logger.tb is not None:
                for k, v in scalars.items():
                    logger.tb.add_scalar(k, v, step)
            if logger.wandb is not None:
                logger.wandb.log(scalars, step=step)
        return record
