"""Evaluate a model on math problem sets: avg@n, pass@n, maj@n (``sgsd.eval.metrics``).

    python -m sgsd.evaluate --model Qwen/Qwen3-1.7B --datasets aime24,aime25,hmmt25 \\
        --n 12 --output runs/eval-base
    python -m sgsd.evaluate --model tiny --datasets demo --n 4 --output runs/eval-tiny
    python -m sgsd.evaluate --model runs/demo/checkpoints/step_000010 --datasets demo ...

``--model`` is ``tiny`` (the offline tiny Qwen3, warm-started), a hub id, a
``save_pretrained`` directory, a LoRA adapter directory (merged into its base model
first) or a trainer checkpoint directory (its merged ``model/`` export, else its
``adapter/``).

A little over 450 lines on purpose: the command line, loading (vLLM or HF), sampling,
grading and the three output files are one command's flow; the metrics live in
``sgsd.eval.metrics``.

``--datasets`` is a comma list of ``demo`` (the held-out ``test`` split of the bundled
demo set, disjoint from what the trainer trains on), ``aime24``, ``aime25``, ``hmmt25``,
``math500`` or any file :func:`sgsd.data.load_problems` reads. A short name is first
looked up as ``<name>.jsonl|.json|.parquet`` in ``--data-dir``, ``$SGSD_DATA_DIR``,
``./data`` and ``../shared/data`` (works offline), then on the Hugging Face hub.

Defaults are the published evaluation settings: n = 12 samples per problem, temperature
1.0, top-p 0.95, no top-k, thinking mode on. ``--skills BANK`` is Base+Skill: the top-8
skills and top-8 mistakes (BM25) are placed before the problem in the prompt, in the
same guidance block an SGSD teacher sees.

Sampling uses vLLM (one batched call per chunk of prompts) when importable, else Hugging
Face ``generate``; grading uses :func:`sgsd.eval.verify.verify_batch` with its timeout.
Outputs in ``--output``: ``samples.jsonl`` (one row per (problem, sample)),
``summary.json`` and ``summary.md``. Errors the user can fix (a model that does not load,
a dataset that cannot be found, bad numbers) end the run with one line on stderr and exit
status 2.

:func:`evaluate_problems` is the engine-level entry point the trainer reuses for
evaluation during training (same engine, sampling settings swapped in for the call).

(A little over the usual file size: the CLI, model resolution and the engine-level entry
point are one concern; the metrics live in :mod:`sgsd.eval.metrics`.)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from sgsd import prompts
from sgsd.engine.model_files import remote_code_problem
from sgsd.eval.metrics import summarize, summary_markdown
from sgsd.eval.verify import DEFAULT_MEMORY_MB

log = logging.getLogger("sgsd.evaluate")

__all__ = [
    "EvalError",
    "evaluate_problems",
    "load_eval_sets",
    "main",
    "problem_messages",
    "sampling_swapped",
]

DEFAULT_DATASETS = "aime24,aime25,hmmt25"
#: Max completion tokens when ``--max-tokens`` is not given: the published 38912 for real
#: models; 64 for the tiny model (its demo answers are a few dozen tokens).
PUBLISHED_MAX_TOKENS = 38912
TINY_MAX_TOKENS = 64
#: Prompts per engine call: large enough to batch well, small enough for the bar to move.
CHUNK_PROMPTS = 64
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


class EvalError(Exception):
    """A problem the user can fix; ``main`` prints it as one line."""


# --------------------------------------------------------------------------- datasets
def data_dirs(extra: str | None = None) -> list[Path]:
    """Where short dataset names are looked up as local files, in order."""
    dirs = [extra, os.environ.get("SGSD_DATA_DIR"), "data", os.path.join("..", "shared", "data")]
    return [Path(d) for d in dirs if d]


def _one_set(name: str, data_dir: str | None, limit: int | None):
    from sgsd.data import DATASET_ALIASES, load_problems

    if name in ("demo", "skillworld"):
        return load_problems(name, split="test", limit=limit)
    path = Path(name).expanduser()
    if path.suffix.lower() in _FILE_SUFFIXES or path.exists():
        if not path.is_file():
            raise EvalError(f"dataset file not found: {path}")
        return load_problems(path, limit=limit)
    for d in data_dirs(data_dir):
        for suffix in _FILE_SUFFIXES:
            f = d / f"{name}{suffix}"
            if f.is_file():
                return load_problems(f, limit=limit)
    if name.lower() not in DATASET_ALIASES and "/" not in name:
        raise EvalError(
            f"unknown dataset {name!r}: use demo, skillworld, {', '.join(DATASET_ALIASES)}, a "
            "hub id or a .jsonl/.json/.parquet file"
        )
    split = "test" if name.lower() == "math500" else "train"
    try:
        return load_problems(name, split=split, limit=limit)
    except Exception as e:  # noqa: BLE001 - offline / missing package: one clear line
        looked = ", ".join(str(d) for d in data_dirs(data_dir))
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise EvalError(
            f"dataset {name!r}: no local {name}.jsonl in [{looked}] and the hub load failed "
            f"({reason}); download it and pass the file path or --data-dir"
        ) from None


def load_eval_sets(
    names: Sequence[str], *, data_dir: str | None = None, limit: int | None = None
) -> dict:
    """``{name: [Problem, ...]}`` for each dataset name (see the module docstring)."""
    out = {}
    for name in names:
        try:
            problems = _one_set(name, data_dir, limit)
        except EvalError:
            raise
        except (OSError, ValueError, TypeError, ImportError, RuntimeError) as e:
            raise EvalError(f"dataset {name!r}: {e}") from None
        if not problems:
            raise EvalError(f"dataset {name!r} has no problems")
        out[name] = problems
    return out


def problem_messages(problem, bank=None, skills_k: int = 8) -> list[dict]:
    """The evaluation prompt: the plain student prompt, or with ``bank`` the Base+Skill
    prompt (top-``skills_k`` skills and mistakes in one guidance block before it)."""
    if bank is None:
        return prompts.student_messages(problem.problem)
    return prompts.skill_guided_messages(problem.problem, bank, skills_k)


# --------------------------------------------------------------------------- sampling
@contextmanager
def sampling_swapped(engine, sampling):
    """Run ``engine`` with another :class:`sgsd.engine.rollout.SamplingConfig` inside the block."""
    old = engine.sampling
    engine.sampling = sampling
    try:
        yield engine
    finally:
        engine.sampling = old


def evaluate_problems(
    engine,
    tokenizer,
    sets: Mapping[str, Sequence],
    n: int,
    *,
    enable_thinking: bool = True,
    bank=None,
    skills_k: int = 8,
    seed_step: int = 0,
    verify_timeout_s: float = 5.0,
    verify_memory_mb: int = DEFAULT_MEMORY_MB,
    progress: bool = False,
) -> tuple[list[dict], dict]:
    """Sample ``n`` completions per problem with ``engine`` (a :class:`RolloutEngine`
    using its current sampling settings), grade them and return ``(rows, summary)``.

    ``seed_step`` offsets the per-request sampling seeds (chunks use ``seed_step + i``), so
    evaluations at different training steps draw different samples reproducibly.
    """
    from sgsd.eval.verify import verify_batch

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise EvalError(f"n must be an int >= 1, got {n!r}")
    jobs = [
        (
            name,
            p,
            prompts.render_prompt_ids(
                tokenizer, problem_messages(p, bank, skills_k), enable_thinking=enable_thinking
            ),
        )
        for name, problems in sets.items()
        for p in problems
    ]
    chunks = [jobs[i : i + CHUNK_PROMPTS] for i in range(0, len(jobs), CHUNK_PROMPTS)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs) * n, desc="sampling", unit="sample", dynamic_ncols=True)
    max_tokens = engine.sampling.max_tokens
    eos = tokenizer.eos_token_id
    rows: list[dict] = []
    for c, chunk in enumerate(chunks):
        completions = engine.generate([ids for _, _, ids in chunk], n, step=seed_step + c)
        flat = [
            (name, p, k, ids)
            for (name, p, _), group in zip(chunk, completions)
            for k, ids in enumerate(group)
        ]
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for *_, ids in flat]
        graded = verify_batch(
            texts,
            [p.answer for _, p, _, _ in flat],
            timeout_s=verify_timeout_s,
            memory_mb=verify_memory_mb,
        )
        for (name, p, k, ids), text, g in zip(flat, texts, graded):
            rows.append(
                {
                    "dataset": name,
                    "problem_id": p.id,
                    "sample": k,
                    "answer": p.answer,
                    "completion": text,
                    "predicted": g.predicted,
                    "reward": float(g.reward),
                    "completion_tokens": len(ids),
                    "truncated": len(ids) >= max_tokens and (not ids or ids[-1] != eos),
                }
            )
        if bar is not None:
            bar.update(len(flat))
    if bar is not None:
        bar.close()
    return rows, summarize(rows, list(sets))


# --------------------------------------------------------------------------- the model
def resolve_model(model: str, scratch: Path | None = None) -> str:
    """A directory or hub id that transformers and vLLM load (see the module docstring).
    A LoRA adapter is merged into ``scratch`` (default: ``<adapter>-merged`` beside it)."""
    from sgsd.config import TrainConfig
    from sgsd.engine.model import model_source

    if model == "tiny":
        return model_source(TrainConfig(model="tiny"))
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "trainer_state.json").is_file():  # a trainer checkpoint
            if (path / "model" / "config.json").is_file():  # the merged export
                path = path / "model"
            elif (path / "adapter" / "adapter_config.json").is_file():
                path = path / "adapter"
            else:
                raise EvalError(f"checkpoint {model} has neither a model/ nor an adapter/")
        if (path / "adapter_config.json").is_file():
            return _merge_adapter(path, scratch or path.parent / f"{path.name}-merged")
        if not (path / "config.json").is_file():
            raise EvalError(f"could not load model {model!r}: {path} has no config.json")
        return str(path)
    if path.suffix or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise EvalError(f"could not load model {model!r}: no such directory or hub id")
    return model


def _merge_adapter(path: Path, merged: Path) -> str:
    """Merge a LoRA adapter into its base model, into ``merged``; return that directory."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    model = AutoPeftModelForCausalLM.from_pretrained(str(path)).merge_and_unload()
    model.save_pretrained(str(merged))
    base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
    AutoTokenizer.from_pretrained(base).save_pretrained(str(merged))
    return str(merged)


