"""Training configuration: one dataclass, documented and validated.

Precedence (lowest to highest): the field defaults below (the paper's hyper-parameters) ->
the tiny-model profile (only when ``model == "tiny"``, only for fields the user did not
set) -> ``--config FILE`` (YAML or JSON) -> ``--key value`` command-line overrides.

    cfg = load_config(["--max-steps", "3", "--output-dir", "runs/demo"])
    cfg.save(Path(cfg.output_dir) / "config.yaml")

Command-line keys accept dashes or underscores (``--max-steps`` == ``--max_steps``);
values are parsed by the field's type (``--finetune full``, ``--gradient-checkpointing
false``, ``--lora-target-modules q_proj,v_proj``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["GRPO_PROFILE", "TINY_PROFILE", "TrainConfig", "load_config", "parse_overrides"]

LORA_TARGETS_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    # ---- model -------------------------------------------------------------------------
    model: str = "tiny"
    """HF model id or local directory; ``"tiny"`` = the offline tiny Qwen3 (sgsd.tiny_model).
    ``Qwen/Qwen3-1.7B`` is the paper's model."""
    finetune: str = "lora"
    """``"lora"`` (PEFT LoRA on every attention and MLP projection) or ``"full"``."""
    lora_r: int = 64
    """LoRA rank (paper: 64)."""
    lora_alpha: int = 128
    """LoRA alpha (paper: 128); the adapter scale is alpha / r."""
    lora_dropout: float = 0.0
    """LoRA dropout. 0 keeps the live teacher and the student the same function."""
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS_ALL))
    """Module names LoRA wraps (default: all attention and MLP projections)."""
    dtype: str = "auto"
    """Parameter dtype: ``auto`` (bf16 on CUDA, fp32 on CPU), ``bfloat16``, ``float16``,
    ``float32``."""
    attn_implementation: str = "auto"
    """``auto`` (flash_attention_2 when installed on CUDA, else sdpa), ``sdpa``, ``eager``,
    ``flash_attention_2``."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward (saves memory on long rollouts)."""

    # ---- data and skills ---------------------------------------------------------------
    dataset: str = "demo"
    """``demo`` (bundled), a JSONL/JSON path, or a HF dataset id
    (``BytedTsinghua-SIA/DAPO-Math-17k`` is the paper's); see sgsd.data.load_problems."""
    dataset_split: str | None = None
    """Dataset split (None: the loader's default; for ``demo``: ``train``, so that the
    held-out ``test`` split that sgsd.evaluate scores is never trained on)."""
    answer_field: str | None = None
    """Field holding the final answer (None: the loader detects it)."""
    dataset_limit: int | None = None
    """Use only the first N problems (None: all)."""
    skill_bank: str | None = None
    """Skill-bank JSON path (None: the bundled default bank)."""
    retrieval_mode: str = "bm25"
    """How teachers are retrieved from the bank (passed to SkillBank.teachers)."""
    enable_thinking: bool = False
    """Render the student's prompt with thinking enabled (Qwen3 chat template flag; the
    published SGSD run samples the student in non-thinking mode)."""
    teacher_thinking: bool = True
    """Render the teachers' prompts with thinking enabled (published: on)."""
    student_skills: bool = False
    """"+Skill" variants: put the top ``student_skills_k`` skills and mistakes (BM25) in
    the student's prompt too (rendered once at start-up from the initial bank)."""
    student_skills_k: int = 3
    """Skills and mistakes each in the +Skill student prompt (published GRPO+Skill: 3)."""

    # ---- loss (DESIGN §3) --------------------------------------------------------------
    loss: str = "sgsd"
    """Loss strategy (sgsd.losses.LOSSES): ``sgsd`` or ``grpo`` (sgsd.grpo; unset fields then
    take GRPO_PROFILE, the published GRPO settings)."""
    grpo_clip_eps: float = 0.2
    """GRPO's PPO clip epsilon (published: 0.2)."""
    num_iterations: int = 1
    """Optimiser passes over each step's rollouts, the first pass's log-probs as the old
    ones (GRPO's num_iterations; published GRPO: 2). Each pass is an optimiser step; the
    LR schedule advances once per trainer step."""
    teacher: str = "live"
    """Teacher weights (sgsd.teachers): ``live`` (current), ``frozen`` (initial; LoRA
    adapter disabled), ``ema`` or ``periodic``."""
    teacher_ema_decay: float = 0.999
    """EMA decay for ``teacher=ema`` (published: 0.999)."""
    teacher_refresh_every: int = 50
    """Refresh interval in optimiser steps for ``teacher=periodic`` (published: 50)."""
    num_teachers: int = 8
    """K: skill-conditioned teachers per rollout (paper: 8)."""
    gate_tau: float = 1.0
    """tau: gate temperature of l(D) = log 2 - softplus(-D^2 / (2 tau)) (paper: 1)."""
    clip_delta: float = 3.0
    """delta: clip of the log-prob gap in the support score (paper: 3)."""
    confidence_threshold: float = 0.05
    """epsilon: |support| at or below this gives polarity 0 (paper: 0.05)."""
    logprob_temperature: float = 1.0
    """Temperature of the student/teacher log-probs in the loss (1 = the model's own
    distribution; independent of the sampling temperature)."""
    log_entropy: bool = True
    """Log the student's and teachers' mean token entropy (one extra no-grad LM-head pass
    for the student; the teachers' comes with their log-probs)."""
    kernel_backend: str = "auto"
    """sgsd_kernels backend: auto, triton, torch, reference."""

    # ---- rollouts ----------------------------------------------------------------------
    rollout_backend: str = "auto"
    """``auto`` (vLLM when importable, else HF generate), ``vllm``, ``hf``."""
    problems_per_step: int = 16
    """Problems per optimizer step, over all ranks (must divide by the world size)."""
    rollouts_per_problem: int = 1
    """G: sampled completions per problem (published SGSD: 1; GRPO: 8)."""
    temperature: float = 1.1
    """Sampling temperature (paper: 1.1)."""
    top_p: float = 0.95
    """Nucleus sampling (paper: 0.95)."""
    top_k: int = 20
    """Top-k sampling (paper: 20; 0 disables)."""
    max_completion_tokens: int = 1024
    """Completion length cap (paper: 1024)."""
    max_prompt_tokens: int = 2048
    """Problems whose rendered student prompt is longer are skipped (with a warning).
    Teacher contexts are not capped (they add the guidance block to the student prompt)."""
    vllm_gpu_memory_utilization: float | None = None
    """vLLM memory fraction (None: 0.3 on GPU, 0.2 of RAM on CPU)."""

    # ---- optimisation ------------------------------------------------------------------
    max_steps: int = 200
    """Optimizer steps (paper: 200)."""
    lr: float = 5e-6
    """AdamW learning rate (paper: 5e-6)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    warmup_steps: int = 0
    """Linear warm-up steps, then ``lr_schedule``."""
    lr_schedule: str = "linear"
    """``linear`` (to 0 at max_steps, the published schedule), ``cosine`` (to 0) or
    ``constant``."""
    max_grad_norm: float = 0.1
    """Gradient-norm clip (paper: 0.1); 0 disables."""
    micro_batch_size: int = 4
    """Rollouts per student forward/backward (gradient accumulation over the step)."""
    teacher_micro_batch_size: int = 8
    """Sequences per no-grad teacher forward (bounds teacher activation memory)."""

    # ---- distributed -------------------------------------------------------------------
    parallelism: str = "ddp"
    """With several ranks: ``ddp`` (replicated model, gradients all-reduced) or ``fsdp2``
    (``fully_shard`` per decoder layer, for models that do not fit one device; needs vLLM
    rollouts)."""

    # ---- checkpoints, logging ----------------------------------------------------------
    output_dir: str = "runs/sgsd"
    """Where config.yaml, metrics.jsonl, samples.jsonl and checkpoints/ go."""
    checkpoint_every: int = 25
    """Save every N steps (and always at the end); 0 = only at the end (paper: 25)."""
    keep_checkpoints: int = 0
    """Keep the newest N checkpoints (0 = keep all, as published); checkpoints of
    evaluated steps are always kept."""
    resume: str | None = None
    """``latest`` (newest checkpoint in output_dir, fresh start if none) or a checkpoint dir."""
    seed: int = 42
    """Seeds data order, sampling and initialisation (published: 42)."""
    log_every: int = 1
    """Console/metrics line every N steps."""
    sample_every: int = 10
    """Print one sampled generation and append samples to samples.jsonl every N steps."""
    progress_bar: bool = True
    """tqdm progress bar on rank 0 (off when stderr is not a terminal)."""
    tensorboard: bool = False
    """Also log to TensorBoard (output_dir/tb)."""
    wandb_project: str | None = None
    """Also log to this Weights & Biases project."""

    # ---- evaluation during training (sgsd.evaluate) --------------------------------------
    eval_every: int = 0
    """Evaluate every N steps and at the end with the rollout engine (0 = never; the paper:
    25). Results go to eval.jsonl and TensorBoard/W&B; evaluated checkpoints are kept."""
    eval_datasets: str = "aime24,aime25,hmmt25"
    """Comma list of evaluation sets (as ``python -m sgsd.evaluate --datasets``)."""
    eval_n: int = 12
    """Samples per evaluation problem (avg@n; published: 12)."""
    eval_limit: int | None = None
    """Evaluate only the first N problems of each set (None: all)."""
    eval_max_tokens: int = 38912
    """Completion cap during evaluation (published: 38912)."""
    eval_temperature: float = 1.0
    """Evaluation sampling temperature (published: 1.0; top-p 0.95, no top-k)."""
    eval_thinking: bool = True
    """Evaluate in thinking mode (published: on)."""

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"invalid config: {msg}")

        need(bool(self.model), "model must be a model id, a path or 'tiny'")
        if self.dataset == "demo" and self.dataset_split is None:
            self.dataset_split = "train"
        need(
            self.finetune in ("lora", "full"), f"finetune must be lora|full, got {self.finetune!r}"
        )
        need(self.lora_r >= 1 and self.lora_alpha > 0, "lora_r >= 1 and lora_alpha > 0")
        need(0.0 <= self.lora_dropout < 1.0, "0 <= lora_dropout < 1")
        need(len(self.lora_target_modules) > 0, "lora_target_modules must not be empty")
        need(
            self.dtype in ("auto", "bfloat16", "float16", "float32"),
            f"dtype must be auto|bfloat16|float16|float32, got {self.dtype!r}",
        )
        need(
            self.attn_implementation in ("auto", "sdpa", "eager", "flash_attention_2"),
            f"attn_implementation must be auto|sdpa|eager|flash_attention_2, "
            f"got {self.attn_implementation!r}",
        )
        need(self.dataset_limit is None or self.dataset_limit >= 1, "dataset_limit >= 1")
        need(self.loss in ("sgsd", "grpo"), f"loss must be sgsd|grpo, got {self.loss!r}")
        need(0 < self.grpo_clip_eps < 1, "0 < grpo_clip_eps < 1")
        need(self.num_iterations >= 1, "num_iterations >= 1")
        need(
            self.teacher in ("live", "frozen", "ema", "periodic"),
            f"teacher must be live|frozen|ema|periodic, got {self.teacher!r}",
        )
        need(0 < self.teacher_ema_decay < 1, "0 < teacher_ema_decay < 1")
        need(self.teacher_refresh_every >= 1, "teacher_refresh_every >= 1")
        need(self.student_skills_k >= 1, "student_skills_k >= 1")
        need(
            self.eval_every >= 0 and self.eval_n >= 1 and self.eval_max_tokens >= 1,
            "eval_every >= 0, eval_n >= 1 and eval_max_tokens >= 1",
        )
        need(self.eval_limit is None or self.eval_limit >= 1, "eval_limit >= 1")
        need(self.eval_temperature > 0, "eval_temperature > 0")
        need(self.num_teachers >= 1, "num_teachers (K) >= 1")
        for name in ("gate_tau", "clip_delta", "logprob_temperature", "temperature", "lr"):
            v = getattr(self, name)
            need(math.isfinite(v) and v > 0, f"{name} must be finite and > 0, got {v}")
        need(
            math.isfinite(self.confidence_threshold) and self.confidence_threshold >= 0,
            "confidence_threshold (epsilon) must be finite and >= 0",
        )
        need(
            self.kernel_backend in ("auto", "triton", "torch", "reference", "native"),
            "kernel_backend must be auto|triton|torch|reference|native, "
            f"got {self.kernel_backend!r}",
        )
        need(
            self.rollout_backend in ("auto", "vllm", "hf"),
            f"rollout_backend must be auto|vllm|hf, got {self.rollout_backend!r}",
        )
        need(
            self.problems_per_step >= 1 and self.rollouts_per_problem >= 1,
            "problems_per_step >= 1 and rollouts_per_problem >= 1",
        )
        need(0.0 < self.top_p <= 1.0, "0 < top_p <= 1")
        need(self.top_k >= 0, "top_k >= 0 (0 disables)")
        need(
            self.max_completion_tokens >= 1 and self.max_prompt_tokens >= 1,
            "max_completion_tokens >= 1 and max_prompt_tokens >= 1",
        )
        need(
            self.vllm_gpu_memory_utilization is None
            or 0.0 < self.vllm_gpu_memory_utilization < 1.0,
            "0 < vllm_gpu_memory_utilization < 1",
        )
        need(self.max_steps >= 1, "max_steps >= 1")
        need(self.weight_decay >= 0, "weight_decay >= 0")
        need(
            len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
            "adam_betas must be two numbers in [0, 1)",
        )
        need(self.warmup_steps >= 0, "warmup_steps >= 0")
        need(
            self.lr_schedule in ("linear", "constant", "cosine"),
            "lr_schedule must be linear|constant|cosine",
        )
        need(self.max_grad_norm >= 0, "max_grad_norm >= 0 (0 disables clipping)")
        need(
            self.micro_batch_size >= 1 and self.teacher_micro_batch_size >= 1,
            "micro_batch_size >= 1 and teacher_micro_batch_size >= 1",
        )
        need(
            self.parallelism in ("ddp", "fsdp2"),
            f"parallelism must be ddp|fsdp2, got {self.parallelism!r}",
        )
        need(
            self.checkpoint_every >= 0 and self.keep_checkpoints >= 0,
            "checkpoint_every >= 0 and keep_checkpoints >= 0",
        )
        need(self.log_every >= 1 and self.sample_every >= 1, "log_every >= 1 and sample_every >= 1")

    # ---- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = _dump(self.to_dict(), yaml_format=path.suffix in (".yaml", ".yml"))
        path.write_text(text)


#: Overrides applied when ``model == "tiny"`` (the embedded default, CPU, offline), for the
#: fields the user did not set: short completions and a small batch so that a step takes
#: seconds on two CPU cores, and a learning rate large enough that parameters visibly move.
TINY_PROFILE: dict[str, Any] = {
    "problems_per_step": 4,
    "rollouts_per_problem": 2,
    "num_teachers": 4,
    "max_completion_tokens": 64,
    "max_prompt_tokens": 1024,
    "micro_batch_size": 8,
    "teacher_micro_batch_size": 16,
    "lr": 1e-3,
    "max_grad_norm": 1.0,
    "lora_r": 8,
    "lora_alpha": 16,
    "gradient_checkpointing": False,
    "max_steps": 10,
    "checkpoint_every": 5,
    "sample_every": 5,
    "output_dir": "runs/demo",
    "eval_datasets": "demo",
    "eval_n": 2,
    "eval_max_tokens": 64,
    "teacher_thinking": False,
}

#: The published GRPO settings, applied when ``loss == "grpo"`` to the fields the user did
#: not set (after TINY_PROFILE): G = 8 rollouts at temperature 1.2, two optimiser passes.
GRPO_PROFILE: dict[str, Any] = {
    "rollouts_per_problem": 8,
    "temperature": 1.2,
    "num_iterations": 2,
}


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in fields(TrainConfig)}


def _parse_value(name: str, raw: Any, tp: Any) -> Any:
    """Coerce ``raw`` (a CLI string or a file value) to the field type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null", "")):
            return None
        inner = [a for a in args if a is not type(None)]
        return _parse_value(name, raw, inner[0])
    if origin is list:
        (elem,) = args
        if isinstance(raw, str):
            raw = [p.strip() for p in raw.split(",") if p.strip()]
        if not isinstance(raw, (list, tuple)):
            raise ValueError(f"config field {name!r} expects a list, got {raw!r}")
        return [_parse_value(name, r, elem) for r in raw]
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        s = str(raw).strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"config field {name!r} expects a boolean, got {raw!r}")
    if tp in (int, float):
        if isinstance(raw, bool):
            raise ValueError(f"config field {name!r} expects {tp.__name__}, got {raw!r}")
        try:
            value = tp(raw) if tp is float or isinstance(raw, int) else int(str(raw), 0)
        except (TypeError, ValueError):
            try:  # "1e3" for an int field
                f = float(raw)
                if tp is int and f.is_integer():
                    return int(f)
            except (TypeError, ValueError):
                pass
            raise ValueError(f"config field {name!r} expects {tp.__name__}, got {raw!r}") from None
        return value
    if tp is str:
        return str(raw)
    raise TypeError(f"unsupported config type {tp} for {name!r}")


