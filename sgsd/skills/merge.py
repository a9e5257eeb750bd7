"""Hierarchical LLM merge of skills or mistakes (docs/design.md §2), as published.

Layer by layer: exact duplicates are removed, the items are cut into consecutive groups
of ``group_size`` (32), and each group goes into one merge prompt (all groups of a layer
in one batched call) that fuses duplicates and near-duplicates. The merged groups form
the next layer's input. It stops when a layer had a single group (``root_group_reached``),
when ``patience`` (3) layers in a row did not shrink the list
(``stagnation_patience_reached``), or after ``max_layers`` (``max_layers_reached``).

A group whose reply is unreadable, empty, or longer than the group (the model invented
items) is kept unchanged and counted in ``parse_failures``: a bad reply never loses or
corrupts items.

**Provenance.** Items may carry ``"_src"``: the ids of the original items they stand for.
Merge replies list the input labels each output item covers (``merged_from``); an
output's ``_src`` is the union of those inputs' ``_src`` (empty when the reply gives no
usable labels). :mod:`sgsd.skills.online_update` uses it to tell an updated online item from a
new one. Layer records have the published metadata shape.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from sgsd.prompts import skill_merge_messages
from sgsd.skills.extraction import LLM, item_key, parse_items

__all__ = ["MergeResult", "dedupe_items", "hierarchical_merge"]

SRC = "_src"
_LABEL_RE = re.compile(r"#?\s*(\d+)")


def dedupe_items(kind: str, items: list[dict]) -> list[dict]:
    """Exact duplicates (same text fields up to case and spacing) removed; the first
    occurrence stays, with the ``_src`` of all its copies."""
    seen: dict[tuple, dict] = {}
    out = []
    for it in items:
        k = item_key(kind, it)
        if k in seen:
            first = seen[k]
            first[SRC] = list(dict.fromkeys([*first.get(SRC, []), *it.get(SRC, [])]))
            continue
        it = dict(it)
        seen[k] = it
        out.append(it)
    return out


@dataclass
class MergeResult:
    items: list[dict]
    layers: list[dict] = field(default_factory=list)  # published metadata shape
    parse_failures: int = 0
    calls: int = 0  # merge prompts sent
    failed_replies: list[dict] = field(default_factory=list)  # {layer, group, reply}


def _merged_group(kind: str, group: list[dict], reply: str | None) -> list[dict] | None:
    parsed = parse_items(kind, reply)
    if not parsed or len(parsed) > len(group):
        return None
    out = []
    for item in parsed:
        sources: list[str] = []
        for label in item.pop("merged_from", []):
            m = _LABEL_RE.fullmatch(label.strip())
            if m and 1 <= int(m.group(1)) <= len(group):
                sources.extend(group[int(m.group(1)) - 1].get(SRC, []))
        item[SRC] = list(dict.fromkeys(sources))
        out.append(item)
    return out


def hierarchical_merge(
    llm: LLM,
    kind: str,
    items: list[dict],
    *,
    group_size: int = 32,
    patience: int = 3,
    max_layers: int = 16,
    on_layer: Callable[[dict], None] | None = None,
) -> MergeResult:
    """Merge ``items`` of ``kind`` ("skill"/"mistake"); see the module docstring.

    ``on_layer(record)`` is called after each layer (progress reporting).
    """
    if kind not in ("skill", "mistake"):
        raise ValueError(f"kind must be 'skill' or 'mistake', got {kind!r}")
    for name, value, low in (("group_size", group_size, 2), ("patience", patience, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if isinstance(max_layers, bool) or not isinstance(max_layers, int) or max_layers < 0:
        raise ValueError(f"max_layers must be an int >= 0, got {max_layers!r}")
    result = MergeResult(dedupe_items(kind, items))
    stagnant = 0
    for layer in range(max_layers):
        current = result.items
        if len(current) <= 1:
            break
        groups = [current[i : i + group_size] for i in range(0, len(current), group_size)]
        asked = [g for g in groups if len(g) > 1]
        prompts = [
            skill_merge_messages(kind, [(f"#{i + 1}", it) for i, it in enumerate(g)]) for g in asked
        ]
        replies = iter(llm(prompts))
        result.calls += len(prompts)
        merged: list[dict] = []
        failures = 0
        for gi, group in enumerate(groups):
            if len(group) == 1:
                merged.extend(group)
                continue
            reply = next(replies)
            out = _merged_group(kind, group, reply)
            if out is None:
                failures += 1
                result.failed_replies.append({"layer": layer, "group": gi, "reply": reply})
                merged.extend(group)
            else:
                merged.extend(out)
        merged = dedupe_items(kind, merged)
        stagnant = stagnant + 1 if len(merged) >= len(current) else 0
        reason = None
        if len(groups) == 1:
            reason = "root_group_reached"
        elif stagnant >= patience:
            reason = "stagnation_patience_reached"
        elif layer == max_layers - 1:
            reason = "max_layers_reached"
        record = {
            "layer_index": layer,
            "input_items": len(current),
            "num_groups": len(groups),
            "output_items": len(merged),
            "stagnant_layers": stagnant,
            "stopped_reason": reason,
            "parse_failures": failures,
        }
        result.layers.append(record)
        result.parse_failures += failures
        result.items = merged
        if on_layer is not None:
            on_layer(record)
        if reason:
            break
    return result
