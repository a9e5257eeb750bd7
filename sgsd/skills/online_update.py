"""Online skill-bank update (docs/design.md §2): the policy refreshes its own bank.

Every ``skill_update_every`` steps, when the step's success rate (all ranks) is below
``skill_update_threshold``, the policy itself (through the colocated rollout engine,
greedy decoding) turns the step's successes into general skills and its failures into
common mistakes (at most 3 per trajectory), LLM-merges them among themselves, then with
the bank's existing online items, and writes the result back as the online items.
Cold-start (static) items are never changed.

**Caps and eviction** (per kind, per update), applied to the merge of existing online
items + new candidates; each output item's provenance (``merged_from``, see
:mod:`sgsd.skills.merge`) decides what it is:

* an output covering existing online items *updates* the oldest of them (it keeps that
  id and its age); the other existing items it covers are *merged* into it (removed);
* an output covering no existing item (or with no usable provenance) is *new*; at most
  ``max_new`` (5) new items are kept, in the merge's order (*dropped* beyond that), and
  they get fresh ``dyn_###`` ids;
* an existing item that no output covers stays unchanged: an unreadable or partial merge
  reply never deletes knowledge;
* then the oldest online items are *evicted* until at most ``online_capacity`` (30)
  remain (FIFO: the oldest was distilled from the most out-of-date policy).

So a kind grows by at most ``max_new`` per update. Ids stay stable across updates
(unlike the published code, which renumbers ``dyn_###`` each time), so logs and
retrieval statistics can follow an item. New candidates whose text equals any bank item
are dropped before merging.

:class:`OnlineBankUpdater` wires this into the trainer (:mod:`sgsd.train`): it gathers
the step's rollouts to rank 0, updates there, broadcasts the bank (every rank then holds
the identical bank), saves ``OUTPUT/skill_bank/step_NNNNNN.json`` and returns the step's
``bank_*`` metrics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sgsd.skills.bank import SkillBank
from sgsd.skills.extraction import (
    LLM,
    MAX_ITEMS_PER_RECORD,
    MemoryRecord,
    extract_from_records,
    item_key,
)
from sgsd.skills.merge import SRC, hierarchical_merge

__all__ = ["OnlineBankUpdater", "UpdateReport", "online_update", "resolve_online"]

log = logging.getLogger(__name__)
_ID = {"skill": "skill_id", "mistake": "mistake_id"}
_HISTORY_KEY = "sgsd_online_updates"


@dataclass
class UpdateReport:
    """What one online update did. Per-kind counters are dicts ``{"skill", "mistake"}``."""

    records: int = 0
    successes: int = 0
    failures: int = 0
    extract_parse_failures: int = 0
    merge_parse_failures: int = 0
    llm_prompts: int = 0
    candidates: dict = field(default_factory=lambda: {"skill": 0, "mistake": 0})
    added: dict = field(default_factory=lambda: {"skill": 0, "mistake": 0})
    updated: dict = field(default_factory=lambda: {"skill": 0, "mistake": 0})
    merged: dict = field(default_factory=lambda: {"skill": 0, "mistake": 0})
    dropped: dict = field(default_factory=lambda: {"skill": 0, "mistake": 0})
    evicted: dict = field(default_factory=lambda: {"skill": 0, "mistake": 0})
    seconds: float = 0.0
    unparsed: list = field(default_factory=list)  # {"stage", "reply"} for the debug file

    def summary(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "unparsed"}
        return json.loads(json.dumps(out))


def resolve_online(
    kind: str,
    existing: list[dict],
    merged: list[dict],
    *,
    max_new: int,
    capacity: int,
    new_id,
) -> tuple[list[dict], dict[str, int]]:
    """The new online items of ``kind`` from the merge output (module docstring rules).

    ``existing``: current online items, oldest first. ``merged``: merge output, items
    with ``_src`` (ids of the existing items they cover; other strings for new
    candidates). ``new_id()`` gives a fresh id. Returns ``(items, counts)`` with counts
    ``added``, ``updated``, ``merged``, ``dropped``, ``evicted``.
    """
    id_field = _ID[kind]
    order = {e[id_field]: i for i, e in enumerate(existing)}
    by_key = {item_key(kind, e): e[id_field] for e in existing}
    claimed: dict[str, dict] = {}
    absorbed: set[str] = set()
    fresh: list[dict] = []

    def free(item_id: str) -> bool:  # an existing item no earlier output has taken
        return item_id in order and item_id not in claimed and item_id not in absorbed

    for out in merged:
        ids = sorted({i for i in out.get(SRC, []) if free(i)}, key=order.__getitem__)
        if not ids and free(by_key.get(item_key(kind, out), "")):
            ids = [by_key[item_key(kind, out)]]
        if ids:
            claimed[ids[0]] = out
            absorbed.update(ids[1:])
        else:
            fresh.append(out)
    counts = {"added": 0, "updated": 0, "merged": len(absorbed), "dropped": 0, "evicted": 0}
    result = []
    for e in existing:
        if e[id_field] in absorbed:
            continue
        if e[id_field] in claimed:
            new = _clean(claimed[e[id_field]], id_field, e[id_field])
            counts["updated"] += item_key(kind, new) != item_key(kind, e)
            result.append(new)
        else:
            result.append(dict(e))
    kept = fresh[:max_new]
    counts["dropped"] = len(fresh) - len(kept)
    for out in kept:
        result.append(_clean(out, id_field, new_id()))
        counts["added"] += 1
    while len(result) > capacity:
        result.pop(0)
        counts["evicted"] += 1
    return result, counts


def _clean(item: dict, id_field: str, item_id: str) -> dict:
    out = {k: v for k, v in item.items() if k not in (SRC, "merged_from")}
    out[id_field] = item_id
    return out


def online_update(
    bank: SkillBank,
    records: list[MemoryRecord],
    llm: LLM,
    *,
    max_new: int = 5,
    max_items_per_record: int = MAX_ITEMS_PER_RECORD,
    group_size: int = 32,
    patience: int = 3,
    max_layers: int = 16,
) -> UpdateReport:
    """Update ``bank``'s online items in place from ``records`` (module docstring)."""
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 0:
        raise ValueError(f"max_new must be an int >= 0, got {max_new!r}")
    t0 = time.perf_counter()
    rep = UpdateReport(records=len(records))
    rep.successes = sum(r.success for r in records)
    rep.failures = rep.records - rep.successes
    extractions = extract_from_records(llm, records, max_items=max_items_per_record)
    rep.llm_prompts += len(extractions)
    for ex in extractions:
        if not ex.parsed:
            rep.extract_parse_failures += 1
            rep.unparsed.append({"stage": "extract", "record": ex.record_id, "reply": ex.reply})
    merge = {"group_size": group_size, "patience": patience, "max_layers": max_layers}
    for kind in ("skill", "mistake"):
        every = bank.skills if kind == "skill" else bank.mistakes
        known = {item_key(kind, it) for it in every}
        cands = [dict(it) for ex in extractions if ex.kind == kind for it in ex.items]
        cands = [c for c in cands if item_key(kind, c) not in known]
        rep.candidates[kind] = len(cands)
        for i, c in enumerate(cands):
            c[SRC] = [f"new:{i}"]
        new = hierarchical_merge(llm, kind, cands, **merge)
        _note_merge(rep, new, kind)
        fresh = [it for it in new.items if item_key(kind, it) not in known]
        if not fresh:
            continue
        online_ids = set(bank.online_skill_ids if kind == "skill" else bank.online_mistake_ids)
        existing = [it for it in every if it[_ID[kind]] in online_ids]
        pool = [{**e, SRC: [e[_ID[kind]]]} for e in existing]
        pool += [{**it, SRC: ["new"]} for it in fresh]
        both = hierarchical_merge(llm, kind, pool, **merge)
        _note_merge(rep, both, kind)
        items, counts = resolve_online(
            kind,
            existing,
            both.items,
            max_new=max_new,
            capacity=bank.online_capacity,
            new_id=bank.next_online_id,
        )
        bank.set_online(kind, items)
        for name, value in counts.items():
            getattr(rep, name)[kind] = value
    rep.seconds = time.perf_counter() - t0
    return rep


