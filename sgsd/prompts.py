"""Prompts for the student, the teachers and the skill bank, and token-aligned rendering.

(Over 450 lines: every prompt the project renders lives here, so that their wording is
read and reviewed in one place.)

Every method in the trainer scores one fixed rollout ``y`` (token ids sampled by the
student) under several prompts: the student's plain prompt, the K SGSD teacher contexts,
the OPSD teacher context. For the per-token log-prob gaps of docs/design.md §3 to compare like
with like, ``y`` must be *the same token ids* at the end of every sequence. This module
guarantees it by construction:

1. each prompt is rendered to ids once (:func:`render_prompt_ids`: chat template with the
   generation prompt, one thinking-mode setting for everything, :data:`ENABLE_THINKING`);
2. the completion's ids are appended to it (:func:`concat_prompt_and_completion`);
   decoded text is never re-tokenised (BPE merges across the prompt/completion boundary,
   or of a detokenised string, would shift or change tokens).

:func:`format_token_mask` is docs/design.md §3's mask ``m``: which completion tokens carry
reasoning content (and so count in the loss) versus chat/format markers and whitespace.

**Teacher styles.** ``"published"`` (the default) renders the guidance as the SGSD
authors' teacher prompt does: a soft-guidance preamble, ``### General Principles`` and
``### Mistakes to Avoid`` in Markdown, then ``Problem: `` and the student's text.
``"compact"`` is this project's earlier plain-text block (``Skill:``/``Principle:`` ...,
then the student's text unchanged). The default follows the published method so that
results compare with the paper; ``compact`` is kept for ablations.

**Skill-bank prompts** (:func:`skill_extraction_messages`, :func:`skill_merge_messages`)
ask for the published JSON schemas: ``{"general_skills": [{skill_id, title, principle,
when_to_apply}]}`` and ``{"common_mistakes": [{mistake_id, description, why_it_happens,
how_to_avoid}]}``; merge replies add ``merged_from`` (the input labels an output item
covers) so that an online merge can tell an updated item from a new one.

Message builders (``*_messages``) return plain ``[{"role": ..., "content": ...}]`` lists,
so they work with any chat template. ``problem`` may be a string or any object with a
``.problem`` attribute (e.g. :class:`sgsd.data.Problem`).
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "DEFAULT_TEACHER_STYLE",
    "ENABLE_THINKING",
    "STUDENT_INSTRUCTION",
    "concat_prompt_and_completion",
    "format_guidance",
    "format_mistake",
    "format_skill",
    "format_token_mask",
    "opsd_teacher_messages",
    "render_prompt_ids",
    "sgsd_teacher_messages",
    "sgsd_teacher_text",
    "skill_guided_messages",
    "skill_extraction_messages",
    "skill_merge_messages",
    "student_messages",
    "student_text",
]

#: The thinking-mode setting used for every prompt the trainer renders (student and
#: teachers alike, so their prompt formats never differ in anything but the guidance).
#: False = Qwen3 non-thinking mode: the generation prompt already holds an empty
#: ``<think></think>`` block and the model answers directly (short rollouts). Pass
#: ``enable_thinking=True`` to :func:`render_prompt_ids` to study thinking-mode rollouts.
ENABLE_THINKING = False

#: Appended to every problem: the verifier reads the last ``\boxed{...}``.
STUDENT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

_GUIDANCE_HEADER = (
    "The following guidance was distilled from earlier attempts at similar problems. "
    "It may be only partly relevant: use what helps and ignore the rest."
)
#: Teacher-context styles (module docstring); the first is the default.
TEACHER_STYLES = ("published", "compact")
DEFAULT_TEACHER_STYLE = "published"
# The published teacher prompt's opening sentence, as the SGSD method specifies it.
_PUBLISHED_HEADER = (
    "You may use the following retrieved math-reasoning skills as soft guidance. "
    "Solve the current problem independently and do not quote the skills verbatim."
)
_OPSD_HEADER = "A reference solution to this problem:"
_OPSD_FOOTER = (
    "Using the reference solution as a guide, solve the problem yourself. " + STUDENT_INSTRUCTION
)


def _problem_text(problem: Any) -> str:
    text = getattr(problem, "problem", problem)
    if not isinstance(text, str):
        raise TypeError(
            f"problem must be a str or have a str .problem attribute, got {type(problem).__name__}"
        )
    if not text.strip():
        raise ValueError("problem text is empty")
    return text.strip()


def _field(item: Any, name: str) -> str:
    value = item.get(name, "") if isinstance(item, Mapping) else getattr(item, name, "")
    return str(value).strip() if value is not None else ""


# --------------------------------------------------------------------------- guidance
def format_skill(skill: Any) -> str:
    """Render one general skill (mapping or object with ``title``, ``principle``,
    ``when_to_apply``) as a short block. Empty fields are left out."""
    lines = []
    if title := _field(skill, "title"):
        lines.append(f"Skill: {title}")
    if principle := _field(skill, "principle"):
        lines.append(f"Principle: {principle}")
    if when := _field(skill, "when_to_apply"):
        lines.append(f"When to apply: {when}")
    return "\n".join(lines)


def format_mistake(mistake: Any) -> str:
    """Render one common mistake (``description``, ``why_it_happens``, ``how_to_avoid``)."""
    lines = []
    if desc := _field(mistake, "description"):
        lines.append(f"Common mistake: {desc}")
    if why := _field(mistake, "why_it_happens"):
        lines.append(f"Why it happens: {why}")
    if how := _field(mistake, "how_to_avoid"):
        lines.append(f"How to avoid it: {how}")
    return "\n".join(lines)


def _check_style(style: Any) -> None:
    if style not in TEACHER_STYLES:
        raise ValueError(f"style must be one of {TEACHER_STYLES}, got {style!r}")


def _published_guidance(skills: Iterable[Any], mistakes: Iterable[Any]) -> str:
    principles = []
    for s in skills:
        title, principle = _field(s, "title"), _field(s, "principle")
        if not (title or principle):
            continue
        line = f"- **{title}**: {principle}" if title else f"- {principle}"
        if when := _field(s, "when_to_apply"):
            line += f"\n  _Apply when: {when}_"
        principles.append(line)
    avoid = []
    for m in mistakes:
        if not (desc := _field(m, "description")):
            continue
        line = f"- **Don't**: {desc}"
        if how := _field(m, "how_to_avoid"):
            line += f"\n  **Instead**: {how}"
        avoid.append(line)
    if not (principles or avoid):
        return ""
    parts = [_PUBLISHED_HEADER]
    if principles:
        parts.append("### General Principles\n" + "\n".join(principles))
    if avoid:
        parts.append("### Mistakes to Avoid\n" + "\n".join(avoid))
    return "\n\n".join(parts)


def format_guidance(
    skills: Iterable[Any] = (),
    mistakes: Iterable[Any] = (),
    *,
    style: str = DEFAULT_TEACHER_STYLE,
) -> str:
    """The teacher's guidance block: a header, then the skills, then the mistakes.

    SGSD pairs one skill with one mistake per teacher (``format_guidance([s], [m])``);
    the same function renders any other combination, e.g. for "+Skill" baselines.
    ``style``: ``"published"`` or ``"compact"`` (module docstring). Returns ``""`` when
    both are empty.
    """
    _check_style(style)
    if style == "published":
        return _published_guidance(skills, mistakes)
    blocks = [b for b in (format_skill(s) for s in skills) if b]
    blocks += [b for b in (format_mistake(m) for m in mistakes) if b]
    if not blocks:
        return ""
    return "\n\n".join([_GUIDANCE_HEADER, *blocks])


# --------------------------------------------------------------------------- messages
def student_text(problem: Any) -> str:
    """User-message text of the plain student prompt: problem, then the instruction."""
    return f"{_problem_text(problem)}\n\n{STUDENT_INSTRUCTION}"


def sgsd_teacher_text(problem: Any, guidance: str, *, style: str = DEFAULT_TEACHER_STYLE) -> str:
    """User-message text of an SGSD teacher: guidance block, then the student's text.

    The student prompt appears verbatim at the end (after ``Problem: `` in the published
    style), so the teacher differs from the student only by the prepended guidance
    (c_k = guidance_k ⊕ x, docs/design.md §2). Empty guidance gives the student's text.
    """
    if not isinstance(guidance, str):
        raise TypeError(f"guidance must be a str, got {type(guidance).__name__}")
    _check_style(style)
    guidance = guidance.strip()
    body = student_text(problem)
    if not guidance:
        return body
    return f"{guidance}\n\nProblem: {body}" if style == "published" else f"{guidance}\n\n{body}"


def student_messages(problem: Any) -> list[dict]:
    """The student's (policy's) prompt: problem + "reason step by step, \\boxed{}"."""
    return [{"role": "user", "content": student_text(problem)}]


def sgsd_teacher_messages(
    problem: Any, guidance: str, *, style: str = DEFAULT_TEACHER_STYLE
) -> list[dict]:
    """An SGSD teacher context: the guidance block (skill + mistake) before the problem.

    ``guidance`` is typically :attr:`sgsd.skills.bank.TeacherSpec.guidance` (retrieved with the
    same ``style``); then the message content equals
    :attr:`~sgsd.skills.bank.TeacherSpec.context`.
    """
    return [{"role": "user", "content": sgsd_teacher_text(problem, guidance, style=style)}]


def opsd_teacher_messages(problem: Any, reference_solution: str) -> list[dict]:
    """The OPSD teacher context: the problem plus the reference solution (or answer)."""
    if not isinstance(reference_solution, str) or not reference_solution.strip():
        raise ValueError("reference_solution must be a non-empty str (a solution or answer)")
    content = (
        f"{_problem_text(problem)}\n\n{_OPSD_HEADER}\n{reference_solution.strip()}\n\n"
        f"{_OPSD_FOOTER}"
    )
    return [{"role": "user", "content": content}]


def skill_guided_messages(problem: Any, bank: Any, k: int) -> list[dict]:
    """The "+Skill" prompt (Base+Skill evaluation, the +Skill training baselines): the top
    ``k`` skills and the top ``k`` mistakes that ``bank`` retrieves for the problem (BM25,
    :meth:`sgsd.skills.bank.SkillBank.retrieve`) in one guidance block before it."""
    text = _problem_text(problem)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    skills = [s for s, _ in bank.retrieve(text, k, "skill")]
    mistakes = [m for m, _ in bank.retrieve(text, k, "mistake")]
    return sgsd_teacher_messages(problem, format_guidance(skills, mistakes))


# --------------------------------------------------------------------------- skill bank
_SKILL_SCHEMA = (
    '{"general_skills": [{"skill_id": "s1", "title": "<a name of at most eight words>", '
    '"principle": "<the reusable idea in one or two sentences>", '
    '"when_to_apply": "<the kind of problem or moment where it helps>"}]}'
)
_MISTAKE_SCHEMA = (
    '{"common_mistakes": [{"mistake_id": "m1", "description": "<what went wrong, in '
    'general terms>", "why_it_happens": "<the reasoning slip behind it>", '
    '"how_to_avoid": "<a concrete check or habit that prevents it>"}]}'
)
_EXTRACT_TASK = {
    "success": (
        "Study the attempt below, which solved a math problem correctly. Write 1 to 3 "
        "general skills that made it work and that would carry over to other problems. "
        "A skill describes a method or a principle; it does not mention this problem's "
        "numbers, names or answer."
    ),
    "failure": (
        "Study the attempt below, which got a math problem wrong. Write 1 to 3 common "
        "mistakes that explain the failure and that other solvers could also make. "
        "Describe each mistake in general terms, without this problem's numbers, "
        "names or answer."
    ),
}
_REPLY_RULE = "Answer with a single JSON object and no other text, exactly in this form:"
_MERGE_TASK = {
    "skill": (
        "Below are general skills for solving math problems, one JSON object per line, "
        "each with a label. Several may express the same idea in different words. Produce "
        "a shorter list: fuse duplicates and near-duplicates into one item that keeps "
        "their common idea, keep every item with a distinct idea, and add nothing new."
    ),
    "mistake": (
        "Below are common mistakes made when solving math problems, one JSON object per "
        "line, each with a label. Several may describe the same error in different words. "
        "Produce a shorter list: fuse duplicates and near-duplicates into one item that "
        "keeps their common point, keep every item with a distinct point, and add nothing "
        "new."
    ),
}
_MERGE_FROM_RULE = (
    'Give every output item a "merged_from" list with the labels of all input items it covers.'
)


def skill_extraction_messages(
    problem: Any, attempt: str, outcome: str, reference_answer: str, predicted: str | None
) -> list[dict]:
    """The prompt that turns one memory record into skills (``outcome="success"``) or
    common mistakes (``outcome="failure"``), in the published JSON schema."""
    if outcome not in _EXTRACT_TASK:
        raise ValueError(f"outcome must be 'success' or 'failure', got {outcome!r}")
    if not isinstance(attempt, str):
        raise TypeError(f"attempt must be a str, got {type(attempt).__name__}")
    schema = _SKILL_SCHEMA if outcome == "success" else _MISTAKE_SCHEMA
    if outcome == "success":
        verdict = "correct (the final answer matches the reference)"
    elif predicted is None:
        verdict = "incorrect (no final answer in \\boxed{})"
    else:
        verdict = f"incorrect (final answer {predicted}, which does not match)"
    content = (
        f"{_EXTRACT_TASK[outcome]}\n\n{_REPLY_RULE}\n{schema}\n\n"
        f"Problem:\n{_problem_text(problem)}\n\nReference answer: {reference_answer}\n"
        f"Outcome: {verdict}\n\nAttempt:\n{attempt.strip() or '(empty)'}"
    )
    return [{"role": "user", "content": content}]


def skill_merge_messages(kind: str, labelled_items: Sequence[tuple[str, Mapping]]) -> list[dict]:
    """The prompt that merges one group of items of ``kind`` ("skill" or "mistake").

    ``labelled_items``: ``(label, item)`` pairs; only the item's text fields are shown.
    """
    if kind not in _MERGE_TASK:
        raise ValueError(f"kind must be 'skill' or 'mistake', got {kind!r}")
    if not labelled_items:
        raise ValueError("labelled_items is empty: nothing to merge")
    fields = (
        ("title", "principle", "when_to_apply")
        if kind == "skill"
        else ("description", "why_it_happens", "how_to_avoid")
    )
    lines = [
        json.dumps({"label": label, **{f: _field(item, f) for f in fields}}, ensure_ascii=False)
        for label, item in labelled_items
    ]
    schema = _SKILL_SCHEMA if kind == "skill" else _MISTAKE_SCHEMA
    schema = schema[:-3] + ', "merged_from": ["<label>", "<label>"]}]}'
    content = (
        f"{_MERGE_TASK[kind]} {_MERGE_FROM_RULE}\n\n{_REPLY_RULE}\n{schema}\n\n"
        "Items:\n" + "\n".join(lines)
    )
    return [{"role": "user", "content": content}]


# --------------------------------------------------------------------------- token ids
def render_prompt_ids(
    tokenizer: Any, messages: list[dict], *, enable_thinking: bool = ENABLE_THINKING
) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template and generation prompt.

    Renders to text and encodes it with ``add_special_tokens=False`` (the chat template
    already contains every marker; this is what ``apply_chat_template(tokenize=True)``
    does, without its return type changing across transformers versions).
    """
    if not messages:
        raise ValueError("messages is empty")
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
    )
    return list(tokenizer.encode(text, add_special_tokens=False))