def load_tokenizer(source: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_engine(args, source: str, tokenizer, max_model_len: int):
    """A rollout engine sampling from ``source``: vLLM or HF generate (``args.backend``)."""
    import torch
    from transformers import AutoModelForCausalLM

    from sgsd.config import TrainConfig
    from sgsd.engine.model import Policy, resolve_dtype
    from sgsd.engine.rollout import HFRolloutEngine, VLLMRolloutEngine, vllm_available

    cfg = TrainConfig(
        model=source,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_completion_tokens=args.max_tokens,
        seed=args.seed,
        dtype=args.dtype,
        rollout_backend=args.backend,
        trust_remote_code=args.trust_remote_code,
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = args.backend
    if backend == "auto":
        backend = "vllm" if vllm_available() else "hf"
    if backend == "vllm":
        if not vllm_available():
            raise EvalError("--backend vllm but vllm is not importable (pip install vllm)")
        return VLLMRolloutEngine(cfg, source, device, max_model_len=max_model_len)
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=resolve_dtype(cfg, device), trust_remote_code=args.trust_remote_code
    )
    model.to(device).eval()
    return HFRolloutEngine(cfg, Policy(model), tokenizer)


# --------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m sgsd.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model",
        default="tiny",
        help="tiny, a hub id, or a model/adapter/checkpoint directory (default: tiny)",
    )
    ap.add_argument(
        "--datasets",
        default=DEFAULT_DATASETS,
        help=f"comma list: demo, aime24, aime25, hmmt25, math500 or files "
        f"(default: {DEFAULT_DATASETS})",
    )
    ap.add_argument("--n", type=int, default=12, help="samples per problem (default 12)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--top-k", type=int, default=0, help="0 disables (default, as published)")
    ap.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help=f"completion cap (default {PUBLISHED_MAX_TOKENS} within the model's context; "
        f"{TINY_MAX_TOKENS} for --model tiny; pass it for tiny-model checkpoints too)",
    )
    ap.add_argument(
        "--thinking",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Qwen3 thinking mode (default on, as published)",
    )
    ap.add_argument(
        "--skills",
        default=None,
        metavar="BANK",
        help="Base+Skill: 'default' (bundled bank) or a skill-bank JSON path",
    )
    ap.add_argument("--skills-k", type=int, default=8, help="skills and mistakes per prompt")
    ap.add_argument("--output", default="runs/eval", help="output directory")
    ap.add_argument(
        "--verbose", action="store_true", help="show third-party logs and known noise too"
    )
    ap.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let a model run the Python code it ships (off: such a model is refused)",
    )
    ap.add_argument("--limit", type=int, default=None, help="first N problems per dataset")
    ap.add_argument("--data-dir", default=None, help="where short dataset names are found")
    ap.add_argument("--backend", choices=("auto", "vllm", "hf"), default="auto")
    ap.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verify-timeout", type=float, default=5.0, help="seconds per grading")
    ap.add_argument(
        "--verify-memory-mb",
        type=int,
        default=DEFAULT_MEMORY_MB,
        help=f"address-space cap of a grading worker, MiB (default {DEFAULT_MEMORY_MB}; 0: none)",
    )
    ap.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: when stderr is a terminal)",
    )
    args = ap.parse_args(argv)
    if args.n < 1:
        raise EvalError(f"--n must be >= 1, got {args.n}")
    if args.limit is not None and args.limit < 1:
        raise EvalError(f"--limit must be >= 1, got {args.limit}")
    args.max_tokens_given = args.max_tokens is not None
    if args.max_tokens is None:
        args.max_tokens = TINY_MAX_TOKENS if args.model == "tiny" else PUBLISHED_MAX_TOKENS
    for name, ok in (
        ("--temperature must be > 0", args.temperature > 0),
        ("--top-p must be in (0, 1]", 0 < args.top_p <= 1),
        ("--top-k must be >= 0", args.top_k >= 0),
        ("--max-tokens must be >= 1", args.max_tokens >= 1),
        ("--skills-k must be >= 1", args.skills_k >= 1),
        ("--verify-timeout must be > 0", args.verify_timeout > 0),
        ("--verify-memory-mb must be >= 0", args.verify_memory_mb >= 0),
    ):
        if not ok:
            raise EvalError(name)
    args.dataset_names = [d.strip() for d in args.datasets.split(",") if d.strip()]
    if not args.dataset_names:
        raise EvalError("--datasets is empty")
    return args


