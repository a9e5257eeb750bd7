"""TRL: GRPO's per-token log-probs from hidden states, and a distillation loss module.

``LinearLogprobsGRPOTrainer`` is ``trl.GRPOTrainer`` whose per-token log-probs and
entropies (policy, old policy and reference) come from :func:`sgsd_kernels.linear_logprobs`
on the model's last hidden states and its LM head: no ``[B, T, V]`` logits, and TRL's
losses, clipping, KL and reductions run unchanged on the result. Text-only batches take
this path; vision inputs and MoE auxiliary losses fall back to TRL's own method.

    from sgsd_kernels.integrations.trl import LinearLogprobsGRPOTrainer
    trainer = LinearLogprobsGRPOTrainer(model=model, reward_funcs=reward, args=args, ...)

Written against TRL 1.16, whose ``GRPOTrainer._get_per_token_logps_and_entropies(model,
input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
**vision)`` returns ``(logps, entropies, aux_loss)``; a TRL whose method differs is refused
at construction. ``LinearLogprobsMixin`` gives the same to a subclass of ``GRPOTrainer``.

:class:`LinearDivergenceLoss` is :func:`sgsd_kernels.linear_divergence` as an
``nn.Module`` with TRL GKD's reductions, for distillation trainers (GKD, on-policy
self-distillation) that hold hidden states.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from trl import GRPOTrainer

from sgsd_kernels import hf
from sgsd_kernels.functional import linear_divergence

__all__ = ["LinearDivergenceLoss", "LinearLogprobsGRPOTrainer", "LinearLogprobsMixin"]

_EXPECTED = ("model", "input_ids", "attention_mask", "logits_to_keep", "batch_size")


class LinearLogprobsMixin:
    """Put before ``GRPOTrainer`` (or a subclass of it) in the bases: its
    ``_get_per_token_logps_and_entropies`` computes text-only batches with the fused
    kernels. ``sgsd_backend`` (class attribute) picks the kernels' backend."""

    sgsd_backend: str = "auto"

    def __init__(self, *args, **kwargs):
        params = list(inspect.signature(super()._get_per_token_logps_and_entropies).parameters)
        if tuple(params[: len(_EXPECTED)]) != _EXPECTED or "compute_aux_loss" not in params:
            raise RuntimeError(
                "this TRL's GRPOTrainer._get_per_token_logps_and_entropies has the parameters "
                f"{params}; LinearLogprobsMixin is written for TRL 1.16's "
                f"{list(_EXPECTED)} + compute_entropy, compute_aux_loss"
            )
        super().__init__(*args, **kwargs)

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **vision,
    ):
        if compute_aux_loss or any(v is not None for v in vision.values()):
            return super()._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                batch_size=batch_size,
                compute_entropy=compute_entropy,
                compute_aux_loss=compute_aux_loss,
                **vision,
            )
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids = input_ids[start : start + batch_size]
            mask = attention_mask[start : start + batch_size]
            # the completion tokens (the last logits_to_keep), predicted one position earlier
            targets = ids[:, -logits_to_keep:].masked_fill(mask[:, -logits_to_keep:] == 0, -100)
            with self.accelerator.autocast():
                # through the accelerator's wrapper (DDP / FSDP / DeepSpeed) forward
                hidden = hf.last_hidden_states(model, ids, attention_mask=mask)
            out = hf.head_logprobs(
                model,
                hidden[:, -logits_to_keep - 1 : -1],
                targets,
                temperature=self.temperature,
                return_entropy=compute_entropy,
                backend=self.sgsd_backend,
            )
            lp, ent = out if compute_entropy else (out, None)
            logps.append(lp)
            entropies.append(ent)
        entropy = torch.cat(entropies) if compute_entropy else None
        return torch.cat(logps), entropy, None


class LinearLogprobsGRPOTrainer(LinearLogprobsMixin, GRPOTrainer):
    """``trl.GRPOTrainer`` with per-token log-probs and entropies from the fused kernels."""


_REDUCTIONS = ("none", "token", "sequence", "mean", "sum")


