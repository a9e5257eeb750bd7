"""Memory records and LLM extraction of skills / common mistakes (docs/design.md §2).

A **memory record** is built by rules, with no LLM, from one verified trajectory: the
problem, the trajectory trimmed to a bounded size, the outcome and the reference answer.
One LLM call per record (temperature 0) then yields 1-3 **general skills** from a success
or 1-3 **common mistakes** from a failure, in the published JSON schema.

The LLM is any callable ``llm(conversations) -> replies``: one chat conversation (a list
of ``{"role", "content"}`` messages) in, one reply string out (``None`` when the prompt
could not be sent, e.g. it does not fit the context). :class:`EngineLLM` adapts a
rollout engine (:mod:`sgsd.engine.rollout`: vLLM or HF generate) to it.

Bad replies are normal (the published 1.7B run could not parse 27% of them; the random
tiny model, none). :func:`parse_items` reads what it can and says whether the reply was
readable; unreadable replies are counted and kept for debugging, never raised.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sgsd.prompts import skill_extraction_messages
from sgsd.skills.bank import MISTAKE_FIELDS, SKILL_FIELDS
from sgsd.skills.json_reply import extract_json_object

__all__ = [
    "MAX_ITEMS_PER_RECORD",
    "TRAJECTORY_CHARS",
    "EngineLLM",
    "Extraction",
    "MemoryRecord",
    "build_record",
    "extract_from_records",
    "item_key",
    "parse_items",
]

#: Items kept per trajectory (the published pipeline asks for 1-3).
MAX_ITEMS_PER_RECORD = 3
#: Trajectory characters kept in a record: head and tail around a ``[...]`` marker. The
#: start shows the plan, the end the final steps and answer; 2400 characters is about
#: 700 Qwen3 tokens, so an extraction prompt stays near 1k tokens.
TRAJECTORY_CHARS = 2400
_SNIP = " [...] "

LLM = Callable[[list[list[dict]]], list[str | None]]

# kind -> (reply key, id field, text fields, field that must be non-empty)
_KIND = {
    "skill": ("general_skills", "skill_id", SKILL_FIELDS[1:], "principle"),
    "mistake": ("common_mistakes", "mistake_id", MISTAKE_FIELDS[1:], "description"),
}


@dataclass(frozen=True)
class MemoryRecord:
    """One verified trajectory, ready to be shown to the extractor."""

    record_id: str
    problem: str
    trajectory: str  # trimmed (TRAJECTORY_CHARS), whitespace squeezed
    success: bool
    reference_answer: str
    predicted: str | None

    @property
    def outcome(self) -> str:
        return "success" if self.success else "failure"

    @property
    def kind(self) -> str:
        """What the record yields: ``"skill"`` from a success, ``"mistake"`` from a failure."""
        return "skill" if self.success else "mistake"

    def messages(self) -> list[dict]:
        return skill_extraction_messages(
            self.problem, self.trajectory, self.outcome, self.reference_answer, self.predicted
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MemoryRecord:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def _trim(text: str, limit: int) -> str:
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"\n\s*\n+", "\n\n", text).strip()
    if len(text) <= limit:
        return text
    head = (limit - len(_SNIP)) // 2
    tail = limit - len(_SNIP) - head
    return text[:head].rstrip() + _SNIP + text[-tail:].lstrip()


def build_record(
    record_id: str,
    problem: str,
    completion: str,
    *,
    success: bool,
    reference_answer: str,
    predicted: str | None,
    max_chars: int = TRAJECTORY_CHARS,
) -> MemoryRecord:
    """A :class:`MemoryRecord` by rules: the completion is trimmed to ``max_chars``
    (head and tail), runs of blank lines and spaces squeezed."""
    for name, value in (("record_id", record_id), ("problem", problem)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name} must be a non-empty str, got {value!r}")
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 64:
        raise ValueError(f"max_chars must be an int >= 64, got {max_chars!r}")
    return MemoryRecord(
        record_id=record_id,
        problem=problem.strip(),
        trajectory=_trim(completion, max_chars),
        success=bool(success),
        reference_answer=str(reference_answer),
        predicted=predicted,
    )


def item_key(kind: str, item: dict) -> tuple[str, ...]:
    """The exact-duplicate key of an item: its text fields, case- and space-folded."""
    return tuple(" ".join(str(item.get(f) or "").lower().split()) for f in _KIND[kind][2])


def parse_items(kind: str, reply: str | None, max_items: int | None = None) -> list[dict] | None:
    """The valid items of ``kind`` in one reply, or ``None`` if the reply is unreadable.

    Readable = a JSON object with the kind's list (``general_skills`` /
    ``common_mistakes``) could be extracted. Items keep only the published fields (as
    stripped strings; a missing optional field becomes ``""``) plus ``merged_from`` when
    it is a list of strings; an item without its main text (principle / description) is
    dropped. ``max_items`` keeps the first that many valid items.
    """
    if kind not in _KIND:
        raise ValueError(f"kind must be 'skill' or 'mistake', got {kind!r}")
    key, id_field, fields, main = _KIND[kind]
    obj = extract_json_object(reply, key)
    if obj is None or not isinstance(obj[key], list):
        return None
    items = []
    for raw in obj[key]:
        if not isinstance(raw, dict):
            continue
        item = {f: " ".join(str(raw.get(f) or "").split()) for f in fields}
        if not item[main]:
            continue
        item[id_field] = " ".join(str(raw.get(id_field) or "").split())
        sources = raw.get("merged_from")
        if isinstance(sources, list) and all(isinstance(x, str) for x in sources):
            item["merged_from"] = list(sources)
        items.append(item)
    return items[:max_items] if max_items is not None else items


@dataclass
class Extraction:
    """What one record's extraction call gave (``items`` empty when unreadable)."""

    record_id: str
    kind: str
    parsed: bool
    items: list[dict] = field(default_factory=list)
    reply: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Extraction:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def extract_from_records(
    llm: LLM, records: Sequence[MemoryRecord], *, max_items: int = MAX_ITEMS_PER_RECORD
) -> list[Extraction]:
    """One batched LLM call over ``records``; one :class:`Extraction` per record, in order."""
    if not records:
        return []
    replies = llm([r.messages() for r in records])
    if len(replies) != len(records):
        raise RuntimeError(f"the LLM returned {len(replies)} replies for {len(records)} prompts")
    out = []
    for rec, reply in zip(records, replies):
        items = parse_items(rec.kind, reply, max_items)
        out.append(Extraction(rec.record_id, rec.kind, items is not None, items or [], reply))
    return out


class EngineLLM:
    """A rollout engine as the extraction/merge LLM: chat template, one batched
    generation, decoded replies (:func:`sgsd.engine.rollout.generate_chat`).

    ``temperature=0`` decodes greedily (the published extraction and merge calls use 0).
    ``step`` only seeds sampling when ``temperature > 0``; each call advances it.
    """

    def __init__(
        self,
        engine: Any,
        tokenizer: Any,
        *,
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        enable_thinking: bool = False,
        seed_step: int = 0,
    ):
        from sgsd.engine.rollout import SamplingConfig

        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
        if not (temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        self.engine = engine
        self.tokenizer = tokenizer
        self.sampling = SamplingConfig(float(temperature), float(top_p), 0, max_tokens)
        self.enable_thinking = enable_thinking
        self.step = seed_step
        self.calls = 0
        self.prompts = 0

    def __call__(self, conversations: list[list[dict]]) -> list[str | None]:
        from sgsd.engine.rollout import generate_chat

        if not conversations:
            return []
        self.calls += 1
        self.prompts += len(conversations)
        replies = generate_chat(
            self.engine,
            self.tokenizer,
            conversations,
            self.sampling,
            step=self.step,
            enable_thinking=self.enable_thinking,
        )
        self.step += 1
        return replies