def run(args: argparse.Namespace) -> dict:
    """Evaluate as the CLI does; returns the summary (also written to ``args.output``)."""
    from sgsd.skills.bank import SkillBank

    sets = load_eval_sets(args.dataset_names, data_dir=args.data_dir, limit=args.limit)
    bank = None
    if args.skills:
        try:
            bank = SkillBank.default() if args.skills == "default" else SkillBank.load(args.skills)
        except (OSError, ValueError) as e:
            raise EvalError(f"--skills {args.skills}: {e}") from None
    try:
        source = resolve_model(args.model, Path(args.output) / "merged-model")
        refused = remote_code_problem(source, args.trust_remote_code)
        if refused is not None:
            raise EvalError(refused)
        tokenizer = load_tokenizer(source, args.trust_remote_code)
        longest = max(
            len(
                prompts.render_prompt_ids(
                    tokenizer,
                    problem_messages(p, bank, args.skills_k),
                    enable_thinking=args.thinking,
                )
            )
            for problems in sets.values()
            for p in problems
        )
        if not args.max_tokens_given:  # the published cap, within the model's context
            from transformers import AutoConfig

            conf = AutoConfig.from_pretrained(source, trust_remote_code=args.trust_remote_code)
            ctx = getattr(conf, "max_position_embeddings", None)
            if ctx:
                args.max_tokens = max(1, min(args.max_tokens, ctx - longest))
        engine = build_engine(args, source, tokenizer, longest + args.max_tokens)
    except EvalError:
        raise
    except Exception as e:  # noqa: BLE001 - any load failure is reported in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise EvalError(
            f"could not load model {args.model!r}: {type(e).__name__}: {first}"
        ) from None
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    try:
        rows, summary = evaluate_problems(
            engine,
            tokenizer,
            sets,
            args.n,
            enable_thinking=args.thinking,
            bank=bank,
            skills_k=args.skills_k,
            verify_timeout_s=args.verify_timeout,
            verify_memory_mb=args.verify_memory_mb,
            progress=progress,
        )
    finally:
        engine.close()
    settings = {
        k: v for k, v in vars(args).items() if k not in ("dataset_names", "max_tokens_given")
    }
    summary = {
        "model": args.model,
        "source": source,
        "engine": engine.name,
        "settings": settings,
        **summary,
    }
    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    title = f"Evaluation of {args.model} (n={args.n}, T={args.temperature}, top-p={args.top_p})"
    (out / "summary.md").write_text(summary_markdown(summary, title=title))
    return summary


def main(argv: list[str] | None = None) -> int:
    from sgsd import console

    try:
        args = parse_args(argv)
        console.prepare_environment(args.verbose)  # before vLLM / transformers load
        console.configure_logging(0, args.verbose)
        summary = run(args)
    except EvalError as e:
        print(f"sgsd.evaluate: error: {e}", file=sys.stderr)
        return 2
    print(summary_markdown(summary, title=f"Evaluation of {args.model}"))
    print(f"written to {args.output}/summary.json, summary.md, samples.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
