"""Deterministic inputs for one benchmark row (the same values for the check and the oracle)."""

from __future__ import annotations

import torch

from sgsd_bench.presets import IGNORE_INDEX, SCALAR_WORKLOADS, Case, split_bt

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
}


def dtype_of(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(_DTYPES)}") from None


def make_inputs(case: Case, N: int, device, dtype, seed: int = 0) -> dict:
    """Deterministic inputs for one row; ``N`` may be the small correctness slice.

    logprobs: hidden [N, H], weight [V, H] (both leaves with grad), targets [N] (≈3 %
    ignore_index), grad_out [N] (the upstream gradient of the per-token log-probs).
    divergence: hidden [N, H], teacher_hidden [N, H] (the student's states plus noise),
    token_mask [N] (≈3 % False), weight.
    sgsd and local_support: student_hidden [B, T, H], weight, targets [B, T], token_mask
    [B, T] (padded tails), rewards [B] (±1), teacher_weights [B, K] (softmax),
    teacher_hidden [B, K, T, H]: the student's states plus noise plus a push of strength
    α_k ∈ [−1, 1] along the target's weight row (a logit change of about 1.5·α_k), so that
    some teachers support the rollout and others suppress it. Generated on ``device``
    (CUDA: fast for the big heads).
    """
    if case.workload not in ("logprobs", *SCALAR_WORKLOADS):
        raise ValueError(
            "make_inputs: workload must be one of logprobs, "
            f"{', '.join(SCALAR_WORKLOADS)}; got {case.workload!r}"
        )
    if case.workload in ("sgsd", "local_support") and case.K < 1:
        raise ValueError(
            f"make_inputs: {'an' if case.workload == 'sgsd' else 'a'} {case.workload} case "
            f"needs K ≥ 1 teachers, got K={case.K}"
        )
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + N)
    V, H, K = case.V, case.H, case.K

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=dev) * scale

    weight = randn(V, H, scale=H**-0.5)
    out = {}
    if case.workload == "logprobs":
        hidden = randn(N, H)
        targets = torch.randint(0, V, (N,), generator=g, device=dev)
        drop = torch.rand(N, generator=g, device=dev) < 0.03
        targets[drop] = IGNORE_INDEX
        out.update(hidden=hidden, targets=targets, grad_out=randn(N))
    elif case.workload == "divergence":
        hidden = randn(N, H)
        teacher_hidden = hidden + randn(N, H, scale=0.3)
        token_mask = torch.rand(N, generator=g, device=dev) >= 0.03
        out.update(hidden=hidden, teacher_hidden=teacher_hidden, token_mask=token_mask)
    else:
        B, T = split_bt(N)
        hidden = randn(B, T, H)
        targets = torch.randint(0, V, (B, T), generator=g, device=dev)
        lengths = torch.randint(max(1, (3 * T) // 4), T + 1, (B,), generator=g, device=dev)
        token_mask = torch.arange(T, device=dev)[None, :] < lengths[:, None]
        rewards = torch.tensor([1.0 if b % 2 == 0 else -1.0 for b in range(B)], device=dev)
        teacher_weights = torch.softmax(randn(B, K), dim=-1)
        alpha = (torch.linspace(-1.0, 1.0, K) if K > 1 else torch.tensor([0.7])).to(dev)
        teacher_hidden = hidden[:, None] + randn(B, K, T, H, scale=0.3)
        teacher_hidden += alpha.view(1, K, 1, 1) * (1.5 * weight[targets])[:, None]
        out.update(
            hidden=hidden,
            targets=targets,
            token_mask=token_mask,
            rewards=rewards,
            teacher_weights=teacher_weights,
            teacher_hidden=teacher_hidden,
        )
    out["weight"] = weight
    for k, v in list(out.items()):
        if v.is_floating_point() and k not in ("rewards", "teacher_weights", "grad_out"):
            out[k] = v.to(dtype)
    out["hidden"].requires_grad_(True)
    out["weight"].requires_grad_(True)
    return out


def upcast(x: dict, dtype) -> dict:
    """The same inputs in ``dtype`` (the oracle sees exactly the values the provider sees)."""
    y = {k: (v.detach().to(dtype) if v.is_floating_point() else v) for k, v in x.items()}
    y["hidden"].requires_grad_(True)
    y["weight"].requires_grad_(True)
    return y


def input_bytes(case: Case) -> int:
    el = dtype_of(case.dtype).itemsize
    b = (case.V * case.H + case.N * case.H) * el
    if case.workload in ("sgsd", "local_support"):
        b += case.K * case.N * case.H * el
    if case.workload == "divergence":
        b += case.N * case.H * el
    return b
