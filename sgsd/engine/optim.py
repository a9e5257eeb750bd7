"""The optimizer (AdamW over the trainable parameters) and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from sgsd.config import TrainConfig

__all__ = ["build_optimizer", "build_scheduler", "resume_schedule"]


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay
    )


def build_scheduler(cfg: TrainConfig, optimizer):
    """Linear warm-up over ``warmup_steps``, then ``lr_schedule`` (cosine, linear to 0 at
    ``max_steps``, or constant); one scheduler step per trainer step. The rate of a step
    is a function of (step, this run's ``max_steps``): see :func:`resume_schedule`."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))
        if cfg.lr_schedule == "linear":  # step 0 at the full rate, 0 after max_steps
            return max(0.0, 1.0 - (step - cfg.warmup_steps) / span)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def resume_schedule(scheduler) -> None:
    """After a checkpoint's scheduler state is loaded: set every parameter group's rate to
    what this run's schedule gives the next step. With the same ``max_steps`` that is the
    saved rate, bit for bit; after ``--max-steps`` was raised on resume, the remaining
    steps follow the new schedule from where the run stands (the saved rate was computed
    for the old end, e.g. 0 for a linear schedule that had finished)."""
    step = scheduler.last_epoch
    rates = [base * f(step) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = lr
    scheduler._last_lr = rates
