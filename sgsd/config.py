"""Training configuration: one dataclass, documented and validated.

Over 450 lines on purpose: it is the one declaration of every option, each with the
documentation that ``--help`` prints, next to the parsing and the validation that name
those options in their messages.

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
import functools
import json
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sgsd.methods.registry import METHODS, method_names

__all__ = [
    "RESUMABLE",
    "TINY_PROFILE",
    "ConfigError",
    "TrainConfig",
    "flag",
    "load_config",
    "parse_overrides",
    "resumed_config",
    "user_options",
]


class ConfigError(ValueError):
    """A bad option: the message is one line that names the flag (``--max-steps must be
    >= 1, got -3``); ``field`` is the TrainConfig field, when there is one."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def flag(name: str) -> str:
    """``max_steps`` -> ``--max-steps``."""
    return "--" + name.replace("_", "-")


LORA_TARGETS_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    # ---- model -------------------------------------------------------------------------
    model: str = "tiny"
    """HF model id or local directory; ``"tiny"`` = the offline tiny Qwen3 (sgsd.tiny.model);
    ``random:NAME[:VOCAB]`` = a random-init Qwen3 of a named shape (``qwen3-0.6b``,
    ``qwen3-1.7b``, ``cpu``; sgsd.engine.model.RANDOM_SHAPES), for timing runs offline.
    ``Qwen/Qwen3-1.7B`` is the paper's model."""
    trust_remote_code: bool = False
    """Let transformers and vLLM run Python code shipped with the model (``auto_map``
    models). Off: such a model is refused with a message naming this flag
    (docs/threat-model.md)."""
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
    """Recompute activations in backward (saves memory on long rollouts). On by default;
    the tiny profile turns it off (its activations are small)."""

    # ---- data and skills ---------------------------------------------------------------
    dataset: str = "demo"
    """``demo`` (bundled), ``skillworld`` (generated, docs/skillworld.md), a JSONL/JSON path,
    or a HF dataset id (``BytedTsinghua-SIA/DAPO-Math-17k`` is the paper's); see
    sgsd.data.load_problems."""
    dataset_split: str | None = None
    """Dataset split (None: the loader's default; for ``demo`` and ``skillworld``:
    ``train``, so that the held-out ``test`` split sgsd.evaluate scores is never trained on)."""
    answer_field: str | None = None
    """Field holding the final answer (None: the loader detects it)."""
    dataset_limit: int | None = None
    """Use only the first N problems (None: all)."""
    skill_bank: str | None = None
    """Skill-bank JSON path, or ``skillworld`` (the skill world's bundled bank); None: the
    bundled default bank."""
    retrieval_mode: str = "bm25"
    """How teachers are retrieved from the bank (passed to SkillBank.teachers)."""
    teacher_style: str = "published"
    """Teacher-context layout: ``published`` (the SGSD authors' Markdown prompt) or
    ``compact`` (sgsd.prompts.TEACHER_STYLES)."""
    skill_update_every: int = 25
    """Online skill-bank update every N steps (0 = off), only on steps whose success rate
    is below skill_update_threshold (sgsd.skills.online_update; paper: 25)."""
    skill_update_threshold: float = 0.8
    """Update only when the step's success rate (all ranks) is below this (paper: 0.8)."""
    skill_update_max_new: int = 5
    """At most this many new online items per kind per update (paper: 5)."""
    skill_online_capacity: int = 30
    """At most this many online items per kind; the oldest are evicted (paper: 30)."""
    skill_update_max_tokens: int = 1024
    """Reply budget of each extraction / merge generation in an online update."""
    enable_thinking: bool = False
    """Render the student's prompt with thinking enabled (Qwen3 chat template flag; the
    published SGSD run samples the student in non-thinking mode)."""
    teacher_thinking: bool = True
    """Render the teachers' prompts with thinking enabled (published: on)."""
    allow_empty_bank: bool = False
    """Train ``--loss sgsd`` from a skill bank that yields no teacher (loss 0 until the
    online update fills it); without it such a bank is an error before the model loads."""
    student_skills: bool = False
    """"+Skill" baselines (GRPO+Skill, OPSD+Skill, ...): put the top ``student_skills_k``
    skills and mistakes (BM25) in the student's prompt too (rendered once at start-up from
    the initial bank)."""
    student_skills_k: int = 3
    """Skills and mistakes each in the +Skill student prompt (published GRPO+Skill: 3)."""

    # ---- loss (docs/design.md §3) ----------------------------------------------------
    loss: str = "sgsd"
    """Training method, one of the registry's (sgsd.methods; listed above). A method's own
    defaults (GRPO: the published settings) apply to the fields you do not set."""
    grpo_clip_eps: float = 0.2
    """GRPO's PPO clip epsilon (published: 0.2)."""
    num_iterations: int = 1
    """Optimiser passes over each step's rollouts, the first pass's log-probs as the old
    ones (GRPO's num_iterations; published GRPO: 2). Each pass is an optimiser step; the
    LR schedule advances once per trainer step."""
    teacher: str = "live"
    """Teacher weights (sgsd.engine.teacher_weights): ``live`` (current), ``frozen`` (initial; LoRA
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
    """delta: clip of the log-prob gap in the support score (paper: 3; ``inf``: no
    clipping, the paper's ablation)."""
    confidence_threshold: float = 0.05
    """epsilon: |support| at or below this gives polarity 0 (paper: 0.05; 0: the
    ablation)."""
    polarity: bool = True
    """Teacher polarity rho = (reward > 0 ? +1 : -1) * sign(support) (docs/design.md §3).
    ``false``: the paper's ablation, every present teacher counts as helpful (rho = +1)."""
    token_mask: bool = True
    """Keep format and special tokens out of the gated loss (docs/design.md §3's m).
    ``false``: the paper's ablation, every completion token counts."""
    logprob_temperature: float = 1.0
    """Temperature of the student/teacher log-probs in the loss (1 = the model's own
    distribution; independent of the sampling temperature)."""
    log_entropy: bool = True
    """Log the student's and teachers' mean token entropy (one extra no-grad LM-head pass
    for the student; the teachers' comes with their log-probs)."""
    kernel_backend: str = "auto"
    """sgsd_kernels backend (``sgsd_kernels.runtime.BACKENDS``): auto (triton on CUDA, else
    torch), triton, torch, reference."""
    local_support_top_k: int | None = None
    """SGSD "Top-k local support" (docs/design.md §3.2; paper ablation: 100): the gate uses
    the KL on the teacher's top-k tokens ∪ {y_t}. None: the full-vocabulary gap."""
    divergence_beta: float = 0.0
    """OPSD (``--loss opsd``): β of the divergence (0 = forward KL, published default)."""
    divergence_temperature: float = 1.1
    """OPSD: softmax temperature of student and teacher in the divergence (published 1.1)."""
    divergence_clip: float | None = 0.05
    """OPSD: per-vocabulary-element clip of the divergence terms (published 0.05)."""

    verify_timeout_s: float = 5.0
    """Seconds (wall clock, and CPU time of the verifier's worker) one symbolic answer
    comparison may take; past it the rollout gets reward -1 (sgsd.eval.verify)."""
    verify_memory_mb: int = 2048
    """Address-space cap of the verifier's worker processes, in MiB (0: none). A model's
    answer that makes the comparison explode gets reward -1 and is counted in
    ``verify_resource_kills`` instead of taking the host's memory."""

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
    """Continue a run: ``latest`` (the newest checkpoint in output_dir; a fresh start if
    there is none) or a checkpoint directory. A bare ``--resume`` means ``latest``."""
    overwrite: bool = False
    """Start fresh in an output_dir that holds another run: its checkpoints, metrics,
    samples, banks and evals are deleted before step 1. Without it such a start refuses."""
    seed: int = 42
    """Seeds data order, sampling and initialisation (published: 42)."""
    log_every: int = 1
    """Console/metrics line every N steps."""
    sample_every: int = 10
    """At steps N, 2N, ...: append rank 0's rollouts to samples.jsonl and print one of
    them under that step's console line."""
    progress_bar: bool = True
    """tqdm progress bar on rank 0 (off when stderr is not a terminal)."""
    tensorboard: bool = False
    """Also log to TensorBoard (output_dir/tb)."""
    wandb_project: str | None = None
    """Also log to this Weights & Biases project."""
    verbose: bool = False
    """Show third-party log lines and warnings that are filtered as known noise."""

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
        def need(cond: bool, name: str, rule: str) -> None:
            if not cond:
                raise ConfigError(f"{flag(name)} {rule}, got {getattr(self, name)!r}", field=name)

        def one_of(name: str, options: tuple[str, ...]) -> None:
            need(getattr(self, name) in options, name, f"must be one of {'|'.join(options)}")

        def positive(*names: str) -> None:
            for name in names:
                v = getattr(self, name)
                need(math.isfinite(v) and v > 0, name, "must be finite and > 0")

        def at_least(lo: int, *names: str) -> None:
            for name in names:
                need(getattr(self, name) >= lo, name, f"must be >= {lo}")

        need(bool(self.model), "model", "must be a model id, a path or 'tiny'")
        if self.dataset in ("demo", "skillworld") and self.dataset_split is None:
            self.dataset_split = "train"
        one_of("finetune", ("lora", "full"))
        at_least(1, "lora_r")
        positive("lora_alpha")
        need(0.0 <= self.lora_dropout < 1.0, "lora_dropout", "must be in [0, 1)")
        need(len(self.lora_target_modules) > 0, "lora_target_modules", "must not be empty")
        one_of("dtype", ("auto", "bfloat16", "float16", "float32"))
        one_of("attn_implementation", ("auto", "sdpa", "eager", "flash_attention_2"))
        need(self.dataset_limit is None or self.dataset_limit >= 1, "dataset_limit", "must be >= 1")
        one_of("teacher_style", ("published", "compact"))
        at_least(0, "skill_update_every", "skill_update_max_new", "skill_online_capacity")
        need(
            0.0 <= self.skill_update_threshold <= 1.0, "skill_update_threshold", "must be in [0, 1]"
        )
        at_least(1, "skill_update_max_tokens")
        one_of("loss", method_names())
        need(
            self.local_support_top_k is None or self.local_support_top_k >= 1,
            "local_support_top_k",
            "must be >= 1 (or none)",
        )
        need(
            self.local_support_top_k is None or self.loss == "sgsd",
            "local_support_top_k",
            f"is a gate of --loss sgsd, not of --loss {self.loss}",
        )
        need(0.0 <= self.divergence_beta <= 1.0, "divergence_beta", "must be in [0, 1]")
        positive("divergence_temperature")
        need(
            self.divergence_clip is None or self.divergence_clip > 0,
            "divergence_clip",
            "must be > 0 (or none)",
        )
        need(0 < self.grpo_clip_eps < 1, "grpo_clip_eps", "must be in (0, 1)")
        at_least(1, "num_iterations", "teacher_refresh_every", "student_skills_k")
        one_of("teacher", ("live", "frozen", "ema", "periodic"))
        need(0 < self.teacher_ema_decay < 1, "teacher_ema_decay", "must be in (0, 1)")
        at_least(0, "eval_every")
        at_least(1, "eval_n", "eval_max_tokens")
        need(self.eval_limit is None or self.eval_limit >= 1, "eval_limit", "must be >= 1")
        positive("eval_temperature")
        at_least(1, "num_teachers")
        positive("gate_tau", "logprob_temperature", "temperature", "lr")
        need(self.clip_delta > 0, "clip_delta", "must be > 0 (inf: no clipping)")
        for ablation in ("polarity", "token_mask"):
            need(
                getattr(self, ablation) or self.loss == "sgsd",
                ablation,
                f"is an ablation of --loss sgsd, not of --loss {self.loss}",
            )
        positive("verify_timeout_s")
        at_least(0, "verify_memory_mb")
        need(
            math.isfinite(self.confidence_threshold) and self.confidence_threshold >= 0,
            "confidence_threshold",
            "must be finite and >= 0",
        )
        one_of("kernel_backend", kernel_backends())
        one_of("rollout_backend", ("auto", "vllm", "hf"))
        at_least(1, "problems_per_step", "rollouts_per_problem")
        need(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        at_least(0, "top_k")
        at_least(1, "max_completion_tokens", "max_prompt_tokens")
        need(
            self.vllm_gpu_memory_utilization is None
            or 0.0 < self.vllm_gpu_memory_utilization < 1.0,
            "vllm_gpu_memory_utilization",
            "must be in (0, 1)",
        )
        at_least(1, "max_steps")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(
            len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
            "adam_betas",
            "must be two numbers in [0, 1)",
        )
        at_least(0, "warmup_steps")
        one_of("lr_schedule", ("linear", "constant", "cosine"))
        need(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 disables clipping)")
        at_least(1, "micro_batch_size", "teacher_micro_batch_size")
        one_of("parallelism", ("ddp", "fsdp2"))
        at_least(0, "checkpoint_every", "keep_checkpoints")
        need(bool(self.output_dir), "output_dir", "must not be empty")
        need(self.resume is None or bool(self.resume), "resume", "must be 'latest' or a path")
        at_least(1, "log_every", "sample_every")

    # ---- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the config to ``path`` atomically (a temporary file renamed into place)."""
        import os

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = _dump(self.to_dict(), yaml_format=path.suffix in (".yaml", ".yml"))
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


@functools.cache
def kernel_backends() -> tuple[str, ...]:
    """``sgsd_kernels.runtime.BACKENDS``, the one list of kernel backends.

    Read from the runtime's source when ``sgsd_kernels`` is not imported yet: importing it
    imports torch (4.7-5.6 s on the loaded 2-core dev box), and the trainer validates its
    options in well under 2 s before anything heavy loads.
    """
    import sys

    if "sgsd_kernels.runtime" in sys.modules:
        return tuple(sys.modules["sgsd_kernels.runtime"].BACKENDS)
    import ast
    import importlib.util

    spec = importlib.util.find_spec("sgsd_kernels")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("sgsd_kernels is not installed (pip install sgsd-kernels)")
    source = Path(next(iter(spec.submodule_search_locations))) / "runtime.py"
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "BACKENDS" for t in node.targets
        ):
            return tuple(ast.literal_eval(node.value))
    raise RuntimeError(f"no BACKENDS tuple in {source}")


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
    "skill_update_max_tokens": 32,
    "max_steps": 10,
    "checkpoint_every": 5,
    "sample_every": 5,
    "output_dir": "runs/demo",
    "eval_datasets": "demo",
    "eval_n": 2,
    "eval_max_tokens": 64,
    "teacher_thinking": False,
}


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in fields(TrainConfig)}


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _parse_value(name: str, raw: Any, tp: Any) -> Any:
    """Coerce ``raw`` (a CLI string or a file value) to the field type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{flag(name)} expects {expected}, got {raw!r}", field=name)

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
            raise bad("a comma-separated list")
        return [_parse_value(name, r, elem) for r in raw]
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        s = str(raw).strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise bad(_TYPE_WORDS[bool])
    if tp in (int, float):
        if isinstance(raw, bool):
            raise bad(_TYPE_WORDS[tp])
        try:
            return tp(raw) if tp is float or isinstance(raw, int) else int(str(raw), 0)
        except (TypeError, ValueError):
            try:  # "1e3" for an int field
                f = float(raw)
                if tp is int and f.is_integer():
                    return int(f)
            except (TypeError, ValueError):
                pass
            raise bad(_TYPE_WORDS[tp]) from None
    if tp is str:
        return str(raw)
    raise TypeError(f"unsupported config type {tp} for {name!r}")


def _bare_values(types: dict[str, Any]) -> dict[str, str]:
    """Flags that may stand alone, and the value they then mean. Every other flag needs a
    value: ``--output-dir --max-steps 3`` is an error, not ``output_dir = "true"``."""
    bare = {name: "true" for name, tp in types.items() if tp is bool}
    bare["resume"] = "latest"
    return bare


def _unknown(key: str, known: list[str], spelled: str, in_file: bool = False) -> ConfigError:
    """``unknown option --max-stpes (did you mean --max-steps?)``."""
    import difflib

    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0] if in_file else flag(close[0])}?)" if close else ""
    return ConfigError(f"unknown option {spelled}{hint}")


def parse_overrides(argv: list[str]) -> dict[str, tuple[str, str]]:
    """``["--max-steps", "3", "--flag=x"]`` -> ``{"max_steps": ("3", "--max-steps"), ...}``:
    each field's raw value and the flag as the user typed it. ``--config`` is returned
    under the key ``config``. Only boolean flags and ``--resume`` may stand alone."""
    types = _field_types()
    bare = _bare_values(types)
    known = [*types, "config"]
    out: dict[str, tuple[str, str]] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or tok == "--":
            raise ConfigError(f"unexpected argument {tok!r}: options are --key value")
        typed, eq, value = tok.partition("=")
        key = typed[2:].replace("-", "_")
        if key not in known:
            raise _unknown(key, known, typed)
        if eq:
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 2
        elif key in bare:
            value = bare[key]
            i += 1
        else:
            raise ConfigError(f"{typed} expects a value", field=key)
        out[key] = (value, typed)
    return out


def _load_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError: report, no traceback
        detail = " ".join(str(e).split())
        raise ConfigError(f"--config {path}: not valid {path.suffix[1:]}: {detail}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a mapping, got {type(data).__name__}")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    for key in data:
        if key not in _field_types():
            raise _unknown(key, list(_field_types()), f"{key} in {path}", in_file=True)
    return data


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
        "usage: sgsd-train [--nproc-per-node N] [--config FILE] [--key value ...]",
        "       torchrun --nproc_per_node=N --module sgsd.train [--key value ...]",
        "       python -m sgsd.train [--key value ...]",
        "",
        *textwrap.wrap(
            "Paper defaults; --model tiny (the default) also applies TINY_PROFILE to the "
            "fields you do not set. Boolean flags and --resume may stand alone; every "
            "other flag takes a value.",
            88,
        ),
        "",
        "methods (--loss NAME):",
    ]
    for m in METHODS.values():
        own = ", ".join(f"{flag(k)} {v}" for k, v in m.defaults.items())
        text = m.summary + (f" (defaults: {own})" if own else "")
        lines += textwrap.wrap(
            text,
            88,
            initial_indent=f"  {m.name:<6}",
            subsequent_indent=" " * 8,
            break_on_hyphens=False,
        )
    lines.append("")
    types = _field_types()
    for f in fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        tiny = f"  [tiny: {TINY_PROFILE[f.name]!r}]" if f.name in TINY_PROFILE else ""
        metavar = "" if types[f.name] is bool else " VALUE"
        shown = f"default {default!r}"
        if f.name == "resume":
            metavar, shown = " [latest|PATH]", "default: a fresh start"
        lines.append(f"  {flag(f.name)}{metavar} ({shown}){tiny}")
        lines += textwrap.wrap(
            docs.get(f.name, ""), 88, initial_indent="      ", subsequent_indent="      "
        )
    return "\n".join(lines)


#: Options that may change when a run is resumed (a change is logged): how long it runs,
#: where and how often it writes, what it prints, and how it runs on the machine at hand
#: (parallelism, kernels, attention, rollout engine, memory knobs). Every other option
#: belongs to the experiment and is taken from the checkpoint (docs/training.md, "Resume").
RESUMABLE = (
    "max_steps",
    "output_dir",
    "resume",
    "overwrite",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "sample_every",
    "progress_bar",
    "tensorboard",
    "wandb_project",
    "verbose",
    "micro_batch_size",
    "teacher_micro_batch_size",
    "vllm_gpu_memory_utilization",
    "parallelism",
    "kernel_backend",
    "attn_implementation",
    "gradient_checkpointing",
    "rollout_backend",
)


def user_options(argv: list[str] | None = None) -> set[str]:
    """The fields the user set: on the command line or in the ``--config`` file."""
    cli = parse_overrides(list(argv or []))
    config_file = cli.pop("config", (None, ""))[0]
    return set(cli) | (set(_load_file(config_file)) if config_file else set())


def resumed_config(
    cfg: TrainConfig, saved: dict[str, Any], user_set: set[str]
) -> tuple[TrainConfig, list[str]]:
    """The options of a resumed run: the checkpoint's (``saved``), except the
    :data:`RESUMABLE` ones the user set. Returns the config and the changes, one
    ``"--flag old -> new"`` each; an experiment option set to another value than the
    checkpoint's is a :class:`ConfigError` that names it."""
    types = _field_types()
    values = {}
    for name, raw in saved.items():
        if name in types:  # an option this version no longer has is dropped
            values[name] = _parse_value(name, raw, types[name])
    changes, conflicts = [], []
    for name in sorted(user_set & set(types)):
        mine = getattr(cfg, name)
        if name not in values or values[name] == mine or name in ("resume", "overwrite"):
            values[name] = mine
        elif name in RESUMABLE:
            changes.append(f"{flag(name)} {values[name]!r} -> {mine!r}")
            values[name] = mine
        else:
            conflicts.append((name, f"{flag(name)} {mine!r} (the run has {values[name]!r})"))
    if conflicts:
        raise ConfigError(
            f"{', '.join(text for _, text in conflicts)}: a resumed run keeps its "
            "experiment's options; drop them, or start a new run in another --output-dir. "
            f"Options that may change on resume: {', '.join(flag(n) for n in RESUMABLE)}",
            field=conflicts[0][0],
        )
    for name in ("resume", "overwrite", "output_dir"):
        values[name] = getattr(cfg, name)
    return TrainConfig(**values), changes