def parse_overrides(argv: list[str]) -> dict[str, str | None]:
    """``["--max-steps", "3", "--flag=x"]`` -> ``{"max_steps": "3", "flag": "x"}``.
    ``--config`` is returned under the key ``config``."""
    out: dict[str, str | None] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or tok == "--":
            raise ValueError(f"unexpected argument {tok!r}: use --key value")
        key = tok[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 2
        else:
            value = "true"  # bare flag: --tensorboard
            i += 1
        out[key.replace("-", "_")] = value
    return out


def _load_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(  # noqa: TRY004 - bad file content, not a caller type error
            f"config file {path} must hold a mapping, got {type(data).__name__}"
        )
    return {k.replace("-", "_"): v for k, v in data.items()}


def field_docs() -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body)."""
    import ast
    import inspect
    import itertools

    tree = ast.parse(inspect.getsource(TrainConfig))
    body = tree.body[0].body
    docs = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def usage() -> str:
    """``--help`` text: every field, its default and its documentation."""
    import textwrap

    docs = field_docs()
    lines = [
        "usage: torchrun --nproc_per_node=N sgsd/train.py [--config FILE] [--key value ...]",
        "",
        (
            "Paper defaults; --model tiny (the default) also applies TINY_PROFILE to the "
            "fields you do not set."
        ),
        "",
    ]
    for f in fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        tiny = f"  [tiny: {TINY_PROFILE[f.name]!r}]" if f.name in TINY_PROFILE else ""
        lines.append(f"  --{f.name.replace('_', '-')} (default {default!r}){tiny}")
        lines += textwrap.wrap(
            docs.get(f.name, ""), 88, initial_indent="      ", subsequent_indent="      "
        )
    return "\n".join(lines)


def load_config(argv: list[str] | None = None, **overrides: Any) -> TrainConfig:
    """Build a :class:`TrainConfig` from ``--config FILE`` + ``--key value`` (+ kwargs)."""
    cli = parse_overrides(list(argv or []))
    values: dict[str, Any] = {}
    config_file = cli.pop("config", None)
    if config_file:
        values.update(_load_file(config_file))
    values.update(cli)
    values.update(overrides)

    types = _field_types()
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ValueError(
            f"unknown config key(s): {', '.join(unknown)} (known: {', '.join(sorted(types))})"
        )
    parsed = {k: _parse_value(k, v, types[k]) for k, v in values.items()}
    user_set = set(parsed)
    if parsed.get("model", "tiny") == "tiny":
        parsed = {**{k: v for k, v in TINY_PROFILE.items() if k not in parsed}, **parsed}
    if parsed.get("loss") == "grpo":
        parsed.update({k: v for k, v in GRPO_PROFILE.items() if k not in user_set})
    return TrainConfig(**parsed)


def _dump(data: dict[str, Any], *, yaml_format: bool) -> str:
    if yaml_format:
        try:
            import yaml

            return yaml.safe_dump(data, sort_keys=False)
        except ImportError:  # pragma: no cover - pyyaml is in the train extra
            pass
    return json.dumps(data, indent=2) + "\n"