def _as_int_list(ids: Any, name: str) -> list[int]:
    if hasattr(ids, "tolist"):  # torch / numpy
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of int token ids, got {type(ids).__name__}")
    out = []
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"{name} must contain int token ids, found {i!r}")
        if i < 0:
            raise ValueError(f"{name} contains a negative token id ({i})")
        out.append(i)
    return out


def concat_prompt_and_completion(
    prompt_ids: Sequence[int], completion_ids: Sequence[int]
) -> tuple[list[int], int]:
    """Return ``(prompt_ids + completion_ids, len(prompt_ids))``.

    The second value is the index of the first completion token: the model's logits at
    positions ``start - 1 ... len - 2`` predict the completion tokens. Accepts lists,
    tuples, 1-D tensors or arrays.
    """
    prompt = _as_int_list(prompt_ids, "prompt_ids")
    completion = _as_int_list(completion_ids, "completion_ids")
    if not prompt:
        raise ValueError("prompt_ids is empty: a completion needs a prompt to condition on")
    return prompt + completion, len(prompt)


# Qwen-family markers that are never reasoning content, whether or not a given tokenizer
# flags them as special (Qwen3 marks <think>/</think> as ordinary added tokens).
_FORMAT_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
_format_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _FormatIds:
    """Per-tokenizer cache: the fixed set of marker ids plus a lazy whitespace memo."""

    def __init__(self, tokenizer: Any):
        ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        for attr in ("eos_token_id", "pad_token_id", "bos_token_id"):
            value = getattr(tokenizer, attr, None)
            if isinstance(value, int):
                ids.add(value)
        vocab = tokenizer.get_vocab()
        ids.update(vocab[t] for t in _FORMAT_TOKENS if t in vocab)
        self.markers = frozenset(ids)
        self.whitespace: dict[int, bool] = {}

    def is_format(self, tokenizer: Any, tok: int) -> bool:
        if tok in self.markers:
            return True
        ws = self.whitespace.get(tok)
        if ws is None:
            # Decoding one id of a byte-level BPE gives its exact text ('\ufffd' for a
            # partial UTF-8 byte, which is content, not whitespace).
            ws = not tokenizer.decode([tok]).strip()
            self.whitespace[tok] = ws
        return ws


def format_token_mask(tokenizer: Any, completion_ids: Sequence[int]) -> list[bool]:
    """docs/design.md §3's mask ``m`` for one completion: True = the token counts in the loss.

    False for special tokens (``tokenizer.all_special_ids``, eos/pad/bos), the chat and
    thinking markers (``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``, ``<think>``,
    ``</think>``) and tokens whose text is whitespace only (newlines, spaces). These
    carry format, not reasoning: a teacher context shifts their probability for reasons
    unrelated to the guidance, and they would dilute the support score S.
    """
    ids = _as_int_list(completion_ids, "completion_ids")
    try:
        cache = _format_cache.get(tokenizer)
    except TypeError:  # unhashable/non-weakrefable tokenizer: no caching
        cache = None
    if cache is None:
        cache = _FormatIds(tokenizer)
        try:
            _format_cache[tokenizer] = cache
        except TypeError:
            pass
    return [not cache.is_format(tokenizer, t) for t in ids]
