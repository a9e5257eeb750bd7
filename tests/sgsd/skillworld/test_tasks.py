"""The skill world's generator and bank (sgsd.skillworld): every answer checked by a
second, independent implementation of each rule; disjoint, deterministic splits; a bank
in the published format whose items state rules, never answers."""

from __future__ import annotations

import json
import re
from collections import deque

import pytest

from sgsd.data import load_problems
from sgsd.skills.bank import SkillBank
from sgsd.skillworld import bank as world_bank
from sgsd.skillworld import tasks

pytest.importorskip("math_verify")


def _independent(name: str, digits: str) -> str:
    """The rules again, written differently (tables, deques, list surgery)."""
    if name == "increment":
        return digits.translate(str.maketrans("0123456789", "1234567890"))
    if name == "complement":
        return digits.translate(str.maketrans("0123456789", "9876543210"))
    if name == "rotate":
        d = deque(digits)
        d.rotate(-1)
        return "".join(d)
    if name == "swap":
        chars = list(digits)
        chars[0], chars[-1] = chars[-1], chars[0]
        return "".join(chars)
    raise AssertionError(f"no independent rule for {name}")


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_answer_agrees_with_an_independent_implementation(split):
    rows = tasks.problems(split)
    assert len(rows) == tasks.SPLIT_SIZES[split] * len(tasks.OPERATIONS)
    for r in rows:
        assert r["answer"] == _independent(r["operation"], r["digits"]), r["id"]
        assert r["problem"] == tasks.problem_text(r["operation"], r["digits"])
        assert r["solution"] == f"\\boxed{{{r['answer']}}}"
        assert len(r["digits"]) in tasks.LENGTHS


def test_the_verifier_grades_the_world_s_answers():
    from sgsd.eval.verify import verify

    for r in tasks.problems("test")[:8]:
        assert verify(f"so \\boxed{{{r['answer']}}}", r["answer"]).correct
        wrong = _independent("swap" if r["operation"] != "swap" else "rotate", r["digits"])
        if wrong != r["answer"]:
            assert not verify(f"\\boxed{{{wrong}}}", r["answer"]).correct


def test_splits_are_disjoint_deterministic_and_seeded():
    train, test = tasks.problems("train"), tasks.problems("test")
    pairs = lambda rows: {(r["operation"], r["digits"]) for r in rows}  # noqa: E731
    assert not pairs(train) & pairs(test)
    assert len(pairs(train)) == len(train) and len(pairs(test)) == len(test)
    assert len({r["id"] for r in train + test}) == len(train) + len(test)
    assert tasks.problems("test") == test
    assert tasks.problems("test", seed=1) != test
    assert tasks.problems() == train + test
    first = [r["operation"] for r in test[: len(tasks.OPERATIONS)]]
    assert first == [op.name for op in tasks.OPERATIONS]  # any prefix covers every operation


def test_load_problems_reads_the_world_by_name():
    test = load_problems("skillworld", split="test")
    assert [p.answer for p in test] == [r["answer"] for r in tasks.problems("test")]
    with pytest.raises(ValueError, match="skillworld: no split 'dev' \\(splits: train, test\\)"):
        load_problems("skillworld", split="dev")


@pytest.mark.parametrize(
    "name,digits,message",
    [
        ("sort", "123", "unknown operation 'sort'; known: increment, complement, rotate, swap"),
        ("rotate", "12a", "digits must be a non-empty string of 0-9, got '12a'"),
        ("rotate", "", "digits must be a non-empty string of 0-9, got ''"),
    ],
)
def test_apply_rule_bad_input(name, digits, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tasks.apply_rule(name, digits)


def test_the_bundled_bank_is_the_generator_s_and_loads():
    assert json.loads(world_bank.BANK_FILE.read_text()) == world_bank.build_bank()
    bank = SkillBank.load("skillworld")
    assert len(bank.skills) == 2 * len(tasks.OPERATIONS)
    assert len(bank.mistakes) == len(tasks.OPERATIONS)


def test_skills_state_rules_never_answers():
    bank = SkillBank.load("skillworld")
    rules = world_bank.skill_rules()
    by_name = {op.name: op for op in tasks.OPERATIONS}
    for skill in bank.skills:
        text = " ".join(skill[f] for f in ("title", "principle", "when_to_apply"))
        assert not re.search(r"\d{2,}", text), skill["skill_id"]  # no digit string
        assert by_name[rules[skill["skill_id"]]].rule in skill["principle"]
        if skill["skill_id"].endswith("_misleading"):
            op = skill["skill_id"].removesuffix("_misleading")
            assert rules[skill["skill_id"]] != op  # a wrong rule under the right name
            assert op in skill["title"] and op in skill["when_to_apply"]


def test_retrieval_puts_each_operation_s_two_skills_on_top():
    """BM25 hands every problem its operation's right and misleading skill (so some
    retrieved teachers are harmful) and its common mistake."""
    bank = SkillBank.load("skillworld")
    for r in tasks.problems("test")[: len(tasks.OPERATIONS)]:
        op = r["operation"]
        specs = bank.teachers(r["problem"], 4)
        assert {s.skill_id for s in specs[:2]} == {f"{op}_rule", f"{op}_misleading"}
        assert f"{op}_mistake" in {s.mistake_id for s in specs}