def load_config(argv: list[str] | None = None, **overrides: Any) -> TrainConfig:
    """Build a :class:`TrainConfig` from ``--config FILE`` + ``--key value`` (+ kwargs).

    Raises :class:`ConfigError` whose message names the flag as the user typed it."""
    cli = parse_overrides(list(argv or []))
    typed = {key: spelled for key, (_, spelled) in cli.items()}
    values: dict[str, Any] = {}
    config_file = cli.pop("config", (None, ""))[0]
    if config_file:
        values.update(_load_file(config_file))
        typed.update({k: f"{k} (in {config_file})" for k in values if k not in typed})
    values.update({key: value for key, (value, _) in cli.items()})
    values.update(overrides)

    types = _field_types()
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise _unknown(unknown[0], list(types), unknown[0])
    try:
        parsed = {k: _parse_value(k, v, types[k]) for k, v in values.items()}
        user_set = set(parsed)
        if parsed.get("model", "tiny") == "tiny":
            parsed = {**{k: v for k, v in TINY_PROFILE.items() if k not in parsed}, **parsed}
        method = METHODS.get(parsed.get("loss", "sgsd"))
        if method is not None:  # an unknown name fails validation below
            parsed.update({k: v for k, v in method.defaults.items() if k not in user_set})
        return TrainConfig(**parsed)
    except ConfigError as e:
        if e.field in typed and not str(e).startswith(typed[e.field]):
            message = typed[e.field] + str(e)[len(flag(e.field)) :]
            raise ConfigError(message, field=e.field) from None
        raise


def _dump(data: dict[str, Any], *, yaml_format: bool) -> str:
    if yaml_format:
        try:
            import yaml

            return yaml.safe_dump(data, sort_keys=False)
        except ImportError:  # pragma: no cover - pyyaml is in the train extra
            pass
    return json.dumps(data, indent=2) + "\n"
