"""The native C++ CPU backend (docs/design.md §5): oracle, odd shapes, dtypes, strides,
thread counts and bitwise reproducibility, the SGSD stream, torch.compile, memory, and
the messages when it cannot be built.

The module builds the extension (into the per-user cache, or $SGSD_CACHE) on first use:
CI prebuilds it with ``python -m sgsd_kernels.native build``, so the build cost is not
paid here there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import sgsd_kernels as sk
from sgsd_kernels import native
from sgsd_kernels.runtime import resolve_backend

from .conftest import REL_ATOL, assert_close_to_oracle

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# (N, H, V): N = 1; odd V and H; several row and vocabulary tiles (256 × 256 at H ≤ 512);
# H > 512 (128 × 128 tiles, the wide-head gradient GEMMs): one row tile, then two with a
# ragged last one (dW accumulated over row tiles in the transposed scratch).
SHAPES = [(1, 61, 1007), (37, 61, 1007), (300, 32, 3000), (5, 600, 263), (130, 520, 300)]


pytestmark = pytest.mark.usefixtures("native_built")


def _case(N, H, V, dtype, with_bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=gen, dtype=torch.float64) * 0.7
    w = torch.randn(V, H, generator=gen, dtype=torch.float64) * 0.4
    b = torch.randn(V, generator=gen, dtype=torch.float64) if with_bias else None
    t = torch.randint(0, V, (N,), generator=gen)
    if N > 2:
        t[1] = -100
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return cast(h), cast(w), cast(b), t


def _leaf(x, dtype=None):
    if x is None:
        return None
    return (x.detach() if dtype is None else x.detach().to(dtype)).clone().requires_grad_(True)


def _run(h, w, b, t, backend, temperature=1.0, entropy=False, dtype=None, seed=1):
    """(outputs, grads of a random linear combination w.r.t. hidden, weight, bias)."""
    leaves = [_leaf(x, dtype) for x in (h, w, b)]
    out = sk.linear_logprobs(
        leaves[0],
        leaves[1],
        t,
        bias=leaves[2],
        temperature=temperature,
        return_entropy=entropy,
        backend=backend,
    )
    outs = out if entropy else (out,)
    gen = torch.Generator().manual_seed(seed)
    loss = sum(
        (o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum() for o in outs
    )
    grads = torch.autograd.grad(loss, [x for x in leaves if x is not None])
    return [o.detach() for o in outs], list(grads)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-H{}-V{}".format(*s))
@pytest.mark.parametrize(
    "with_bias,temperature,entropy",
    [(False, 1.0, False), (True, 0.7, True)],
    ids=["plain", "bias-temp-entropy"],
)
def test_matches_float64_oracle(dtype, shape, with_bias, temperature, entropy):
    h, w, b, t = _case(*shape, dtype, with_bias)
    kw = dict(temperature=temperature, entropy=entropy)
    oracle, oracle_g = _run(h, w, b, t, "reference", dtype=torch.float64, **kw)
    # Eager in the same dtype: low-precision GEMM, fp32 softmax (the bound's yardstick).
    eager, eager_g = _run(h, w, b, t, "reference", **kw)
    got, got_g = _run(h, w, b, t, "native", **kw)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for i, (g, e, o) in enumerate(zip(got, eager, oracle)):
        assert g.dtype == out_dtype
        assert_close_to_oracle(f"output {i}", g, e, o, rel_atol=REL_ATOL[dtype])
    for name, g, e, o in zip(["hidden", "weight", "bias"], got_g, eager_g, oracle_g):
        assert g.dtype == dtype, name
        assert_close_to_oracle(f"d{name}", g, e, o, rel_atol=REL_ATOL[dtype])
    if t.numel() > 2:  # the ignored row: 0 and no gradient
        assert got[0][1] == 0 and got_g[0][1].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("gap", [-300.0, -30.0, 10.0, 55.0, 70.0, 100.0])
def test_logits_jumping_between_vocabulary_blocks_match_oracle(dtype, gap):
    # The forward shifts a tile by the running max of the task's earlier blocks and rebases
    # rows whose tile max is higher, or takes a max pass when it is over 64 higher; a bias
    # that lifts the third 256-wide vocabulary block by `gap` drives every row down each
    # path (and, negative, far below the running max: exp underflows to 0 there).
    h, w, _, t = _case(37, 61, 1007, dtype, False)
    b = torch.zeros(1007, dtype=dtype)
    b[512:768] = gap
    t[5] = 600  # a target inside the lifted block
    kw = dict(temperature=0.9, entropy=True)
    oracle, oracle_g = _run(h, w, b, t, "reference", dtype=torch.float64, **kw)
    eager, eager_g = _run(h, w, b, t, "reference", **kw)
    got, got_g = _run(h, w, b, t, "native", **kw)
    for i, (g, e, o) in enumerate(zip(got, eager, oracle)):
        assert_close_to_oracle(f"output {i}", g, e, o, rel_atol=REL_ATOL[dtype])
    for name, g, e, o in zip(["hidden", "weight", "bias"], got_g, eager_g, oracle_g):
        assert_close_to_oracle(f"d{name}", g, e, o, rel_atol=REL_ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["plain", "bias"])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_one_vocabulary_entry_gives_log_prob_and_gradients_of_exactly_zero(
    dtype, with_bias, temperature
):
    # p = 1 exactly: the backward's log p = z − lse must see the logits the forward's lse
    # came from, rounded the same way (a fused multiply-add there gives gradients of 1e-5).
    h, w, b, t = _case(257, 3, 1, dtype, with_bias)
    (lp, ent), grads = _run(h, w, b, t, "native", temperature=temperature, entropy=True)
    assert (lp == 0).all() and (ent == 0).all()
    for g in grads:
        assert (g == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_inputs_match_contiguous(dtype):
    h, w, b, t = _case(41, 48, 700, dtype, True)
    # Same values, other strides: hidden every other column of a wider tensor, weight the
    # transpose of an [H, V] tensor, bias every other element, targets strided.
    h_nc = torch.zeros(41, 96, dtype=dtype)
    h_nc[:, ::2] = h
    h_nc = h_nc[:, ::2]
    w_nc = w.T.contiguous().T
    b_nc = torch.stack([b, b], 1)[:, 0]
    t_nc = torch.stack([t, t], 1)[:, 0]
    assert not (h_nc.is_contiguous() or w_nc.is_contiguous() or b_nc.is_contiguous())
    want, want_g = _run(h, w, b, t, "native", temperature=0.9, entropy=True)
    got, got_g = _run(h_nc, w_nc, b_nc, t_nc, "native", temperature=0.9, entropy=True)
    for a, c in zip(got + got_g, want + want_g):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


@pytest.fixture
def threads():
    previous = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(previous)


@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_bitwise_reproducible_at_fixed_thread_count(threads, n_threads, dtype):
    threads(n_threads)
    h, w, b, t = _case(300, 40, 2100, dtype, True)
    first = _run(h, w, b, t, "native", temperature=1.3, entropy=True)
    second = _run(h, w, b, t, "native", temperature=1.3, entropy=True)
    for a, c in zip(first[0] + first[1], second[0] + second[1]):
        assert torch.equal(a, c)


def test_thread_counts_agree(threads):
    h, w, b, t = _case(300, 40, 2100, torch.float32, True)
    threads(1)
    one = _run(h, w, b, t, "native", entropy=True)
    threads(2)
    two = _run(h, w, b, t, "native", entropy=True)
    for a, c in zip(one[0] + one[1], two[0] + two[1]):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(37, 61, 1007), (300, 32, 3000)], ids=str)
def test_without_onednn_matches_oracle(dtype, shape):
    """fp32 and bf16 tiles run on oneDNN's brgemm (bf16 only where the CPU has bf16 dot
    products). With oneDNN turned off, fp32 brgemm falls back to ATen's BLAS and bf16 takes
    the fp32-copy path, as on a CPU without them: both must still be right."""
    h, w, b, t = _case(*shape, dtype, True)
    kw = dict(temperature=0.8, entropy=True)
    oracle, oracle_g = _run(h, w, b, t, "reference", dtype=torch.float64, **kw)
    eager, eager_g = _run(h, w, b, t, "reference", **kw)
    fast, fast_g = _run(h, w, b, t, "native", **kw)
    with torch.backends.mkldnn.flags(enabled=False):
        slow, slow_g = _run(h, w, b, t, "native", **kw)
    for got, got_g in ((fast, fast_g), (slow, slow_g)):
        for g, e, o in zip(got + got_g, eager + eager_g, oracle + oracle_g):
            assert_close_to_oracle(str(dtype), g, e, o, rel_atol=REL_ATOL[dtype])
    if dtype == torch.bfloat16 and native.ops().bf16_gemms():  # two paths: roundings differ
        assert not all(torch.equal(a, c) for a, c in zip(fast + fast_g, slow + slow_g))


def test_tile_plan_is_the_kernel_tile_and_checks_its_input():
    assert native.tile_plan(1024, 32768, 256) == (256, 256)
    assert native.tile_plan(256, 151936, 1024) == (128, 128)  # H > 512: smaller tiles
    assert native.tile_plan(5, 100, 1024) == (5, 100)
    with pytest.raises(RuntimeError, match="tile_plan needs N, V, H >= 1"):
        native.tile_plan(0, 10, 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("M", "H", "Vb"), [(1, 61, 1007), (37, 61, 256), (256, 1024, 128)])
def test_tile_gemm_seconds_times_the_engine_gemms(dtype, M, H, Vb):
    # the benchmark's native yardstick: best seconds per call of the logits GEMM and of the
    # two gradient GEMMs, positive and finite (no timing assertion beyond that)
    h, w = torch.randn(M, H).to(dtype), torch.randn(Vb, H).to(dtype)
    s = native.ops().tile_gemm_seconds(h.T.contiguous().T, w, 2)  # strided hidden is fine
    assert len(s) == 2 and all(0 < x < float("inf") for x in s)


def test_tile_gemm_seconds_checks_its_input():
    h, w = torch.randn(4, 8), torch.randn(16, 8)
    with pytest.raises(RuntimeError, match="tile_gemm_seconds takes fp32, bf16 or fp16"):
        native.ops().tile_gemm_seconds(h.double(), w.double(), 1)
    with pytest.raises(RuntimeError, match="needs M >= 1 rows and reps >= 1"):
        native.ops().tile_gemm_seconds(h, w, 0)
    with pytest.raises(RuntimeError, match="needs M >= 1 rows and reps >= 1"):
        native.ops().tile_gemm_seconds(h[:0], w, 1)
    with pytest.raises(RuntimeError, match="hidden and weight dtypes differ"):
        native.ops().tile_gemm_seconds(h, w.bfloat16(), 1)


def test_frozen_head_skips_weight_gradient():
    h, w, b, t = _case(20, 16, 300, torch.float32, False)
    leaf = _leaf(h)
    lp = sk.linear_logprobs(leaf, w, t, backend="native")
    (gh,) = torch.autograd.grad(lp.sum(), [leaf])
    hh = _leaf(h)
    want = torch.autograd.grad(sk.linear_logprobs(hh, w, t, backend="reference").sum(), [hh])[0]
    torch.testing.assert_close(gh, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sgsd_loss_stream_matches_torch_backend(dtype):
    B, K, T, H, V = 2, 3, 21, 32, 1007
    gen = torch.Generator().manual_seed(3)
    sh = (torch.randn(B, T, H, generator=gen) * 0.5).to(dtype)
    th = (torch.randn(B, K, T, H, generator=gen) * 0.5).to(dtype)
    w = (torch.randn(V, H, generator=gen) * 0.3).to(dtype)
    tg = torch.randint(0, V, (B, T), generator=gen)
    tg[0, 3] = -100
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, -4:] = False
    r = torch.tensor([1.0, -1.0])
    tw = torch.full((B, K), 1.0 / K, dtype=dtype)

    def run(backend):
        s, wl = _leaf(sh), _leaf(w)
        out = sk.linear_gated_kd_loss(s, wl, tg, mask, r, tw, teacher_hidden=th, backend=backend)
        return [out.loss.detach(), out.teacher_logprobs, *torch.autograd.grad(out.loss, [s, wl])]

    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for a, c in zip(run("native"), run("torch")):
        torch.testing.assert_close(a.float(), c.float(), **tol)


@pytest.mark.parametrize("backend", ["native", "auto"])
def test_torch_compile_fullgraph(backend):
    h, w, b, t = _case(33, 24, 500, torch.float32, True)

    def f(h, w, b):
        lp, ent = sk.linear_logprobs(
            h, w, t, bias=b, temperature=0.8, return_entropy=True, backend=backend
        )
        return (lp * 2 + ent).sum()

    got_leaves = [_leaf(x) for x in (h, w, b)]
    want_leaves = [_leaf(x) for x in (h, w, b)]
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(*got_leaves)
    want = f(*want_leaves)
    torch.testing.assert_close(got, want)
    for a, c in zip(torch.autograd.grad(got, got_leaves), torch.autograd.grad(want, want_leaves)):
        torch.testing.assert_close(a, c)


def test_auto_picks_native_on_cpu_once_built():
    assert native.is_built()
    assert resolve_backend("auto", torch.device("cpu")) == "native"
    assert resolve_backend("native", torch.device("cpu")) == "native"


def test_native_needs_cpu_tensors():
    with pytest.raises(ValueError, match="backend='native' needs CPU tensors"):
        resolve_backend("native", torch.device("meta"))


def test_kernel_checks_its_inputs():
    ops = native.ops()
    h, w, t = torch.randn(4, 8), torch.randn(10, 9), torch.zeros(4, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"hidden must be \[N, H\] and weight \[V, H\]"):
        ops.linear_logprobs_forward(h, w, None, t, 1.0, -100, False)
    with pytest.raises(RuntimeError, match="hidden and weight dtypes differ"):
        ops.linear_logprobs_forward(h, torch.randn(10, 8).double(), None, t, 1.0, -100, False)
    with pytest.raises(RuntimeError, match=r"targets must be \[N\]"):
        ops.linear_logprobs_forward(h, torch.randn(10, 8), None, t[:3], 1.0, -100, False)
    with pytest.raises(RuntimeError, match=r"bias must be \[V\]"):
        ops.linear_logprobs_forward(h, torch.randn(10, 8), torch.randn(9), t, 1.0, -100, False)


def test_bad_backend_message_lists_native():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="'native'"):
        sk.linear_logprobs(h, w, t, backend="nativ")


_CALL_NATIVE = textwrap.dedent(
    """
    import torch, sgsd_kernels as sk
    try:
        sk.linear_logprobs(torch.randn(3, 8), torch.randn(10, 8), torch.zeros(3, dtype=torch.long),
                           backend="native")
    except Exception as exc:
        print(type(exc).__name__, exc)
    """
)


def _native_in_fresh_process(tmp_path, cxx: str) -> str:
    env = {**os.environ, "CXX": cxx, "SGSD_CACHE": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", _CALL_NATIVE], env=env, capture_output=True, text=True, timeout=600
    )
    return out.stdout


def test_missing_compiler_is_named(tmp_path):
    msg = _native_in_fresh_process(tmp_path, "/nonexistent/bin/c++")
    assert msg.startswith("NativeUnavailable"), msg
    assert "no C++ compiler: '/nonexistent/bin/c++' is not on PATH" in msg, msg


def test_build_failure_names_its_log(tmp_path):
    # A "compiler" that fails every compile: the message must point at the log.
    fake = tmp_path / "broken-cxx"
    fake.write_text("#!/bin/sh\necho 'fatal: this compiler always fails' >&2\nexit 1\n")
    fake.chmod(0o755)
    msg = _native_in_fresh_process(tmp_path, str(fake))
    assert msg.startswith("NativeUnavailable"), msg
    assert "failed; the compiler output is in" in msg, msg
    log = msg.strip().rsplit(" ", 1)[-1]
    assert log.endswith("build.log") and os.path.exists(log), msg


def test_prebuild_command_prints_its_directory():
    out = subprocess.run(
        [sys.executable, "-m", "sgsd_kernels.native", "build"],
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    assert out.stdout.strip() == str(native.build_dir())
    assert (native.build_dir() / "sgsd_native.so").exists()


def test_peak_memory_has_no_n_by_v_term():
    from .test_memory import N_BIG, N_SMALL, _peak_delta, logits_bytes

    # Best of two only for the big run: stray first touches only inflate RSS (test_memory).
    small = _peak_delta("linear", "native", N_SMALL)
    big = min(_peak_delta("linear", "native", N_BIG) for _ in range(2))
    mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    assert big - small < logits_bytes(N_BIG - N_SMALL) / 8, f"{mib(small)} -> {mib(big)}"
    assert big < logits_bytes(N_BIG) / 2, f"native peak {mib(big)}"


def test_wheel_carries_the_cpp_sources(tmp_path):
    """An installed wheel must be able to build the extension: the sources are package
    data. Built from a copy of the tree so that the checkout is not touched."""
    import shutil
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy(root / name, src / name)
    for pkg in ("sgsd_kernels", "sgsd"):
        shutil.copytree(root / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*cmd, "-w", str(tmp_path), str(src)], check=True, timeout=600)
    (wheel,) = tmp_path.glob("sgsd_kernels-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for source in native.SOURCES + native.HEADERS:
        assert f"sgsd_kernels/csrc/{source}" in names, sorted(names)
    assert "sgsd_kernels/native.py" in names
