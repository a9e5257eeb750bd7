"""Skill world: digit operations whose rule decides the answer (docs/skillworld.md).

Each problem names one operation and a short digit string::

    Apply the operation "complement" to the digits 38417.      answer: 61582

The rules are ones a two-layer model can carry out token by token (the tiny tokenizer
splits digits one by one, as Qwen's does): a fixed map of each digit, or a fixed
rearrangement of the positions. Every rule is stated in words by the world's skill bank
(:mod:`sgsd.skillworld.bank`); the answer is checked by the project's verifier from
``\\boxed{}``.

Problems are generated from a seed: for each operation, distinct digit strings of
:data:`LENGTHS` digits, dealt to the ``train`` and ``test`` splits without overlap, so
no held-out (operation, digits) pair is ever trained on.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "LENGTHS",
    "OPERATIONS",
    "SPLIT_SIZES",
    "Operation",
    "apply_rule",
    "problem_text",
    "problems",
]


@dataclass(frozen=True)
class Operation:
    """An operation: its name (what a problem says), its rule in words (what a skill
    says) and the rule itself."""

    name: str
    rule: str
    apply: Callable[[str], str]


def _each(f: Callable[[int], int]) -> Callable[[str], str]:
    return lambda digits: "".join(str(f(int(d)) % 10) for d in digits)


#: The operations, in bank order: two digit maps and two rearrangements of positions. The
#: output has as many digits as the input, and each output digit depends on one input
#: digit at a fixed position, which a two-layer model learns in a minute on a CPU.
OPERATIONS: tuple[Operation, ...] = (
    Operation("increment", "add one to every digit, 9 becomes 0", _each(lambda d: d + 1)),
    Operation("complement", "replace every digit d by nine minus d", _each(lambda d: 9 - d)),
    Operation("rotate", "move the first digit to the end", lambda s: s[1:] + s[:1]),
    Operation("swap", "exchange the first and the last digit", lambda s: s[-1] + s[1:-1] + s[0]),
)
_BY_NAME = {op.name: op for op in OPERATIONS}

#: Digits per problem.
LENGTHS = (4,)
#: Problems per operation in each split.
SPLIT_SIZES = {"train": 200, "test": 24}


def apply_rule(name: str, digits: str) -> str:
    """The answer of operation ``name`` on ``digits``."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown operation {name!r}; known: {', '.join(_BY_NAME)}")
    if not digits.isdigit():
        raise ValueError(f"digits must be a non-empty string of 0-9, got {digits!r}")
    return _BY_NAME[name].apply(digits)


def problem_text(name: str, digits: str) -> str:
    return f'Apply the operation "{name}" to the digits {digits}.'


def problems(split: str | None = None, *, seed: int = 0) -> list[dict]:
    """The world's problems as rows ``{"id", "problem", "answer", "solution",
    "operation", "digits"}``: ``split`` is ``"train"``, ``"test"`` or None (both, train
    first). Deterministic in ``seed``; the splits never share an (operation, digits)
    pair. Rows interleave the operations, so any prefix covers all of them."""
    if split not in (None, *SPLIT_SIZES):
        raise ValueError(f"skillworld: no split {split!r} (splits: {', '.join(SPLIT_SIZES)})")
    rng = random.Random(f"skillworld-{seed}")
    dealt: dict[str, list[list[str]]] = {}
    for op in OPERATIONS:
        seen: set[str] = set()
        drawn: list[str] = []
        while len(drawn) < sum(SPLIT_SIZES.values()):
            n = rng.choice(LENGTHS)
            digits = "".join(rng.choice("0123456789") for _ in range(n))
            if digits not in seen:
                seen.add(digits)
                drawn.append(digits)
        cut = SPLIT_SIZES["train"]
        dealt[op.name] = [drawn[:cut], drawn[cut:]]
    rows = []
    for index, name in enumerate(SPLIT_SIZES):
        if split not in (None, name):
            continue
        for i in range(SPLIT_SIZES[name]):
            for op in OPERATIONS:
                digits = dealt[op.name][index][i]
                answer = op.apply(digits)
                rows.append(
                    {
                        "id": f"skillworld-{name}-{op.name}-{i:03d}",
                        "problem": problem_text(op.name, digits),
                        "answer": answer,
                        "solution": f"\\boxed{{{answer}}}",
                        "operation": op.name,
                        "digits": digits,
                    }
                )
    return rows
