"""The provider registry: what the benchmark times. Adding a provider is one entry in
``_ENTRIES`` below.

Every provider turns the inputs of :func:`sgsd_bench.inputs.make_inputs` into the output of
the row: [N] float32 log-probs (logprobs) or the scalar loss (sgsd; divergence: the masked
mean of ``linear_divergence``; local_support: the SGSD loss with
``local_support_top_k``); the worker then takes
the gradient into ``hidden`` and ``weight``. ``reference`` is the one baseline: the
published SGSD code path (one row per (rollout, teacher), the student forward replicated K
times, full log_softmax materialised), as written once in ``sgsd_kernels.reference``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sgsd_bench.presets import (
    DIVERGENCE_HYPER,
    IGNORE_INDEX,
    LOCAL_SUPPORT_TOP_K,
    SGSD_HYPER,
    Case,
)

BASELINE = "reference"


class NotAvailable(Exception):
    """The provider cannot run this row here; the message says why."""


@dataclass(frozen=True)
class Provider:
    name: str
    what: str  # one line for the docs and --help
    build: Callable[[str, str], Callable]  # (workload, device) -> fn(inputs); NotAvailable
    color: str  # matplotlib colour of its line
    # why it cannot run (workload, on_cuda) here, known before any worker starts; None: it can
    unavailable: Callable[[str, bool], str | None] = lambda workload, cuda: None
    # rough peak of the logits it materialises, to skip rows that cannot fit (0: streams)
    materialises: Callable[[Case], int] = lambda case: 0
    warm_up: bool = False  # compiles or autotunes: one untimed call at the full shape first


def _sk():
    try:
        import sgsd_kernels as sk
    except Exception as e:
        raise NotAvailable(f"sgsd_kernels does not import: {type(e).__name__}: {e}") from e
    return sk


def _sk_fn(backend: str, workload: str):
    """fn(inputs) calling the public sgsd_kernels op of ``workload`` with ``backend``."""
    sk = _sk()
    if workload == "logprobs":
        return lambda x: sk.linear_logprobs(
            x["hidden"], x["weight"], x["targets"], ignore_index=IGNORE_INDEX, backend=backend
        )
    if workload == "divergence":
        return lambda x: _masked_mean(
            sk.linear_divergence(
                x["hidden"],
                x["weight"],
                x["teacher_hidden"],
                mask=x["token_mask"],
                backend=backend,
                **DIVERGENCE_HYPER,
            ),
            x["token_mask"],
        )
    extra = {"local_support_top_k": LOCAL_SUPPORT_TOP_K} if workload == "local_support" else {}
    return lambda x: (
        sk.linear_gated_kd_loss(
            x["hidden"],
            x["weight"],
            x["targets"],
            x["token_mask"],
            x["rewards"],
            x["teacher_weights"],
            teacher_hidden=x["teacher_hidden"],
            backend=backend,
            **SGSD_HYPER,
            **extra,
        ).loss
    )


def _masked_mean(d, mask):
    """OPSD's loss: Σ_t m_t D_t / Σ_t m_t."""
    return d.sum() / mask.sum().clamp(min=1)


def _backend(backend: str):
    def build(workload: str, device: str):
        return _sk_fn(backend, workload)

    return build


def _build_native(workload: str, device: str):
    _sk()
    from sgsd_kernels import native

    try:
        native.build()  # compiles once into the per-user cache; says what is missing
    except native.NativeUnavailable as e:
        raise NotAvailable(str(e)) from e
    return _sk_fn("native", workload)


_COMPILED: dict = {}


def _build_compiled(workload: str, device: str):
    key = (workload, str(device))
    if key not in _COMPILED:  # one dynamic-shape graph per workload: compile once
        _COMPILED[key] = torch.compile(_sk_fn("reference", workload), dynamic=True)
    return _COMPILED[key]


def _build_cce(workload: str, device: str):
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as e:
        raise NotAvailable(
            f"cut-cross-entropy not installed ({type(e).__name__}: {e}); "
            "pip install --no-deps cut-cross-entropy"
        ) from e
    impl = "cce" if _on_cuda(device) else "torch_compile"

    def fn(x):
        nll = linear_cross_entropy(
            x["hidden"],
            x["weight"],
            x["targets"],
            ignore_index=IGNORE_INDEX,
            reduction="none",
            impl=impl,
        )
        return -nll.float()

    return fn


def _build_liger(workload: str, device: str):
    if workload == "divergence":
        return _build_liger_jsd()
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception as e:
        raise NotAvailable(
            f"liger-kernel not installed ({type(e).__name__}: {e}); pip install liger-kernel"
        ) from e

    def fn(x):
        nll = liger_fused_linear_cross_entropy(
            x["hidden"], x["weight"], x["targets"], ignore_index=IGNORE_INDEX, reduction="none"
        )
        return -nll.float()

    return fn


