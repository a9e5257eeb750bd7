"""The provider registry, the inputs and the float64 check (tiny shapes, no timing)."""

from __future__ import annotations

import pytest
import torch

from sgsd_bench import measure, providers
from sgsd_bench.inputs import dtype_of, make_inputs
from sgsd_bench.presets import IGNORE_INDEX, PRESETS, Case, split_bt

V, H = 1031, 37  # odd on purpose


def _case(workload, dtype, N=48, K=3):
    return Case(workload, N, V, H, K if workload == "sgsd" else 0, dtype)


def test_registry_names_colours_and_baseline():
    names = list(providers.PROVIDERS)
    assert providers.BASELINE == names[0] == "reference"
    assert len({p.color for p in providers.PROVIDERS.values()}) == len(names)
    assert {"torch", "triton", "native", "torch-compile", "cce", "liger"} <= set(names)
    assert "paper-reference" not in names


def test_unknown_provider_message():
    with pytest.raises(ValueError, match=r"unknown provider 'nope'; choose from reference, "):
        providers.build_provider("nope", "logprobs", "cpu")


@pytest.mark.parametrize(
    ("name", "workload", "cuda", "words"),
    [
        ("triton", "logprobs", False, "needs a CUDA device"),
        ("cce", "sgsd", True, "no SGSD"),
        ("liger", "sgsd", True, "no SGSD"),
        ("liger", "logprobs", False, "needs a CUDA device"),
    ],
)
def test_static_unavailable_says_why(name, workload, cuda, words):
    assert words in providers.static_unavailable(name, workload, cuda)
    if not cuda:
        with pytest.raises(providers.NotAvailable, match=words):
            providers.build_provider(name, workload, "cpu")


@pytest.mark.parametrize("name", ["reference", "torch", "cce"])
def test_static_unavailable_none_where_it_runs(name):
    assert providers.static_unavailable(name, "logprobs", False) is None


def test_native_provider_builds_or_says_what_is_missing(monkeypatch):
    from sgsd_kernels import native

    fn = providers.build_provider("native", "logprobs", "cpu")
    assert callable(fn)

    def no_compiler(verbose=False):
        raise native.NativeUnavailable("no C++ compiler found (set CXX)")

    monkeypatch.setattr(native, "build", no_compiler)
    with pytest.raises(providers.NotAvailable, match="no C\\+\\+ compiler"):
        providers.build_provider("native", "logprobs", "cpu")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("workload", ["logprobs", "sgsd"])
@pytest.mark.parametrize("name", ["reference", "torch"])
def test_library_providers_pass_the_float64_check(name, workload, dtype):
    case = _case(workload, dtype)
    fn = providers.build_provider(name, workload, "cpu")
    err, what = measure.check_provider(fn, case, 32, "cpu")
    assert err <= measure.TOL[dtype], what


@pytest.mark.parametrize("workload", ["logprobs", "sgsd"])
def test_check_catches_a_wrong_provider(workload):
    case = _case(workload, "float32")
    good = providers.build_provider("torch", workload, "cpu")
    err, what = measure.check_provider(lambda x: good(x) * 1.01, case, 32, "cpu")
    assert err > measure.TOL["float32"]
    assert "rel err 1.0" in what  # all three are off by the same 1 %


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_make_inputs_sgsd(dtype):
    case = Case("sgsd", 130, V, H, 3, dtype)
    x = make_inputs(case, case.N, "cpu", dtype_of(dtype))
    B, T = split_bt(case.N)
    assert x["teacher_hidden"].shape == (B, 3, T, H) and x["hidden"].dtype == dtype_of(dtype)
    assert x["weight"].requires_grad and x["hidden"].requires_grad
    assert x["token_mask"][:, 0].all() and x["rewards"].abs().eq(1).all()
    again = make_inputs(case, case.N, "cpu", dtype_of(dtype))
    assert torch.equal(x["teacher_hidden"], again["teacher_hidden"])


def test_make_inputs_logprobs_has_ignored_targets():
    x = make_inputs(Case("logprobs", 999, V, H, 0, "float32"), 999, "cpu", torch.float32)
    frac = (x["targets"] == IGNORE_INDEX).float().mean().item()
    assert 0.005 < frac < 0.08 and x["grad_out"].shape == (999,)


def test_make_inputs_bad_inputs():
    with pytest.raises(ValueError, match="workload must be one of logprobs, sgsd, divergence, "
                       "local_support; got 'kd'"):  # fmt: skip
        make_inputs(Case("kd", 8, V, H, 0, "float32"), 8, "cpu", torch.float32)
    with pytest.raises(ValueError, match="an sgsd case needs K ≥ 1 teachers, got K=0"):
        make_inputs(Case("sgsd", 8, V, H, 0, "float32"), 8, "cpu", torch.float32)
    with pytest.raises(ValueError, match="dtype 'int8' is not one of float32"):
        dtype_of("int8")
    with pytest.raises(ValueError, match="split_bt: N must be ≥ 1, got 0"):
        split_bt(0)
    with pytest.raises(ValueError, match="percentiles: no samples"):
        measure.percentiles([])


@pytest.mark.parametrize("N", [1, 63, 64, 1023, 1024, 1026])
def test_split_bt_covers_n(N):
    B, T = split_bt(N)
    assert B * T == N and B in (1, 2, 4)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_are_consistent(preset):
    p = PRESETS[preset]
    assert p.name == preset and p.min_reps <= p.max_reps and p.check_N >= 1
    assert p.logprobs_N or p.sgsd
    assert set(p.default_off) <= set(providers.PROVIDERS)
    assert all(s[0] in providers.PROVIDERS for s in p.skip)


def test_cpu_qwen_and_cce_in_the_cpu_default():
    q = PRESETS["cpu-qwen"]
    assert (q.V, q.H, q.logprobs_N, q.sgsd, q.dtype) == (151936, 1024, [256], [], "float32")
    assert "cce" not in PRESETS["cpu-small"].default_off
