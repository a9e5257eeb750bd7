"""Public functions (docs/design.md §4): argument validation, flattening, backend dispatch.

Each function's docstring shows the eager PyTorch expression it equals. The heavy work
lives in ``sgsd_kernels.ops`` (custom ops with autograd); ``backend="reference"`` runs the
materialising eager code in ``sgsd_kernels.reference``.

Over 450 lines on purpose: the public functions and their docstrings (the equivalent eager
expression, every argument) are the library's API reference, kept together in one file; the
argument checks live in ``sgsd_kernels.validation``.
"""

from __future__ import annotations

import torch

from sgsd_kernels import reference as ref
from sgsd_kernels import validation as check
from sgsd_kernels.loss_inputs import DivergenceInputs, GateHypers, HiddenGatedInputs
from sgsd_kernels.ops.arguments import LinearInputs
from sgsd_kernels.ops.common import compute_dtype, fold_logit_scale
from sgsd_kernels.ops.gated_kd import gated_kd_op
from sgsd_kernels.ops.linear_divergence import linear_divergence_op
from sgsd_kernels.ops.linear_logprobs import linear_logprobs_op, linear_logprobs_streams_op
from sgsd_kernels.ops.local_support import local_support_op
from sgsd_kernels.ops.logprobs_from_logits import logprobs_from_logits_op
from sgsd_kernels.output import GatedKDOutput
from sgsd_kernels.runtime import check_backend, resolve_backend

__all__ = [
    "linear_logprobs",
    "logprobs_from_logits",
    "gated_kd_loss",
    "linear_gated_kd_loss",
    "GatedKDLoss",
    "linear_divergence",
]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> contiguous [N, D], the layout the custom ops take."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def _flat_targets(targets: torch.Tensor) -> torch.Tensor:
    """[...] integer ids -> contiguous int64 [N]."""
    return targets.reshape(-1).long().contiguous()


