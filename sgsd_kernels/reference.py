"""Eager, materialising reference implementations of every public op.

Written to read like docs/design.md §3: every intermediate (full logits, full log-softmax, the
per-token gaps) is a plain tensor. This is the baseline in benchmarks and, run in
float64, the oracle in tests. Math is done in float32 (float64 when the inputs are
float64); the memory cost is O(N·V) (O(K·N·V) for the gated loss from hidden states),
which is exactly what the fused backends avoid.

No validation happens here: the public functions in :mod:`sgsd_kernels.functional`
validate and then dispatch to these (``backend="reference"``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sgsd_kernels.loss_inputs import DivergenceInputs, GateHypers, HiddenGatedInputs
from sgsd_kernels.ops.common import compute_dtype

__all__ = [
    "logprobs_from_logits_ref",
    "head_logits",
    "linear_logprobs_ref",
    "gated_kd_ref",
    "gated_rows",
    "linear_gated_kd_ref",
    "linear_divergence_ref",
    "local_support_terms_ref",
    "local_support_gated_rows",
    "linear_local_support_kd_ref",
]


def logprobs_from_logits_ref(
    logits, targets, temperature=1.0, ignore_index=-100, return_entropy=False
):
    """log_softmax(logits / temperature).gather(targets); ignored targets give 0.0.

    ``logits`` [..., V] float, ``targets`` [...] integer ids. Entropy (when requested) is
    that of softmax(logits / temperature); 0.0 where the target is ignored. The validated
    form of :func:`sgsd_kernels.logprobs_from_logits`, whose signature documents the
    arguments.
    """
    dtype = compute_dtype(logits)
    z = logits.to(dtype) / temperature
    logp = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    lp = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros((), dtype=dtype, device=logits.device)
    lp = torch.where(valid, lp, zero)
    if not return_entropy:
        return lp
    entropy = -(logp.exp() * logp).sum(-1)
    entropy = torch.where(valid, entropy, zero)
    return lp, entropy


def head_logits(hidden, weight, bias, dtype, softcap=None, logit_scale=None):
    """The LM head's logits before the temperature (docs/design.md §3.3), in ``dtype``:
    z = hidden @ weight.T + bias, then z ← logit_scale·z, then z ← softcap·tanh(z/softcap)
    (each step only when its argument is set)."""
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    if logit_scale is not None:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def linear_logprobs_ref(
    hidden, weight, targets, bias=None, temperature=1.0, ignore_index=-100, return_entropy=False,
    softcap=None, logit_scale=None,
):  # fmt: skip
    """log_softmax(head_logits(...) / temperature).gather(targets).

    ``hidden`` [..., H], ``weight`` [V, H], ``bias`` [V] or None, ``targets`` [...]: the
    validated form of :func:`sgsd_kernels.linear_logprobs`, whose signature documents the
    arguments."""
    dtype = compute_dtype(hidden, weight, bias)
    logits = head_logits(hidden, weight, bias, dtype, softcap, logit_scale)
    return logprobs_from_logits_ref(logits, targets, temperature, ignore_index, return_entropy)


def gate(delta: torch.Tensor, tau: float) -> torch.Tensor:
    """ℓ(Δ) = log 2 − softplus(−Δ²/(2τ)): 0 at Δ = 0, saturates at log 2 for large |Δ|."""
    return math.log(2.0) - F.softplus(-delta.square() / (2.0 * tau))


def gated_kd_ref(
    student_logprobs,
    teacher_logprobs,
    token_mask,
    rewards,
    teacher_weights,
    gate_tau=1.0,
    clip_delta=3.0,
    confidence_threshold=0.05,
    use_polarity=True,
) -> dict[str, torch.Tensor]:
    """The SGSD gated loss, docs/design.md §3 (:func:`gated_rows`): the validated form of
    :func:`sgsd_kernels.gated_kd_loss`, whose signature documents the arguments.

    ``student_logprobs`` is s[b, t] [B, T], or one row per (rollout, teacher) [B, K, T]
    the way the published code replicates the student (same values for every k; the
    gradient then sums over the K copies).

    Returns a dict with ``loss`` (differentiable w.r.t. ``student_logprobs`` only),
    ``support``, ``polarity``, ``row_loss`` ([B, K]) and ``clipped`` (count of masked-in
    tokens of present teachers whose gap was clipped, a float scalar).
    """
    K = teacher_logprobs.shape[1]
    s_rows = student_logprobs
    if s_rows.dim() == 2:
        s_rows = s_rows.unsqueeze(1).expand(-1, K, -1)  # [B, K, T]
    dtype = compute_dtype(s_rows, teacher_logprobs)
    s = s_rows.to(dtype)  # [B, K, T]
    u = teacher_logprobs.detach().to(dtype)  # [B, K, T]  (teachers are constants)
    gap = u - s  # Δ, the gate's argument too
    hypers = GateHypers(gate_tau, clip_delta, confidence_threshold, use_polarity)
    return gated_rows(gap, gap, token_mask, rewards, teacher_weights, hypers)


def gated_rows(gap, gated, token_mask, rewards, teacher_weights, hypers: GateHypers):
    """docs/design.md §3 over [B, K, T] rows, in the dtype of ``gap``. The masked gap Δ
    (``gap`` selected at masked-in tokens) drives S, σ, ρ and the clipped count, with no
    gradient; the gate ℓ is applied to ``gated`` (Δ itself in §3, the local KL in §3.2),
    which carries the gradient. Returns the dict of :func:`gated_kd_ref`."""
    dtype = gap.dtype
    m = token_mask.to(torch.bool).unsqueeze(1)  # [B, 1, T]
    w = teacher_weights.detach().to(dtype)  # [B, K]
    B = gap.shape[0]
    # Masked positions may hold padding garbage (-inf, NaN): select, never multiply.
    zero = torch.zeros((), dtype=dtype, device=gap.device)
    n = token_mask.to(dtype).sum(-1).clamp_min(1.0).unsqueeze(1)  # [B, 1]

    with torch.no_grad():
        delta = torch.where(m, gap.detach(), zero)
        support = delta.clamp(-hypers.clip_delta, hypers.clip_delta).sum(-1) / n  # S[b,k]
        sigma = torch.where(
            support.abs() > hypers.confidence_threshold,
            torch.sign(support),
            torch.zeros_like(support),
        )
        outcome = torch.where(rewards > 0, 1.0, -1.0).to(dtype).unsqueeze(1)  # [B, 1]
        polarity = outcome * sigma  # ρ[b,k]
        if not hypers.use_polarity:  # the ablation: every present teacher is helpful
            polarity = torch.ones_like(support)
        present = (w > 0).unsqueeze(-1)
        clipped = ((delta.abs() > hypers.clip_delta) & m & present).sum().to(dtype)

    per_token = torch.where(m, gate(torch.where(m, gated, zero), hypers.gate_tau), zero)
    row_loss = per_token.sum(-1) / n  # L[b,k]
    # Absent teachers (w = 0) are inert even if their log-probs are garbage.
    term = torch.where(w > 0, w * polarity * row_loss, zero)
    loss = term.sum() / max(B, 1)
    return {
        "loss": loss,
        "support": support,
        "polarity": polarity,
        "row_loss": row_loss.detach(),
        "clipped": clipped,
    }


def linear_gated_kd_ref(x: HiddenGatedInputs) -> dict[str, torch.Tensor]:
    """The SGSD loss from hidden states the way the published (TRL-based) code computes it:
    one row per (rollout, teacher). The student forward is replicated K times, and the
    full log_softmax of the student [B,K,T,V] and teacher [B,K,T,V] logits is
    materialised; the per-row student log-probs s[b,k,t] then enter §3 (the same values
    for every k, so the loss equals §3 with s[b,t]; the gradient sums the K copies).
    Positions whose target is ``ignore_index`` get log-prob 0 (``x.mask`` excludes them).
    """
    hidden, weight, bias = x.student.hidden, x.student.weight, x.student.bias
    B, T, H = hidden.shape
    K = x.teacher_weights.shape[1]
    row_targets = x.targets.unsqueeze(1).expand(B, K, T)
    student_rows = hidden.unsqueeze(1).expand(B, K, T, H)  # one copy per teacher
    head = dict(softcap=x.softcap, logit_scale=x.logit_scale)
    s_rows = linear_logprobs_ref(
        student_rows, weight, row_targets, bias, x.temperature, x.ignore_index, **head
    )
    if x.teacher_logprobs is None:
        with torch.no_grad():
            u = linear_logprobs_ref(
                x.teacher_hidden.detach(),
                weight.detach(),
                row_targets,
                None if bias is None else bias.detach(),
                x.temperature,
                x.ignore_index,
                **head,
            )
    else:
        u = x.teacher_logprobs.detach().to(s_rows.dtype)
    out = gated_kd_ref(s_rows, u, x.mask, x.rewards, x.teacher_weights, *x.gate)
    out["student_logprobs"] = s_rows[:, 0].detach()
    out["teacher_logprobs"] = u.detach()
    return out


# --- docs/design.md §3.1: full-vocabulary divergence (OPSD) ------------------------------


def divergence_terms(student_logp, teacher_logp, beta):
    """Per-element d_v of docs/design.md §3.1 from log-probabilities over the last dimension.

    β = 0 is the forward KL p_T(log p_T − log p_S), β = 1 the reverse KL
    p_S(log p_S − log p_T) and 0 < β < 1 the generalised JSD through the mixture
    M = β p_T + (1 − β) p_S (``F.kl_div(input, target, log_target=True)`` computes
    p_target · (log p_target − input)).
    """
    if beta == 0.0:
        return F.kl_div(student_logp, teacher_logp, reduction="none", log_target=True)
    if beta == 1.0:
        return F.kl_div(teacher_logp, student_logp, reduction="none", log_target=True)
    mixture = torch.logsumexp(
        torch.stack([teacher_logp + math.log(beta), student_logp + math.log1p(-beta)]), dim=0
    )
    to_teacher = F.kl_div(mixture, teacher_logp, reduction="none", log_target=True)
    to_student = F.kl_div(mixture, student_logp, reduction="none", log_target=True)
    return beta * to_teacher + (1.0 - beta) * to_student


def linear_divergence_ref(x: DivergenceInputs) -> torch.Tensor:
    """D[...] of docs/design.md §3.1 the way the published OPSD loss computes it: full student and
    teacher logits [..., V] are materialised, divided by the temperature, optionally cut to
    the teacher's top-k columns (both renormalised there), turned into per-element
    divergences, clipped element-wise from above and summed over the vocabulary.

    The teacher side (``x.teacher``, already resolved to the student head where no
    teacher head was given) is a constant. ``x.mask`` False gives 0 and no gradient.
    """
    student, teacher = x.student, x.teacher
    dtype = compute_dtype(student.hidden, student.weight, teacher.hidden, teacher.weight)
    head = dict(softcap=x.softcap, logit_scale=x.logit_scale)
    student_logits = head_logits(student.hidden, student.weight, student.bias, dtype, **head)
    with torch.no_grad():
        tb = None if teacher.bias is None else teacher.bias.detach()
        teacher_logits = head_logits(
            teacher.hidden.detach(), teacher.weight.detach(), tb, dtype, **head
        )
    student_logits = student_logits / x.temperature
    teacher_logits = teacher_logits / x.temperature
    if x.teacher_top_k is not None:
        top = torch.topk(teacher_logits, k=x.teacher_top_k, dim=-1).indices
        student_logits = student_logits.gather(-1, top)
        teacher_logits = teacher_logits.gather(-1, top)
    per_element = divergence_terms(
        torch.log_softmax(student_logits, dim=-1), torch.log_softmax(teacher_logits, dim=-1), x.beta
    )
    if x.elementwise_clip is not None:
        per_element = per_element.clamp(max=x.elementwise_clip)
    divergence = per_element.sum(-1)
    if x.mask is not None:
        zero = torch.zeros((), dtype=dtype, device=divergence.device)
        divergence = torch.where(x.mask.to(torch.bool), divergence, zero)
    return divergence


# --- docs/design.md §3.2: top-k local support -------------------------------------------


def local_support_terms_ref(student_logits, teacher_logits, targets, top_k):
    """Renormalise both distributions on the teacher's top-k ∪ {y_t} (docs/design.md §3.2).

    ``student_logits``/``teacher_logits`` [..., V] (already divided by the temperature),
    ``targets`` [...] valid token ids. Returns (student local log-prob of y_t, teacher local
    log-prob of y_t, local KL Σ p̃_T (log p̃_T − log p̃_S) with the teacher constant, support
    size k or k + 1). The support is k teacher columns plus y_t, whose extra slot is
    switched off when y_t is already among the k.
    """
    k = min(int(top_k), teacher_logits.shape[-1])
    top = torch.topk(teacher_logits, k=k, dim=-1).indices
    sampled = targets.unsqueeze(-1)
    extra_slot = ~(top == sampled).any(-1, keepdim=True)
    columns = torch.cat([top, sampled], dim=-1)
    in_support = torch.cat([torch.ones_like(top, dtype=torch.bool), extra_slot], dim=-1)
    s_local = torch.log_softmax(
        student_logits.gather(-1, columns).masked_fill(~in_support, float("-inf")), dim=-1
    )
    t_local = torch.log_softmax(
        teacher_logits.detach().gather(-1, columns).masked_fill(~in_support, float("-inf")),
        dim=-1,
    )
    is_sampled = in_support & (columns == sampled)
    zero = torch.zeros((), dtype=s_local.dtype, device=s_local.device)
    s_y = torch.where(is_sampled, s_local, zero).sum(-1)
    t_y = torch.where(is_sampled, t_local, zero).sum(-1)
    local_kl = torch.where(in_support, t_local.exp() * (t_local - s_local), zero).sum(-1)
    return s_y, t_y, local_kl, in_support.sum(-1).to(s_local.dtype)


def local_support_gated_rows(local_delta, local_kl, token_mask, rewards, teacher_weights, hypers):
    """docs/design.md §3.2 on [B, K, T] terms: Δ̃ (constant) drives S, σ and ρ; the gate is applied
    to the local KL, which carries the gradient. Same return dict as :func:`gated_kd_ref`;
    ``hypers`` is a :class:`~sgsd_kernels.loss_inputs.GateHypers`."""
    gap = local_delta.detach().to(local_kl.dtype)
    return gated_rows(gap, local_kl, token_mask, rewards, teacher_weights, hypers)


def linear_local_support_kd_ref(x: HiddenGatedInputs, top_k: int) -> dict[str, torch.Tensor]:
    """The "Top-k local support" SGSD loss (docs/design.md §3.2) the way the published code runs
    it: one row per (rollout, teacher), full student and teacher logits [B, K, T, V]
    materialised, then :func:`local_support_terms_ref` on the teacher's ``top_k``.
    ``x.teacher_hidden`` is set and ``x.mask`` already excludes ignored targets. Adds
    ``local_divergence`` and ``local_size`` [B, K, T] to the dict."""
    hidden, weight, bias = x.student.hidden, x.student.weight, x.student.bias
    B, T, H = hidden.shape
    K = x.teacher_weights.shape[1]
    dtype = compute_dtype(hidden, weight, x.teacher_hidden, bias)
    safe = torch.where(x.targets != x.ignore_index, x.targets, torch.zeros_like(x.targets)).long()
    row_targets = safe.unsqueeze(1).expand(B, K, T)
    head = dict(softcap=x.softcap, logit_scale=x.logit_scale)
    student_rows = hidden.unsqueeze(1).expand(B, K, T, H)
    student_logits = head_logits(student_rows, weight, bias, dtype, **head)
    with torch.no_grad():
        tb = None if bias is None else bias.detach()
        teacher_logits = head_logits(x.teacher_hidden.detach(), weight.detach(), tb, dtype, **head)
    s_y, t_y, local_kl, size = local_support_terms_ref(
        student_logits / x.temperature, teacher_logits / x.temperature, row_targets, top_k
    )
    out = local_support_gated_rows(
        (t_y - s_y).detach(), local_kl, x.mask, x.rewards, x.teacher_weights, x.gate
    )
    out["local_divergence"] = local_kl.detach()
    out["local_size"] = size
    return out
