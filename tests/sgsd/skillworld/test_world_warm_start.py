"""The skill world's warm-start data (sgsd.skillworld.warm_start): teacher rows are the
trainer's teacher prompts answered by the rule their skill states, plain rows teach only
the TAUGHT operations, and the unsure rows keep each digit right with the set probability.
(The warm start itself is run by benchmarks/skillworld.py, not by the tests: minutes.)"""

from __future__ import annotations

import random

import pytest

pytest.importorskip("transformers")

from sgsd import prompts  # noqa: E402 (after the importorskip)
from sgsd.skills.bank import SkillBank  # noqa: E402
from sgsd.skillworld import tasks  # noqa: E402
from sgsd.skillworld import warm_start as W  # noqa: E402
from sgsd.skillworld.bank import skill_rules  # noqa: E402


@pytest.fixture(scope="module")
def rows(tiny_tokenizer):
    return W.examples(tiny_tokenizer)


def _answer(tokenizer, ids, start) -> str:
    text = tokenizer.decode(ids[start:], skip_special_tokens=True)
    return text.split("\\boxed{")[1].split("}")[0]


def test_teacher_rows_follow_the_skill_they_read(tiny_tokenizer, rows):
    _, _, teacher = rows
    train = tasks.problems("train")
    k = W.WARM_START["num_teachers"]
    assert len(teacher) == k * len(train)
    bank = SkillBank.load("skillworld")
    rules = skill_rules()
    for i in (0, 1, 2, 3, 101):  # every operation, both teachers
        p = train[i]
        specs = bank.teachers(p["problem"], k)
        for spec, (ids, start, positions) in zip(specs, teacher[k * i : k * (i + 1)]):
            assert positions is None
            prompt = prompts.render_prompt_ids(
                tiny_tokenizer, [{"role": "user", "content": spec.context}], enable_thinking=True
            )
            # the trainer's teacher prompt, token for token (teachers think, as published)
            assert ids[:start] == prompt
            want = tasks.apply_rule(rules[spec.skill_id], p["digits"])
            assert _answer(tiny_tokenizer, ids, start) == want


def test_plain_rows_teach_only_the_taught_operations(tiny_tokenizer, rows):
    plain, unsure, _ = rows
    train = tasks.problems("train")
    taught = [p for p in train if p["operation"] in W.TAUGHT]
    others = [p for p in train if p["operation"] not in W.TAUGHT]
    assert len(plain) == len(taught) and len(unsure) == len(others)
    assert set(W.TAUGHT) < {op.name for op in tasks.OPERATIONS}
    for p, (ids, start, positions) in zip(taught, plain):
        assert positions is None and _answer(tiny_tokenizer, ids, start) == p["answer"]
    for p, (ids, _, positions) in zip(others, unsure):
        assert [tiny_tokenizer.decode([ids[i]]) for i in positions] == list(p["answer"])


@pytest.mark.parametrize("keep", [0.0, 0.4, 1.0])
def test_unsure_rows_keep_each_digit_with_the_set_probability(tiny_tokenizer, rows, keep):
    _, unsure, _ = rows
    digits = [tiny_tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    rng = random.Random(0)
    kept = total = 0
    for _ in range(20):
        for (ids, start, positions), (new, new_start) in zip(
            unsure[:50], W._redraw(unsure[:50], rng, digits, keep)
        ):
            assert new_start == start and len(new) == len(ids)
            assert [a for i, a in enumerate(ids) if i not in positions] == [
                b for i, b in enumerate(new) if i not in positions
            ]
            kept += sum(new[i] == ids[i] for i in positions)
            total += len(positions)
    # a redrawn digit is right one time in ten by chance
    assert kept / total == pytest.approx(keep + (1 - keep) / 10, abs=0.03)