def _unflatten(lp, ent, lead, return_entropy):
    """[N] op results back to the caller's leading shape."""
    if return_entropy:
        return lp.view(lead), ent.view(lead)
    return lp.view(lead)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
    check_finite: bool = False,
    softcap: float | None = None,
    logit_scale: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of ``targets`` under the LM head, without materialising logits.

    Equivalent to::

        z = (hidden @ weight.T + bias).float()
        z = logit_scale * z                      # if logit_scale (Cohere)
        z = softcap * torch.tanh(z / softcap)    # if softcap (Gemma 2/3), before T
        z = z / temperature
        lp = torch.log_softmax(z, -1).gather(-1, targets[..., None]).squeeze(-1)
        lp[targets == ignore_index] = 0          # and no gradient there
        entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)   # if return_entropy

    Args:
        hidden: [..., H] float16/bfloat16/float32/float64 (differentiable).
        weight: [V, H], same dtype as ``hidden`` (differentiable).
        targets: [...] integer token ids in [0, V) or ``ignore_index``.
        bias: optional [V] (differentiable).
        return_entropy: also return the (differentiable) entropy of the softmax; 0 at
            ignored positions.
        backend: one of ``sgsd_kernels.runtime.BACKENDS`` ("auto": triton on CUDA; on CPU
            native when it is built, else torch).
        check_finite: raise ``ValueError`` on NaN/inf in ``hidden``/``weight``/``bias``
            (otherwise NaN propagates to the output; it is never hidden).
        softcap: finite c > 0: the head's logits become c·tanh(z / c) before the
            temperature (``final_logit_softcapping``); None leaves them uncapped.
        logit_scale: finite a > 0 multiplying the raw logits first (``logit_scale``);
            None is 1. Gradients flow through both (docs/design.md §3.3).

    Returns:
        float32 [...] log-probs (float64 for float64 inputs), or (logprobs, entropy).
    """
    temperature, ignore_index = check.linear_inputs(
        hidden, weight, targets, bias, temperature, ignore_index
    )
    softcap, logit_scale = check.logit_transform(softcap, logit_scale)
    check.flag("return_entropy", return_entropy)
    check.finite_inputs(check_finite, hidden=hidden, weight=weight, bias=bias)
    backend = resolve_backend(backend, hidden.device)
    lead = hidden.shape[:-1]
    if backend == "reference":
        check.targets_in_range("targets", targets, weight.shape[0], ignore_index)
        return ref.linear_logprobs_ref(
            hidden, weight, targets, bias, temperature, ignore_index, return_entropy,
            softcap, logit_scale,
        )  # fmt: skip
    h2, t1 = _rows(hidden), _flat_targets(targets)
    b = None if bias is None else bias.contiguous()
    temperature, cap = fold_logit_scale(temperature, softcap, logit_scale)
    lp, ent, _ = linear_logprobs_op(
        h2, weight.contiguous(), b, cap, t1, temperature, ignore_index, return_entropy, backend
    )
    return _unflatten(lp, ent, lead, return_entropy)


def logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
    check_finite: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of ``targets`` from existing logits, streaming over the vocabulary.

    Equivalent to ``torch.log_softmax(logits.float() / temperature, -1).gather(-1,
    targets[..., None]).squeeze(-1)`` (0 where ``targets == ignore_index``), without the
    full-size log_softmax copy. Gradient w.r.t. ``logits`` has the logits' dtype.
    """
    check.tensor("logits", logits, kind="float")
    check.tensor("targets", targets, kind="int")
    check.same_device(logits=logits, targets=targets)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, "
            f"got {tuple(targets.shape)}"
        )
    temperature = check.hyper("temperature", temperature, positive=True)
    ignore_index = check.integer("ignore_index", ignore_index)
    check.flag("return_entropy", return_entropy)
    check.finite_inputs(check_finite, logits=logits)
    backend = resolve_backend(backend, logits.device)
    if backend == "reference":
        check.targets_in_range("targets", targets, logits.shape[-1], ignore_index)
        return ref.logprobs_from_logits_ref(
            logits, targets, temperature, ignore_index, return_entropy
        )
    lead = logits.shape[:-1]
    z, t1 = _rows(logits), _flat_targets(targets)
    lp, ent, _ = logprobs_from_logits_op(z, t1, temperature, ignore_index, return_entropy, backend)
    return _unflatten(lp, ent, lead, return_entropy)


def _wrap(parts: dict, weights: torch.Tensor, mask: torch.Tensor, total_tokens: int):
    return GatedKDOutput(
        loss=parts["loss"],
        support=parts["support"],
        polarity=parts["polarity"],
        row_loss=parts["row_loss"].detach(),
        student_logprobs=parts.get("student_logprobs"),
        teacher_logprobs=parts.get("teacher_logprobs"),
        _present=weights > 0,
        _kept_tokens=mask.sum(-1),
        _total_tokens=total_tokens,
        _clipped=parts["clipped"],
    )


def _gated(s, u, mask, rewards, weights, gate: GateHypers, backend, total_tokens):
    """Run the loss on validated [B,T]/[B,K,T] tensors and wrap a GatedKDOutput."""
    dtype = compute_dtype(s)
    s = s.to(dtype)
    u = u.detach().to(dtype)
    w = weights.detach().to(dtype)
    mask = mask.to(torch.bool)
    if backend == "reference":
        check.teacher_weights_valid(w)
        parts = ref.gated_kd_ref(s, u, mask, rewards, w, *gate)
    else:
        names = ("loss", "support", "polarity", "row_loss", "clipped")
        parts = dict(
            zip(
                names,
                gated_kd_op(
                    s.contiguous(),
                    u.contiguous(),
                    mask.contiguous(),
                    rewards.to(dtype).contiguous(),
                    w.contiguous(),
                    *gate,
                    backend,
                ),
            )
        )
    return _wrap(parts, w, mask, total_tokens)


