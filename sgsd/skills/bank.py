"""Skill bank (published SGSD format) and BM25 retrieval of skill-conditioned teachers.

(About 600 lines, over the usual 450 lines on purpose: one class whose format checks,
online-item rules and retrieval all work on the same item lists; the tokenizer and scorer
live in :mod:`sgsd.skills.bm25`.)

Format (the one the SGSD authors publish, read and written losslessly)::

    {"general_skills":  [{"skill_id", "title", "principle", "when_to_apply", ...}, ...],
     "common_mistakes": [{"mistake_id", "description", "why_it_happens", "how_to_avoid", ...}],
     "task_specific_skills": {...},
     "metadata": {...},
     ...}

Unknown keys, at the top level and inside items, are kept and written back unchanged.

**Static and online items.** Items read from a file are *static*: never changed or
evicted (the cold-start bank). Items added during training are *online*, with ids
``dyn_###`` (a counter over the bank's life, never reused, kept in :meth:`state_dict`),
bounded by ``online_capacity`` per kind (30, as published). They enter one at a time with
:meth:`SkillBank.add_skill` / :meth:`SkillBank.add_mistake`, or a whole kind at once with
:meth:`SkillBank.set_online` (what :mod:`sgsd.skills.online_update` does after an LLM merge). When
a kind is full the **oldest online item of that kind is evicted** (FIFO): online items
are extracted from recent rollouts, so the oldest is the one distilled from the most
out-of-date policy. Adding an item whose text equals an existing one is a no-op that
returns the existing id. :meth:`save` writes
online items after the static ones, and records which ids are online (and the capacity)
under ``metadata["sgsd_online"]``, so a saved bank reloads with the same split; a bank
without online items is written back exactly as it was read.

**Retrieval** (:meth:`SkillBank.teachers`): two BM25 indices (skills, mistakes), built
lazily and rebuilt after online updates, over item text tokenised by
:func:`sgsd.skills.bm25.math_tokenize` (LaTeX commands, numbers and operators are tokens;
LaTeX commands also add the words they stand for, so ``\\binom`` in a problem meets
"binomial" in a skill). The k-th ranked skill is paired with the k-th ranked mistake
(docs/design.md §2).

Teacher weights: each index's scores are divided by that index's best score for this
query (so the top item scores 1 and all scores lie in [0, 1]); a pair's score is the mean
of its two normalised scores; ``weight = softmax(pair_score / temperature)`` over the
returned pairs. Raw BM25 is unbounded and its scale moves with query length, term rarity
and bank size, so a softmax on raw scores would make the weights near one-hot for long
problems and near uniform for short ones; dividing by the per-query maximum removes that
scale while keeping ratios between items (unlike min-max, which would exaggerate tiny
differences between near-ties). If nothing in an index matches the query at all, its
normalised scores are 0, and the weights fall back towards uniform.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sgsd.prompts import (
    DEFAULT_TEACHER_STYLE,
    TEACHER_STYLES,
    format_guidance,
    sgsd_teacher_text,
)
from sgsd.skills.bm25 import BM25, math_tokenize

__all__ = [
    "BUNDLED_BANKS",
    "DEFAULT_BANK_FILE",
    "DEFAULT_ONLINE_CAPACITY",
    "DEFAULT_TEMPERATURE",
    "MISTAKE_FIELDS",
    "ONLINE_ID_PREFIX",
    "SKILL_FIELDS",
    "SkillBank",
    "SkillBankError",
    "TeacherSpec",
    "math_tokenize",
]

#: Required fields of a general skill / a common mistake (the first is the id).
SKILL_FIELDS = ("skill_id", "title", "principle", "when_to_apply")
MISTAKE_FIELDS = ("mistake_id", "description", "why_it_happens", "how_to_avoid")
#: Default cap on online-added items, per kind (the published online update keeps 30).
DEFAULT_ONLINE_CAPACITY = 30
#: Prefix of online item ids (``dyn_001``...).
ONLINE_ID_PREFIX = "dyn_"
#: Default softmax temperature for teacher weights (pair scores lie in [0, 1], so at 0.5
#: the best pair weighs at most e^2 ~ 7.4x the weakest).
DEFAULT_TEMPERATURE = 0.5

_ONLINE_META_KEY = "sgsd_online"
_STATE_VERSION = 1
#: The competition-math bank bundled with the package (:meth:`SkillBank.default`).
DEFAULT_BANK_FILE = Path(__file__).resolve().parent.parent / "assets" / "default_skill_bank.json"
#: Banks bundled with the package, by the name ``--skill-bank`` accepts.
BUNDLED_BANKS = {
    "skillworld": Path(__file__).resolve().parent.parent / "assets" / "skillworld_skill_bank.json"
}

# Kind descriptors: (list key in the file, id field, required fields, fields indexed).
_KINDS = {
    "skill": ("general_skills", "skill_id", SKILL_FIELDS, ("title", "principle", "when_to_apply")),
    "mistake": (
        "common_mistakes",
        "mistake_id",
        MISTAKE_FIELDS,
        ("description", "why_it_happens", "how_to_avoid"),
    ),
}


class SkillBankError(ValueError):
    """A skill bank file or item is malformed. The message names the offending item."""


# --------------------------------------------------------------------------- teachers
@dataclass(frozen=True)
class TeacherSpec:
    """One skill-conditioned teacher for one problem.

    ``context`` is the teacher's full user-message text (guidance block + the student's
    problem prompt, :func:`sgsd.prompts.sgsd_teacher_text`); ``guidance`` the block alone
    (pass it to :func:`sgsd.prompts.sgsd_teacher_messages`). ``weight`` is the teacher's
    weight w_k (weights of one call sum to 1). Scores are normalised BM25 scores in [0, 1]
    (see the module docstring); ``score`` is the pair score the weight is a softmax of.
    ``skill_id`` / ``mistake_id`` is None when the bank has no item of that kind.
    """

    context: str
    guidance: str
    weight: float
    skill_id: str | None
    mistake_id: str | None
    skill_score: float
    mistake_score: float
    score: float
    rank: int


def _softmax(xs: list[float], temperature: float) -> list[float]:
    m = max(xs)
    e = [math.exp((x - m) / temperature) for x in xs]
    s = sum(e)
    return [v / s for v in e]


# --------------------------------------------------------------------------- the bank
class SkillBank:
    """General skills and common mistakes, with BM25 retrieval of teacher contexts.

    Build with :meth:`load`, :meth:`default`, :meth:`from_dict` or
    :meth:`from_state_dict`. Items are plain dicts in file order (static, then online).
    """

    def __init__(
        self,
        data: Mapping[str, Any] | None = None,
        *,
        online_capacity: int = DEFAULT_ONLINE_CAPACITY,
        source: str = "<dict>",
    ):
        if (
            isinstance(online_capacity, bool)
            or not isinstance(online_capacity, int)
            or (online_capacity < 0)
        ):
            raise ValueError(f"online_capacity must be an int >= 0, got {online_capacity!r}")
        data = {"general_skills": [], "common_mistakes": []} if data is None else data
        if not isinstance(data, Mapping):
            raise SkillBankError(
                f"{source}: a skill bank must be a JSON object, got {type(data).__name__}"
            )
        self.source = source
        self.online_capacity = online_capacity
        self._data = copy.deepcopy(dict(data))  # everything besides the item lists
        meta = self._data.get("metadata")
        if meta is not None and not isinstance(meta, dict):
            raise SkillBankError(
                f"{source}: 'metadata' must be an object, got {type(meta).__name__}"
            )
        tss = self._data.get("task_specific_skills")
        if tss is not None and not isinstance(tss, (dict, list)):
            raise SkillBankError(
                f"{source}: 'task_specific_skills' must be an object or a "
                f"list, got {type(tss).__name__}"
            )
        online_meta = meta.pop(_ONLINE_META_KEY, None) if isinstance(meta, dict) else None
        online_ids: dict[str, set] = {"skill": set(), "mistake": set()}
        if online_meta is not None:
            if not isinstance(online_meta, dict):
                raise SkillBankError(f"{source}: metadata.{_ONLINE_META_KEY} must be an object")
            online_ids = {
                "skill": set(online_meta.get("skills", [])),
                "mistake": set(online_meta.get("mistakes", [])),
            }
            if "capacity" in online_meta:
                self.online_capacity = int(online_meta["capacity"])
            if not meta:
                del self._data["metadata"]  # it held nothing else: it was ours
        self._static: dict[str, list[dict]] = {}
        self._online: dict[str, list[dict]] = {}
        for kind, (key, id_field, _, _) in _KINDS.items():
            items = self._data.pop(key, [])
            if not isinstance(items, list):
                raise SkillBankError(
                    f"{source}: '{key}' must be a list, got {type(items).__name__}"
                )
            checked = [self._validate(kind, item, f"{key}[{i}]") for i, item in enumerate(items)]
            self._check_unique(kind, checked)
            self._static[kind] = [it for it in checked if it[id_field] not in online_ids[kind]]
            self._online[kind] = [it for it in checked if it[id_field] in online_ids[kind]]
        self._key_order = list(data.keys())
        self._indices: dict[str, BM25 | None] = {"skill": None, "mistake": None}
        self._counter = 0

    # ---- validation -------------------------------------------------------------------
    def _validate(self, kind: str, item: Any, where: str) -> dict:
        _, id_field, fields, _ = _KINDS[kind]
        if not isinstance(item, Mapping):
            raise SkillBankError(
                f"{self.source}: {where}: expected an object, got {type(item).__name__}"
            )
        item_id = item.get(id_field)
        label = f"{where} ({id_field} {item_id!r})" if isinstance(item_id, str) else where
        for f in fields:
            if f not in item:
                raise SkillBankError(f"{self.source}: {label}: missing required field '{f}'")
            if not isinstance(item[f], str):
                raise SkillBankError(
                    f"{self.source}: {label}: field '{f}' must be a string, "
                    f"got {type(item[f]).__name__}"
                )
        if not item_id.strip():
            raise SkillBankError(f"{self.source}: {where}: '{id_field}' is empty")
        main = "principle" if kind == "skill" else "description"  # the item's substance
        if not item[main].strip():
            raise SkillBankError(f"{self.source}: {label}: field '{main}' is empty")
        return copy.deepcopy(dict(item))

    def _check_unique(self, kind: str, items: list[dict]) -> None:
        key, id_field, _, _ = _KINDS[kind]
        seen: dict[str, int] = {}
        for i, it in enumerate(items):
            j = seen.setdefault(it[id_field], i)
            if j != i:
                raise SkillBankError(
                    f"{self.source}: {key}[{i}]: duplicate {id_field} "
                    f"{it[id_field]!r} (first at {key}[{j}])"
                )

    # ---- construction / persistence ------------------------------------------------------
    @classmethod
    def load(
        cls, path: str | os.PathLike, *, online_capacity: int = DEFAULT_ONLINE_CAPACITY
    ) -> SkillBank:
        """Read a bank from a JSON file (``SkillBankError`` naming the problem if invalid).
        ``path`` may also name a bundled bank (:data:`BUNDLED_BANKS`: ``"skillworld"``)."""
        path = BUNDLED_BANKS.get(str(path), Path(path))
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"skill bank file not found: {path}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SkillBankError(
                f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
            ) from None
        return cls(data, online_capacity=online_capacity, source=str(path))

    @classmethod
    def default(cls, *, online_capacity: int = DEFAULT_ONLINE_CAPACITY) -> SkillBank:
        """The competition-math bank bundled with the package (written for this project)."""
        return cls.load(DEFAULT_BANK_FILE, online_capacity=online_capacity)

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, online_capacity: int = DEFAULT_ONLINE_CAPACITY
    ) -> SkillBank:
        return cls(data, online_capacity=online_capacity)

    def to_dict(self) -> dict:
        """The bank in the published format (a deep copy; JSON-serialisable)."""
        out: dict[str, Any] = {}
        lists = {_KINDS[k][0]: copy.deepcopy(self._static[k] + self._online[k]) for k in _KINDS}
        rest = copy.deepcopy(self._data)
        if self._online["skill"] or self._online["mistake"]:
            meta = rest.setdefault("metadata", {})
            meta[_ONLINE_META_KEY] = {
                "skills": [it["skill_id"] for it in self._online["skill"]],
                "mistakes": [it["mistake_id"] for it in self._online["mistake"]],
                "capacity": self.online_capacity,
            }
        for key in [*self._key_order, *lists, *rest]:
            if key in out:
                continue
            if key in lists:
                out[key] = lists[key]
            elif key in rest:
                out[key] = rest[key]
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write the bank as JSON atomically (temporary file in the same folder + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; a bank is a shared file
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def state_dict(self) -> dict:
        """Everything needed to restore the bank exactly (JSON-serialisable)."""
        return {
            "version": _STATE_VERSION,
            "data": self.to_dict(),
            "online_capacity": self.online_capacity,
            "counter": self._counter,
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> SkillBank:
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
            raise SkillBankError(
                f"unsupported skill-bank state (expected a dict with version {_STATE_VERSION})"
            )
        bank = cls(
            state["data"], online_capacity=int(state["online_capacity"]), source="<state_dict>"
        )
        bank._counter = int(state.get("counter", 0))
        return bank

    # ---- access --------------------------------------------------------------------------
    @property
    def skills(self) -> list[dict]:
        """All general skills (static, then online), as copies."""
        return copy.deepcopy(self._static["skill"] + self._online["skill"])

    @property
    def mistakes(self) -> list[dict]:
        """All common mistakes (static, then online), as copies."""
        return copy.deepcopy(self._static["mistake"] + self._online["mistake"])

    @property
    def online_skill_ids(self) -> list[str]:
        return [it["skill_id"] for it in self._online["skill"]]

    @property
    def online_mistake_ids(self) -> list[str]:
        return [it["mistake_id"] for it in self._online["mistake"]]

    @property
    def metadata(self) -> dict:
        return copy.deepcopy(self._data.get("metadata", {}))

    def get_skill(self, skill_id: str) -> dict:
        return copy.deepcopy(self._find("skill", skill_id))

    def get_mistake(self, mistake_id: str) -> dict:
        return copy.deepcopy(self._find("mistake", mistake_id))

    def _find(self, kind: str, item_id: str) -> dict:
        id_field = _KINDS[kind][1]
        for it in self._static[kind] + self._online[kind]:
            if it[id_field] == item_id:
                return it
        raise KeyError(f"no {kind} with {id_field} {item_id!r}")

    def __len__(self) -> int:
        return sum(len(self._static[k]) + len(self._online[k]) for k in _KINDS)

    def __repr__(self) -> str:
        return (
            f"SkillBank({len(self._static['skill'])}+{len(self._online['skill'])} skills, "
            f"{len(self._static['mistake'])}+{len(self._online['mistake'])} mistakes, "
            f"online_capacity={self.online_capacity}, source={self.source!r})"
        )

    # ---- online updates ------------------------------------------------------------------
    def add_skill(
        self,
        title: str,
        principle: str,
        when_to_apply: str = "",
        *,
        skill_id: str | None = None,
        **extra: Any,
    ) -> str:
        """Add an online general skill; returns its id (the next ``dyn_###`` if not given).

        Evicts the oldest online skill when ``online_capacity`` is reached; a skill with
        the same title/principle/when_to_apply as an existing one is not added twice.
        """
        fields = {"title": title, "principle": principle, "when_to_apply": when_to_apply}
        return self._add("skill", skill_id, fields, extra)

    def add_mistake(
        self,
        description: str,
        why_it_happens: str = "",
        how_to_avoid: str = "",
        *,
        mistake_id: str | None = None,
        **extra: Any,
    ) -> str:
        """Add an online common mistake; returns its id. Same policy as :meth:`add_skill`."""
        fields = {
            "description": description,
            "why_it_happens": why_it_happens,
            "how_to_avoid": how_to_avoid,
        }
        return self._add("mistake", mistake_id, fields, extra)

    def _add(self, kind: str, item_id: str | None, fields: dict, extra: dict) -> str:
        _, id_field, _, text_fields = _KINDS[kind]
        if self.online_capacity == 0:
            raise ValueError(f"online_capacity is 0: this bank accepts no online {kind}s")
        pool = self._static[kind] + self._online[kind]
        for it in pool:  # same text -> same item
            if all(it.get(f, "").strip() == str(fields[f]).strip() for f in text_fields):
                return it[id_field]
        if item_id is None:
            item_id = self.next_online_id()
        item = self._validate(kind, {id_field: item_id, **fields, **extra}, f"new {kind}")
        if any(it[id_field] == item_id for it in pool):
            raise SkillBankError(
                f"{self.source}: new {kind}: {id_field} {item_id!r} already exists"
            )
        online = self._online[kind]
        online.append(item)
        while len(online) > self.online_capacity:
            online.pop(0)  # FIFO: the oldest online item goes first
        self._indices[kind] = None  # rebuilt lazily at the next retrieval
        return item_id

    def next_online_id(self) -> str:
        """A fresh ``dyn_###`` id (the counter only grows, so an evicted id never returns)."""
        existing = {it[_KINDS[k][1]] for k in _KINDS for it in self._static[k] + self._online[k]}
        while True:
            self._counter += 1
            item_id = f"{ONLINE_ID_PREFIX}{self._counter:03d}"
            if item_id not in existing:
                return item_id

    def set_online(self, kind: str, items: list[Mapping[str, Any]]) -> None:
        """Replace every online item of ``kind`` ("skill" or "mistake") with ``items``
        (oldest first, each with its id). Static items are untouched; raises
        ``SkillBankError`` for an invalid item or an id clash, ``ValueError`` when there
        are more than ``online_capacity`` items."""
        if kind not in _KINDS:
            raise ValueError(f"kind must be 'skill' or 'mistake', got {kind!r}")
        if len(items) > self.online_capacity:
            raise ValueError(
                f"{len(items)} online {kind}s exceed online_capacity={self.online_capacity}"
            )
        new = [self._validate(kind, it, f"online {kind}[{i}]") for i, it in enumerate(items)]
        self._check_unique(kind, self._static[kind] + new)
        self._online[kind] = new
        self._indices[kind] = None

    def set_metadata(self, key: str, value: Any) -> None:
        """Set ``metadata[key]`` (JSON-serialisable; written by :meth:`save`)."""
        if not isinstance(key, str) or key == _ONLINE_META_KEY:
            raise ValueError(f"metadata key must be a str other than {_ONLINE_META_KEY!r}")
        meta = self._data.setdefault("metadata", {})
        if "metadata" not in self._key_order:
            self._key_order.append("metadata")
        meta[key] = copy.deepcopy(value)

    def clear_online(self) -> None:
        """Drop every online item (static items stay)."""
        for kind in _KINDS:
            self._online[kind] = []
            self._indices[kind] = None

    # ---- retrieval -----------------------------------------------------------------------
    def _index(self, kind: str) -> BM25:
        if self._indices[kind] is None:
            text_fields = _KINDS[kind][3]
            docs = [
                math_tokenize(" ".join(it.get(f, "") for f in text_fields))
                for it in self._static[kind] + self._online[kind]
            ]
            self._indices[kind] = BM25(docs)
        return self._indices[kind]

    def _normalised_scores(self, kind: str, query: list[str]) -> list[float]:
        scores = self._index(kind).scores(query)
        top = max(scores, default=0.0)
        return [s / top for s in scores] if top > 0 else [0.0] * len(scores)

    def retrieve(self, problem: str, k: int, kind: str = "skill") -> list[tuple[dict, float]]:
        """Top-``k`` items of one ``kind`` ("skill" or "mistake") for ``problem``, as
        ``(item, normalised score)``, best first; ties keep bank order."""
        if kind not in _KINDS:
            raise ValueError(f"kind must be 'skill' or 'mistake', got {kind!r}")
        _check_k(k)
        items = self._static[kind] + self._online[kind]
        scores = self._normalised_scores(kind, math_tokenize(_query_text(problem)))
        order = sorted(range(len(items)), key=lambda i: (-scores[i], i))[:k]
        return [(copy.deepcopy(items[i]), scores[i]) for i in order]

    def teachers(
        self,
        problem: str,
        k: int,
        *,
        mode: str = "bm25",
        temperature: float = DEFAULT_TEMPERATURE,
        seed: int | None = None,
        style: str = DEFAULT_TEACHER_STYLE,
    ) -> list[TeacherSpec]:
        """Up to ``k`` skill-conditioned teachers for ``problem`` (docs/design.md §2).

        ``mode="bm25"``: the k-th best skill paired with the k-th best mistake, weights
        ``softmax(pair_score / temperature)`` (module docstring). ``mode="random"`` (an
        ablation): skills and mistakes drawn uniformly without replacement, equal weights;
        ``seed=None`` derives the draw from the problem text, so it is reproducible.

        Returns ``min(k, #skills, #mistakes)`` teachers (or ``min(k, #items)`` of the one
        kind when the other is empty; ``[]`` for an empty bank or ``k == 0``). Weights are
        > 0 and sum to 1. Ties are broken by bank order, so the result is deterministic.
        ``style`` is the teacher-context style (:data:`sgsd.prompts.TEACHER_STYLES`).
        """
        if mode not in ("bm25", "random"):
            raise ValueError(f"mode must be 'bm25' or 'random', got {mode!r}")
        if style not in TEACHER_STYLES:
            raise ValueError(f"style must be one of {TEACHER_STYLES}, got {style!r}")
        _check_k(k)
        if not (
            isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
        ):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        text = _query_text(problem)
        skills = self._static["skill"] + self._online["skill"]
        mistakes = self._static["mistake"] + self._online["mistake"]
        sizes = [n for n in (len(skills), len(mistakes)) if n]
        n = min([k, *sizes]) if sizes else 0
        if n == 0:
            return []
        query = math_tokenize(text)
        s_scores = self._normalised_scores("skill", query)
        m_scores = self._normalised_scores("mistake", query)
        if mode == "bm25":
            s_order = sorted(range(len(skills)), key=lambda i: (-s_scores[i], i))[:n]
            m_order = sorted(range(len(mistakes)), key=lambda i: (-m_scores[i], i))[:n]
        else:
            if seed is None:
                seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
            rng = random.Random(seed)
            s_order = rng.sample(range(len(skills)), n) if skills else []
            m_order = rng.sample(range(len(mistakes)), n) if mistakes else []
        specs_in = []
        for r in range(n):
            sk = skills[s_order[r]] if s_order else None
            mi = mistakes[m_order[r]] if m_order else None
            ss = s_scores[s_order[r]] if s_order else 0.0
            ms = m_scores[m_order[r]] if m_order else 0.0
            # A missing side does not drag the pair score down: average what exists.
            pair = (ss + ms) / 2 if (sk is not None and mi is not None) else ss + ms
            specs_in.append((sk, mi, ss, ms, pair))
        if mode == "bm25":
            weights = _softmax([p[4] for p in specs_in], float(temperature))
        else:
            weights = [1.0 / n] * n
        out = []
        for r, ((sk, mi, ss, ms, pair), w) in enumerate(zip(specs_in, weights)):
            guidance = format_guidance([sk] if sk else [], [mi] if mi else [], style=style)
            out.append(
                TeacherSpec(
                    context=sgsd_teacher_text(text, guidance, style=style),
                    guidance=guidance,
                    weight=w,
                    skill_id=sk["skill_id"] if sk else None,
                    mistake_id=mi["mistake_id"] if mi else None,
                    skill_score=ss,
                    mistake_score=ms,
                    score=pair,
                    rank=r,
                )
            )
        return out


def _check_k(k: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}")


def _query_text(problem: Any) -> str:
    text = getattr(problem, "problem", problem)
    if not isinstance(text, str) or not text.strip():
        raise ValueError("problem must be a non-empty str (or have a non-empty .problem)")
    return text
