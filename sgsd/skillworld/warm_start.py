"""The skill world's warm start: the tiny model taught to follow a rule given in context,
and to answer the plain prompt for only part of the operations (docs/skillworld.md).

Starting from the random-init tiny model (:func:`sgsd.tiny.model.build_tiny_model`), every
step mixes rows from the world's ``train`` split (:data:`WARM_START`):

* **teacher rows** for every operation: the problem after a guidance block rendered by
  the trainer's own code (:meth:`sgsd.skills.bank.SkillBank.teachers` on the world's bank,
  K = 2, the default retrieval and style), answered by what *that teacher's skill* says,
  right or misleading (:func:`sgsd.skillworld.bank.skill_rules`). So the model learns to
  read the rule, and a misleading skill makes it answer wrongly;
* **plain rows**, the student's prompt, answered right for the :data:`TAUGHT` operations;
* from step ``unsure_from``, **unsure rows**: the plain prompt of the other operations,
  each answer digit right with probability ``unsure_keep`` and random otherwise.

At step 0 the plain student therefore knows half of the operations and has a weak grasp of
the rest, and the teacher with the right skill knows all of them: :func:`headroom`
measures the three accuracies on the held-out split. The result is cached like the tiny
model (:func:`world_model_dir`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

__all__ = [
    "TAUGHT",
    "WARM_START",
    "headroom",
    "save_world_model",
    "warm_start",
    "world_model_dir",
]

#: The operations the plain prompt is taught; the others are learnt only with a skill.
TAUGHT = ("increment", "rotate")

#: Steps; plain, unsure and teacher rows per step; the unsure rows' digit-keep
#: probability and first step; peak learning rate (AdamW, linear decay after a short
#: warm-up); K, the teachers retrieved per problem (the runner's ``--num-teachers``: the
#: operation's right and misleading skill). 1000 steps: in 600-800-step trials the
#: right-skill context still failed one operation in four on the held-out split. Unsure
#: rows from the start slowed the rest of the learning; unsure rows with fully random
#: digits left SGSD no gradient (docs/skillworld.md).
WARM_START: dict = {
    "steps": 1000,
    "plain_rows": 6,
    "unsure_rows": 2,
    "unsure_keep": 0.4,
    "unsure_from": 700,
    "teacher_rows": 8,
    "lr": 3e-3,
    "warmup": 20,
    "num_teachers": 2,
}

_MARKER = "sgsd_skillworld_model.json"
#: Bump when the training procedure changes in a way WARM_START does not show (part of
#: the cache key, with the settings, the bank and the train split).
_FORMAT_VERSION = 1


def _teacher_contexts(problem: dict, k: int) -> list[tuple[str, str]]:
    """``(teacher text, the operation its skill's rule is)`` for the K teachers the trainer
    retrieves for ``problem`` (default retrieval and style)."""
    from sgsd.config import TrainConfig
    from sgsd.skills.bank import SkillBank
    from sgsd.skillworld.bank import BANK_FILE, skill_rules

    cfg = TrainConfig()
    bank = _bank(BANK_FILE, SkillBank)
    rules = skill_rules()
    specs = bank.teachers(problem["problem"], k, mode=cfg.retrieval_mode, style=cfg.teacher_style)
    return [(s.context, rules[s.skill_id]) for s in specs]


_BANKS: dict = {}


def _bank(path, cls):
    if path not in _BANKS:
        _BANKS[path] = cls.load(path)
    return _BANKS[path]


def examples(tokenizer, settings: dict | None = None) -> tuple[list, list, list]:
    """``(plain rows, unsure rows, teacher rows)`` for the ``train`` split. A row is
    ``(token ids, prompt length, answer digit positions)``: plain rows answered right for
    the :data:`TAUGHT` operations; unsure rows, the plain prompt of the other operations
    with digits to redraw at random (positions given: :func:`_redraw`); for every problem
    one teacher row per retrieved teacher, answered by that teacher's skill."""
    from sgsd import prompts
    from sgsd.skillworld.tasks import apply_rule, problems
    from sgsd.tiny.warm_start import encode_example

    cfg = {**WARM_START, **(settings or {})}
    digit_ids = {tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)}
    plain, unsure, teacher = [], [], []
    for p in problems("train"):
        text = prompts.student_text(p["problem"])
        ids, start = encode_example(tokenizer, text, p["solution"], p["id"])
        if p["operation"] in TAUGHT:
            plain.append((ids, start, None))
        else:
            positions = [i for i in range(start, len(ids)) if ids[i] in digit_ids]
            assert len(positions) == len(p["digits"]), p["id"]  # one token per digit
            unsure.append((ids, start, positions))
        for text, rule in _teacher_contexts(p, cfg["num_teachers"]):
            answer = f"\\boxed{{{apply_rule(rule, p['digits'])}}}"
            teacher.append((*encode_example(tokenizer, text, answer, p["id"]), None))
    return plain, unsure, teacher


def _redraw(
    rows, rng: random.Random, digit_tokens: list[int], keep: float
) -> list[tuple[list[int], int]]:
    """``(ids, prompt length)`` rows where each answer digit a row marks stays right with
    probability ``keep`` and is drawn at random otherwise, afresh at every draw: the plain
    prompt of an operation it is not taught learns the answer's format and a weak grasp
    of the rule (a digit right about half the time, a whole answer rarely)."""
    out = []
    for ids, start, positions in rows:
        if positions:
            ids = list(ids)
            for i in positions:
                if rng.random() >= keep:
                    ids[i] = rng.choice(digit_tokens)
        out.append((ids, start))
    return out