def gated_kd_loss(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    token_mask: torch.Tensor,
    rewards: torch.Tensor,
    teacher_weights: torch.Tensor,
    *,
    gate_tau: float = 1.0,
    clip_delta: float = 3.0,
    confidence_threshold: float = 0.05,
    use_polarity: bool = True,
    backend: str = "auto",
) -> GatedKDOutput:
    """The SGSD gated self-distillation loss (docs/design.md §3) from per-token log-probs.

    Equivalent to (s [B,T], u [B,K,T], m [B,T], r [B], w [B,K])::

        d = (u - s[:, None]).where(m[:, None], 0)                  # Δ
        n = m.sum(-1, keepdim=True).clamp(min=1)
        S = d.clamp(-clip_delta, clip_delta).sum(-1) / n          # support (no grad)
        rho = torch.where(r > 0, 1., -1.)[:, None] * S.sign() * (S.abs() > eps)
        L = ((log(2) - F.softplus(-d**2 / (2 * gate_tau))) * m[:, None]).sum(-1) / n
        loss = (w * rho.detach() * L).sum() / B

    Only ``student_logprobs`` receives a gradient; teachers are constants. The paper's
    ablations: ``clip_delta=math.inf`` (no clipping), ``confidence_threshold=0`` and
    ``use_polarity=False`` (ρ = +1 for every teacher, whatever r and S).
    """
    check.tensor("student_logprobs", student_logprobs, kind="float")
    check.tensor("teacher_logprobs", teacher_logprobs, kind="float")
    if student_logprobs.dim() != 2:
        raise ValueError(
            f"student_logprobs must have shape [B, T], got {tuple(student_logprobs.shape)}"
        )
    B, T, K = check.gate_inputs(
        "student_logprobs", student_logprobs, token_mask, rewards, teacher_weights
    )
    check.shape("teacher_logprobs", teacher_logprobs, (B, K, T), f"[B, K, T] = [{B}, {K}, {T}]")
    check.same_device(student_logprobs=student_logprobs, teacher_logprobs=teacher_logprobs)
    gate = GateHypers(*check.gate_hypers(gate_tau, clip_delta, confidence_threshold, use_polarity))
    backend = resolve_backend(backend, student_logprobs.device)
    check.mask_values(token_mask)
    return _gated(
        student_logprobs,
        teacher_logprobs,
        token_mask,
        rewards,
        teacher_weights,
        gate,
        backend,
        B * T,
    )


