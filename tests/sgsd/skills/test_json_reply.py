"""Robust JSON extraction from model replies (sgsd.skills.json_reply)."""

from __future__ import annotations

import pytest

from sgsd.skills.json_reply import extract_json_object


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"a": 1}', {"a": 1}),
        ('noise {"a": [1, {"b": "}"}]} noise', {"a": [1, {"b": "}"}]}),
        ('```json\n{"a": 2}\n```\ntrailing', {"a": 2}),
        ("```\n{'a': 'it''s'}\n```", None),  # not a Python literal either
        ("{'a': \"don't\", 'b': None, 'c': True,}", {"a": "don't", "b": None, "c": True}),
        ('{"a": "say \\"hi\\""}', {"a": 'say "hi"'}),
        ('{"a": [{"x": 1}, {"x": 2}, {"x": 3', {"a": [{"x": 1}, {"x": 2}]}),
        ('<think>{"a": 0}</think> final: {"a": 9}', {"a": 9}),
        ('<think>only {"a": 0} in the reasoning</think> no object', {"a": 0}),
        ("{}", {}),
        ("[1, 2]", None),
        ("}{", None),
        ("", None),
        (None, None),
        (42, None),
    ],
)
def test_extracts_the_object(text, expected):
    assert extract_json_object(text) == expected


def test_required_key_and_last_object_wins():
    text = 'schema {"items": ["<x>"]} then {"other": 1} and answer {"items": ["real"]} bye'
    assert extract_json_object(text, "items") == {"items": ["real"]}
    assert extract_json_object(text, "missing") is None
    # the fenced blocks are preferred over objects in the prose around them
    fenced = '{"items": ["prose"]}\n```json\n{"items": ["fenced"]}\n```'
    assert extract_json_object(fenced, "items") == {"items": ["fenced"]}


@pytest.mark.parametrize("depth", [1, 50, 3000])
def test_deep_or_unbalanced_input_never_raises(depth):
    assert extract_json_object("{" * depth) is None
    nested = '{"a": ' * depth + "1" + "}" * depth
    result = extract_json_object(nested)
    assert result is None or isinstance(result, dict)


def test_recorded_replies_parse_as_expected(skill_replies):
    for case in skill_replies["extract_success"]:
        obj = extract_json_object(case["reply"], "general_skills")
        assert (obj is None) == (case["expect"] is None), case["name"]
