"""Hierarchical LLM merge (sgsd.skills.merge) on recorded merge replies."""

from __future__ import annotations

import pytest

from sgsd import prompts as P
from sgsd.skills.merge import SRC, dedupe_items, hierarchical_merge


def _items(skill_replies, n=4):
    base = skill_replies["merge"]["items"]
    out = [dict(base[i % len(base)]) for i in range(n)]
    for i, it in enumerate(out):
        if i >= len(base):
            it["principle"] += f" (variant {i})"
        it[SRC] = [f"x{i}"]
    return out


def test_dedupe_keeps_first_and_unions_provenance():
    a = {"title": "T", "principle": "Same idea.", "when_to_apply": "", SRC: ["a"]}
    b = {"title": " t ", "principle": "same  IDEA.", "when_to_apply": None, SRC: ["b"]}
    c = {"title": "T", "principle": "Other idea.", "when_to_apply": "", SRC: ["c"]}
    out = dedupe_items("skill", [a, b, c])
    assert [it["principle"] for it in out] == ["Same idea.", "Other idea."]
    assert out[0][SRC] == ["a", "b"] and a[SRC] == ["a"]  # inputs are not modified


def test_one_group_clean_reply(skill_replies, replay_llm):
    llm = replay_llm([skill_replies["merge"]["reply_clean"]])
    res = hierarchical_merge(llm, "skill", _items(skill_replies))
    assert [it["title"] for it in res.items] == [
        "Isolate the unknown",
        "Count the complement",
        "Check small cases",
    ]
    assert [it[SRC] for it in res.items] == [["x0", "x1"], ["x2"], ["x3"]]
    assert "merged_from" not in res.items[0]
    assert res.layers == [
        {
            "layer_index": 0,
            "input_items": 4,
            "num_groups": 1,
            "output_items": 3,
            "stagnant_layers": 0,
            "stopped_reason": "root_group_reached",
            "parse_failures": 0,
        }
    ]
    assert res.calls == 1 and res.parse_failures == 0
    prompt = llm.prompts[0]
    assert all(f'"label": "#{i}"' in prompt for i in range(1, 5)) and '"#5"' not in prompt
    assert "Undo operations in reverse order." in prompt and "merged_from" in prompt


@pytest.mark.parametrize("bad", ["reply_invented", "garbage", "empty_list", "missing"])
def test_bad_reply_keeps_the_group(skill_replies, replay_llm, bad):
    reply = {
        "reply_invented": skill_replies["merge"]["reply_invented"],
        "garbage": skill_replies["extract_success"][6]["reply"],
        "empty_list": '{"general_skills": []}',
        "missing": None,
    }[bad]
    items = _items(skill_replies)
    res = hierarchical_merge(replay_llm([reply]), "skill", items)
    assert [it["title"] for it in res.items] == [it["title"] for it in items]
    assert res.parse_failures == 1 and res.failed_replies == [
        {"layer": 0, "group": 0, "reply": reply}
    ]
    assert res.layers[0]["stagnant_layers"] == 1


def test_unlabelled_reply_loses_provenance_only(skill_replies, replay_llm):
    llm = replay_llm([skill_replies["merge"]["reply_no_labels"]])
    res = hierarchical_merge(llm, "skill", _items(skill_replies))
    assert len(res.items) == 2 and all(it[SRC] == [] for it in res.items)


def test_layers_until_the_root_group(skill_replies, replay_llm):
    pair = skill_replies["merge"]["reply_pair"]
    # 5 items in groups of 2: [2, 2, 1] -> two calls, both give the same merged text,
    # so dedupe leaves [merged, item 5]; then one group of 2 -> one item.
    llm = replay_llm([pair, pair, pair])
    res = hierarchical_merge(llm, "skill", _items(skill_replies, 5), group_size=2)
    assert [(r["input_items"], r["num_groups"], r["output_items"]) for r in res.layers] == [
        (5, 3, 2),
        (2, 1, 1),
    ]
    assert res.layers[-1]["stopped_reason"] == "root_group_reached"
    assert res.calls == 3 and len(llm.prompts) == 3
    (item,) = res.items
    # x4 went through layer 0 alone; layer 1's reply names #1 (x0-x3) and #2 (x4)
    assert sorted(item[SRC]) == ["x0", "x1", "x2", "x3", "x4"]
    assert item["title"] == "Merged pair"


@pytest.mark.parametrize("patience", [1, 3])
def test_stagnation_stops(skill_replies, replay_llm, patience):
    garbage = skill_replies["extract_success"][6]["reply"]
    llm = replay_llm([garbage] * (3 * patience))
    res = hierarchical_merge(
        llm, "skill", _items(skill_replies, 6), group_size=2, patience=patience
    )
    assert len(res.layers) == patience and len(res.items) == 6
    assert [r["stagnant_layers"] for r in res.layers] == list(range(1, patience + 1))
    assert res.layers[-1]["stopped_reason"] == "stagnation_patience_reached"
    assert res.parse_failures == 3 * patience and not llm.replies


def test_max_layers_and_trivial_inputs(skill_replies, replay_llm):
    garbage = skill_replies["extract_success"][6]["reply"]
    llm = replay_llm([garbage] * 3)
    res = hierarchical_merge(llm, "skill", _items(skill_replies, 6), group_size=2, max_layers=1)
    assert res.layers[-1]["stopped_reason"] == "max_layers_reached"
    none = replay_llm([])
    assert hierarchical_merge(none, "skill", _items(skill_replies), max_layers=0).layers == []
    assert hierarchical_merge(none, "mistake", []).items == []
    assert len(hierarchical_merge(none, "skill", _items(skill_replies, 1)).items) == 1
    assert none.prompts == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "hint"}, "kind must be 'skill' or 'mistake'"),
        ({"group_size": 1}, "group_size must be an int >= 2"),
        ({"patience": 0}, "patience must be an int >= 1"),
        ({"max_layers": -1}, "max_layers must be an int >= 0"),
        ({"group_size": True}, "group_size must be an int >= 2"),
    ],
)
def test_bad_arguments(kwargs, match):
    kind = kwargs.pop("kind", "skill")
    with pytest.raises(ValueError, match=match):
        hierarchical_merge(lambda c: [], kind, [], **kwargs)


def test_merge_prompt_bad_inputs():
    with pytest.raises(ValueError, match="kind must be 'skill' or 'mistake'"):
        P.skill_merge_messages("hint", [("#1", {})])
    with pytest.raises(ValueError, match="labelled_items is empty"):
        P.skill_merge_messages("mistake", [])
    text = P.skill_merge_messages("mistake", [("#1", {"description": "D", "why_it_happens": 1})])
    assert (
        '"common_mistakes"' in text[0]["content"] and '"why_it_happens": "1"' in text[0]["content"]
    )
