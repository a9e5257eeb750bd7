"""Memory records, extraction prompts and parsing of recorded extraction replies."""

from __future__ import annotations

import pytest

from sgsd import prompts as P
from sgsd.skills.extraction import (
    TRAJECTORY_CHARS,
    Extraction,
    MemoryRecord,
    build_record,
    extract_from_records,
    item_key,
    parse_items,
)


def _record(success: bool, rid: str = "r1", completion: str = "x = 12, so \\boxed{12}"):
    return build_record(
        rid,
        "Solve for $x$: $6x + 19 = 91$.",
        completion,
        success=success,
        reference_answer="12",
        predicted="12" if success else "13",
    )


# --------------------------------------------------------------------------- records
@pytest.mark.parametrize("length", [0, 10, TRAJECTORY_CHARS, TRAJECTORY_CHARS + 1, 50_000])
def test_record_trims_head_and_tail(length):
    text = "".join(chr(ord("a") + i % 26) for i in range(length))
    rec = build_record(
        "r", "p?", "START" + text + "END", success=False, reference_answer="1", predicted=None
    )
    assert len(rec.trajectory) <= TRAJECTORY_CHARS
    assert rec.trajectory.startswith("START") and rec.trajectory.endswith("END")
    assert ("[...]" in rec.trajectory) == (length + 8 > TRAJECTORY_CHARS)


def test_record_squeezes_whitespace_and_round_trips():
    rec = build_record(
        "r7", "  What?  ", "a  \t b\n\n\n\nc", success=True, reference_answer="3", predicted="3"
    )
    assert rec.trajectory == "a b\n\nc" and rec.problem == "What?"
    assert rec.kind == "skill" and rec.outcome == "success"
    assert MemoryRecord.from_dict(rec.to_dict()) == rec
    assert _record(False).kind == "mistake"


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"record_id": ""}, ValueError, "record_id must be a non-empty str"),
        ({"problem": "  "}, ValueError, "problem must be a non-empty str"),
        ({"completion": None}, TypeError, "completion must be a str"),
        ({"max_chars": 10}, ValueError, "max_chars must be an int >= 64"),
    ],
)
def test_record_bad_inputs(kwargs, exc, match):
    args = {"record_id": "r", "problem": "p", "completion": "c", "max_chars": 100, **kwargs}
    with pytest.raises(exc, match=match):
        build_record(
            args["record_id"],
            args["problem"],
            args["completion"],
            success=True,
            reference_answer="1",
            predicted="1",
            max_chars=args["max_chars"],
        )


# --------------------------------------------------------------------------- prompts
def test_extraction_prompts_hold_the_record_and_the_schema():
    ok, bad = _record(True).messages()[0]["content"], _record(False).messages()[0]["content"]
    for text in (ok, bad):
        assert "6x + 19 = 91" in text and "Reference answer: 12" in text
        assert "\\boxed{12}" in text  # the trajectory
    assert '"general_skills"' in ok and '"principle"' in ok and "common_mistakes" not in ok
    assert '"common_mistakes"' in bad and '"how_to_avoid"' in bad and "final answer 13" in bad
    none = build_record("r", "p", "", success=False, reference_answer="1", predicted=None)
    assert "no final answer" in none.messages()[0]["content"]
    with pytest.raises(ValueError, match="outcome must be 'success' or 'failure'"):
        P.skill_extraction_messages("p", "a", "partial", "1", None)
    with pytest.raises(TypeError, match="attempt must be a str"):
        P.skill_extraction_messages("p", None, "success", "1", None)


# --------------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    "stage, kind", [("extract_success", "skill"), ("extract_failure", "mistake")]
)
def test_recorded_replies(skill_replies, stage, kind):
    for case in skill_replies[stage]:
        items = parse_items(kind, case["reply"], max_items=3)
        if case["expect"] is None:
            assert items is None, case["name"]
            continue
        assert items is not None and len(items) == case["expect"], case["name"]
        main = "principle" if kind == "skill" else "description"
        for it in items:
            assert it[main] and all(isinstance(v, str) for v in it.values())


def test_parse_keeps_published_fields_and_merged_from():
    reply = (
        '{"general_skills": [{"skill_id": 7, "title": "  T  ", "principle": "P\\nQ", '
        '"extra": "x", "merged_from": ["#1", "#2"]}, {"title": "no principle"}, "junk"]}'
    )
    (item,) = parse_items("skill", reply)
    assert item == {
        "title": "T",
        "principle": "P Q",
        "when_to_apply": "",
        "skill_id": "7",
        "merged_from": ["#1", "#2"],
    }
    assert parse_items("skill", '{"general_skills": []}') == []  # readable, nothing in it
    assert parse_items("skill", '{"general_skills": "text"}') is None
    assert parse_items("mistake", None) is None
    with pytest.raises(ValueError, match="kind must be 'skill' or 'mistake'"):
        parse_items("hint", "{}")


def test_item_key_folds_case_and_space():
    a = {"title": "Check  Small cases", "principle": "Test it.", "when_to_apply": ""}
    b = {"title": "check small CASES", "principle": " test it. ", "when_to_apply": None}
    assert item_key("skill", a) == item_key("skill", b)
    assert item_key("skill", a) != item_key("skill", {**a, "principle": "Other."})


# --------------------------------------------------------------------------- extraction
def test_extract_from_records_one_call_in_order(skill_replies, replay_llm):
    ok = skill_replies["extract_success"]
    bad = skill_replies["extract_failure"]
    records = [_record(True, "a"), _record(False, "b"), _record(True, "c")]
    llm = replay_llm([ok[1]["reply"], bad[0]["reply"], ok[6]["reply"]])
    out = extract_from_records(llm, records)
    assert [e.record_id for e in out] == ["a", "b", "c"]
    assert [e.kind for e in out] == ["skill", "mistake", "skill"]
    assert [e.parsed for e in out] == [True, True, False]
    assert [len(e.items) for e in out] == [2, 1, 0]
    assert out[2].reply == ok[6]["reply"]  # kept for the debug file
    assert Extraction.from_dict(out[0].to_dict()) == out[0]
    assert "general_skills" in llm.prompts[0] and "common_mistakes" in llm.prompts[1]
    assert extract_from_records(llm, []) == []


def test_extract_from_records_reply_count_mismatch():
    with pytest.raises(RuntimeError, match="returned 0 replies for 1 prompts"):
        extract_from_records(lambda convs: [], [_record(True)])