def _build_liger_jsd():
    """Liger's LigerFusedLinearJSD at β = DIVERGENCE_HYPER's beta and T = 1.1 (its own β
    convention and no element clip: the same shapes and work, not the same value)."""
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except Exception as e:
        raise NotAvailable(
            f"liger-kernel not installed ({type(e).__name__}: {e}); pip install liger-kernel"
        ) from e
    jsd = LigerFusedLinearJSD(
        jsd_beta=DIVERGENCE_HYPER["beta"],
        ignore_index=IGNORE_INDEX,
        temperature=DIVERGENCE_HYPER["temperature"],
    )

    def fn(x):
        labels = torch.where(x["token_mask"], 0, IGNORE_INDEX)
        return jsd(x["hidden"], x["weight"], x["teacher_hidden"], x["weight"].detach(), labels)

    return fn


def _on_cuda(device) -> bool:
    return str(device).startswith("cuda")


def _needs_cuda(why: str):
    return lambda workload, cuda: None if cuda else why


def _logprobs_only(why: str, cuda_why: str | None = None, also: tuple = ()):
    """Runs log-probs (and the workloads in ``also``) only; ``cuda_why``: needs CUDA."""

    def unavailable(workload: str, cuda: bool):
        if workload != "logprobs" and workload not in also:
            return f"{why} ({workload})"
        return None if cuda or cuda_why is None else cuda_why

    return unavailable


def _materialising(case: Case) -> int:
    """The published path: log-probs ~4 N×V fp32 buffers (logits, log_softmax, their
    gradients); SGSD ~(4K+2): the student's logits and log_softmax replicated K times, the
    teachers' K, and the gradient of the replicated student; the divergence ~7 (both
    logits, both log_softmax, the element terms, their gradients)."""
    nv = case.N * case.V * 4
    if case.workload == "logprobs":
        return 4 * nv
    return 7 * nv if case.workload == "divergence" else (4 * case.K + 2) * nv


_ENTRIES = (
    Provider(
        "reference",
        "the published code path: sgsd_kernels backend='reference' (eager, materialising, one "
        "row per (rollout, teacher)); the baseline",
        _backend("reference"),
        "tab:blue",
        materialises=_materialising,
    ),
    Provider(
        "torch",
        "sgsd_kernels backend='torch' (blockwise, no N×V buffer)",
        _backend("torch"),
        "tab:green",
    ),
    Provider(
        "triton",
        "sgsd_kernels backend='triton' (CUDA only)",
        _backend("triton"),
        "tab:red",
        unavailable=_needs_cuda(
            "the triton backend needs a CUDA device (TRITON_INTERPRET=1 runs it on CPU for "
            "tests only, far too slow to time)"
        ),
        warm_up=True,
    ),
    Provider(
        "native",
        "sgsd_kernels backend='native' (C++ CPU kernels, built on first use)",
        _build_native,
        "tab:olive",
    ),
    Provider(
        "torch-compile",
        "torch.compile(dynamic=True) of the backend='reference' call",
        _build_compiled,
        "tab:purple",
        materialises=_materialising,
        warm_up=True,
    ),
    Provider(
        "cce",
        "Apple's Cut Cross-Entropy, linear_cross_entropy(reduction='none') = −log-prob "
        "(impl 'cce' on CUDA, 'torch_compile' on CPU); log-probs only",
        _build_cce,
        "tab:brown",
        unavailable=_logprobs_only(
            "Cut Cross-Entropy computes (linear) cross-entropy only; it has no SGSD "
            "(multi-teacher gated) loss and no divergence"
        ),
        materialises=lambda case: 0 if case.workload == "logprobs" else _materialising(case),
        warm_up=True,
    ),
    Provider(
        "liger",
        "Liger-Kernel's fused linear cross-entropy, reduction='none', and for the divergence "
        "its fused linear JSD (CUDA only)",
        _build_liger,
        "tab:pink",
        unavailable=_logprobs_only(
            "Liger-Kernel has no SGSD (multi-teacher gated) loss and no top-k local support",
            "Liger-Kernel's fused linear cross-entropy and JSD are Triton-only: each needs a CUDA "
            "device",
            also=("divergence",),
        ),
        warm_up=True,
    ),
)

PROVIDERS: dict[str, Provider] = {p.name: p for p in _ENTRIES}
NAMES = tuple(PROVIDERS)


def get(name: str) -> Provider:
    try:
        return PROVIDERS[name]
    except KeyError:
        raise ValueError(f"unknown provider {name!r}; choose from {', '.join(NAMES)}") from None


def static_unavailable(name: str, workload: str, cuda: bool) -> str | None:
    """Why ``name`` cannot run ``workload`` on this kind of device (None: it can)."""
    return get(name).unavailable(workload, cuda)


def build_provider(name: str, workload: str, device):
    """fn(inputs) -> [N] float32 log-probs (logprobs) or the scalar loss (sgsd).

    Raises NotAvailable with the reason when the provider cannot run this workload here.
    """
    p = get(name)
    why = p.unavailable(workload, _on_cuda(device))
    if why:
        raise NotAvailable(why)
    return p.build(workload, str(device))


def parse_providers(spec: str | None) -> tuple[list[str], bool]:
    """(providers, named explicitly) from ``--providers``: None (the default set, minus what
    the preset leaves out), "all", or a comma list of registry names."""
    if spec in (None, "all"):
        return list(NAMES), spec == "all"
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in names if s not in PROVIDERS]
    if bad or not names:
        raise ValueError(f"unknown provider(s) {bad or spec!r}; choose from {', '.join(NAMES)}")
    return names, True
