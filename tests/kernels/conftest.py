"""Shared setup for the kernel tests.

Without a GPU, the Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET must
be set before any kernel module is imported (the library imports them lazily, on the
first triton call), so it is set here at collection time. With CUDA, the real compiled
kernels run on the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sgsd_kernels as sk  # noqa: E402  (after TRITON_INTERPRET is set)

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# Every concrete backend ("auto" only picks one of them), from the library's one list.
BACKENDS = [b for b in sk.BACKENDS if b != "auto"]
# The backends cheap enough on CPU for many generated cases (not the Triton interpreter).
EAGER_BACKENDS = tuple(b for b in BACKENDS if b != "triton")
LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add fork/join latency (on a loaded 2-core machine
    a 5x31 log_softmax takes ~15 ms with 2 threads, ~3 us with 1). Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def small_workspace(monkeypatch):
    """Shrink the torch backend's workspace so small shapes still take several row chunks
    and vocabulary blocks (the online-softmax merge paths)."""
    from sgsd_kernels.ops import torch_backend

    monkeypatch.setattr(torch_backend, "WORKSPACE_ELEMENTS", 4096)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_oracle(name, got, eager, oracle, *, rel_atol):
    """docs/design.md §8: |op − oracle| ≤ 2·|eager − oracle| + atol, where ``eager`` is plain
    PyTorch in the same low precision and atol = rel_atol · max|oracle|."""
    atol = rel_atol * max(oracle.double().abs().max().item(), 1.0) if oracle.numel() else 0.0
    err = max_err(got, oracle)
    bound = 2.0 * max_err(eager, oracle) + atol
    assert err <= bound, f"{name}: error {err:.3e} vs oracle exceeds bound {bound:.3e}"


REL_ATOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 2e-2,
    torch.float16: 4e-3,
}


@pytest.fixture(scope="session")
def native_built():
    """The native extension, built once per session; the native test modules use it."""
    from sgsd_kernels import native

    try:
        native.build()
    except native.NativeUnavailable as exc:  # CI has a compiler: this must not happen
        pytest.fail(f"the native extension did not build: {exc}")