def linear_gated_kd_loss(
    student_hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_mask: torch.Tensor,
    rewards: torch.Tensor,
    teacher_weights: torch.Tensor,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_logprobs: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    gate_tau: float = 1.0,
    clip_delta: float = 3.0,
    confidence_threshold: float = 0.05,
    use_polarity: bool = True,
    ignore_index: int = -100,
    backend: str = "auto",
    check_finite: bool = False,
    local_support_top_k: int | None = None,
    softcap: float | None = None,
    logit_scale: float | None = None,
) -> GatedKDOutput:
    """The SGSD loss straight from hidden states: never materialises K×T×V logits.

    Equivalent to::

        head = dict(bias=bias, temperature=T, softcap=softcap, logit_scale=logit_scale)
        s = linear_logprobs(student_hidden, weight, targets, **head)
        u = teacher_logprobs  or  linear_logprobs(teacher_hidden, weight,
                                                  targets[:, None].expand(-1, K, -1), **head)
        gated_kd_loss(s, u.detach(), token_mask & (targets != ignore_index), rewards,
                      teacher_weights, ...)

    Args:
        student_hidden: [B, T, H] (differentiable), weight [V, H], targets [B, T].
        teacher_hidden: [B, K, T, H] (treated as constants) — or —
        teacher_logprobs: [B, K, T] precomputed teacher log-probs. Exactly one is given.

    The student and the K teachers share ``weight``: on the Triton path they run as one
    stream of (K+1)·B·T rows through the forward kernel, and only the student rows
    enter the backward. ``softcap`` and ``logit_scale`` (as in :func:`linear_logprobs`:
    z ← a·z, z ← c·tanh(z/c), then z/T) apply to the student and the teachers alike,
    since they share the head; ``teacher_logprobs`` are taken as given.

    ``local_support_top_k=k`` (needs ``teacher_hidden``) runs docs/design.md §3.2 instead: per
    (b, k, t) both distributions are renormalised on the teacher's top-k ∪ {y_t}; Δ̃ drives
    S, σ, ρ and the gate is applied to the local KL (see :func:`_local_support_loss`).
    It takes ``logit_scale`` but not ``softcap`` (ValueError): the local-support kernels
    have no soft cap.
    """
    if (teacher_hidden is None) == (teacher_logprobs is None):
        raise ValueError(
            "pass exactly one of teacher_hidden [B, K, T, H] or teacher_logprobs [B, K, T]"
        )
    softcap, logit_scale = check.logit_transform(softcap, logit_scale)
    if local_support_top_k is not None and softcap is not None:
        raise ValueError(
            f"local_support_top_k={local_support_top_k!r} cannot be combined with "
            f"softcap={softcap!r}: the local-support kernels have no soft cap (logit_scale "
            "is supported)"
        )
    if local_support_top_k is not None:
        local_support_top_k = check.integer("local_support_top_k", local_support_top_k)
        if local_support_top_k < 1:
            raise ValueError(f"local_support_top_k must be >= 1, got {local_support_top_k}")
        if teacher_hidden is None:
            raise ValueError(
                "local_support_top_k needs teacher_hidden [B, K, T, H]: the local support is "
                "the teacher's top-k tokens, which teacher_logprobs (sampled tokens only) "
                "do not carry"
            )
    check.tensor("student_hidden", student_hidden, kind="float")
    check.tensor("targets", targets, kind="int")
    if student_hidden.dim() != 3:
        raise ValueError(
            f"student_hidden must have shape [B, T, H], got {tuple(student_hidden.shape)}"
        )
    B, T, H = student_hidden.shape
    check.shape("targets", targets, (B, T), f"[B, T] = [{B}, {T}]")
    temperature, ignore_index = check.linear_inputs(
        student_hidden, weight, targets, bias, temperature, ignore_index, "student_hidden"
    )
    _, _, K = check.gate_inputs(
        "student_hidden", student_hidden, token_mask, rewards, teacher_weights
    )
    if teacher_hidden is not None:
        check.tensor("teacher_hidden", teacher_hidden, kind="float")
        check.shape(
            "teacher_hidden", teacher_hidden, (B, K, T, H), f"[B, K, T, H] = [{B}, {K}, {T}, {H}]"
        )
        if teacher_hidden.dtype != weight.dtype:
            raise TypeError(
                f"teacher_hidden dtype {teacher_hidden.dtype} must match weight dtype "
                f"{weight.dtype}"
            )
    else:
        check.tensor("teacher_logprobs", teacher_logprobs, kind="float")
        check.shape("teacher_logprobs", teacher_logprobs, (B, K, T), f"[B, K, T] = [{B}, {K}, {T}]")
    check.same_device(
        student_hidden=student_hidden,
        teacher_hidden=teacher_hidden,
        teacher_logprobs=teacher_logprobs,
    )
    gate = GateHypers(*check.gate_hypers(gate_tau, clip_delta, confidence_threshold, use_polarity))
    check.finite_inputs(
        check_finite,
        student_hidden=student_hidden,
        weight=weight,
        bias=bias,
        teacher_hidden=teacher_hidden,
    )
    backend = resolve_backend(backend, student_hidden.device)
    check.mask_values(token_mask)
    x = HiddenGatedInputs(
        student=LinearInputs(student_hidden, weight, bias),
        targets=targets,
        mask=token_mask.to(torch.bool) & (targets != ignore_index),
        rewards=rewards,
        teacher_weights=teacher_weights,
        teacher_hidden=teacher_hidden,
        teacher_logprobs=teacher_logprobs,
        temperature=temperature,
        ignore_index=ignore_index,
        gate=gate,
        softcap=softcap,
        logit_scale=logit_scale,
    )
    if local_support_top_k is not None:
        parts = _local_support_loss(x, local_support_top_k, backend)
        result = _wrap(parts, teacher_weights.detach(), x.mask, B * T)
        result._local_divergence = parts["local_divergence"]
        result._local_size = parts["local_size"]
        result._token_mask = x.mask
        return result

    if backend == "reference":
        check.targets_in_range("targets", targets, weight.shape[0], ignore_index)
        check.teacher_weights_valid(teacher_weights)
        parts = ref.linear_gated_kd_ref(x)
        return _wrap(parts, teacher_weights.detach(), x.mask, B * T)

    flat_t = _flat_targets(targets)
    temperature, cap = fold_logit_scale(temperature, softcap, logit_scale)
    b_arg = None if bias is None else bias.contiguous()
    w_arg = weight.contiguous()
    s_hidden = _rows(student_hidden)
    if teacher_hidden is not None:
        # One stream of (K+1)·B·T rows over W; teacher rows get no gradient.
        t_hidden = teacher_hidden.detach().reshape(B * K * T, H).contiguous()
        t_targets = targets.long().unsqueeze(1).expand(B, K, T).reshape(-1).contiguous()
        s_lp, u_lp, _ = linear_logprobs_streams_op(
            s_hidden, t_hidden, w_arg, b_arg, flat_t, t_targets, temperature, ignore_index, cap,
            backend,
        )  # fmt: skip
        u = u_lp.view(B, K, T)
    else:
        s_lp, _, _ = linear_logprobs_op(
            s_hidden, w_arg, b_arg, cap, flat_t, temperature, ignore_index, False, backend
        )
        u = teacher_logprobs
    s = s_lp.view(B, T)
    result = _gated(s, u, x.mask, rewards, teacher_weights, gate, backend, B * T)
    result.student_logprobs = s.detach()
    result.teacher_logprobs = u.detach()
    return result