class LinearDivergenceLoss(nn.Module):
    """β-JSD / forward / reverse KL between a student and a (constant) teacher from hidden
    states and LM heads (:func:`sgsd_kernels.linear_divergence`), reduced like TRL GKD's
    ``generalized_jsd_loss``. Equivalent to::

        zs, zt = student_hidden @ weight.T / T, teacher_hidden @ teacher_weight.T / T
        GKDTrainer.generalized_jsd_loss(zs, zt, labels, beta=beta, reduction=...)

    with ``labels != -100`` as ``mask``; ``beta=0`` is the forward KL(teacher‖student),
    ``beta=1`` the reverse KL. ``top_k`` restricts both distributions to the teacher's
    top-k tokens (renormalised), ``elementwise_clip`` caps each vocabulary term.

    Reductions of the per-token divergences D (0 where ``mask`` is False):

    - ``"none"``: D itself, the shape of ``student_hidden.shape[:-1]``;
    - ``"token"``: ΣD / #unmasked tokens (GKD's ``"batchmean"`` with labels);
    - ``"sequence"``: the mean over rows (dim 0) of each row's ΣD / its #unmasked, rows
      without a token left out;
    - ``"mean"``: ΣD / (#unmasked · V) (GKD's ``"mean"``: over tokens and vocabulary);
    - ``"sum"``: ΣD.

    ``num_items_in_batch`` (the Trainer's count under gradient accumulation) replaces the
    token count of ``"token"``, as in GKD.
    """

    def __init__(
        self,
        beta: float = 0.5,
        temperature: float = 1.0,
        *,
        top_k: int | None = None,
        elementwise_clip: float | None = None,
        reduction: str = "token",
        backend: str = "auto",
    ):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.beta, self.temperature, self.top_k = beta, temperature, top_k
        self.elementwise_clip, self.reduction, self.backend = elementwise_clip, reduction, backend

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, temperature={self.temperature}, top_k={self.top_k}, "
            f"elementwise_clip={self.elementwise_clip}, reduction={self.reduction!r}"
        )

    def forward(
        self,
        student_hidden: torch.Tensor,
        weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        *,
        teacher_weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        d = linear_divergence(
            student_hidden,
            weight,
            teacher_hidden.detach(),
            teacher_weight=None if teacher_weight is None else teacher_weight.detach(),
            bias=bias,
            teacher_bias=None if teacher_bias is None else teacher_bias.detach(),
            beta=self.beta,
            temperature=self.temperature,
            elementwise_clip=self.elementwise_clip,
            teacher_top_k=self.top_k,
            mask=mask,
            backend=self.backend,
        )
        if self.reduction == "none":
            return d
        keep = (
            torch.ones(d.shape, dtype=torch.bool, device=d.device)
            if mask is None
            else mask.to(torch.bool)
        )
        if self.reduction == "sum":
            return d.sum()
        if self.reduction == "sequence":
            rows = d.reshape(d.shape[0], -1).sum(-1)
            counts = keep.reshape(d.shape[0], -1).sum(-1)
            present = counts > 0
            return (rows[present] / counts[present]).sum() / present.sum().clamp(min=1)
        if self.reduction == "token" and num_items_in_batch is not None:
            return d.sum() / num_items_in_batch
        count = keep.sum().clamp(min=1)
        if self.reduction == "mean":
            count = count * weight.shape[0]
        return d.sum() / count

    def from_models(
        self,
        student: nn.Module,
        teacher: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        teacher_input_ids: torch.Tensor | None = None,
        teacher_attention_mask: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss between two causal LMs on one batch, with transformers' shift: the
        positions predicting ``labels[:, 1:] != -100`` (all tokens when ``labels`` is None).

        The teacher may read its own prompt (``teacher_input_ids``, e.g. self-distillation
        with privileged context): its rows are right-aligned with the student's, so the
        last ``T`` positions of both are the same response. Student and teacher heads must
        be plain (no logit soft-capping or scaling)."""
        for m in (student, teacher):
            if hf.logit_transform(m):
                raise NotImplementedError(
                    f"{type(hf.unwrap_causal_lm(m)).__name__} rescales its logits; "
                    "LinearDivergenceLoss.from_models takes plain heads"
                )
        s = hf.last_hidden_states(student, input_ids, attention_mask=attention_mask)
        with torch.no_grad():
            t = hf.last_hidden_states(
                teacher,
                input_ids if teacher_input_ids is None else teacher_input_ids,
                attention_mask=attention_mask
                if teacher_input_ids is None
                else teacher_attention_mask,
            )
            tw, tb = hf._head_weight(teacher)
        T = input_ids.shape[1]
        t = t[:, -T:]
        w, b = hf._head_weight(student)
        mask = None
        if labels is not None:
            mask = labels[:, 1:] != -100
        return self(
            s[:, :-1],
            w,
            t[:, :-1].to(s.dtype),
            teacher_weight=tw.to(w.dtype),
            bias=b,
            teacher_bias=None if tb is None else tb.to(w.dtype),
            mask=mask,
            num_items_in_batch=num_items_in_batch,
        )
