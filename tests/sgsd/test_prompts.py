"""Prompts: message builders, token-aligned rendering, the format-token mask."""

from __future__ import annotations

import pytest

from sgsd import prompts as P
from sgsd.skills.bank import SkillBank

PROBLEM = "Find the remainder when $7^{100}$ is divided by $5$."
SKILL = {
    "skill_id": "s1",
    "title": "Cycle of last digits",
    "principle": "Powers modulo m repeat with a period dividing phi(m).",
    "when_to_apply": "Large exponents modulo a small number.",
}
MISTAKE = {
    "mistake_id": "m1",
    "description": "Reducing the exponent modulo m instead of modulo the period.",
    "why_it_happens": "Confusing the base's modulus with the exponent's period.",
    "how_to_avoid": "Find the cycle length first, then reduce the exponent modulo it.",
}


def _all_prompt_messages():
    guidance = P.format_guidance([SKILL], [MISTAKE])
    return {
        "student": P.student_messages(PROBLEM),
        "sgsd_teacher": P.sgsd_teacher_messages(PROBLEM, guidance),
        "opsd_teacher": P.opsd_teacher_messages(PROBLEM, "7^4 = 2401 ≡ 1, so the answer is 1."),
        "skill_guided": P.skill_guided_messages(PROBLEM, SkillBank.default(), 2),
    }


def test_student_prompt_content():
    (msg,) = P.student_messages(PROBLEM)
    assert msg["role"] == "user"
    assert msg["content"].startswith(PROBLEM)
    assert msg["content"].endswith(P.STUDENT_INSTRUCTION)
    assert "\\boxed{}" in P.STUDENT_INSTRUCTION


def test_problem_object_accepted():
    class Obj:
        problem = PROBLEM

    assert P.student_messages(Obj()) == P.student_messages(PROBLEM)


@pytest.mark.parametrize("style", P.TEACHER_STYLES)
def test_teacher_is_guidance_then_student_prompt(style):
    guidance = P.format_guidance([SKILL], [MISTAKE], style=style)
    (teacher,) = P.sgsd_teacher_messages(PROBLEM, guidance, style=style)
    (student,) = P.student_messages(PROBLEM)
    # The teacher differs from the student only by the prepended guidance.
    assert teacher["content"].endswith(student["content"])
    assert teacher["content"].startswith(guidance)
    for text in (SKILL["principle"], MISTAKE["how_to_avoid"]):
        assert text in teacher["content"]
    # Skill block comes before the mistake block.
    assert guidance.index(SKILL["title"]) < guidance.index(MISTAKE["description"])


def test_published_teacher_layout():
    """The published teacher prompt: preamble, principles, mistakes, then "Problem:"."""
    guidance = P.format_guidance([SKILL, {"principle": "Untitled idea."}], [MISTAKE])
    assert P.DEFAULT_TEACHER_STYLE == "published"
    expected = (
        "You may use the following retrieved math-reasoning skills as soft guidance. Solve "
        "the current problem independently and do not quote the skills verbatim.\n\n"
        "### General Principles\n"
        f"- **{SKILL['title']}**: {SKILL['principle']}\n  _Apply when: {SKILL['when_to_apply']}_\n"
        "- Untitled idea.\n\n"
        "### Mistakes to Avoid\n"
        f"- **Don't**: {MISTAKE['description']}\n  **Instead**: {MISTAKE['how_to_avoid']}"
    )
    assert guidance == expected
    text = P.sgsd_teacher_messages(PROBLEM, guidance)[0]["content"]
    assert text == f"{expected}\n\nProblem: {PROBLEM}\n\n{P.STUDENT_INSTRUCTION}"
    only_mistakes = P.format_guidance([], [MISTAKE])
    assert "### Mistakes to Avoid" in only_mistakes and "Principles" not in only_mistakes
    compact = P.format_guidance([SKILL], [MISTAKE], style="compact")
    assert compact.startswith("The following guidance") and "Skill: " in compact


def test_empty_guidance_is_the_student_prompt():
    assert P.format_guidance([], []) == ""
    assert P.sgsd_teacher_messages(PROBLEM, "") == P.student_messages(PROBLEM)


def test_format_helpers_accept_objects_and_skip_empty_fields():
    class Skill:
        title = "T"
        principle = "P"
        when_to_apply = ""

    assert P.format_skill(Skill()) == "Skill: T\nPrinciple: P"
    assert "Why it happens" not in P.format_mistake({"description": "D"})


def test_opsd_teacher_contains_reference():
    (msg,) = P.opsd_teacher_messages(PROBLEM, "The answer is 1.")
    assert PROBLEM in msg["content"] and "The answer is 1." in msg["content"]
    assert msg["content"].endswith(P.STUDENT_INSTRUCTION)


