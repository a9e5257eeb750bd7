"""Which problems a run trains on, and in which order.

:func:`load_problem_set` keeps the problems whose rendered student prompt fits
``max_prompt_tokens``; :class:`ProblemSampler` fixes the order in which steps take them
(the position in that order is the data state a checkpoint keeps).
"""

from __future__ import annotations

import logging

import torch

from sgsd import prompts
from sgsd.config import TrainConfig
from sgsd.data import load_problems

__all__ = ["ProblemSampler", "load_problem_set"]

log = logging.getLogger("sgsd.train")


def load_problem_set(cfg: TrainConfig, tokenizer, strategy, bank=None):
    """The problems whose rendered student prompt fits ``max_prompt_tokens``, and those
    prompts' token ids. The student prompt is the strategy's, or with ``student_skills``
    (the "+Skill" baselines) the top ``student_skills_k`` skills and mistakes from
    ``bank`` before the problem."""
    loaded = load_problems(
        cfg.dataset, split=cfg.dataset_split, answer_field=cfg.answer_field, limit=cfg.dataset_limit
    )
    problems, prompt_ids = [], []
    for p in loaded:
        if cfg.student_skills:
            messages = prompts.skill_guided_messages(p.problem, bank, cfg.student_skills_k)
        else:
            messages = strategy.student_messages(p)
        ids = prompts.render_prompt_ids(tokenizer, messages, enable_thinking=cfg.enable_thinking)
        if len(ids) <= cfg.max_prompt_tokens:
            problems.append(p)
            prompt_ids.append(ids)
    if skipped := len(loaded) - len(problems):
        log.warning(
            "skipped %d of %d problems: student prompt longer than max_prompt_tokens=%d",
            skipped,
            len(loaded),
            cfg.max_prompt_tokens,
        )
    if not problems:
        raise ValueError(
            f"no problem in {cfg.dataset!r} fits max_prompt_tokens={cfg.max_prompt_tokens}"
        )
    return problems, prompt_ids


class ProblemSampler:
    """Deterministic problem order: epoch e is a permutation of the problems seeded by
    (seed, e); every step takes the next ``problems_per_step`` of the global stream and
    rank r takes its contiguous share. The position in the stream is the data state."""

    def __init__(self, num_problems: int, seed: int):
        self.n = num_problems
        self.seed = seed

    def _epoch(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, position: int, count: int) -> list[int]:
        out = []
        while len(out) < count:
            epoch, offset = divmod(position + len(out), self.n)
            order = self._epoch(epoch)
            out.extend(order[offset : offset + count - len(out)])
        return out
