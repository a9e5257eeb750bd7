"""Bad input to ``linear_divergence`` and to ``linear_gated_kd_loss(local_support_top_k=)``
raises ValueError/TypeError whose message names the argument and what was expected."""

from __future__ import annotations

import pytest
import torch

import sgsd_kernels as sk

N, H, V = 4, 8, 30


def _args(**over):
    base = dict(
        student_hidden=torch.randn(N, H),
        weight=torch.randn(V, H),
        teacher_hidden=torch.randn(N, H),
    )
    kw = {}
    for key, value in over.items():
        (base if key in base else kw)[key] = value
    return base, kw


BAD = [
    (dict(student_hidden=[1.0]), TypeError, "student_hidden must be a torch.Tensor"),
    (
        dict(student_hidden=torch.ones(N, H, dtype=torch.long)),
        TypeError,
        "student_hidden must be a floating",
    ),
    (dict(weight=torch.randn(V)), ValueError, "weight must have shape [V, H]"),
    (
        dict(student_hidden=torch.randn(N, H + 1)),
        ValueError,
        "student_hidden must have shape [..., H]",
    ),
    (
        dict(teacher_hidden=torch.randn(N + 1, H)),
        ValueError,
        "teacher_hidden must have the shape of student_hidden",
    ),
    (
        dict(teacher_hidden=torch.randn(N, H, dtype=torch.float64)),
        TypeError,
        "teacher_hidden dtype",
    ),
    (dict(weight=torch.randn(V, H, dtype=torch.float64)), TypeError, "weight dtype"),
    (
        dict(teacher_weight=torch.randn(V + 1, H)),
        ValueError,
        "teacher_weight must have shape [V, H] = [30, 8]",
    ),
    (dict(teacher_weight=torch.randn(V, H).half()), TypeError, "teacher_weight dtype"),
    (dict(bias=torch.randn(V + 2)), ValueError, "bias must have shape [V] = [30]"),
    (dict(teacher_bias=torch.randn(3)), ValueError, "teacher_bias must have shape [V] = [30]"),
    (dict(teacher_bias=torch.randn(V).double()), TypeError, "teacher_bias dtype"),
    (dict(mask=torch.ones(N + 1, dtype=torch.bool)), ValueError, "mask must have shape"),
    (dict(mask=torch.ones(N)), TypeError, "mask must be a bool"),
    (dict(mask=torch.full((N,), 2)), ValueError, "mask must hold only 0/1"),
    (dict(beta=-0.1), ValueError, "beta must be in [0, 1], got -0.1"),
    (dict(beta=1.5), ValueError, "beta must be in [0, 1], got 1.5"),
    (dict(beta=float("nan")), ValueError, "beta must be finite"),
    (dict(beta="0"), TypeError, "beta must be a real number"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(temperature=float("inf")), ValueError, "temperature must be finite"),
    (dict(elementwise_clip=0.0), ValueError, "elementwise_clip must be > 0"),
    (dict(elementwise_clip=-1.0), ValueError, "elementwise_clip must be > 0"),
    (dict(teacher_top_k=0), ValueError, "teacher_top_k must be in [1, V] = [1, 30], got 0"),
    (dict(teacher_top_k=V + 1), ValueError, "teacher_top_k must be in [1, V] = [1, 30], got 31"),
    (dict(teacher_top_k=2.0), TypeError, "teacher_top_k must be an int"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(softcap=0.0), ValueError, "softcap must be > 0, got 0.0"),
    (dict(softcap=-5.0), ValueError, "softcap must be > 0, got -5.0"),
    (dict(softcap=float("nan")), ValueError, "softcap must be finite, got nan"),
    (dict(softcap=float("inf")), ValueError, "softcap must be finite, got inf"),
    (dict(softcap=True), TypeError, "softcap must be a real number, got bool"),
    (dict(logit_scale=0), ValueError, "logit_scale must be > 0, got 0.0"),
    (dict(logit_scale=-0.5), ValueError, "logit_scale must be > 0, got -0.5"),
    (dict(logit_scale=float("-inf")), ValueError, "logit_scale must be finite, got -inf"),
    (dict(logit_scale="2"), TypeError, "logit_scale must be a real number, got str"),
]


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("over,exc,message", BAD, ids=lambda x: str(x)[:40])
def test_linear_divergence_bad_input(over, exc, message, backend):
    if "backend" not in over:
        over = {**over, "backend": backend}
    args, kw = _args(**over)
    with pytest.raises(exc) as info:
        sk.linear_divergence(*args.values(), **kw)
    assert message in str(info.value)


def test_linear_divergence_check_finite():
    args, _ = _args()
    args["teacher_hidden"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="teacher_hidden contains non-finite"):
        sk.linear_divergence(*args.values(), check_finite=True)
    # without the check NaN propagates to that row; other rows stay finite
    d = sk.linear_divergence(*args.values(), backend="torch")
    assert torch.isnan(d[0]) and torch.isfinite(d[1:]).all()


def _gated(**over):
    B, K, T = 2, 2, 3
    kw = dict(
        student_hidden=torch.randn(B, T, H),
        weight=torch.randn(V, H),
        targets=torch.randint(0, V, (B, T)),
        token_mask=torch.ones(B, T, dtype=torch.bool),
        rewards=torch.ones(B),
        teacher_weights=torch.ones(B, K),
        teacher_hidden=torch.randn(B, K, T, H),
    )
    kw.update(over)
    return sk.linear_gated_kd_loss(*list(kw.values())[:6], **dict(list(kw.items())[6:]))


@pytest.mark.parametrize(
    "over,exc,message",
    [
        (dict(local_support_top_k=0), ValueError, "local_support_top_k must be >= 1, got 0"),
        (dict(local_support_top_k=1.5), TypeError, "local_support_top_k must be an int"),
        (
            dict(teacher_hidden=None, teacher_logprobs=torch.randn(2, 2, 3), local_support_top_k=4),
            ValueError,
            "local_support_top_k needs teacher_hidden",
        ),
        (
            dict(targets=torch.full((2, 3), V), local_support_top_k=4),
            ValueError,
            "targets must be in [0, 30)",
        ),
        (
            dict(teacher_weights=-torch.ones(2, 2), local_support_top_k=4),
            ValueError,
            "teacher_weights must be finite and >= 0",
        ),
        (
            dict(softcap=30.0, local_support_top_k=4),
            ValueError,
            "local_support_top_k=4 cannot be combined with softcap=30.0",
        ),
        (dict(softcap=-1.0, local_support_top_k=4), ValueError, "softcap must be > 0, got -1.0"),
    ],
)
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_local_support_bad_input(over, exc, message, backend):
    with pytest.raises(exc) as info:
        _gated(**over, backend=backend)
    assert message in str(info.value)
