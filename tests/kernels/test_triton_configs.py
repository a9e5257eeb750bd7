"""Launch-configuration policy of the Triton backend (``triton_configs``): the fp32 dot
precision follows PyTorch's TF32 switch, the tile tables fit each architecture on paper,
and the opt-in autotune works (run here in the Triton interpreter, against the torch
backend)."""

from __future__ import annotations

import pytest
import torch

from .conftest import DEVICE, max_err

triton = pytest.importorskip("triton")

from sgsd_kernels.ops.triton_backend import triton_configs as tc  # noqa: E402


@pytest.fixture
def matmul_precision():
    """Set torch.backends.cuda.matmul.fp32_precision (the new API only: reading the legacy
    allow_tf32 after mixing the two raises in torch 2.13) and restore it."""
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    yield lambda value: setattr(matmul, "fp32_precision", value)
    matmul.fp32_precision = previous


@pytest.mark.parametrize("setting,expected", [("none", False), ("ieee", False), ("tf32", True)])
def test_tf32_follows_pytorch(matmul_precision, setting, expected):
    matmul_precision(setting)
    assert tc.tf32_enabled() is expected


def test_set_float32_matmul_precision_high_enables_tf32(matmul_precision):
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert tc.tf32_enabled()
        torch.set_float32_matmul_precision("highest")
        assert not tc.tf32_enabled()
    finally:
        torch.set_float32_matmul_precision(previous)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_non_fp32_dots_ignore_the_tf32_switch(matmul_precision, dtype):
    matmul_precision("tf32")
    assert tc.input_precision(dtype) == "ieee"
    assert tc.operands(dtype) in ("16", "fp64")


def test_fp32_operand_class_follows_the_switch(matmul_precision, monkeypatch):
    monkeypatch.setattr(tc, "interpreting", lambda: False)
    matmul_precision("ieee")
    assert (tc.input_precision(torch.float32), tc.operands(torch.float32)) == ("ieee", "fp32")
    matmul_precision("tf32")
    assert (tc.input_precision(torch.float32), tc.operands(torch.float32)) == ("tf32", "tf32")


def test_every_table_entry_has_a_space_starting_with_it():
    for fam in ("sm80", "sm86", "sm90"):
        for kind in tc.KINDS:
            for ops in ("16", "fp32", "tf32", "fp64"):
                assert tc.SPACE[(fam, kind, ops)][0] == tc.DEFAULTS[(fam, kind, ops)]


def _smem_estimate(cfg, elem_bytes):
    # Operand tiles of one pipeline stage: [BLOCK_N, BLOCK_H] + [BLOCK_V, BLOCK_H].
    return (cfg["BLOCK_N"] + cfg["BLOCK_V"]) * cfg["BLOCK_H"] * elem_bytes * cfg["num_stages"]


@pytest.mark.parametrize("fam,cc", [("sm80", 80), ("sm86", 86), ("sm90", 90)])
def test_tables_stay_inside_shared_memory_on_paper(fam, cc):
    """A lower bound (the compiler adds layout-conversion buffers); the AOT test checks
    the real numbers for sm_80 and sm_90."""
    size = {"16": 2, "fp32": 4, "tf32": 4, "fp64": 8}
    for (f, _kind, ops), space in tc.SPACE.items():
        if f == fam:
            for cfg in space:
                assert _smem_estimate(cfg, size[ops]) <= tc.shared_limit(cc), (f, ops, cfg)


@pytest.mark.parametrize(
    "cc,fam",
    [
        (80, "sm80"),
        (87, "sm80"),
        (86, "sm86"),
        (89, "sm86"),
        (90, "sm90"),
        (100, "sm90"),
        (120, "sm86"),
        (75, "sm86"),
    ],
)
def test_family_of_each_architecture(cc, fam):
    assert tc.family(cc) == fam


def test_bad_kind_is_rejected_with_a_message():
    with pytest.raises(ValueError, match=r"kind must be one of \('fwd', 'grad_logits'\)"):
        tc.candidates("backward", torch.float32)


def test_deterministic_mode_keeps_the_default_tiles_with_autotune_on(autotune):
    import sgsd_kernels as sk

    h = torch.randn(19, 24, device=DEVICE, requires_grad=True)
    w = torch.randn(77, 24, device=DEVICE, requires_grad=True)
    t = torch.randint(0, 77, (19,), device=DEVICE)
    with sk.deterministic():
        sk.linear_logprobs(h, w, t, backend="triton").sum().backward()
    assert tc.tuned_configs() == {}


@pytest.mark.parametrize("value", [1, "yes", None])
def test_set_autotune_needs_a_bool(value):
    with pytest.raises(TypeError, match="enabled must be a bool, got"):
        tc.set_autotune(value)


@pytest.fixture
def autotune():
    previous = tc.autotune_enabled()
    tc.set_autotune(True)
    tc._tuned.clear()
    yield
    tc.set_autotune(previous)
    tc._tuned.clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_autotune_picks_from_the_space_and_matches_torch(autotune, dtype):
    import sgsd_kernels as sk

    N, V, H = 19, 77, 24  # odd shapes: partial tiles everywhere
    h = (torch.randn(N, H, device=DEVICE) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(V, H, device=DEVICE) * 0.2).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), device=DEVICE)
    got, grads = {}, {}
    for backend in ("triton", "torch"):
        h.grad = w.grad = None
        lp = sk.linear_logprobs(h, w, t, backend=backend)
        lp.sum().backward()
        got[backend], grads[backend] = lp, (h.grad, w.grad)
    tuned = tc.tuned_configs()
    # a kernel whose space holds one config (e.g. the sm_90 fp32 forward) is not timed
    assert {key[0] for key in tuned} == {k for k in tc.KINDS if len(tc.candidates(k, dtype)) > 1}
    for key, cfg in tuned.items():
        assert cfg in tc.candidates(key[0], dtype), (key, cfg)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert max_err(got["triton"], got["torch"]) < tol
    for a, b in zip(grads["triton"], grads["torch"], strict=True):
        assert max_err(a, b) < tol * max(1.0, b.abs().max().item())
