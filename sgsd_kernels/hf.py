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

:func:`patch_causal_lm` puts the same computation inside the model's own ``forward``: a
patched model called with ``labels=`` returns per-token ``log_probs`` (and ``entropy``) and
the loss, never logits, so every wrapper's hooks run as for any forward.

    hf.patch_causal_lm(model, return_entropy=True)
    out = model(input_ids, attention_mask=mask, labels=labels)   # out.logits is None
    out.loss.backward()                                          # == transformers' labels= loss

Over 450 lines on purpose: the hidden-state helpers and the patch built on them are one API
(docs/integrations.md) sharing the head's weight, LoRA and logit-transform handling.
This module imports neither transformers nor peft at import time; it duck-types what it
needs (the patched forward's output class subclasses transformers' ``ModelOutput``, built
on first use).
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
from torch import nn

from sgsd_kernels import functional as F
from sgsd_kernels.runtime import check_backend

__all__ = [
    "backbone",
    "head_logprobs",
    "last_hidden_states",
    "lm_head_parameters",
    "logit_transform",
    "patch_causal_lm",
    "unpatch_causal_lm",
    "unwrap_causal_lm",
]


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


def _head_weight(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`lm_head_parameters` as plain tensors: an FSDP2-sharded head (DTensor) is
    gathered here, since the head module's own forward (whose hook would unshard it) never
    runs; ``full_tensor()`` is differentiable, its backward reduce-scatters."""
    weight, bias = lm_head_parameters(model)
    if hasattr(weight, "ds_id") and weight.numel() == 0:
        raise NotImplementedError(
            "the LM head's weight is partitioned by DeepSpeed ZeRO-3 and its module's forward "
            "(which would gather it) does not run; use ZeRO-2 or FSDP2 for the fused head"
        )
    if hasattr(weight, "full_tensor"):
        weight = weight.full_tensor()
    if bias is not None and hasattr(bias, "full_tensor"):
        bias = bias.full_tensor()
    return weight, bias


# Config fields that change the logits between the head's matmul and the softmax in
# transformers' own forward. Each is passed to the kernels or refused: a head whose
# transform is dropped would give wrong log-probs that look right.
_UNSUPPORTED_SCALES = ("logits_scaling", "output_multiplier", "lm_head_multiplier")


def logit_transform(model: nn.Module) -> dict[str, float]:
    """Keyword arguments of :func:`sgsd_kernels.linear_logprobs` that reproduce the model's
    own logits after the head's matmul: ``softcap`` from ``final_logit_softcapping``
    (Gemma 2/3) and ``logit_scale`` (Cohere); ``{}`` for a plain head (Llama, Qwen).

    Raises ``NotImplementedError`` for a transform the installed kernels cannot apply.
    """
    lm = unwrap_causal_lm(model)
    config = getattr(lm, "config", None)
    get_text = getattr(config, "get_text_config", None)
    text = get_text() if callable(get_text) else config
    name = type(lm).__name__
    for field in _UNSUPPORTED_SCALES:
        value = getattr(text, field, None)
        if value is not None and value != 1:
            raise NotImplementedError(
                f"{name}: config.{field}={value} rescales the logits, which sgsd_kernels does "
                f"not reproduce; its log-probs would be wrong"
            )
    out = {}
    softcap = getattr(text, "final_logit_softcapping", None)
    if softcap is not None:
        out["softcap"] = float(softcap)
    scale = getattr(text, "logit_scale", None)
    if scale is not None and scale != 1:
        out["logit_scale"] = float(scale)
    return out


_PATCH = "_sgsd_kernels_patch"


@functools.cache
def _output_class():
    """``LinearCausalLMOutput``: transformers' ``ModelOutput`` with the patched fields."""
    from dataclasses import dataclass

    from transformers.utils import ModelOutput

    @dataclass
    class LinearCausalLMOutput(ModelOutput):
        """Output of a causal LM patched by :func:`patch_causal_lm`, called with labels."""

        loss: torch.Tensor | None = None
        logits: torch.Tensor | None = None
        log_probs: torch.Tensor | None = None
        entropy: torch.Tensor | None = None
        past_key_values: object | None = None
        hidden_states: tuple[torch.Tensor, ...] | None = None
        attentions: tuple[torch.Tensor, ...] | None = None

    return LinearCausalLMOutput


def patch_causal_lm(
    model: nn.Module,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
) -> nn.Module:
    """Make ``model(..., labels=labels)`` return per-token log-probs and the loss from the
    fused kernels instead of ``[B, T, V]`` logits; returns ``model``.

    ``model`` is a transformers ``*ForCausalLM`` (or a PEFT / DDP / compiled wrapper of
    one: the inner causal LM's ``forward`` is replaced, so any wrapper's forward and hooks
    still run around it). Called with ``labels`` ``[B, T]`` (``-100`` = ignored), the
    patched forward runs the backbone, then :func:`sgsd_kernels.linear_logprobs` on the
    LM head, and returns a ``ModelOutput`` with

    - ``log_probs`` ``[B, T]`` float32, aligned with ``labels`` (transformers' shift):
      ``log_probs[:, t] = log_softmax(logits[:, t - 1] / temperature)[labels[:, t]]``;
      ``0.0`` at ``t = 0`` (nothing predicts the first token) and wherever
      ``labels == -100`` (no gradient there). Equivalent to::

          z = model_unpatched(input_ids, ...).logits.float() / temperature
          lp = z[:, :-1].log_softmax(-1).gather(-1, labels[:, 1:, None].clamp(min=0))[..., 0]
          log_probs = F.pad(lp.masked_fill(labels[:, 1:] == -100, 0), (1, 0))

    - ``entropy`` ``[B, T]`` of the same (tempered) distribution, same alignment and zeros,
      when ``return_entropy``; else None.
    - ``loss``: ``-log_probs.sum() / (labels[:, 1:] != -100).sum()`` (``num_items_in_batch``
      replaces the count when given), i.e. transformers' ``labels=`` loss at
      ``temperature=1``; 0 when no label counts (transformers gives NaN).
    - ``logits``: None. ``past_key_values``, ``hidden_states``, ``attentions``: the backbone's.

    ``logits_to_keep=k`` (an int > 0) scores only the last ``k`` labels: ``log_probs`` and
    ``entropy`` are ``[B, k]`` (``log_probs[:, -k:]`` of the full result) and the loss
    counts those labels only; 0 keeps all. Pre-shifted ``shift_labels=`` (aligned with the
    inputs: ``shift_labels[:, t]`` is predicted at position ``t``) are scored unshifted.
    Without labels the original forward runs, unchanged (logits; ``generate`` works).

    Gemma's ``final_logit_softcapping`` and Cohere's ``logit_scale`` are applied (see
    :func:`logit_transform`); other logit rescalings raise ``NotImplementedError``. A LoRA
    adapter on the head is applied through its merged weight (:func:`lm_head_parameters`).
    Patching a patched model raises ``RuntimeError``: call :func:`unpatch_causal_lm` first.
    """
    lm = unwrap_causal_lm(model)
    if _PATCH in lm.__dict__:
        raise RuntimeError(
            f"{type(lm).__name__} is already patched by patch_causal_lm; call "
            f"unpatch_causal_lm(model) first to patch it with other settings"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {type(return_entropy).__name__}")
    check_backend(backend)
    if lm.get_output_embeddings() is None:
        raise TypeError(
            f"{type(lm).__name__} has no LM head (get_output_embeddings() is None): "
            f"patch_causal_lm needs a *ForCausalLM model"
        )
    backbone(lm)  # fails now, with its message, rather than at the first call
    logit_transform(lm)
    had_own = "forward" in lm.__dict__
    previous = lm.forward
    # the class's signature names the arguments even when ``previous`` is a (*args, **kwargs)
    # wrapper another library put on the instance
    signature = inspect.signature(type(lm).forward)
    var_keyword = next(
        (k for k, p in signature.parameters.items() if p.kind is p.VAR_KEYWORD), "**"
    )
    settings = dict(temperature=float(temperature), return_entropy=return_entropy, backend=backend)

    @functools.wraps(previous)
    def forward(*args, **kwargs):
        call = signature.bind(lm, *args, **kwargs).arguments
        call.pop(next(iter(signature.parameters)))  # self
        call.update(call.pop(var_keyword, None) or {})
        labels = call.pop("labels", None)
        shift_labels = call.pop("shift_labels", None)
        if labels is None and shift_labels is None:
            return previous(*args, **kwargs)
        keep = call.pop("logits_to_keep", 0)
        num_items = call.pop("num_items_in_batch", None)
        out = backbone(lm)(**call)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        log_probs, entropy = _score(lm, hidden, labels, shift_labels, keep, settings)
        counted = (labels[:, 1:] if shift_labels is None else shift_labels) != -100
        if isinstance(keep, int) and keep > 0:
            counted = counted[:, -keep:]
        denom = counted.sum().clamp(min=1) if num_items is None else num_items
        if torch.is_tensor(denom):
            denom = denom.to(log_probs.device)
        return _output_class()(
            loss=-log_probs.sum() / denom,
            logits=None,
            log_probs=log_probs,
            entropy=entropy,
            past_key_values=getattr(out, "past_key_values", None),
            hidden_states=getattr(out, "hidden_states", None),
            attentions=getattr(out, "attentions", None),
        )

    lm.forward = forward
    lm.__dict__[_PATCH] = (had_own, previous if had_own else None, settings)
    return model


def _score(lm, hidden, labels, shift_labels, keep, settings):
    """``(log_probs, entropy | None)`` of the kept label positions (see patch_causal_lm)."""
    if not (isinstance(keep, int) and not isinstance(keep, bool)) or keep < 0:
        raise TypeError(
            f"with labels, logits_to_keep must be an int >= 0 (the number of last labels to "
            f"score), got {keep!r}"
        )
    T = hidden.shape[1]
    if shift_labels is not None:
        k = T if keep == 0 else min(keep, T)
        h, targets, pad = hidden[:, T - k :], shift_labels[:, T - k :], 0
    else:
        if labels.dim() != 2 or labels.shape != hidden.shape[:2]:
            raise ValueError(
                f"labels must have shape [B, T] = {tuple(hidden.shape[:2])}, got "
                f"{tuple(labels.shape)}"
            )
        k = T if keep == 0 else min(keep, T)
        # label t is predicted by position t - 1; label 0 by nothing (padded with 0 below)
        h, targets, pad = (
            hidden[:, max(T - k - 1, 0) : T - 1],
            labels[:, max(T - k, 1) :],
            int(k == T),
        )
    result = head_logprobs(lm, h, targets.to(h.device), **settings)
    lp, ent = result if settings["return_entropy"] else (result, None)
    if pad:
        lp = nn.functional.pad(lp, (1, 0))
        ent = None if ent is None else nn.functional.pad(ent, (1, 0))
    return lp, ent


def head_logprobs(
    model: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`sgsd_kernels.linear_logprobs` of ``hidden [..., H]`` through ``model``'s own LM
    head: its weight and bias (a LoRA adapter on the head merged in, an FSDP2 shard
    gathered) and its logit transform (:func:`logit_transform`). Equivalent to::

        z = model.get_output_embeddings()(hidden).float()   # + softcap / scale, as the model
        torch.log_softmax(z / temperature, -1).gather(-1, targets[..., None])[..., 0]

    ``hidden`` and the head may differ in dtype (autocast, an fp32 head): both are cast to
    the wider one. Float32 results (float64 for float64 inputs), 0 where ``targets == -100``.
    """
    transform = logit_transform(model)
    weight, bias = _head_weight(model)
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return F.linear_logprobs(
        hidden.to(dtype),
        weight.to(dtype),
        targets,
        bias=None if bias is None else bias.to(dtype),
        temperature=temperature,
        return_entropy=return_entropy,
        backend=backend,
        **transform,
    )


def unpatch_causal_lm(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_causal_lm`: the model's forward is the one it had before; returns
    ``model``. Raises ``ValueError`` if ``model`` is not patched."""
    lm = unwrap_causal_lm(model)
    state = lm.__dict__.pop(_PATCH, None)
    if state is None:
        raise ValueError(
            f"{type(lm).__name__} is not patched by patch_causal_lm: nothing to unpatch"
        )
    had_own, previous, _ = state
    if had_own:
        lm.forward = previous
    else:
        lm.__dict__.pop("forward", None)
    return model
