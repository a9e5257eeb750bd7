"""Online skill-bank update (sgsd.skills.online_update): caps, eviction, ids, provenance rules,
and a full update on recorded extraction and merge replies."""

from __future__ import annotations

import json

import pytest

from sgsd.skills.bank import SkillBank
from sgsd.skills.extraction import build_record
from sgsd.skills.merge import SRC
from sgsd.skills.online_update import bank_fingerprint, online_update, resolve_online


def _sk(i, text=None, src=None):
    it = {
        "skill_id": f"dyn_{i:03d}",
        "title": f"T{i}",
        "principle": text or f"principle {i}",
        "when_to_apply": "w",
    }
    if src is not None:
        it[SRC] = src
    return it


def _ids():
    n = iter(range(100, 200))
    return lambda: f"dyn_{next(n):03d}"


def test_resolve_update_merge_new_cap_and_evict():
    existing = [_sk(1), _sk(2), _sk(3)]
    merged = [
        {**_sk(0, "A and B fused"), SRC: ["dyn_002", "dyn_001", "new"]},  # updates dyn_001
        {**_sk(0, "principle 3"), "title": "T3", SRC: []},  # same text as dyn_003
        *({**_sk(0, f"fresh {i}"), SRC: ["new"]} for i in range(6)),
    ]
    items, counts = resolve_online("skill", existing, merged, max_new=5, capacity=6, new_id=_ids())
    # [dyn_001 (updated), dyn_003, 5 fresh] = 7 > 6: the oldest (dyn_001) is evicted
    assert [it["skill_id"] for it in items] == ["dyn_003"] + [f"dyn_{i}" for i in range(100, 105)]
    assert [it["principle"] for it in items[1:]] == [f"fresh {i}" for i in range(5)]
    assert counts == {"added": 5, "updated": 1, "merged": 1, "dropped": 1, "evicted": 1}
    assert all(SRC not in it and "merged_from" not in it for it in items)


def test_resolve_never_loses_unreferenced_items_and_caps_growth():
    existing = [_sk(1), _sk(2)]
    fresh = [{**_sk(0, f"new {i}"), SRC: []} for i in range(4)]
    items, counts = resolve_online("skill", existing, fresh, max_new=2, capacity=30, new_id=_ids())
    assert [it["skill_id"] for it in items] == ["dyn_001", "dyn_002", "dyn_100", "dyn_101"]
    assert len(items) <= len(existing) + 2 and counts["dropped"] == 2
    # two outputs claiming the same existing item: the second one is new
    twice = [{**_sk(0, "x"), SRC: ["dyn_001"]}, {**_sk(0, "y"), SRC: ["dyn_001"]}]
    items, counts = resolve_online("skill", existing, twice, max_new=5, capacity=30, new_id=_ids())
    assert [it["principle"] for it in items] == ["x", "principle 2", "y"]
    assert counts["updated"] == 1 and counts["added"] == 1
    items, _ = resolve_online("skill", existing, [], max_new=0, capacity=1, new_id=_ids())
    assert [it["skill_id"] for it in items] == ["dyn_002"]  # capacity shrank: FIFO


def _bank():
    return SkillBank(
        {
            "general_skills": [
                {
                    "skill_id": "gen_001",
                    "title": "Static",
                    "principle": "Keep me.",
                    "when_to_apply": "always",
                }
            ],
            "common_mistakes": [
                {
                    "mistake_id": "err_001",
                    "description": "Static mistake.",
                    "why_it_happens": "",
                    "how_to_avoid": "",
                }
            ],
            "metadata": {"model": "m"},
        },
        online_capacity=3,
    )


def _records(outcomes):
    return [
        build_record(
            f"r{i}",
            f"Problem {i}?",
            f"attempt {i} \\boxed{{{i}}}",
            success=ok,
            reference_answer=str(i),
            predicted=str(i) if ok else None,
        )
        for i, ok in enumerate(outcomes)
    ]


def test_online_update_on_recorded_replies(skill_replies, replay_llm):
    ok, bad = skill_replies["extract_success"], skill_replies["extract_failure"]
    merge = skill_replies["merge"]["reply_clean"]
    bank = _bank()
    static = (bank.skills[:1], bank.mistakes[:1])
    # extraction (3 prompts), skills merged among themselves (1), then with the (empty)
    # online set (1); the single mistake needs no merge call.
    llm = replay_llm([ok[0]["reply"], ok[1]["reply"], bad[0]["reply"], merge, merge])
    rep = online_update(bank, _records([True, True, False]), llm, max_new=2)
    assert not llm.replies and len(llm.prompts) == 5 == rep.llm_prompts
    assert (rep.records, rep.successes, rep.failures) == (3, 2, 1)
    assert rep.candidates == {"skill": 3, "mistake": 1}
    assert rep.added == {"skill": 2, "mistake": 1} and rep.dropped == {"skill": 1, "mistake": 0}
    assert bank.online_skill_ids == ["dyn_001", "dyn_002"]
    assert bank.online_mistake_ids == ["dyn_003"]
    assert [s["title"] for s in bank.skills[1:]] == ["Isolate the unknown", "Count the complement"]
    assert (bank.skills[:1], bank.mistakes[:1]) == static  # cold-start items never change
    assert rep.extract_parse_failures == rep.merge_parse_failures == 0

    # Second update: one failure; its mistake merges with the online one (reply covers #1).
    upd = skill_replies["merge_mistakes"]["reply_update_and_new"]
    llm = replay_llm([bad[1]["reply"], upd])
    rep = online_update(bank, _records([False]), llm, max_new=5)
    assert bank.online_mistake_ids == ["dyn_003", "dyn_004"]
    assert bank.get_mistake("dyn_003")["description"].startswith("Losing a sign")
    assert rep.updated["mistake"] == 1 and rep.added["mistake"] == 1
    restored = SkillBank.from_state_dict(json.loads(json.dumps(bank.state_dict())))
    assert bank_fingerprint(restored) == bank_fingerprint(bank)
    assert restored.next_online_id() == bank.next_online_id() == "dyn_005"


def test_unparseable_replies_leave_the_bank_intact(skill_replies, replay_llm):
    garbage = skill_replies["extract_success"][6]["reply"]
    bank = _bank()
    before = bank_fingerprint(bank)
    rep = online_update(bank, _records([True, False, False]), replay_llm([garbage, None, "{"]))
    assert bank_fingerprint(bank) == before
    assert rep.extract_parse_failures == 3 and len(rep.unparsed) == 3
    assert rep.unparsed[1] == {"stage": "extract", "record": "r1", "reply": None}
    assert sum(rep.added.values()) == 0 and json.dumps(rep.summary())


def test_candidates_equal_to_bank_items_are_dropped(replay_llm):
    bank = _bank()
    same = '{"general_skills": [{"title": "static", "principle": "keep  me.", "when_to_apply": "Always"}]}'  # noqa: E501
    rep = online_update(bank, _records([True]), replay_llm([same]))
    assert rep.candidates["skill"] == 0 and bank.online_skill_ids == []


def test_fingerprint_and_bad_arguments():
    a, b = _bank(), _bank()
    assert bank_fingerprint(a) == bank_fingerprint(b)
    b.add_skill("New", "a new principle")
    assert bank_fingerprint(a) != bank_fingerprint(b)
    with pytest.raises(ValueError, match="max_new must be an int >= 0"):
        online_update(a, [], lambda c: [], max_new=-1)