def _note_merge(rep: UpdateReport, result, kind: str) -> None:
    rep.merge_parse_failures += result.parse_failures
    rep.llm_prompts += result.calls
    for f in result.failed_replies:
        rep.unparsed.append({"stage": f"merge_{kind}", **f})


# ----------------------------------------------------------------------------- trainer
def _collectives():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def bank_fingerprint(bank: SkillBank) -> int:
    """A 62-bit hash of the bank's full state (equal banks, equal fingerprints)."""
    text = json.dumps(bank.state_dict(), sort_keys=True, ensure_ascii=False)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 2


class OnlineBankUpdater:
    """The trainer's hook: call :meth:`step` once per optimizer step on every rank.

    ``cfg`` needs ``skill_update_every`` (0 = off), ``skill_update_threshold``,
    ``skill_update_max_new``, ``skill_update_max_tokens``, ``num_teachers``,
    ``retrieval_mode``, ``enable_thinking``; ``out_dir`` is the run's output folder.
    """

    def __init__(self, cfg: Any, out_dir: str | Path, *, rank: int):
        self.cfg = cfg
        self.out = Path(out_dir) / "skill_bank"
        self.rank = rank

    @staticmethod
    def context_len(cfg: Any) -> int:
        """Context the rollout engine needs for update prompts (0 when updates are off):
        4096 prompt tokens (a 32-item merge prompt is about 3k Qwen3 tokens) + the reply."""
        return 4096 + cfg.skill_update_max_tokens if cfg.skill_update_every else 0

    def step(self, step: int, rollouts: list, bank: SkillBank, engine, tokenizer, device):
        """Returns ``(bank, metrics)``: the (possibly replaced) bank, identical on every
        rank, and this step's ``bank_*`` metrics (the same on every rank)."""
        import torch

        dist = _collectives()
        cfg = self.cfg
        # What retrieval picked this step (before any update): online share of teachers.
        online = set(bank.online_skill_ids) | set(bank.online_mistake_ids)
        hits = slots = 0
        for text in dict.fromkeys(r.problem.problem for r in rollouts):
            for t in bank.teachers(text, cfg.num_teachers, mode=cfg.retrieval_mode):
                for item_id in (t.skill_id, t.mistake_id):
                    if item_id is not None:
                        slots += 1
                        hits += item_id in online
        counts = torch.tensor([hits, slots], dtype=torch.float64, device=device)
        if dist:
            dist.all_reduce(counts)
        metrics: dict[str, float] = {
            "bank_online_teacher_frac": float(counts[0] / counts[1]) if counts[1] else 0.0
        }
        update = _idle_metrics()
        if cfg.skill_update_every and step % cfg.skill_update_every == 0:
            mine = [
                {
                    "record_id": f"step{step}-rank{self.rank}-{i}",
                    "problem": r.problem.problem,
                    "completion": tokenizer.decode(r.completion_ids, skip_special_tokens=True),
                    "success": r.reward > 0,
                    "reference_answer": r.problem.answer,
                    "predicted": r.predicted,
                }
                for i, r in enumerate(rollouts)
            ]
            gathered = [mine]
            if dist:
                gathered = [None] * dist.get_world_size() if self.rank == 0 else None
                dist.gather_object(mine, gathered, dst=0)
            payload = [None, update]
            if self.rank == 0:
                rows = [r for part in gathered for r in part]
                payload = self._update(step, rows, bank, engine, tokenizer)
                payload[0] = payload[0].state_dict() if payload[0] is not None else None
            if dist:
                dist.broadcast_object_list(payload, src=0)
            state, update = payload
            if state is not None:
                bank = SkillBank.from_state_dict(state)
        metrics.update(update)
        metrics["bank_skills"] = float(len(bank.skills))
        metrics["bank_mistakes"] = float(len(bank.mistakes))
        metrics["bank_online_skills"] = float(len(bank.online_skill_ids))
        metrics["bank_online_mistakes"] = float(len(bank.online_mistake_ids))
        fp = torch.tensor([bank_fingerprint(bank)] * 2, dtype=torch.int64, device=device)
        if dist:
            lo, hi = fp[:1].clone(), fp[1:].clone()
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
            fp = torch.cat([lo, hi])
        metrics["bank_ranks_agree"] = float(fp[0] == fp[1])
        return bank, metrics

    def _update(self, step: int, rows: list[dict], bank: SkillBank, engine, tokenizer) -> list:
        """Rank 0: ``[bank or None, metrics]`` (None when the success rate is too high)."""
        from sgsd.skills.extraction import EngineLLM, build_record

        cfg = self.cfg
        metrics = _idle_metrics()
        rate = sum(r["success"] for r in rows) / max(1, len(rows))
        if rate >= cfg.skill_update_threshold:
            return [None, metrics]
        llm = EngineLLM(
            engine,
            tokenizer,
            max_tokens=cfg.skill_update_max_tokens,
            temperature=0.0,
            enable_thinking=cfg.enable_thinking,
            seed_step=step,
        )
        rep = online_update(
            bank, [build_record(**r) for r in rows], llm, max_new=cfg.skill_update_max_new
        )
        # The history leaves out timings, so that a resumed run writes the same bank.
        entry = {"step": step, "success_rate": rate, **rep.summary()}
        entry.pop("seconds")
        bank.set_metadata(_HISTORY_KEY, [*bank.metadata.get(_HISTORY_KEY, []), entry])
        self.out.mkdir(parents=True, exist_ok=True)
        path = bank.save(self.out / f"step_{step:06d}.json")
        log.info(
            "skill bank update at step %d (success rate %.2f, %d rollouts): +%d skills, "
            "+%d mistakes, %d evicted, %d/%d replies unparsed, %.1fs -> %s",
            step,
            rate,
            len(rows),
            rep.added["skill"],
            rep.added["mistake"],
            sum(rep.evicted.values()),
            rep.extract_parse_failures + rep.merge_parse_failures,
            rep.llm_prompts,
            rep.seconds,
            path,
        )
        if rep.unparsed:
            with open(self.out / "unparsed_replies.jsonl", "a", encoding="utf-8") as f:
                for u in rep.unparsed:
                    f.write(json.dumps({"step": step, **u}, ensure_ascii=False) + "\n")
        metrics.update(
            bank_update=1.0,
            bank_update_time_s=rep.seconds,
            bank_added=float(sum(rep.added.values())),
            bank_evicted=float(sum(rep.evicted.values())),
            bank_parse_failures=float(rep.extract_parse_failures + rep.merge_parse_failures),
        )
        return [bank, metrics]


def _idle_metrics() -> dict[str, float]:
    keys = ("bank_update", "bank_update_time_s", "bank_added", "bank_evicted")
    return {k: 0.0 for k in (*keys, "bank_parse_failures")}