def test_skill_guided_prompt_holds_the_top_skills_and_mistakes():
    bank = SkillBank.default()
    (msg,) = P.skill_guided_messages(PROBLEM, bank, 2)
    skills = [s for s, _ in bank.retrieve(PROBLEM, 2, "skill")]
    mistakes = [m for m, _ in bank.retrieve(PROBLEM, 2, "mistake")]
    assert msg["content"] == P.sgsd_teacher_text(PROBLEM, P.format_guidance(skills, mistakes))
    assert msg["content"].endswith(P.student_messages(PROBLEM)[0]["content"])


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: P.student_messages(""), ValueError, "problem text is empty"),
        (lambda: P.student_messages(12), TypeError, "problem must be a str"),
        (lambda: P.sgsd_teacher_messages(PROBLEM, None), TypeError, "guidance must be a str"),
        (lambda: P.sgsd_teacher_text(PROBLEM, "g", style="x"), ValueError, "style must be one"),
        (lambda: P.format_guidance([SKILL], style="md"), ValueError, "style must be one of"),
        (lambda: P.opsd_teacher_messages(PROBLEM, ""), ValueError, "reference_solution"),
        (lambda: P.skill_guided_messages(PROBLEM, SkillBank.default(), 0), ValueError, "k must"),
        (lambda: P.skill_guided_messages("", SkillBank.default(), 2), ValueError, "empty"),
        (lambda: P.concat_prompt_and_completion([], [1]), ValueError, "prompt_ids is empty"),
        (lambda: P.concat_prompt_and_completion([1], [2, -1]), ValueError, "negative"),
        (lambda: P.concat_prompt_and_completion([1], ["a"]), TypeError, "int token ids"),
        (lambda: P.concat_prompt_and_completion("abc", [1]), TypeError, "sequence of int"),
    ],
)
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_render_matches_chat_template(tiny_tokenizer):
    for name, msgs in _all_prompt_messages().items():
        ids = P.render_prompt_ids(tiny_tokenizer, msgs)
        text = tiny_tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True, enable_thinking=P.ENABLE_THINKING
        )
        assert tiny_tokenizer.decode(ids) == text, name
        assert ids[:1] == [tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")]


def test_one_thinking_mode_for_all_prompts(tiny_tokenizer):
    """Every prompt ends with the same generation prompt (same thinking mode)."""
    tails = set()
    for msgs in _all_prompt_messages().values():
        ids = P.render_prompt_ids(tiny_tokenizer, msgs)
        tails.add(tiny_tokenizer.decode(ids).split("<|im_end|>")[-1])
    assert len(tails) == 1
    expected = "\n<|im_start|>assistant\n" + (
        "" if P.ENABLE_THINKING else "<think>\n\n</think>\n\n"
    )
    assert tails.pop() == expected


@pytest.mark.parametrize(
    "completion_text",
    [
        "The answer is \\boxed{1}.",
        "\n\nStarts with newlines, which could merge with the prompt's trailing ones.",
        " leading space and $7^{4}=2401$",
        "",
    ],
)
def test_completion_ids_identical_in_student_and_every_teacher(tiny_tokenizer, completion_text):
    completion = tiny_tokenizer.encode(completion_text, add_special_tokens=False)
    completion.append(tiny_tokenizer.eos_token_id)
    for name, msgs in _all_prompt_messages().items():
        prompt = P.render_prompt_ids(tiny_tokenizer, msgs)
        full, start = P.concat_prompt_and_completion(prompt, completion)
        assert start == len(prompt), name
        assert full[:start] == prompt, name
        assert full[start:] == completion, name


def test_concat_accepts_tensors():
    torch = pytest.importorskip("torch")
    full, start = P.concat_prompt_and_completion(torch.tensor([5, 6]), torch.tensor([7]))
    assert full == [5, 6, 7] and start == 2
    assert all(type(t) is int for t in full)


def test_format_token_mask(tiny_tokenizer):
    tok = tiny_tokenizer
    content = tok.encode("x = 2", add_special_tokens=False)
    # Qwen-style digit splitting makes " 2" two tokens: a bare space (format) and "2".
    assert tok.convert_ids_to_tokens(content) == ["x", "Ġ=", "Ġ", "2"]
    newline = tok.encode("\n\n", add_special_tokens=False)
    think = [tok.convert_tokens_to_ids(t) for t in ("<think>", "</think>")]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    ids = think[:1] + newline + content + think[1:] + [eos, pad]
    mask = P.format_token_mask(tok, ids)
    expected = [False] + [False] * len(newline) + [True, True, False, True] + [False] * 3
    assert mask == expected
    assert P.format_token_mask(tok, []) == []


def test_format_token_mask_on_a_realistic_completion(tiny_tokenizer):
    tok = tiny_tokenizer
    text = "We reduce: $7 \\equiv 2 \\pmod 5$.\n\nSo the answer is \\boxed{1}."
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    mask = P.format_token_mask(tok, ids)
    kept = "".join(tok.decode([i]) for i, m in zip(ids, mask) if m)
    dropped = [tok.decode([i]) for i, m in zip(ids, mask) if not m]
    assert kept.replace(" ", "") == text.replace("\n", "").replace(" ", "")
    assert all(not d.strip() or d == tok.eos_token for d in dropped)
    assert mask[-1] is False
