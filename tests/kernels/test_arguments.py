"""The op layer's argument bundles (``sgsd_kernels/ops/arguments.py``): schemas written
from them, and the rows the streams bundle hands to a backend."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import sgsd_kernels  # noqa: F401  (registers the sgsd:: ops)
from sgsd_kernels.ops.arguments import LinearInputs, RowGrads, RowTargets, Streams, op_schema


def test_op_schema_spells_the_bundle_fields_in_order():
    got = op_schema("Tensor logits", RowGrads, "str backend", returns="Tensor")
    assert got == (
        "(Tensor logits, Tensor grad_logprobs, Tensor? grad_entropy, Tensor targets, "
        "Tensor lse, Tensor? entropy, float temperature, SymInt ignore_index, str backend)"
        " -> Tensor"
    )


@pytest.mark.parametrize(
    "op, expected",
    [
        (
            "linear_logprobs",
            "(Tensor hidden, Tensor weight, Tensor? bias, float? softcap, Tensor targets, "
            "float temperature, SymInt ignore_index, bool with_entropy, str backend) "
            "-> (Tensor, Tensor, Tensor)",
        ),
        (
            "logprobs_from_logits",
            "(Tensor logits, Tensor targets, float temperature, SymInt ignore_index, "
            "bool with_entropy, str backend) -> (Tensor, Tensor, Tensor)",
        ),
        (
            "linear_logprobs_streams",
            "(Tensor student_hidden, Tensor teacher_hidden, Tensor weight, Tensor? bias, "
            "Tensor student_targets, Tensor teacher_targets, float temperature, "
            "SymInt ignore_index, float? softcap, str backend) -> (Tensor, Tensor, Tensor)",
        ),
        (
            "linear_logprobs_backward",
            "(Tensor grad_logprobs, Tensor? grad_entropy, Tensor hidden, Tensor weight, "
            "Tensor? bias, float? softcap, Tensor targets, Tensor lse, Tensor? entropy, "
            "float temperature, SymInt ignore_index, bool need_weight_grad, str backend) "
            "-> (Tensor, Tensor, Tensor)",
        ),
        (
            "logprobs_from_logits_backward",
            "(Tensor grad_logprobs, Tensor? grad_entropy, Tensor logits, Tensor targets, "
            "Tensor lse, Tensor? entropy, float temperature, SymInt ignore_index, str backend)"
            " -> Tensor",
        ),
    ],
)
def test_registered_schemas(op, expected):
    """The schemas written from the bundles are the ones the ops always had (compiled
    graphs and inductor caches call the ops positionally)."""
    assert str(getattr(torch.ops.sgsd, op).default._schema) == f"sgsd::{op}{expected}"


def test_op_schema_rejects_a_field_type_without_schema_type():
    @dataclasses.dataclass
    class Bad:
        x: torch.Tensor
        scale: complex

    with pytest.raises(TypeError, match=r"op_schema: field Bad\.scale has type 'complex'; a "):
        op_schema(Bad, returns="Tensor")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_streams_rows(dtype):
    g = torch.Generator().manual_seed(0)
    N, M, H, V = 3, 5, 7, 11
    sh = torch.randn(N, H, generator=g).to(dtype)
    th = torch.randn(M, H, generator=g, dtype=torch.float64)  # cast to the student's dtype
    w = torch.randn(V, H, generator=g).to(dtype)
    st, tt = torch.randint(0, V, (N,), generator=g), torch.randint(0, V, (M,), generator=g)
    streams = Streams(sh, th, w, None, st, tt, 0.7, -100, 2.5)

    rows, linear = streams.joint()
    assert rows == RowTargets(rows.targets, 0.7, -100, False)
    assert torch.equal(rows.targets, torch.cat([st, tt]))
    assert linear.hidden.dtype == dtype and linear.hidden.shape == (N + M, H)
    assert torch.equal(linear.hidden[N:], th.to(dtype))
    assert linear.weight is w and linear.bias is None

    rows, linear = streams.teacher()
    assert rows.targets is tt and not rows.with_entropy
    assert linear == LinearInputs(th, w, None, 2.5)  # the soft cap goes with the head
