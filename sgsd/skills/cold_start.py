"""Cold-start skill bank from the model's own rollouts (docs/design.md §2).

    python -m sgsd.build_skill_bank --model Qwen/Qwen3-1.7B \\
        --dataset BytedTsinghua-SIA/DAPO-Math-17k --output banks/qwen3-1.7b.json
    python -m sgsd.build_skill_bank --model tiny --dataset demo --num-problems 8 \\
        --output /tmp/bank.json            # offline, CPU, a couple of minutes

The published pipeline, phase by phase (each with a progress bar):

1. **solve**: sample ``--num-problems`` (256) problems with ``--seed`` (42); the model
   solves each once (temperature 1.0, top-p 0.95, thinking on, ``--solve-max-tokens``);
   math-verify checks the answer; a memory record is built by rules
   (:func:`sgsd.skills.extraction.build_record`);
2. **extract**: one call per record at temperature 0 (``--extractor-model``, default the
   same model): 1-3 general skills from a success, 1-3 common mistakes from a failure;
3. **merge**: hierarchical LLM merge of each kind in groups of ``--group-size`` (32)
   (:mod:`sgsd.skills.merge`); ids ``gen_###`` / ``err_###``;
4. write the published format (``general_skills``, ``common_mistakes``,
   ``task_specific_skills``, ``metadata`` with the model, counts, parse failures and the
   merge layers) and print a summary.

Records and extractions are cached in ``OUTPUT.work/`` as they are produced;
``--resume`` continues from there (same settings required). Unparseable replies are
counted and kept in ``OUTPUT.work/unparsed_replies.jsonl``; if nothing parses, the bank
is still written (valid, empty) and the summary says so. One engine is in memory at a
time: a different ``--extractor-model`` replaces the solver's engine after phase 1.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main", "write_bank"]

# Budgets when --model tiny (random weights: long generations only cost time).
_TINY_SOLVE_TOKENS = 48
_TINY_REPLY_TOKENS = 48


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sgsd.build_skill_bank",
        description="Build a cold-start SGSD skill bank from the model's own rollouts.",
    )
    a = p.add_argument
    a("--model", default="tiny", help="HF id or path; 'tiny' = the offline tiny Qwen3")
    a("--dataset", default="demo", help="'demo', a JSONL/JSON/parquet path or a HF dataset id")
    a("--dataset-split", default=None)
    a("--answer-field", default=None, help="field with the final answer (default: detected)")
    a("--num-problems", type=int, default=256, help="problems sampled (published: 256)")
    a("--seed", type=int, default=42, help="problem sample and sampling seed (published: 42)")
    a("--output", default="skill_bank.json", help="bank JSON to write")
    a("--extractor-model", default=None, help="model for extraction/merge (default: --model)")
    a("--verbose", action="store_true", help="show third-party logs and known noise too")
    a(
        "--trust-remote-code",
        action="store_true",
        help="let a model run the Python code it ships (off: such a model is refused)",
    )
    a("--group-size", type=int, default=32, help="items per merge prompt (published: 32)")
    a("--max-layers", type=int, default=16, help="cap on merge layers per kind")
    a("--patience", type=int, default=3, help="stop after this many non-shrinking layers")
    a("--rollout-backend", default="auto", choices=["auto", "vllm", "hf"])
    a("--resume", action="store_true", help="continue from OUTPUT.work/ (same settings)")
    a("--solve-max-tokens", type=int, default=None, help="default 8192 (tiny: 48)")
    a("--reply-max-tokens", type=int, default=None, help="default 2048 (tiny: 48)")
    a("--no-thinking", dest="thinking", action="store_false", help="solve without thinking")
    a("--batch-size", type=int, default=32, help="problems/records per generation call")
    a("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    a("--vllm-gpu-memory-utilization", type=float, default=None)
    return p


def _check_args(args: argparse.Namespace) -> None:
    for name in ("num_problems", "batch_size", "group_size", "patience"):
        low = 2 if name == "group_size" else 1
        if getattr(args, name) < low:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= {low}")
    if args.max_layers < 0:
        raise SystemExit("--max-layers must be >= 0")
    tiny = args.model == "tiny"
    if args.solve_max_tokens is None:
        args.solve_max_tokens = _TINY_SOLVE_TOKENS if tiny else 8192
    if args.reply_max_tokens is None:
        args.reply_max_tokens = _TINY_REPLY_TOKENS if tiny else 2048
    for name in ("solve_max_tokens", "reply_max_tokens"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    args.extractor_model = args.extractor_model or args.model
    from sgsd.engine.model_files import remote_code_problem

    for option, source in (("--model", args.model), ("--extractor-model", args.extractor_model)):
        refused = remote_code_problem(source, args.trust_remote_code, option)
        if refused is not None:
            raise SystemExit(refused)


# ----------------------------------------------------------------------------- cache
class _Work:
    """``OUTPUT.work/``: settings, records.jsonl, extractions.jsonl, unparsed replies."""

    KEYS = ("model", "dataset", "dataset_split", "answer_field", "num_problems", "seed")
    KEYS2 = ("solve_max_tokens", "thinking", "extractor_model", "reply_max_tokens")

    def __init__(self, output: Path, args: argparse.Namespace):
        self.dir = output.with_name(output.name + ".work")
        self.settings = {k: getattr(args, k) for k in (*self.KEYS, *self.KEYS2)}
        path = self.dir / "settings.json"
        if args.resume and path.is_file():
            saved = json.loads(path.read_text())
            diff = sorted(k for k in self.settings if saved.get(k) != self.settings[k])
            if diff:
                raise SystemExit(
                    f"--resume: {self.dir} was made with other settings ({', '.join(diff)}); "
                    "rerun without --resume to start over"
                )
        elif self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.settings, indent=2))

    def read(self, name: str) -> list[dict]:
        path = self.dir / name
        if not path.is_file():
            return []
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut off by an interrupted run: redo from here
        return rows

    def write(self, name: str, rows: list[dict]) -> None:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (self.dir / name).write_text(text, encoding="utf-8")

    def append(self, name: str, rows: list[dict]) -> None:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        with open(self.dir / name, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()


# ----------------------------------------------------------------------------- engines
def _engine(model: str, args: argparse.Namespace, max_model_len: int):
    """``(engine, tokenizer)`` for ``model`` (vLLM in process, or HF generate)."""
    import torch
    from transformers import AutoTokenizer

    from sgsd.config import TrainConfig
    from sgsd.engine.model import load_policy, model_source
    from sgsd.engine.rollout import HFRolloutEngine, VLLMRolloutEngine, vllm_available

    cfg = TrainConfig(
        model=model,
        finetune="full",
        gradient_checkpointing=False,
        dtype=args.dtype,
        rollout_backend=args.rollout_backend,
        seed=args.seed,
        vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        trust_remote_code=args.trust_remote_code,
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = args.rollout_backend
    if backend == "auto":
        backend = "vllm" if vllm_available() else "hf"
    if backend == "vllm":
        if not vllm_available():
            raise SystemExit("--rollout-backend vllm, but vllm is not importable")
        source = model_source(cfg)
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=args.trust_remote_code)
        threads = torch.get_num_threads()
        engine = VLLMRolloutEngine(cfg, source, device, max_model_len=max_model_len)
        torch.set_num_threads(threads)  # vLLM may lower it for serving
        return engine, tok
    policy, tok, _ = load_policy(cfg, device)
    policy.requires_grad_(False)
    return HFRolloutEngine(cfg, policy, tok), tok


def _context_len(model: str, prompt_tokens: int, args: argparse.Namespace) -> int:
    """Engine context: the longest solve prompt + its budget, or a merge prompt (about
    3k Qwen3 tokens for 32 items; 4096 leaves room) + the reply budget; capped at the
    model's positions."""
    from transformers import AutoConfig

    from sgsd.config import TrainConfig
    from sgsd.engine.model import model_source

    want = max(prompt_tokens + args.solve_max_tokens, 4096 + args.reply_max_tokens)
    source = model_source(TrainConfig(model=model))
    conf = AutoConfig.from_pretrained(source, trust_remote_code=args.trust_remote_code)
    return min(want, getattr(conf, "max_position_embeddings", want) or want)