def warm_start(model, tokenizer, *, seed: int = 0, settings: dict | None = None) -> float:
    """Train ``model`` in place; returns the mean loss per answer token of the last 20
    steps. Deterministic in ``seed`` (one thread, the caller's RNG untouched)."""
    from sgsd.tiny.warm_start import supervised_steps

    cfg = {**WARM_START, **(settings or {})}
    plain, unsure, teacher = examples(tokenizer, cfg)
    digit_tokens = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    rng = random.Random(seed)

    def batches(step: int) -> list:  # plain rows, unsure rows (late), teacher rows
        unsure_rows = cfg["unsure_rows"] if step >= cfg["unsure_from"] else 0
        return [
            _redraw(rng.sample(pool, n), rng, digit_tokens, cfg["unsure_keep"])
            for pool, n in (
                (plain, cfg["plain_rows"]),
                (unsure, unsure_rows),
                (teacher, cfg["teacher_rows"]),
            )
            if n
        ]

    return supervised_steps(
        model, tokenizer.pad_token_id, cfg, batches, seed=seed, what="the skill world's model"
    )


def _fingerprint(seed: int) -> str:
    from sgsd.skillworld.bank import build_bank
    from sgsd.skillworld.tasks import problems
    from sgsd.tiny.model import tiny_model_fingerprint

    payload = {
        "tiny": tiny_model_fingerprint(seed),
        "warm_start": WARM_START,
        "taught": TAUGHT,
        "bank": build_bank(),
        "problems": problems("train"),
        "format": _FORMAT_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def world_model_dir(seed: int = 0) -> Path:
    """The cache directory of the world's warm-started model (beside the tiny model's)."""
    from sgsd.tiny.model import default_tiny_model_dir

    root = default_tiny_model_dir(seed).parent
    return root / f"tiny-qwen3-skillworld-{_fingerprint(seed)[:16]}"


def save_world_model(seed: int = 0) -> Path:
    """Build (once) and return the directory of the world's warm-started tiny model, a
    ``save_pretrained`` directory the trainer and the evaluator load with ``--model``."""
    path = world_model_dir(seed)
    marker = path / _MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == _fingerprint(seed):
        return path
    from sgsd.tiny.model import _portable_tokenizer_config, build_tiny_model

    model, tokenizer = build_tiny_model(seed)
    loss = warm_start(model, tokenizer, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        os.chmod(tmp, 0o755)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _portable_tokenizer_config(tmp)
        meta = {"fingerprint": _fingerprint(seed), "seed": seed, "final_loss": loss}
        (tmp / _MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def headroom(model, tokenizer, *, n: int = 1, temperature: float = 0.0, limit: int | None = None):
    """Held-out accuracy at step 0 under three prompts: ``plain`` (the student's),
    ``right_skill`` (the guidance block of the operation's correct skill and its mistake)
    and ``misleading_skill`` (its misleading skill and the same mistake), each in [0, 1],
    plus per-operation accuracies under ``by_operation``. Sampling is seeded, so the
    numbers are reproducible; the caller's RNG is left as it was."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _headroom(model, tokenizer, n, temperature, limit)


def _headroom(model, tokenizer, n: int, temperature: float, limit: int | None) -> dict:
    import torch

    from sgsd import prompts
    from sgsd.eval.verify import verify
    from sgsd.skills.bank import SkillBank
    from sgsd.skillworld.bank import BANK_FILE
    from sgsd.skillworld.tasks import problems

    bank = _bank(BANK_FILE, SkillBank)
    rows = problems("test")[:limit]
    texts = {"plain": [], "right_skill": [], "misleading_skill": []}
    for p in rows:
        op = p["operation"]
        mistake = bank.get_mistake(f"{op}_mistake")
        texts["plain"].append(prompts.student_text(p["problem"]))
        for key, sid in (("right_skill", f"{op}_rule"), ("misleading_skill", f"{op}_misleading")):
            guidance = prompts.format_guidance([bank.get_skill(sid)], [mistake])
            texts[key].append(prompts.sgsd_teacher_text(p["problem"], guidance))
    out: dict = {"by_operation": {}}
    for key, batch in texts.items():
        correct = []
        for i in range(0, len(batch), 32):
            ids = [
                prompts.render_prompt_ids(tokenizer, [{"role": "user", "content": t}])
                for t in batch[i : i + 32]
            ]
            width = max(map(len, ids))
            x = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in ids])
            attn = (
                torch.arange(width)[None] >= torch.tensor([width - len(r) for r in ids])[:, None]
            ).long()
            with torch.no_grad():
                gen = model.generate(
                    input_ids=x.repeat_interleave(n, 0),
                    attention_mask=attn.repeat_interleave(n, 0),
                    max_new_tokens=24,
                    do_sample=temperature > 0,
                    temperature=temperature if temperature > 0 else None,
                    top_p=0.95 if temperature > 0 else None,
                    top_k=None,
                    pad_token_id=tokenizer.pad_token_id,
                )
            for j, g in enumerate(gen[:, width:]):
                text = tokenizer.decode(g, skip_special_tokens=True)
                correct.append(verify(text, rows[i + j // n]["answer"]).correct)
        per_problem = [sum(correct[j * n : (j + 1) * n]) / n for j in range(len(batch))]
        out[key] = sum(per_problem) / len(per_problem)
        for p, acc in zip(rows, per_problem):
            out["by_operation"].setdefault(p["operation"], {}).setdefault(key, []).append(acc)
    for op, accs in out["by_operation"].items():
        out["by_operation"][op] = {k: sum(v) / len(v) for k, v in accs.items()}
    return out
