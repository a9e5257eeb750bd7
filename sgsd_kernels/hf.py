"""Hugging Face helpers: last hidden states and the LM head, never the logits.

The fused ops take ``hidden [..., H]`` and the LM-head ``weight [V, H]`` (+ ``bias``);
these helpers get both out of any transformers causal LM -- plain, wrapped in
``DistributedDataParallel``/``torch.compile``, or a PEFT model -- by running the
model's *backbone* (``get_decoder()`` / ``.model``) instead of its ``forward``, which
would multiply every position by the head and allocate a ``[B, T, V]`` tensor.

A distributed wrapper's own forward always runs: :func:`last_hidden_states` on a
``DistributedDataParallel`` (or ``DataParallel``), an FSDP2 root or a DeepSpeed engine
calls the wrapper, whose forward prepares the gradient all-reduce (DDP), gathers the
sharded parameters (FSDP2, ZeRO-3) and then runs the backbone in place of the inner
model's forward (a forward redirection). Running the backbone around the wrapper would
train each rank on its own gradients, silently.

    from sgsd_kernels import hf
    hidden = hf.last_hidden_states(model, input_ids, attention_mask=mask)   # [B, T, H]
    weight, bias = hf.lm_head_parameters(model)                              # [V, H], [V] | None
    lp = sk.linear_logprobs(hidden[:, :-1], weight, input_ids[:, 1:], bias=bias)

This module imports neither transformers nor peft; it duck-types what it needs.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["backbone", "last_hidden_states", "lm_head_parameters", "unwrap_causal_lm"]


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` module inside ``model``.

    Peels ``DistributedDataParallel`` / ``DataParallel`` (``.module``), ``torch.compile``
    (``._orig_mod``) and PEFT (``get_base_model()``). PEFT's LoRA layers are injected in
    place, so running the returned module's backbone still applies the adapters.
    """
    seen = 0
    while seen < 16:
        seen += 1
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            inner = model.get_base_model()
            if inner is model:
                break
            model = inner
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            break
    if not hasattr(model, "get_output_embeddings"):
        raise TypeError(
            f"expected a transformers causal LM (with get_output_embeddings()), got "
            f"{type(model).__name__}"
        )
    return model


def backbone(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM: the module whose output is the last hidden state
    (after the final norm), i.e. everything before the LM head."""
    lm = unwrap_causal_lm(model)
    get_decoder = getattr(lm, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or decoder is lm:
        decoder = getattr(lm, "model", None)
        if not isinstance(decoder, nn.Module):
            decoder = getattr(lm, "transformer", None)
    if not isinstance(decoder, nn.Module) or decoder is lm:
        raise TypeError(
            f"cannot find the decoder backbone of {type(lm).__name__}: it has neither "
            f"get_decoder() nor a .model / .transformer submodule"
        )
    return decoder


def last_hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """``[B, T, H]`` last hidden states (the LM head's input) of ``model`` on ``input_ids``.

    Equals ``model(input_ids, attention_mask=..., output_hidden_states=True).hidden_states[-1]``
    without computing the logits. Extra ``kwargs`` (``position_ids``, ...) go to the
    backbone. Gradients flow as usual; wrap in ``torch.no_grad()`` for teachers.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [B, T], got {tuple(input_ids.shape)}")
    decoder = backbone(model)

    def run(input_ids, attention_mask=None, **kwargs):
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        return out[0] if isinstance(out, tuple) else out.last_hidden_state

    target = _redirect_target(model)
    if target is None:
        return run(input_ids, attention_mask, **kwargs)
    return _through_wrapper(model, target, run, input_ids, attention_mask, **kwargs)


def _redirect_target(model: nn.Module) -> nn.Module | None:
    """The module whose ``forward`` a distributed wrapper ``model`` runs inside its own
    (DDP / DataParallel / DeepSpeed: ``model.module``; an FSDP2 root: itself), or None
    when ``model`` is no such wrapper."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    if type(model).__name__ == "DeepSpeedEngine" and isinstance(
        getattr(model, "module", None), nn.Module
    ):
        return model.module
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return None
    return model if isinstance(model, FSDPModule) else None


def _through_wrapper(wrapper: nn.Module, target: nn.Module, run, *args, **kwargs):
    """``wrapper(*args, **kwargs)`` with ``target.forward`` replaced by ``run`` for that one
    call: the wrapper's forward logic and hooks run around the backbone."""
    had_own = "forward" in target.__dict__
    own = target.__dict__.get("forward")

    def restore() -> None:
        if had_own:
            target.forward = own
        else:
            target.__dict__.pop("forward", None)

    def redirected(*a, **k):
        restore()  # only this call is redirected, even if run() calls the target again
        return run(*a, **k)

    target.forward = redirected
    try:
        return wrapper(*args, **kwargs)
    finally:
        restore()


def _lora_delta(head: nn.Module) -> torch.Tensor | None:
    """Sum of the active, unmerged LoRA deltas of a PEFT-wrapped head (None if none)."""
    get_delta = getattr(head, "get_delta_weight", None)
    if get_delta is None or getattr(head, "disable_adapters", False):
        return None
    active = getattr(head, "active_adapters", None) or []
    merged = set(getattr(head, "merged_adapters", []) or [])
    deltas = [
        get_delta(name)
        for name in active
        if name not in merged and name in getattr(head, "lora_A", {})
    ]
    if not deltas:
        return None
    return torch.stack(deltas).sum(0)


def lm_head_parameters(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [V, H], bias [V] or None)`` of the LM head, as live (differentiable) tensors.

    For a PEFT LoRA adapter on the head itself, the weight is ``base + delta`` (a new,
    differentiable tensor); otherwise it is the head's own parameter (tied or not).
    """
    lm = unwrap_causal_lm(model)
    head = lm.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(lm).__name__}.get_output_embeddings() returned None")
    base = getattr(head, "base_layer", head)  # PEFT wraps the nn.Linear as .base_layer
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"the LM head {type(base).__name__} has no 2-D weight")
    delta = _lora_delta(head) if head is not base else None
    if delta is not None:
        weight = weight + delta.to(weight.dtype)
    bias = getattr(base, "bias", None)
    if bias is not None and not isinstance(bias, torch.Tensor):
        bias = None
    return weight, bias