def _local_support_loss(x: HiddenGatedInputs, top_k: int, backend: str) -> dict:
    """docs/design.md §3.2 on validated inputs: the ``sgsd::local_support`` op gives Δ̃, KL̃ and the
    support size per (b, k, t) (only for masked-in positions), then the
    gated epilogue runs on those [B, K, T] tensors in plain PyTorch."""
    hidden, weight, bias = x.student.hidden, x.student.weight, x.student.bias
    check.targets_in_range("targets", x.targets, weight.shape[0], x.ignore_index)
    if check.value_checks_enabled():
        check.teacher_weights_valid(x.teacher_weights)
    if backend == "reference":
        return ref.linear_local_support_kd_ref(x, top_k)
    B, T, H = hidden.shape
    K = x.teacher_weights.shape[1]
    device = hidden.device
    safe = torch.where(x.targets != x.ignore_index, x.targets, torch.zeros_like(x.targets)).long()
    student_row = (torch.arange(B, device=device)[:, None, None] * T).expand(B, K, T)
    student_row = (student_row + torch.arange(T, device=device)).reshape(-1).contiguous()
    # Support S is reported for absent teachers too (as in §3), so only the token mask
    # decides which rows run.
    valid = x.mask.unsqueeze(1).expand(B, K, T)
    local_delta, local_kl, size, *_ = local_support_op(
        hidden.reshape(B * T, H).contiguous(),
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        x.teacher_hidden.detach().reshape(B * K * T, H).contiguous(),
        student_row,
        safe.unsqueeze(1).expand(B, K, T).reshape(-1).contiguous(),
        valid.reshape(-1).contiguous(),
        top_k,
        fold_logit_scale(x.temperature, None, x.logit_scale)[0],
        backend,
    )
    local_kl = local_kl.view(B, K, T)
    dtype = local_kl.dtype
    parts = ref.local_support_gated_rows(
        local_delta.view(B, K, T), local_kl, x.mask, x.rewards.to(dtype),
        x.teacher_weights.detach().to(dtype), x.gate,
    )  # fmt: skip
    parts["local_divergence"] = local_kl.detach()
    parts["local_size"] = size.view(B, K, T)
    return parts


