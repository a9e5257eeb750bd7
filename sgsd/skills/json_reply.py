"""Reading one JSON object out of a language model's free-text reply.

Models asked for JSON rarely return only JSON. Replies seen from Qwen3 models (and the
tiny random model) include: a ``<think>...</think>`` block first (sometimes quoting the
schema), a fenced ```json block, prose before or after the object, Python-style dicts
with single quotes, ``True``/``None`` literals, trailing commas, and objects cut off by
the token budget. :func:`extract_json_object` tries, in order:

1. every fenced code block, then every balanced ``{...}`` span of the text after the
   last ``</think>`` (the answer), then of the whole text;
2. each candidate as strict JSON, then after a lenient rewrite (single-quoted strings
   to double-quoted, Python literals to JSON, trailing commas removed);
3. for an object cut off at the end of the text, the longest prefix that ends after a
   complete element, closed with the brackets still open.

Among the candidates that parse to a dict (holding ``required_key`` when given) the
*last* one wins: a reply that restates the schema before answering ends with its answer.
Returns ``None`` when nothing parses; it never raises on content.
"""

from __future__ import annotations

import json
import re
from collections import deque
from typing import Any

__all__ = ["extract_json_object"]

_FENCE_RE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?(.*?)(?:```|\Z)", re.S)
_CLOSER = {"{": "}", "[": "]"}
# Start positions tried per text region: each try scans to the end of its span, so this
# bounds the work on pathological replies (thousands of nested or unmatched braces).
_MAX_STARTS = 64


def _scan(text: str, start: int) -> tuple[int | None, list[tuple[int, str]]]:
    """Scan a bracketed value starting at ``text[start] == "{"``.

    Returns ``(end, cuts)``: ``end`` is the index just past the matching ``}`` (None if
    the text ends first); ``cuts`` lists, for the last :data:`_MAX_STARTS` nested elements
    that closed, ``(index after it, the closers of the brackets still open there)`` (used
    to repair a truncated object). Strings in either quote style are skipped. The open
    brackets are a linked list, so remembering them at a cut costs O(1).
    """
    stack: tuple | None = None  # (bracket, rest) cons cells
    cuts: deque = deque(maxlen=_MAX_STARTS)
    quote: str | None = None
    i = start
    while i < len(text):
        c = text[i]
        if quote is not None:
            if c == "\\":
                i += 2
                continue
            if c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c in "{[":
            stack = (c, stack)
        elif c in "}]":
            if stack is None or _CLOSER[stack[0]] != c:
                return None, []  # mismatched bracket: not a JSON value
            stack = stack[1]
            if stack is None:
                return i + 1, []
            cuts.append((i + 1, stack))
        i += 1
    return None, [(cut, _closers(open_)) for cut, open_ in cuts]


def _closers(stack: tuple | None) -> str:
    out = []
    while stack is not None:
        out.append(_CLOSER[stack[0]])
        stack = stack[1]
    return "".join(out)


def _lenient(text: str) -> str:
    """Single-quoted strings -> double-quoted; True/False/None -> JSON; trailing commas."""
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c in "\"'":
            j = i + 1
            chars: list[str] = []
            while j < len(text) and text[j] != c:
                if text[j] == "\\" and j + 1 < len(text):
                    nxt = text[j + 1]
                    chars.append(nxt if (c == "'" and nxt == "'") else text[j : j + 2])
                    j += 2
                    continue
                chars.append('\\"' if (c == "'" and text[j] == '"') else text[j])
                j += 1
            out.append('"' + "".join(chars) + '"')
            i = j + 1
            continue
        out.append(c)
        i += 1
    body = "".join(out)
    body = re.sub(r",\s*([}\]])", r"\1", body)
    # Python literals outside strings: strings are now all double-quoted, so split on them.
    parts = re.split(r'("(?:[^"\\]|\\.)*")', body)
    for k in range(0, len(parts), 2):
        parts[k] = re.sub(r"\bTrue\b", "true", parts[k])
        parts[k] = re.sub(r"\bFalse\b", "false", parts[k])
        parts[k] = re.sub(r"\bNone\b", "null", parts[k])
    return "".join(parts)


def _loads(candidate: str) -> Any:
    for text in (candidate, _lenient(candidate)):
        try:
            return json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            continue
    return None


def _objects(text: str) -> list[Any]:
    """Every value that parses from a ``{`` of ``text``, in text order (outermost
    spans only: a span's nested objects are not separate candidates)."""
    found: list[Any] = []
    i = text.find("{")
    for _ in range(_MAX_STARTS):
        if i == -1:
            break
        end, cuts = _scan(text, i)
        if end is not None:
            value = _loads(text[i:end])
            if value is not None:
                found.append(value)
                i = text.find("{", end)
                continue
        else:  # cut off: the longest prefix ending after a complete element, closed
            for cut, closers in reversed(cuts):
                value = _loads(re.sub(r",\s*$", "", text[i:cut]) + closers)
                if value is not None:
                    found.append(value)
                    break
            if found and end is None:
                break
        i = text.find("{", i + 1)
    return found


def extract_json_object(text: Any, required_key: str | None = None) -> dict | None:
    """The JSON object a model reply holds (see the module docstring), or ``None``.

    ``required_key``: only objects with this key count. ``text`` that is not a str
    (e.g. ``None`` for a prompt that was never sent) gives ``None``.
    """
    if not isinstance(text, str) or "{" not in text:
        return None
    answer = text.rsplit("</think>", 1)[-1] if "</think>" in text else text
    fenced = [m.group(1) for m in _FENCE_RE.finditer(answer)]
    for regions in (fenced, [answer], [text] if answer is not text else []):
        hits = [
            v
            for region in regions
            for v in _objects(region)
            if isinstance(v, dict) and (required_key is None or required_key in v)
        ]
        if hits:
            return hits[-1]
    return None
