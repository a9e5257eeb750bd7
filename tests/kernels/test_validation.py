"""Bad input to every public function (docs/design.md §4): the exception type AND a message that
names the argument and what was expected; non-finite inputs never give a finite-looking
wrong answer; all-masked rows contribute exactly 0 (finite loss, finite gradients).

Every case goes through :func:`call`, which builds a valid call of the named entry point
and applies the overrides, so each test changes exactly one thing. ``test_valid_call``
checks that the unmodified call succeeds (a failure below is the override's doing).
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import sgsd_kernels as sk

from .conftest import EAGER_BACKENDS

B, K, T, V, H = 2, 3, 5, 11, 7
N = 4  # rows for the log-prob functions

ENTRY_POINTS = (
    "linear_logprobs",
    "logprobs_from_logits",
    "gated_kd_loss",
    "linear_gated_kd_loss",
    "GatedKDLoss",
    "GatedKDLoss.from_hidden",
)
GATE_HYPERS = ("gate_tau", "clip_delta", "confidence_threshold")

_DROP = object()  # override value: leave the argument out of the call


pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def valid_args(fn: str, seed: int = 0) -> dict:
    """Keyword arguments of a valid call of ``fn`` (fp32, CPU, small odd shapes)."""
    g = _gen(seed)
    if fn == "linear_logprobs":
        return dict(
            hidden=torch.randn(N, H, generator=g),
            weight=torch.randn(V, H, generator=g),
            targets=torch.randint(0, V, (N,), generator=g),
            bias=torch.randn(V, generator=g),
        )
    if fn == "logprobs_from_logits":
        return dict(
            logits=torch.randn(N, V, generator=g), targets=torch.randint(0, V, (N,), generator=g)
        )
    gate = dict(
        token_mask=torch.ones(B, T, dtype=torch.bool),
        rewards=torch.tensor([1.0, -1.0]),
        teacher_weights=torch.rand(B, K, generator=g) + 0.1,
    )
    if fn in ("gated_kd_loss", "GatedKDLoss"):
        return dict(
            student_logprobs=-torch.rand(B, T, generator=g) * 3,
            teacher_logprobs=-torch.rand(B, K, T, generator=g) * 3,
            **gate,
        )
    if fn in ("linear_gated_kd_loss", "GatedKDLoss.from_hidden"):
        return dict(
            student_hidden=torch.randn(B, T, H, generator=g),
            weight=torch.randn(V, H, generator=g),
            targets=torch.randint(0, V, (B, T), generator=g),
            teacher_hidden=torch.randn(B, K, T, H, generator=g),
            bias=torch.randn(V, generator=g),
            **gate,
        )
    raise AssertionError(fn)


def call(fn: str, **overrides):
    """Call entry point ``fn`` with a valid argument set updated by ``overrides``."""
    args = valid_args(fn)
    args.update(overrides)
    args = {k: v for k, v in args.items() if v is not _DROP}
    if fn.startswith("GatedKDLoss"):
        ctor = {k: args.pop(k) for k in (*GATE_HYPERS, "use_polarity", "backend") if k in args}
        loss_fn = sk.GatedKDLoss(**ctor)
        return loss_fn.from_hidden(**args) if fn.endswith("from_hidden") else loss_fn(**args)
    return getattr(sk, fn)(**args)


def raises(exc, *fragments: str):
    """pytest.raises matching every (literal) fragment of the message, in order."""
    return pytest.raises(exc, match=".*".join(re.escape(f) for f in fragments))


@pytest.mark.parametrize("fn", ENTRY_POINTS)
def test_valid_call(fn):
    out = call(fn)
    if isinstance(out, sk.GatedKDOutput):
        assert torch.isfinite(out.loss)
    else:
        assert torch.isfinite(out).all()


# --- shapes, dtypes, types: one table per entry point --------------------------------------

LINEAR_LOGPROBS_CASES = [
    (
        "hidden H != weight H",
        dict(hidden=torch.randn(N, H - 1)),
        ValueError,
        ("hidden must have shape [..., H] with H = weight.shape[1] = 7", "got (4, 6)"),
    ),
    (
        "hidden 0-d",
        dict(hidden=torch.tensor(1.0)),
        ValueError,
        ("hidden must have shape [..., H]",),
    ),
    (
        "weight 1-d",
        dict(weight=torch.randn(V)),
        ValueError,
        ("weight must have shape [V, H]", "got (11,)"),
    ),
    (
        "weight V = 0",
        dict(weight=torch.randn(0, H)),
        ValueError,
        ("weight must have shape [V, H] with V, H >= 1", "got (0, 7)"),
    ),
    (
        "targets fewer rows",
        dict(targets=torch.randint(0, V, (N - 1,))),
        ValueError,
        ("targets must have shape", "(4,)", "got (3,)"),
    ),
    (
        "targets broadcastable",
        dict(targets=torch.randint(0, V, (1,))),
        ValueError,
        ("targets must have shape", "(4,)", "got (1,)"),
    ),
    (
        "targets more rows",
        dict(targets=torch.randint(0, V, (2 * N,))),
        ValueError,
        ("targets must have shape", "(4,)", "got (8,)"),
    ),
    (
        "targets same numel, other shape",
        dict(targets=torch.randint(0, V, (2, 2))),
        ValueError,
        ("targets must have shape", "(4,)", "got (2, 2)"),
    ),
    (
        "bias wrong length",
        dict(bias=torch.randn(V + 1)),
        ValueError,
        ("bias must have shape [V] = [11]", "got (12,)"),
    ),
    (
        "weight dtype != hidden dtype",
        dict(weight=torch.randn(V, H, dtype=torch.float64)),
        TypeError,
        ("weight dtype torch.float64 must match hidden dtype torch.float32",),
    ),
    (
        "hidden bf16, weight fp32",
        dict(hidden=torch.randn(N, H).bfloat16()),
        TypeError,
        ("weight dtype torch.float32 must match hidden dtype torch.bfloat16",),
    ),
    (
        "bias dtype != weight dtype",
        dict(bias=torch.randn(V, dtype=torch.float64)),
        TypeError,
        ("bias dtype torch.float64 must match weight dtype torch.float32",),
    ),
    (
        "hidden integer",
        dict(hidden=torch.ones(N, H, dtype=torch.long)),
        TypeError,
        ("hidden must be a floating tensor", "torch.int64"),
    ),
    (
        "hidden not a tensor",
        dict(hidden=[[0.0] * H] * N),
        TypeError,
        ("hidden must be a torch.Tensor", "list"),
    ),
    ("weight not a tensor", dict(weight=None), TypeError, ("weight must be a torch.Tensor",)),
    (
        "targets float",
        dict(targets=torch.zeros(N)),
        TypeError,
        ("targets must be an integer tensor", "torch.float32"),
    ),
    (
        "targets bool",
        dict(targets=torch.zeros(N, dtype=torch.bool)),
        TypeError,
        ("targets must be an integer tensor", "torch.bool"),
    ),
    (
        "target == V",
        dict(targets=torch.tensor([0, 1, V, 2])),
        ValueError,
        ("targets must be in [0, 11) or equal ignore_index=-100", "found 11"),
    ),
    (
        "target -1",
        dict(targets=torch.tensor([0, -1, 3, 2])),
        ValueError,
        ("targets must be in [0, 11)", "found -1"),
    ),
    (
        "target == default ignore_index but ignore_index=-1",
        dict(targets=torch.tensor([0, -100, 3, 2]), ignore_index=-1),
        ValueError,
        ("targets must be in [0, 11) or equal ignore_index=-1", "found -100"),
    ),
    (
        "ignore_index float",
        dict(ignore_index=-100.0),
        TypeError,
        ("ignore_index must be an int", "float"),
    ),
    (
        "return_entropy int",
        dict(return_entropy=1),
        TypeError,
        ("return_entropy must be a bool", "int"),
    ),
    (
        "check_finite str",
        dict(check_finite="yes"),
        TypeError,
        ("check_finite must be a bool", "str"),
    ),
]

LOGITS_CASES = [
    (
        "logits V = 0",
        dict(logits=torch.randn(N, 0)),
        ValueError,
        ("logits must have shape [..., V] with V >= 1", "got (4, 0)"),
    ),
    (
        "logits 0-d",
        dict(logits=torch.tensor(1.0)),
        ValueError,
        ("logits must have shape [..., V]",),
    ),
    (
        "targets fewer rows",
        dict(targets=torch.randint(0, V, (N - 1,))),
        ValueError,
        ("targets must have shape logits.shape[:-1] = (4,)", "got (3,)"),
    ),
    (
        "targets extra dim",
        dict(targets=torch.randint(0, V, (N, 1))),
        ValueError,
        ("targets must have shape logits.shape[:-1] = (4,)", "got (4, 1)"),
    ),
    (
        "logits integer",
        dict(logits=torch.ones(N, V, dtype=torch.int32)),
        TypeError,
        ("logits must be a floating tensor", "torch.int32"),
    ),
    (
        "targets float",
        dict(targets=torch.zeros(N)),
        TypeError,
        ("targets must be an integer tensor",),
    ),
    (
        "target == V",
        dict(targets=torch.tensor([V, 0, 0, 0])),
        ValueError,
        ("targets must be in [0, 11) or equal ignore_index=-100", "found 11"),
    ),
    (
        "target negative",
        dict(targets=torch.tensor([0, 0, -5, 0])),
        ValueError,
        ("targets must be in [0, 11)", "found -5"),
    ),
    (
        "ignore_index str",
        dict(ignore_index="-100"),
        TypeError,
        ("ignore_index must be an int", "str"),
    ),
    (
        "return_entropy None",
        dict(return_entropy=None),
        TypeError,
        ("return_entropy must be a bool",),
    ),
]

# Shared by gated_kd_loss, GatedKDLoss, linear_gated_kd_loss, GatedKDLoss.from_hidden.
GATE_CASES = [
    (
        "token_mask wrong T",
        dict(token_mask=torch.ones(B, T + 1, dtype=torch.bool)),
        ValueError,
        ("token_mask must have shape [B, T] = [2, 5]", "got (2, 6)"),
    ),
    (
        "token_mask 1-d",
        dict(token_mask=torch.ones(B * T, dtype=torch.bool)),
        ValueError,
        ("token_mask must have shape [B, T] = [2, 5]", "got (10,)"),
    ),
    (
        "token_mask float",
        dict(token_mask=torch.ones(B, T)),
        TypeError,
        ("token_mask must be a bool (or 0/1 integer) tensor", "torch.float32"),
    ),
    (
        "token_mask int holds 2",
        dict(token_mask=torch.full((B, T), 2)),
        ValueError,
        ("token_mask must hold only 0/1",),
    ),
    (
        "rewards wrong B",
        dict(rewards=torch.ones(B + 1)),
        ValueError,
        ("rewards must have shape [B] = [2]", "got (3,)"),
    ),
    (
        "rewards [B, 1]",
        dict(rewards=torch.ones(B, 1)),
        ValueError,
        ("rewards must have shape [B] = [2]", "got (2, 1)"),
    ),
    (
        "rewards not a tensor",
        dict(rewards=[1.0, -1.0]),
        TypeError,
        ("rewards must be a torch.Tensor",),
    ),
    (
        "teacher_weights 1-d",
        dict(teacher_weights=torch.ones(B)),
        ValueError,
        ("teacher_weights must have shape [B, K] = [2, K]", "got (2,)"),
    ),
    (
        "teacher_weights wrong B",
        dict(teacher_weights=torch.ones(B + 1, K)),
        ValueError,
        ("teacher_weights must have shape [B, K] = [2, K]", "got (3, 3)"),
    ),
    (
        "teacher_weights integer",
        dict(teacher_weights=torch.ones(B, K, dtype=torch.long)),
        TypeError,
        ("teacher_weights must be a floating tensor",),
    ),
    (
        "teacher_weights negative",
        dict(teacher_weights=torch.tensor([[1.0, -0.5, 0.0], [1.0, 1.0, 1.0]])),
        ValueError,
        ("teacher_weights must be finite and >= 0",),
    ),
    (
        "teacher_weights NaN",
        dict(teacher_weights=torch.tensor([[1.0, math.nan, 0.0], [1.0, 1.0, 1.0]])),
        ValueError,
        ("teacher_weights must be finite and >= 0",),
    ),
    (
        "teacher_weights inf",
        dict(teacher_weights=torch.tensor([[1.0, math.inf, 0.0], [1.0, 1.0, 1.0]])),
        ValueError,
        ("teacher_weights must be finite and >= 0",),
    ),
]

GATED_KD_CASES = GATE_CASES + [
    (
        "student_logprobs 1-d",
        dict(student_logprobs=torch.zeros(B)),
        ValueError,
        ("student_logprobs must have shape [B, T]", "got (2,)"),
    ),
    (
        "student_logprobs 3-d",
        dict(student_logprobs=torch.zeros(B, T, 1)),
        ValueError,
        ("student_logprobs must have shape [B, T]", "got (2, 5, 1)"),
    ),
    (
        "student_logprobs integer",
        dict(student_logprobs=torch.zeros(B, T, dtype=torch.long)),
        TypeError,
        ("student_logprobs must be a floating tensor", "torch.int64"),
    ),
    (
        "teacher_logprobs wrong T",
        dict(teacher_logprobs=torch.zeros(B, K, T + 1)),
        ValueError,
        ("teacher_logprobs must have shape [B, K, T] = [2, 3, 5]", "got (2, 3, 6)"),
    ),
    (
        "teacher_logprobs [B, T]",
        dict(teacher_logprobs=torch.zeros(B, T)),
        ValueError,
        ("teacher_logprobs must have shape [B, K, T] = [2, 3, 5]", "got (2, 5)"),
    ),
    (
        "teacher_logprobs K != weights K",
        dict(teacher_weights=torch.ones(B, K + 1)),
        ValueError,
        ("teacher_logprobs must have shape [B, K, T] = [2, 4, 5]", "got (2, 3, 5)"),
    ),
    (
        "teacher_logprobs not a tensor",
        dict(teacher_logprobs=0.0),
        TypeError,
        ("teacher_logprobs must be a torch.Tensor",),
    ),
    (
        "K = 0",
        dict(teacher_weights=torch.ones(B, 0), teacher_logprobs=torch.zeros(B, 0, T)),
        ValueError,
        ("teacher_weights has K = 0 teachers; K must be >= 1",),
    ),
]

LINEAR_GATED_CASES = GATE_CASES + [
    (
        "neither teacher input",
        dict(teacher_hidden=_DROP),
        ValueError,
        ("pass exactly one of teacher_hidden [B, K, T, H] or teacher_logprobs [B, K, T]",),
    ),
    (
        "both teacher inputs",
        dict(teacher_logprobs=torch.zeros(B, K, T)),
        ValueError,
        ("pass exactly one of teacher_hidden [B, K, T, H] or teacher_logprobs [B, K, T]",),
    ),
    (
        "student_hidden 2-d",
        dict(student_hidden=torch.randn(B * T, H)),
        ValueError,
        ("student_hidden must have shape [B, T, H]", "got (10, 7)"),
    ),
    (
        "student_hidden H != weight H",
        dict(student_hidden=torch.randn(B, T, H + 1)),
        ValueError,
        ("student_hidden must have shape [..., H] with H = weight.shape[1] = 7", "got (2, 5, 8)"),
    ),
    (
        "weight dtype != student_hidden dtype",
        dict(weight=torch.randn(V, H, dtype=torch.float64)),
        TypeError,
        ("weight dtype torch.float64 must match student_hidden dtype torch.float32",),
    ),
    (
        "weight 3-d",
        dict(weight=torch.randn(1, V, H)),
        ValueError,
        ("weight must have shape [V, H]",),
    ),
    (
        "bias wrong length",
        dict(bias=torch.randn(V - 1)),
        ValueError,
        ("bias must have shape [V] = [11]",),
    ),
    (
        "targets wrong T",
        dict(targets=torch.randint(0, V, (B, T + 1))),
        ValueError,
        ("targets must have shape [B, T] = [2, 5]", "got (2, 6)"),
    ),
    (
        "targets float",
        dict(targets=torch.zeros(B, T)),
        TypeError,
        ("targets must be an integer tensor",),
    ),
    (
        "target == V",
        dict(targets=torch.full((B, T), V)),
        ValueError,
        ("targets must be in [0, 11) or equal ignore_index=-100", "found 11"),
    ),
    (
        "target negative",
        dict(targets=torch.full((B, T), -3)),
        ValueError,
        ("targets must be in [0, 11)", "found -3"),
    ),
    (
        "teacher_hidden wrong K",
        dict(teacher_hidden=torch.randn(B, K + 1, T, H)),
        ValueError,
        ("teacher_hidden must have shape [B, K, T, H] = [2, 3, 5, 7]", "got (2, 4, 5, 7)"),
    ),
    (
        "teacher_hidden wrong H",
        dict(teacher_hidden=torch.randn(B, K, T, H - 1)),
        ValueError,
        ("teacher_hidden must have shape [B, K, T, H] = [2, 3, 5, 7]", "got (2, 3, 5, 6)"),
    ),
    (
        "teacher_hidden dtype != weight dtype",
        dict(teacher_hidden=torch.randn(B, K, T, H).double()),
        TypeError,
        ("teacher_hidden dtype torch.float64 must match weight dtype torch.float32",),
    ),
    (
        "teacher_hidden integer",
        dict(teacher_hidden=torch.ones(B, K, T, H, dtype=torch.long)),
        TypeError,
        ("teacher_hidden must be a floating tensor",),
    ),
    (
        "teacher_logprobs wrong shape",
        dict(teacher_hidden=_DROP, teacher_logprobs=torch.zeros(B, K, T + 1)),
        ValueError,
        ("teacher_logprobs must have shape [B, K, T] = [2, 3, 5]", "got (2, 3, 6)"),
    ),
    (
        "teacher_logprobs integer",
        dict(teacher_hidden=_DROP, teacher_logprobs=torch.zeros(B, K, T, dtype=torch.long)),
        TypeError,
        ("teacher_logprobs must be a floating tensor",),
    ),
    (
        "K = 0",
        dict(teacher_weights=torch.ones(B, 0), teacher_hidden=torch.randn(B, 0, T, H)),
        ValueError,
        ("teacher_weights has K = 0 teachers; K must be >= 1",),
    ),
    (
        "K = 0 with teacher_logprobs",
        dict(
            teacher_weights=torch.ones(B, 0),
            teacher_hidden=_DROP,
            teacher_logprobs=torch.zeros(B, 0, T),
        ),
        ValueError,
        ("teacher_weights has K = 0 teachers; K must be >= 1",),
    ),
    ("ignore_index float", dict(ignore_index=0.5), TypeError, ("ignore_index must be an int",)),
    ("check_finite int", dict(check_finite=1), TypeError, ("check_finite must be a bool",)),
]


def _cases(fns, table):
    return [
        pytest.param(fn, over, exc, frags, id=f"{fn}-{name}")
        for fn in fns
        for name, over, exc, frags in table
    ]


@pytest.mark.parametrize(
    "fn, overrides, exc, fragments",
    _cases(["linear_logprobs"], LINEAR_LOGPROBS_CASES)
    + _cases(["logprobs_from_logits"], LOGITS_CASES)
    + _cases(["gated_kd_loss", "GatedKDLoss"], GATED_KD_CASES)
    + _cases(["linear_gated_kd_loss", "GatedKDLoss.from_hidden"], LINEAR_GATED_CASES),
)
def test_bad_input(fn, overrides, exc, fragments):
    with raises(exc, *fragments):
        call(fn, **overrides)


# --- hyper-parameters ------------------------------------------------------------------------

HYPERS = {
    "linear_logprobs": ("temperature",),
    "logprobs_from_logits": ("temperature",),
    "gated_kd_loss": GATE_HYPERS,
    "GatedKDLoss": GATE_HYPERS,  # checked in the constructor
    "linear_gated_kd_loss": ("temperature", *GATE_HYPERS),
    "GatedKDLoss.from_hidden": ("temperature",),  # gate hypers are the constructor's
}
POSITIVE = {"temperature", "gate_tau", "clip_delta"}  # τ, δ, temperature > 0; ε >= 0


def _hyper_cases():
    cases = []
    for fn, names in HYPERS.items():
        for name in names:
            # clip_delta = +inf is the no-clipping ablation (docs/design.md §3)
            infinite = (-math.inf,) if name == "clip_delta" else (math.inf, -math.inf)
            for value in (math.nan, *infinite):
                cases.append(
                    pytest.param(
                        fn,
                        name,
                        value,
                        ValueError,
                        f"{name} must be finite",
                        id=f"{fn}-{name}={value}",
                    )
                )
            bad = (0.0, -1.0, -1e-12, 0) if name in POSITIVE else (-0.05, -1e-12, -1)
            expect = "> 0" if name in POSITIVE else ">= 0"
            for value in bad:
                cases.append(
                    pytest.param(
                        fn,
                        name,
                        value,
                        ValueError,
                        f"{name} must be {expect}",
                        id=f"{fn}-{name}={value!r}",
                    )
                )
            for value in ("1.0", None, True, torch.tensor(1.0)):
                cases.append(
                    pytest.param(
                        fn,
                        name,
                        value,
                        TypeError,
                        f"{name} must be a real number",
                        id=f"{fn}-{name}={type(value).__name__}",
                    )
                )
    return cases


@pytest.mark.parametrize("fn, name, value, exc, fragment", _hyper_cases())
def test_bad_hyper_parameter(fn, name, value, exc, fragment):
    with raises(exc, fragment):
        call(fn, **{name: value})


# The head's soft cap c > 0 and logit scale a > 0 (docs/design.md §3.3), None = absent.
HEAD_FNS = ("linear_logprobs", "linear_gated_kd_loss", "GatedKDLoss.from_hidden")


def _head_cases():
    cases = []
    for fn in HEAD_FNS:
        for name in ("softcap", "logit_scale"):
            bad = [
                (math.nan, ValueError, f"{name} must be finite, got nan"),
                (math.inf, ValueError, f"{name} must be finite, got inf"),
                (-math.inf, ValueError, f"{name} must be finite, got -inf"),
                (0.0, ValueError, f"{name} must be > 0, got 0.0"),
                (0, ValueError, f"{name} must be > 0, got 0.0"),
                (-30.0, ValueError, f"{name} must be > 0, got -30.0"),
                (True, TypeError, f"{name} must be a real number, got bool"),
                ("30", TypeError, f"{name} must be a real number, got str"),
                (torch.tensor(30.0), TypeError, f"{name} must be a real number, got Tensor"),
            ]
            for value, exc, fragment in bad:
                cases.append(
                    pytest.param(fn, name, value, exc, fragment, id=f"{fn}-{name}={value!r}")
                )
    return cases


@pytest.mark.parametrize("fn, name, value, exc, fragment", _head_cases())
def test_bad_softcap_or_logit_scale(fn, name, value, exc, fragment):
    with raises(exc, fragment):
        call(fn, **{name: value})


@pytest.mark.parametrize("fn", HEAD_FNS)
def test_softcap_and_logit_scale_accept_ints_and_none(fn):
    capped = call(fn, softcap=30, logit_scale=2)
    plain = call(fn, softcap=None, logit_scale=None)
    loss = lambda out: out.loss if isinstance(out, sk.GatedKDOutput) else out  # noqa: E731
    assert torch.isfinite(loss(capped)).all()
    assert torch.equal(loss(plain), loss(call(fn)))


def test_gated_kd_loss_constructor_validates_eagerly():
    """GatedKDLoss rejects bad hyper-parameters and backends at construction, before data."""
    with raises(ValueError, "gate_tau must be > 0"):
        sk.GatedKDLoss(gate_tau=0.0)
    with raises(ValueError, "clip_delta must be > 0"):
        sk.GatedKDLoss(clip_delta=-3.0)
    with raises(ValueError, "confidence_threshold must be >= 0"):
        sk.GatedKDLoss(confidence_threshold=-0.01)
    with raises(ValueError, "backend must be one of", "'gpu'"):
        sk.GatedKDLoss(backend="gpu")
    with raises(TypeError, "use_polarity must be a bool", "int"):
        sk.GatedKDLoss(use_polarity=1)


@pytest.mark.parametrize("fn", ["gated_kd_loss", "linear_gated_kd_loss"])
@pytest.mark.parametrize("value", [0, "no", None])
def test_use_polarity_must_be_a_bool(fn, value):
    with raises(TypeError, "use_polarity must be a bool", type(value).__name__):
        call(fn, use_polarity=value)


@pytest.mark.parametrize("fn", ["gated_kd_loss", "linear_gated_kd_loss", "GatedKDLoss"])
def test_boundary_hyper_parameters_are_accepted(fn):
    """ε = 0 is allowed (ε ≥ 0); tiny positive τ/δ are allowed; ints are accepted as reals."""
    assert torch.isfinite(call(fn, confidence_threshold=0.0).loss)
    assert torch.isfinite(call(fn, confidence_threshold=0).loss)
    assert torch.isfinite(call(fn, gate_tau=1e-6, clip_delta=1e-6).loss)
    assert torch.isfinite(call(fn, clip_delta=math.inf, use_polarity=False).loss)
    assert torch.isfinite(call(fn, gate_tau=2, clip_delta=3).loss)


# --- backend names -----------------------------------------------------------------------------


@pytest.mark.parametrize("fn", ENTRY_POINTS)
@pytest.mark.parametrize("backend", ["cuda", "Torch", "", "triton ", None, 1])
def test_bad_backend_name(fn, backend):
    with raises(
        ValueError, "backend must be one of", "'auto'", "'triton'", "'torch'", "'reference'"
    ):
        call(fn, backend=backend)


@pytest.mark.parametrize("fn", ENTRY_POINTS)
def test_triton_backend_on_cpu_without_interpreter(fn, monkeypatch):
    from sgsd_kernels import runtime

    if not runtime.triton_available():
        pytest.skip("triton not importable")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with raises(ValueError, "backend='triton' needs CUDA tensors", "TRITON_INTERPRET=1"):
        call(fn, backend="triton")


# --- devices -----------------------------------------------------------------------------------

_TENSOR_ARGS = {
    "linear_logprobs": ("hidden", "weight", "targets", "bias"),
    "logprobs_from_logits": ("logits", "targets"),
    "gated_kd_loss": (
        "student_logprobs",
        "teacher_logprobs",
        "token_mask",
        "rewards",
        "teacher_weights",
    ),
    "GatedKDLoss": (
        "student_logprobs",
        "teacher_logprobs",
        "token_mask",
        "rewards",
        "teacher_weights",
    ),
    "linear_gated_kd_loss": (
        "student_hidden",
        "weight",
        "targets",
        "token_mask",
        "rewards",
        "teacher_weights",
        "teacher_hidden",
        "bias",
        "teacher_logprobs",
    ),
}


def _device_cases():
    for fn, names in _TENSOR_ARGS.items():
        for name in names:
            yield pytest.param(fn, name, id=f"{fn}-{name}")
    # A 0/1 integer mask is valid input; its values are checked, so it must be device-checked first.
    yield pytest.param("gated_kd_loss", "token_mask:int", id="gated_kd_loss-token_mask:int")


@pytest.mark.parametrize("fn, name", list(_device_cases()))
def test_mismatched_device(fn, name):
    """One tensor on the meta device, the rest on CPU: ValueError naming it, before any
    check that reads values (which would fail on meta with an unrelated RuntimeError)."""
    args = valid_args(fn)
    if name == "teacher_logprobs" and fn == "linear_gated_kd_loss":
        args["teacher_hidden"] = _DROP
        args["teacher_logprobs"] = -torch.rand(B, K, T)
    if name == "token_mask:int":
        name = "token_mask"
        args[name] = args[name].long()
    args[name] = torch.empty_like(args[name], device="meta")
    with raises(ValueError, f"{name} is on meta", "same device"):
        call(fn, **args)


# --- non-finite values ---------------------------------------------------------------------------


def _poison(t: torch.Tensor, index, value: float) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


FINITE_CHECK_CASES = [
    ("linear_logprobs", "hidden", (1, 2)),
    ("linear_logprobs", "weight", (3, 0)),
    ("linear_logprobs", "bias", (5,)),
    ("logprobs_from_logits", "logits", (2, 7)),
    ("linear_gated_kd_loss", "student_hidden", (0, 1, 2)),
    ("linear_gated_kd_loss", "weight", (4, 4)),
    ("linear_gated_kd_loss", "bias", (0,)),
    ("linear_gated_kd_loss", "teacher_hidden", (1, 2, 3, 4)),
    ("GatedKDLoss.from_hidden", "student_hidden", (1, 4, 0)),
    ("GatedKDLoss.from_hidden", "teacher_hidden", (0, 0, 0, 0)),
]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("fn, name, index", FINITE_CHECK_CASES)
def test_check_finite_raises(fn, name, index, value):
    bad = _poison(valid_args(fn)[name], index, value)
    with raises(ValueError, f"{name} contains non-finite values"):
        call(fn, **{name: bad}, check_finite=True)
    # check_finite=True on clean input is a no-op.
    call(fn, check_finite=True)


@pytest.mark.parametrize("backend", EAGER_BACKENDS)
@pytest.mark.parametrize("return_entropy", [False, True])
@pytest.mark.parametrize(
    "name, index, bad_rows",
    [
        ("hidden", (1, 2), [1]),
        ("weight", (3, 0), [0, 1, 2, 3]),  # a NaN weight row enters every row's normaliser
        ("bias", (6,), [0, 1, 2, 3]),
    ],
)
def test_linear_logprobs_nan_propagates(backend, return_entropy, name, index, bad_rows):
    args = valid_args("linear_logprobs")
    clean = sk.linear_logprobs(**args, backend=backend, return_entropy=return_entropy)
    args[name] = _poison(args[name], index, math.nan)
    out = sk.linear_logprobs(**args, backend=backend, return_entropy=return_entropy)
    for c, o in zip(*((clean, out) if return_entropy else ((clean,), (out,)))):
        good = [r for r in range(N) if r not in bad_rows]
        assert torch.isnan(o[bad_rows]).all(), o
        torch.testing.assert_close(o[good], c[good])


@pytest.mark.parametrize("backend", EAGER_BACKENDS)
def test_linear_logprobs_inf_hidden_is_not_finite(backend):
    args = valid_args("linear_logprobs")
    args["hidden"] = _poison(args["hidden"], (2, 0), math.inf)
    out = sk.linear_logprobs(**args, backend=backend)
    assert not torch.isfinite(out[2])
    assert torch.isfinite(out[[0, 1, 3]]).all()


@pytest.mark.parametrize("backend", EAGER_BACKENDS)
@pytest.mark.parametrize("return_entropy", [False, True])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_logprobs_from_logits_non_finite_propagates(backend, return_entropy, value):
    args = valid_args("logprobs_from_logits")
    clean = sk.logprobs_from_logits(**args, backend=backend, return_entropy=return_entropy)
    args["logits"] = _poison(args["logits"], (2, 7), value)
    out = sk.logprobs_from_logits(**args, backend=backend, return_entropy=return_entropy)
    for c, o in zip(*((clean, out) if return_entropy else ((clean,), (out,)))):
        assert torch.isnan(o[2]), o
        torch.testing.assert_close(o[[0, 1, 3]], c[[0, 1, 3]])


@pytest.mark.parametrize("backend", EAGER_BACKENDS)
@pytest.mark.parametrize(
    "name, index",
    [
        ("student_logprobs", (0, 3)),
        ("teacher_logprobs", (1, 2, 0)),
    ],
)
def test_gated_kd_loss_nan_propagates(backend, name, index):
    """A NaN log-prob at a masked-in position of a present teacher makes the loss NaN."""
    bad = _poison(valid_args("gated_kd_loss")[name], index, math.nan)
    out = call("gated_kd_loss", **{name: bad}, backend=backend)
    assert torch.isnan(out.loss), out.loss


@pytest.mark.parametrize("backend", EAGER_BACKENDS)
@pytest.mark.parametrize(
    "name, index",
    [
        ("student_hidden", (0, 3, 1)),
        ("teacher_hidden", (1, 2, 0, 6)),
        ("weight", (10, 3)),
        ("bias", (0,)),
    ],
)
def test_linear_gated_kd_loss_nan_propagates(backend, name, index):
    out = call(
        "linear_gated_kd_loss",
        **{name: _poison(valid_args("linear_gated_kd_loss")[name], index, math.nan)},
        backend=backend,
    )
    assert torch.isnan(out.loss), out.loss


# --- all-masked rows: contribute exactly 0, never NaN ---------------------------------------------


def _loss_and_grads(fn, backend, args, wrt):
    args = dict(args)
    leaves = {}
    for name in wrt:
        leaves[name] = args[name].detach().clone().requires_grad_(True)
        args[name] = leaves[name]
    out = call(fn, **args, backend=backend)
    out.loss.backward()
    return out, {name: leaf.grad for name, leaf in leaves.items()}


@pytest.mark.parametrize("backend", EAGER_BACKENDS)
@pytest.mark.parametrize("eps", [0.0, 0.05])
def test_gated_kd_loss_all_masked_row(backend, eps):
    Bx = 3
    g = _gen(3)
    args = dict(
        student_logprobs=-torch.rand(Bx, T, generator=g) * 4,
        teacher_logprobs=-torch.rand(Bx, K, T, generator=g) * 4,
        token_mask=torch.rand(Bx, T, generator=g) > 0.3,
        rewards=torch.tensor([1.0, -1.0, 1.0]),
        teacher_weights=torch.rand(Bx, K, generator=g) + 0.1,
        confidence_threshold=eps,
    )
    args["token_mask"][1] = False
    args["token_mask"][0, 0] = True
    # Padding garbage at masked positions must be inert (select, never multiply).
    args["student_logprobs"][1] = math.nan
    args["teacher_logprobs"][1, 0] = -math.inf
    args["teacher_logprobs"][1, 1] = math.nan
    out, grads = _loss_and_grads("gated_kd_loss", backend, args, ["student_logprobs"])
    assert torch.isfinite(out.loss)
    assert torch.isfinite(grads["student_logprobs"]).all()
    assert (grads["student_logprobs"][1] == 0).all()
    for t in (out.support, out.polarity, out.row_loss):
        assert torch.isfinite(t).all() and (t[1] == 0).all()
    assert all(math.isfinite(v) for v in out.metrics().values())

    # Row 1 contributes exactly 0: the loss is the other rows' loss times (B-1)/B.
    keep = [0, 2]
    sub = {k: (v[keep] if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    sub_out = call("gated_kd_loss", **sub, backend=backend)
    torch.testing.assert_close(out.loss * Bx, sub_out.loss * (Bx - 1))


@pytest.mark.parametrize("backend", EAGER_BACKENDS)
def test_gated_kd_loss_everything_masked(backend):
    args = valid_args("gated_kd_loss")
    args["token_mask"] = torch.zeros(B, T, dtype=torch.bool)
    out, grads = _loss_and_grads("gated_kd_loss", backend, args, ["student_logprobs"])
    assert out.loss.item() == 0.0
    assert (grads["student_logprobs"] == 0).all()
    assert all(math.isfinite(v) for v in out.metrics().values())


@pytest.mark.parametrize("backend", EAGER_BACKENDS)
@pytest.mark.parametrize("how", ["mask", "ignore_index", "teacher_logprobs"])
def test_linear_gated_kd_loss_all_masked_row(backend, how):
    args = valid_args("linear_gated_kd_loss")
    if how == "mask":
        args["token_mask"][1] = False
    elif how == "ignore_index":
        args["targets"][1] = -100
    else:  # precomputed teacher log-probs with padding garbage in the masked row
        args["token_mask"][1] = False
        args["teacher_hidden"] = _DROP
        u = -torch.rand(B, K, T, generator=_gen(5))
        u[1] = math.nan
        args["teacher_logprobs"] = u
    out, grads = _loss_and_grads(
        "linear_gated_kd_loss", backend, args, ["student_hidden", "weight", "bias"]
    )
    assert torch.isfinite(out.loss)
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
    assert (grads["student_hidden"][1] == 0).all()
    for t in (out.support, out.polarity, out.row_loss):
        assert (t[1] == 0).all()
    assert all(math.isfinite(v) for v in out.metrics().values())