class GatedKDLoss(torch.nn.Module):
    """Module form of :func:`gated_kd_loss` with the hyper-parameters bound.

    ``loss_fn(student_logprobs, teacher_logprobs, token_mask, rewards, teacher_weights)``
    returns a :class:`GatedKDOutput`; ``loss_fn.from_hidden(...)`` calls
    :func:`linear_gated_kd_loss` with the same hyper-parameters.
    """

    def __init__(
        self,
        gate_tau: float = 1.0,
        clip_delta: float = 3.0,
        confidence_threshold: float = 0.05,
        use_polarity: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        hypers = check.gate_hypers(gate_tau, clip_delta, confidence_threshold, use_polarity)
        self.gate_tau, self.clip_delta, self.confidence_threshold, self.use_polarity = hypers
        self.backend = check_backend(backend)

    def _hypers(self) -> dict:
        return dict(
            gate_tau=self.gate_tau,
            clip_delta=self.clip_delta,
            confidence_threshold=self.confidence_threshold,
            use_polarity=self.use_polarity,
            backend=self.backend,
        )

    def forward(self, student_logprobs, teacher_logprobs, token_mask, rewards, teacher_weights):
        return gated_kd_loss(
            student_logprobs,
            teacher_logprobs,
            token_mask,
            rewards,
            teacher_weights,
            **self._hypers(),
        )

    def from_hidden(
        self, student_hidden, weight, targets, token_mask, rewards, teacher_weights, **kwargs
    ) -> GatedKDOutput:
        return linear_gated_kd_loss(
            student_hidden,
            weight,
            targets,
            token_mask,
            rewards,
            teacher_weights,
            **{**self._hypers(), **kwargs},
        )

    def extra_repr(self) -> str:
        return (
            f"gate_tau={self.gate_tau}, clip_delta={self.clip_delta}, "
            f"confidence_threshold={self.confidence_threshold}, "
            f"use_polarity={self.use_polarity}, backend={self.backend!r}"
        )


# --- docs/design.md §3.1: full-vocabulary divergence -------------------------------------


def _teacher_head(teacher_hidden, weight, bias, teacher_weight, teacher_bias) -> LinearInputs:
    """The teacher side of a divergence: its own head, or the student's weight and (unless
    ``teacher_bias`` is given) bias when ``teacher_weight`` is None."""
    if teacher_weight is None:
        teacher_weight = weight
        if teacher_bias is None:
            teacher_bias = bias
    return LinearInputs(teacher_hidden, teacher_weight, teacher_bias)


def linear_divergence(
    student_hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    *,
    teacher_weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    beta: float = 0.0,
    temperature: float = 1.0,
    elementwise_clip: float | None = None,
    teacher_top_k: int | None = None,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
    check_finite: bool = False,
    softcap: float | None = None,
    logit_scale: float | None = None,
) -> torch.Tensor:
    """Per-token divergence D between the teacher's and the student's next-token
    distributions over the whole vocabulary (docs/design.md §3.1), without materialising logits.

    Equivalent to (the published OPSD ``generalized_jsd_loss`` per token)::

        cap = lambda z: softcap * torch.tanh(z / softcap) if softcap else z
        zs = cap(logit_scale * (student_hidden @ weight.T + bias).float()) / temperature
        zt = cap(logit_scale * (teacher_hidden @ teacher_weight.T + teacher_bias).float())
        zt = zt / temperature                      # (logit_scale None: 1)
        if teacher_top_k: top = zt.topk(teacher_top_k).indices; zs, zt = zs[top], zt[top]
        a, c = zs.log_softmax(-1), zt.log_softmax(-1)
        d = β=0: c.exp() * (c - a)         β=1: a.exp() * (a - c)
            else: with log M = log(β c.exp() + (1 - β) a.exp()):
                  β c.exp() (c - log M) + (1 - β) a.exp() (a - log M)
        D = d.clamp(max=elementwise_clip).sum(-1);   D[~mask] = 0

    Args:
        student_hidden: [..., H] (differentiable); teacher_hidden: [..., H] (constant).
        weight: [V, H] (differentiable). teacher_weight: [V, H] constant teacher head; None
            uses ``weight`` (still constant on the teacher side).
        bias / teacher_bias: optional [V]; with ``teacher_weight`` None the teacher uses
            ``bias`` unless ``teacher_bias`` is given.
        beta: in [0, 1]; 0 = forward KL (OPSD), 1 = reverse KL.
        elementwise_clip: c > 0 caps every vocabulary element's term before the sum.
        teacher_top_k: 1 ≤ k ≤ V restricts to the teacher's top-k tokens, both
            distributions renormalised there.
        mask: [...] bool; False gives 0 and no gradient.
        backend: "auto" | "triton" | "torch" | "reference".
        softcap / logit_scale: as in :func:`linear_logprobs` (c > 0, a > 0), for both
            heads: z ← a·z, z ← c·tanh(z/c), then z/T (docs/design.md §3.3).

    Returns:
        D [...] float32 (float64 for float64 inputs). Gradients reach ``student_hidden``,
        ``weight`` and ``bias`` through the student side only.
    """
    V = check.divergence_inputs(
        student_hidden, weight, teacher_hidden, teacher_weight, bias, teacher_bias, mask,
        check_finite,
    )  # fmt: skip
    beta, temperature, clip, top_k = check.divergence_hypers(
        beta, temperature, elementwise_clip, teacher_top_k, V
    )
    softcap, logit_scale = check.logit_transform(softcap, logit_scale)
    backend = resolve_backend(backend, student_hidden.device)
    if mask is not None and mask.dtype != torch.bool and check.value_checks_enabled():
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("mask must hold only 0/1 (or be a bool tensor)")
    x = DivergenceInputs(
        student=LinearInputs(student_hidden, weight, bias),
        teacher=_teacher_head(teacher_hidden, weight, bias, teacher_weight, teacher_bias),
        beta=beta,
        temperature=temperature,
        elementwise_clip=clip,
        teacher_top_k=top_k,
        mask=mask,
        softcap=softcap,
        logit_scale=logit_scale,
    )
    if backend == "reference":
        return ref.linear_divergence_ref(x)
    temperature, cap = fold_logit_scale(temperature, softcap, logit_scale)
    lead, H = student_hidden.shape[:-1], weight.shape[1]
    if top_k == V:
        top_k = None  # renormalising on the whole vocabulary changes nothing
    flat_mask = (
        torch.ones(lead.numel(), dtype=torch.bool, device=student_hidden.device)
        if mask is None
        else mask.reshape(-1).to(torch.bool).contiguous()
    )
    teacher = x.teacher
    d, _ = linear_divergence_op(
        student_hidden.reshape(-1, H).contiguous(),
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        teacher.hidden.detach().reshape(-1, H).contiguous(),
        teacher.weight.detach().contiguous(),
        None if teacher.bias is None else teacher.bias.detach().contiguous(),
        flat_mask,
        beta,
        temperature,
        clip,
        top_k,
        backend,
        softcap=cap,
    )
    return d.view(lead)