def _bar(total: int, desc: str, initial: int = 0):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="item", file=sys.stderr)


# ----------------------------------------------------------------------------- phases
def _solve(args, problems, work: _Work, engine, tok) -> list:
    from sgsd.engine.rollout import SamplingConfig
    from sgsd.eval.verify import verify_batch
    from sgsd.prompts import render_prompt_ids, student_messages
    from sgsd.skills.extraction import MemoryRecord, build_record

    done = [MemoryRecord.from_dict(r) for r in work.read("records.jsonl")]
    bs = args.batch_size
    sampling = SamplingConfig(1.0, 0.95, 0, args.solve_max_tokens)
    bar = _bar(len(problems), "solve", len(done))
    for chunk in range(len(done) // bs, -(-len(problems) // bs)):
        batch = problems[chunk * bs : (chunk + 1) * bs][len(done) - chunk * bs :]
        if not batch:
            continue
        ids = [
            render_prompt_ids(tok, student_messages(p), enable_thinking=args.thinking)
            for p in batch
        ]
        outs = engine.generate(ids, 1, step=chunk, sampling=sampling)
        texts = [tok.decode(o[0], skip_special_tokens=True) for o in outs]
        results = verify_batch(texts, [p.answer for p in batch])
        new = [
            build_record(
                p.id,
                p.problem,
                text,
                success=res.correct,
                reference_answer=p.answer,
                predicted=res.predicted,
            )
            for p, text, res in zip(batch, texts, results)
        ]
        work.append("records.jsonl", [r.to_dict() for r in new])
        done.extend(new)
        bar.update(len(new))
    bar.close()
    return done


def _extract(args, records, work: _Work, llm) -> list:
    from sgsd.skills.extraction import Extraction, extract_from_records

    done = [Extraction.from_dict(e) for e in work.read("extractions.jsonl")]
    bar = _bar(len(records), "extract", len(done))
    for lo in range(len(done), len(records), args.batch_size):
        new = extract_from_records(llm, records[lo : lo + args.batch_size])
        work.append("extractions.jsonl", [e.to_dict() for e in new])
        done.extend(new)
        bar.update(len(new))
    bar.close()
    return done


def _merge(args, kind: str, extractions, work: _Work, llm):
    from sgsd.skills.merge import SRC, hierarchical_merge

    items = []
    for ex in extractions:
        if ex.kind == kind:
            items += [{**it, SRC: [f"{ex.record_id}:{i}"]} for i, it in enumerate(ex.items)]
    bar = _bar(0, f"merge {kind}s")

    def on_layer(rec: dict) -> None:
        bar.total = (bar.total or 0) + rec["num_groups"]
        bar.update(rec["num_groups"])
        bar.set_postfix_str(f"{rec['input_items']} -> {rec['output_items']}")

    res = hierarchical_merge(
        llm,
        kind,
        items,
        group_size=args.group_size,
        patience=args.patience,
        max_layers=args.max_layers,
        on_layer=on_layer,
    )
    bar.close()
    return len(items), res


def write_bank(path: Path, skills: list[dict], mistakes: list[dict], metadata: dict):
    """Write the published format (ids ``gen_###`` / ``err_###``) and load it back with
    :class:`sgsd.skills.bank.SkillBank` (which validates it)."""
    from sgsd.skills.bank import MISTAKE_FIELDS, SKILL_FIELDS, SkillBank

    def final(items, fields, prefix):
        return [
            {fields[0]: f"{prefix}{i:03d}", **{f: it.get(f, "") for f in fields[1:]}}
            for i, it in enumerate(items, 1)
        ]

    data = {
        "general_skills": final(skills, SKILL_FIELDS, "gen_"),
        "common_mistakes": final(mistakes, MISTAKE_FIELDS, "err_"),
        "task_specific_skills": {},
        "metadata": metadata,
    }
    bank = SkillBank(data, source=str(path))
    bank.save(path)
    return SkillBank.load(path)


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    from sgsd import console

    args = build_parser().parse_args(argv)
    _check_args(args)
    console.prepare_environment(args.verbose)  # before vLLM / transformers load
    console.configure_logging(0, args.verbose)
    from sgsd.data import load_problems
    from sgsd.prompts import render_prompt_ids, student_messages
    from sgsd.skills.extraction import EngineLLM

    t0 = time.perf_counter()
    output = Path(args.output)
    work = _Work(output, args)
    pool = load_problems(args.dataset, split=args.dataset_split, answer_field=args.answer_field)
    n = min(args.num_problems, len(pool))
    if n < args.num_problems:
        print(f"note: {args.dataset} has only {n} problems; using all", file=sys.stderr)
    problems = random.Random(args.seed).sample(pool, n)

    engine, tok = None, None
    records = work.read("records.jsonl")
    if len(records) < n:
        from transformers import AutoTokenizer

        from sgsd.config import TrainConfig
        from sgsd.engine.model import model_source

        probe = AutoTokenizer.from_pretrained(
            model_source(TrainConfig(model=args.model)), trust_remote_code=args.trust_remote_code
        )
        longest = max(
            len(render_prompt_ids(probe, student_messages(p), enable_thinking=args.thinking))
            for p in problems
        )
        engine, tok = _engine(args.model, args, _context_len(args.model, longest, args))
    records = _solve(args, problems, work, engine, tok)
    t_solve = time.perf_counter() - t0

    if engine is None or args.extractor_model != args.model:
        if engine is not None:
            engine.close()
        engine, tok = _engine(
            args.extractor_model, args, _context_len(args.extractor_model, 0, args)
        )
    llm = EngineLLM(engine, tok, max_tokens=args.reply_max_tokens, temperature=0.0)
    extractions = _extract(args, records, work, llm)
    merged = {kind: _merge(args, kind, extractions, work, llm) for kind in ("skill", "mistake")}
    engine.close()
    unparsed_rows = [
        {"stage": "extract", "record": e.record_id, "reply": e.reply}
        for e in extractions
        if not e.parsed
    ]
    for kind, (_, res) in merged.items():
        unparsed_rows += [{"stage": f"merge_{kind}", **f} for f in res.failed_replies]
    work.write("unparsed_replies.jsonl", unparsed_rows)

    successes = sum(r.success for r in records)
    unparsed = sum(not e.parsed for e in extractions)
    meta: dict[str, Any] = {
        "source": "sgsd.build_skill_bank (cold start from the model's own rollouts)",
        "model": args.model,
        "extractor_model": args.extractor_model,
        "dataset": args.dataset,
        "num_problems": n,
        "seed": args.seed,
        "successes": successes,
        "failures": len(records) - successes,
        "parse_failures": unparsed,
        "merge_parse_failures": sum(m[1].parse_failures for m in merged.values()),
        "merge_group_size": args.group_size,
        "merge_stagnation_patience": args.patience,
        "input_general_skills": merged["skill"][0],
        "output_general_skills": len(merged["skill"][1].items),
        "input_common_mistakes": merged["mistake"][0],
        "output_common_mistakes": len(merged["mistake"][1].items),
        "general_merge_layers": merged["skill"][1].layers,
        "common_mistake_merge_layers": merged["mistake"][1].layers,
    }
    empty = not (merged["skill"][1].items or merged["mistake"][1].items)
    if empty:
        meta["note"] = "no extraction reply could be parsed: the bank has no items"
    bank = write_bank(output, merged["skill"][1].items, merged["mistake"][1].items, meta)

    print(_summary(output, work, meta, bank, len(records), time.perf_counter() - t0, t_solve))
    return 0


def _summary(output, work, meta, bank, n_records, seconds, t_solve) -> str:
    def layers(rows, start):
        return " -> ".join([str(start), *(str(r["output_items"]) for r in rows)])

    n = max(1, n_records)
    lines = [
        f"skill bank written to {output}",
        f"  problems          {meta['num_problems']} from {meta['dataset']} (seed {meta['seed']})",
        f"  successes         {meta['successes']}",
        f"  failures          {meta['failures']}",
        f"  parse failures    {meta['parse_failures']} of {n_records} extraction replies "
        f"({100 * meta['parse_failures'] / n:.0f}%); merge replies unparsed: "
        f"{meta['merge_parse_failures']}",
        f"  general skills    {layers(meta['general_merge_layers'], meta['input_general_skills'])}"
        f" (items before and after each merge layer)",
        "  common mistakes   "
        f"{layers(meta['common_mistake_merge_layers'], meta['input_common_mistakes'])}",
        f"  bank              {len(bank.skills)} general skills, {len(bank.mistakes)} common "
        f"mistakes",
        f"  time              {seconds:.1f}s (model load + solve {t_solve:.1f}s)",
        f"  cache, debug      {work.dir}",
    ]
    if "note" in meta:
        lines.append(f"  WARNING: {meta['note']} (replies in {work.dir}/unparsed_replies.jsonl)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
