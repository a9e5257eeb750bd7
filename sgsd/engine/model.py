"""Policy model: load a causal LM (+ LoRA), expose hidden states and the LM head.

The trainer never calls the model's ``forward`` (which would compute ``[B, T, V]``
logits). :class:`Policy` runs the backbone and returns last hidden states; the loss
multiplies them by the LM head inside the fused kernels. ``Policy`` is the module that
``DistributedDataParallel`` wraps (gradient synchronisation sees every trainable
parameter, the LM head included when it trains), and the FSDP2 root (its forward gathers
the embeddings and the head; :func:`shard_fsdp2`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from sgsd.config import TrainConfig
from sgsd_kernels import hf

log = logging.getLogger(__name__)

__all__ = [
    "Policy",
    "gathered",
    "is_fsdp",
    "load_policy",
    "merged_weights",
    "model_source",
    "random_model_spec",
    "resolve_dtype",
    "save_random_model",
    "shard_fsdp2",
    "trainable_names",
    "wrap_for_parallelism",
]


def resolve_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def _attn_implementation(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


#: Qwen3's vocabulary: the LM head's rows (its tokenizer uses fewer ids).
QWEN3_VOCAB = 151_936

#: ``--model random:NAME[:VOCAB]``: a random-init Qwen3 of a named shape built from its
#: config alone (no download), with the tiny model's tokenizer, to time the trainer at a
#: real model's size offline (benchmarks/bench_train_step.py, benchmarks/gpu_check.sh).
#: The Qwen3 entries are the published configs (tied embeddings); ``cpu`` is small enough
#: for 2 CPU cores but keeps the 151,936-row head, which is what the kernels are about.
RANDOM_SHAPES: dict[str, dict] = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128),
    "cpu": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=64),
}  # fmt: skip


def random_model_spec(model: str) -> tuple[str, int] | None:
    """``(shape, vocab)`` of a ``random:NAME[:VOCAB]`` model spec; None for any other."""
    if not model.startswith("random:"):
        return None
    name, _, vocab = model[len("random:") :].partition(":")
    if name not in RANDOM_SHAPES or (vocab and not vocab.isdigit()):
        raise ValueError(
            f"--model {model}: expected random:NAME[:VOCAB], NAME one of {', '.join(RANDOM_SHAPES)}"
        )
    return name, int(vocab) if vocab else QWEN3_VOCAB


def save_random_model(model: str, seed: int = 0) -> Path:
    """Write the ``random:NAME[:VOCAB]`` model (bf16, seeded) and the tiny tokenizer next to
    the tiny model's cache, once, and return the directory (written to a temporary
    sibling, then moved into place, as :func:`sgsd.tiny.model.save_tiny_model` does). The
    weights are built on the GPU when there is one: a 1.7B model's random init takes
    seconds there and minutes on a CPU; their values then depend on the device."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from sgsd.tiny.model import (
        _portable_tokenizer_config,
        build_tiny_tokenizer,
        default_tiny_model_dir,
    )

    name, vocab = random_model_spec(model)
    path = default_tiny_model_dir().parent / f"random-{name}-v{vocab}-s{seed}"
    marker = path / "sgsd_random_model.json"
    if marker.is_file():
        return path
    tokenizer = build_tiny_tokenizer()
    if vocab < len(tokenizer):
        raise ValueError(f"--model {model}: VOCAB must be >= {len(tokenizer)} (the tokenizer's)")
    eos, pad = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    config = Qwen3Config(
        vocab_size=vocab,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=True,
        bos_token_id=pad,
        eos_token_id=eos,
        pad_token_id=pad,
        dtype="bfloat16",
        **RANDOM_SHAPES[name],
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        net = Qwen3ForCausalLM(config).to(torch.bfloat16)
    net.generation_config = GenerationConfig(
        bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        net.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _portable_tokenizer_config(tmp)
        (tmp / marker.name).write_text(json.dumps({"model": model, "seed": seed}) + "\n")
        try:
            os.replace(tmp, path)
        except OSError:  # another process finished first
            if not marker.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def model_source(cfg: TrainConfig) -> str:
    """A path or hub id that both transformers and vLLM can load (builds the tiny model
    and ``random:`` models)."""
    if random_model_spec(cfg.model) is not None:
        return str(save_random_model(cfg.model, seed=0))
    if cfg.model != "tiny":
        return cfg.model
    from sgsd.tiny.model import default_tiny_model_dir, save_tiny_model

    # The warm-started tiny model (right sometimes on the demo set; trained once, cached).
    return str(save_tiny_model(default_tiny_model_dir(warm_start=True), seed=0, warm_start=True))


class Policy(nn.Module):
    """The trained causal LM, seen as ``hidden = policy(input_ids, attention_mask)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model  # PEFT-wrapped or plain transformers causal LM

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return hf.last_hidden_states(self.model, input_ids, attention_mask=attention_mask)

    def lm_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return hf.lm_head_parameters(self.model)

    @property
    def is_peft(self) -> bool:
        return hasattr(self.model, "peft_config")


def load_policy(cfg: TrainConfig, device: torch.device):
    """``(Policy, tokenizer, source)`` with LoRA applied (or all weights trainable)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = model_source(cfg)
    dtype = resolve_dtype(cfg, device)
    attn = _attn_implementation(cfg, device)
    trust = cfg.trust_remote_code
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation=attn, trust_remote_code=trust
        )
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise ValueError(
            f"--model {source}: loading it runs code shipped with the model; pass "
            "--trust-remote-code if you trust its source"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.config.use_cache = False
    if cfg.finetune == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.finetune == "lora":
            # inputs must require grad for checkpointed blocks when the embeddings are frozen
            model.enable_input_require_grads()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info(
        "model %s (%s, %s, attn=%s): %.2fM / %.2fM parameters trainable",
        source,
        cfg.finetune,
        dtype,
        attn,
        n_train / 1e6,
        n_all / 1e6,
    )
    return Policy(model), tokenizer, source


def is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_fsdp2(policy: Policy, device: torch.device, world_size: int) -> Policy:
    """FSDP2 (``fully_shard``): each decoder layer is one shard group, the rest (embeddings,
    final norm, LM head) the root group. ``Policy`` is the root, so its ``forward``
    gathers the root parameters and ``policy.lm_head()`` is valid right after a forward."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    layers = getattr(hf.backbone(policy.model), "layers", None)
    if layers is None:
        raise TypeError("FSDP2 needs a decoder with a .layers list (one shard group per layer)")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(policy, mesh=mesh)
    return policy


def wrap_for_parallelism(policy: Policy, parallelism: str, device: torch.device, world_size: int):
    """What the student forward runs through: the policy itself (one rank), a
    DistributedDataParallel wrapper (``ddp``) or the FSDP2-sharded policy (``fsdp2``)."""
    if world_size == 1:
        return policy
    if parallelism == "fsdp2":
        return shard_fsdp2(policy, device, world_size)
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(policy, device_ids=ids)


@contextmanager
def gathered(policy: Policy):
    """Inside the block every parameter is full (unsharded) under FSDP2; a no-op otherwise.
    A collective: all ranks enter together."""
    from torch.distributed.fsdp import FSDPModule

    groups = [m for m in policy.modules() if isinstance(m, FSDPModule)]
    for m in groups:
        m.unshard()
    try:
        yield
    finally:
        for m in groups:
            m.reshard()


@torch.no_grad()
def merged_weights(policy: Policy) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights under the base checkpoint's names, LoRA deltas merged in.

    Does not modify the model (merging in place and unmerging would drift the base
    weights by rounding). This is what gets pushed into vLLM before each generation.
    Under FSDP2, iterate inside :func:`gathered`.
    """
    base = hf.unwrap_causal_lm(policy.model)
    deltas: dict[str, torch.Tensor] = {}
    if policy.is_peft:
        for name, module in base.named_modules():
            if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
                delta = None
                for adapter in module.active_adapters:
                    if adapter in module.lora_A and adapter not in module.merged_adapters:
                        d = module.get_delta_weight(adapter)
                        delta = d if delta is None else delta + d
                if delta is not None:
                    deltas[f"{name}.weight"] = delta
    # named_parameters, not state_dict(): under FSDP2 state_dict() returns the shards
    for key, tensor in base.named_parameters(remove_duplicate=False):
        if "lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        delta = deltas.get(key)
        yield key, (tensor + delta.to(tensor.dtype)) if delta is not None else tensor


def trainable_names(policy: Policy) -> list[str]:
    return [n for n, p in policy.named_parameters() if p.requires_grad]
