"""The optimizer (AdamW over the trainable parameters) and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from sgsd.config import TrainConfig

__all__ = ["build_optimizer", "build_scheduler"]


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay
    )


def build_scheduler(cfg: TrainConfig, optimizer):
    """Linear warm-up over ``warmup_steps``, then ``lr_schedule`` (cosine, linear to 0 at
    ``max_steps``, or constant); one scheduler step per trainer step."""

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
