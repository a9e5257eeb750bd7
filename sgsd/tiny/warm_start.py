"""A short supervised warm start for the tiny model, so that SGSD's decisions all occur.

A random-init tiny model never produces a correct boxed answer, so every SGSD reward is
-1, every teacher is "helpful" and none of the method's decisions (polarity, gating,
GRPO's advantages) is exercised. :func:`warm_start` fine-tunes the tiny model on the
worked solutions of the demo set's ``train`` split (never its ``test`` split, which
:mod:`sgsd.evaluate` scores): a chat-formatted prompt, then an empty thinking block and
the one-line solution ending in ``\\boxed{answer}``; the loss covers the assistant turn
only. The model learns the answer format and, for the simpler problem families, a guess
that is sometimes right (remainders, small roots, Pythagorean triples).

Two kinds of prompt, mixed in every batch (:data:`WARM_START` ``teacher_rows``):

* the plain student prompt (:func:`sft_examples`);
* an SGSD teacher context (:func:`teacher_sft_examples`): the problem after one of the
  guidance blocks (skill + mistake) that the trainer's teachers would retrieve for it
  from the bundled bank, built by the same code (:meth:`sgsd.skills.bank.SkillBank.teachers`,
  the tiny profile's K and the default retrieval and style), with the same solution.

Without the second kind the model has never seen a guidance block, so every teacher
context only lowers its token log-probs: every support score S (docs/design.md §3) is
negative, polarity follows the reward alone and "neutral" (|S| <= ε) never happens
(measured: mean raw support -2.3, no neutral teacher in 6 steps of the embedded run). With
it a teacher context costs the warmed model little on its own rollouts: many support
scores fall within ±ε, and helpful, harmful and neutral teachers all occur in the embedded
run (README, "Training"; ``tests/sgsd/tiny/test_warm_start.py``).

Measured (the default :data:`WARM_START`): 80 s on the shared 2-core dev box at load ≈ 2
(one thread); on the demo test split (58 problems, ``python -m sgsd.evaluate --model tiny
--datasets demo --n 8 --max-tokens 64 --backend hf``) avg@8 4.1% (95% CI [0.1, 8.1]),
pass@8 8.6%, 97.6% of samples boxed.

Deterministic: one intra-op thread (a fixed reduction order), a fixed example order
drawn from ``seed``, the caller's RNG state untouched. :mod:`sgsd.tiny.model` caches the
result on disk; its fingerprint includes :data:`WARM_START` and :func:`data_digest` (the
text of every example), so changing the recipe or the data retrains.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from functools import lru_cache

__all__ = [
    "WARM_START",
    "batch_loss",
    "data_digest",
    "encode_example",
    "one_thread",
    "supervised_steps",
    "sft_examples",
    "teacher_sft_examples",
    "warm_start",
]

#: Steps; rows per step (``batch_size`` student rows + ``teacher_rows`` teacher-context
#: rows); peak learning rate (AdamW, linear decay to 0 after a short warm-up).
WARM_START: dict = {"steps": 400, "batch_size": 16, "teacher_rows": 4, "lr": 3e-3, "warmup": 20}


def _teacher_k() -> int:
    from sgsd.config import TINY_PROFILE

    return int(TINY_PROFILE["num_teachers"])


def _example_texts() -> list[tuple[str, list[str], str]]:
    """``(student text, [teacher texts], solution)`` per demo ``train`` problem (strings
    only: no tokenizer), in split order."""
    from sgsd import prompts
    from sgsd.config import TrainConfig
    from sgsd.data import load_problems
    from sgsd.skills.bank import SkillBank

    cfg = TrainConfig()
    bank = SkillBank.default()
    out = []
    for p in load_problems("demo", split="train"):
        specs = bank.teachers(
            p.problem, _teacher_k(), mode=cfg.retrieval_mode, style=cfg.teacher_style
        )
        out.append((prompts.student_text(p), [s.context for s in specs], p.solution))
    return out


@lru_cache(maxsize=1)
def data_digest() -> str:
    """SHA-256 of every warm-start prompt and target text (part of the cache key)."""
    h = hashlib.sha256()
    for student, teachers, solution in _example_texts():
        for text in (student, *teachers, solution):
            h.update(text.encode("utf-8"))
            h.update(b"\0")
    return h.hexdigest()


def encode_example(tokenizer, user_text: str, solution: str, what: str) -> tuple[list[int], int]:
    """``(token ids, prompt length)`` of one supervised row: the user turn rendered as the
    trainer renders prompts (thinking on), then the assistant turn ``solution``. ``what``
    names the row in the error raised if the template breaks the prefix property."""
    from sgsd import prompts

    user = [{"role": "user", "content": user_text}]
    prompt = prompts.render_prompt_ids(tokenizer, user, enable_thinking=True)
    text = tokenizer.apply_chat_template(
        [*user, {"role": "assistant", "content": solution}], tokenize=False
    )
    ids = tokenizer.encode(text.rstrip("\n"), add_special_tokens=False)
    if ids[: len(prompt)] != prompt:  # the chat template's prefix property
        raise RuntimeError(f"{what}: the rendered prompt is not a prefix of the example")
    return ids, len(prompt)


def sft_examples(tokenizer) -> list[tuple[list[int], int]]:
    """``(token ids, prompt length)`` per demo ``train`` problem: student prompt (chat
    template, generation prompt, thinking on) followed by the assistant turn."""
    return [
        encode_example(tokenizer, student, solution, f"train problem {i}")
        for i, (student, _, solution) in enumerate(_example_texts())
    ]


def teacher_sft_examples(tokenizer) -> list[list[tuple[list[int], int]]]:
    """Per demo ``train`` problem, ``(token ids, prompt length)`` for each of its teacher
    contexts (the guidance-prefixed prompt the trainer's teachers score with) followed by
    the same assistant turn as in :func:`sft_examples`."""
    return [
        [
            encode_example(tokenizer, t, solution, f"train problem {i}, teacher {k}")
            for k, t in enumerate(teachers)
        ]
        for i, (_, teachers, solution) in enumerate(_example_texts())
    ]


@contextmanager
def one_thread():
    """One intra-op thread inside the block: a fixed reduction order, so a warm start gives
    the same weights on any machine with the same library versions."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def batch_loss(model, rows: list[tuple[list[int], int]], pad: int):
    """Summed next-token cross-entropy over the assistant tokens of ``rows`` and their
    count. The LM head runs only at those positions: the teacher prompts are ~6x longer
    than the completions, so full logits would be most of a step's cost."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    pos_rows, pos_cols, targets = [], [], []
    for row, (seq, start) in enumerate(rows):
        ids[row, : len(seq)] = torch.tensor(seq)
        attn[row, : len(seq)] = 1
        pos_rows += [row] * (len(seq) - start)
        pos_cols += range(start - 1, len(seq) - 1)
        targets += seq[start:]
    hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state
    logits = model.lm_head(hidden[torch.tensor(pos_rows), torch.tensor(pos_cols)])
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(targets), reduction="sum")
    return loss, len(targets)


def _settings(config: dict | None) -> dict:
    """:data:`WARM_START` updated with ``config``, checked."""
    unknown = sorted(set(config or {}) - set(WARM_START))
    if unknown:
        raise ValueError(f"unknown warm-start setting(s) {unknown}; known: {sorted(WARM_START)}")
    cfg = {**WARM_START, **(config or {})}
    for key, low in (("steps", 1), ("batch_size", 1), ("teacher_rows", 0), ("warmup", 0)):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < low:
            raise ValueError(f"warm-start {key} must be an int >= {low}, got {cfg[key]!r}")
    if not (isinstance(cfg["lr"], (int, float)) and 0 < cfg["lr"] < float("inf")):
        raise ValueError(f"warm-start lr must be a finite number > 0, got {cfg['lr']!r}")
    return cfg


def _progress(steps: int, what: str):
    """The warm start's steps, with a log line first and a bar on a terminal."""
    import logging
    import sys

    logging.getLogger(__name__).info(
        "warm-starting %s: %d supervised steps (once: the result is cached)", what, steps
    )
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety; the train extra brings tqdm
        return range(steps)
    return tqdm(range(steps), desc="warm start", disable=not sys.stderr.isatty())


def supervised_steps(model, pad: int, settings: dict, batches, *, seed: int, what: str) -> float:
    """The warm starts' loop: ``settings["steps"]`` AdamW steps at ``settings["lr"]``
    (linear warm-up over ``settings["warmup"]`` steps, then linear decay to 0), gradients
    clipped at 1; ``batches(step)`` gives the step's groups of ``(ids, prompt length)``
    rows, one forward each (short rows are not padded to long ones), and the step's loss
    is the mean over all their assistant tokens. One thread, ``seed`` set and the caller's
    RNG untouched. Returns the mean loss of the last 20 steps; the model ends in eval
    mode."""
    import torch

    steps, warmup = settings["steps"], settings["warmup"]
    losses: list[float] = []
    with torch.random.fork_rng(devices=[]), one_thread():
        torch.manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=0.0)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, 1.0 - (step - warmup) / max(1, steps - warmup))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        model.train()
        for step in _progress(steps, what):
            parts = [batch_loss(model, rows, pad) for rows in batches(step) if rows]
            loss = sum(p[0] for p in parts) / sum(p[1] for p in parts)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        model.eval()
    tail = losses[-20:]
    return sum(tail) / len(tail)


def warm_start(model, tokenizer, *, seed: int = 0, config: dict | None = None) -> float:
    """Fine-tune ``model`` in place (see the module docstring); returns the mean loss per
    assistant token of the last 20 steps. Leaves the model in eval mode."""
    import torch

    cfg = _settings(config)
    student = sft_examples(tokenizer)
    teacher = [row for rows in teacher_sft_examples(tokenizer) for row in rows]
    orders: dict[str, list[int]] = {"student": [], "teacher": []}

    def draw(kind: str, pool: list, n: int) -> list:
        order = orders[kind]
        while len(order) < n:  # epochs of fresh permutations
            order += torch.randperm(len(pool)).tolist()
        picked = [pool[i] for i in order[:n]]
        del order[:n]
        return picked

    def batches(step: int) -> list:  # student rows, teacher rows
        return [
            draw("student", student, cfg["batch_size"]),
            draw("teacher", teacher, cfg["teacher_rows"]),
        ]

    return supervised_steps(
        model, tokenizer.pad_token_id, cfg, batches, seed=seed, what="the tiny model"
    )
