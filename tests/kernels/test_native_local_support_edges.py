"""Edge cases of the native local-support kernels (``sgsd_kernels/csrc/local_support.cpp``,
docs/design.md §3.2): the teacher top-k sweep on adversarial orderings and special values,
degenerate and non-contiguous inputs through the ``sgsd::local_support`` op against the
float64 reference, gradients (gradcheck, partial requires_grad), meta tensors, bitwise
repeatability, the kernels' argument checks, and the ``auto``/``native`` dispatch when the
extension is not built. Over 450 lines: one adversarial case list per kernel, kept
together so each edge is checked against the same reference helpers.
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
from sgsd_kernels.ops.local_support import local_support_op
from sgsd_kernels.reference import local_support_terms_ref

from .conftest import REL_ATOL

pytestmark = pytest.mark.usefixtures("native_built")


@pytest.fixture
def threads():
    previous = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(previous)


def _rank_order(z: torch.Tensor, k: int) -> torch.Tensor:
    """The native top-k order, written independently: NaN first, then larger values, equal
    values (−0 == +0) by lower index. Two stable sorts: by value, then by the NaN flag."""
    zz = z.double().clone()
    nan = zz.isnan()
    zz[nan] = float("inf")
    order = torch.sort(zz, dim=-1, descending=True, stable=True).indices
    by_nan = torch.sort(nan.gather(1, order).double(), dim=-1, descending=True, stable=True)
    return order.gather(1, by_nan.indices)[:, :k]


def _logits(pattern: str, R: int, V: int, dtype: torch.dtype, g: torch.Generator):
    f64 = dict(dtype=torch.float64)
    if pattern == "ascending":  # every entry beats the bar: a compaction every cap − k entries
        return (torch.arange(V, **f64) + torch.randn(R, 1, generator=g, **f64)).to(dtype)
    if pattern == "descending":  # nothing after the first k ever enters
        return (-torch.arange(V, **f64)).expand(R, V).to(dtype)
    if pattern == "few_values":  # ties everywhere, at the k-th place too
        return torch.randint(0, 5, (R, V), generator=g).to(dtype)
    if pattern == "ascending_ties":
        return (torch.arange(V, **f64) // 3).expand(R, V).to(dtype)
    if pattern == "signed_zeros":
        z = torch.zeros(R, V, **f64)
        z[:, ::3] = -0.0
        z[:, 5::7] = 1.0
        return z.to(dtype)
    if pattern == "denormals":  # subnormal multiples: ordered by value, not flushed to 0
        tiny = 1e-45 if dtype == torch.float32 else 5e-324
        return (torch.randint(-3, 4, (R, V), generator=g).to(dtype)) * tiny
    z = torch.randn(R, V, generator=g, **f64)  # "special": NaN, +inf, −inf among normals
    u = torch.rand(R, V, generator=g)
    z[u < 0.05] = float("nan")
    z[(u >= 0.05) & (u < 0.1)] = float("inf")
    z[(u >= 0.1) & (u < 0.2)] = float("-inf")
    return z.to(dtype)


PATTERNS = ["ascending", "descending", "few_values", "ascending_ties", "signed_zeros",
            "denormals", "special"]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("n_threads", [1, 2])
def test_teacher_top_k_on_adversarial_rows(dtype, pattern, n_threads, threads):
    """Rows on both sides of the 32-row compare block (31, 33, 70) and k up to V − 1, where
    the candidate buffer is exactly V slots; the order is the documented rank order."""
    threads(n_threads)
    g = torch.Generator().manual_seed(len(pattern))
    for R, V in ((1, 2), (33, 101), (70, 1007)):
        for k in sorted({1, 7, 100, V - 2, V - 1, V} & set(range(1, V + 1))):
            z = _logits(pattern, R, V, dtype, g)
            y = torch.randint(0, V, (R,), generator=g)
            cols, _, keep = native.ops().local_support_teacher(z.T.contiguous(), y, k, 1.0)
            want = _rank_order(z, k)
            assert torch.equal(cols[:, :k], want), (R, V, k)
            assert torch.equal(cols[:, k], y)
            assert torch.equal(keep[:, k], ~(want == y[:, None]).any(-1))


def test_teacher_reads_non_contiguous_logits():
    """A transposed [V, R] view (row-major [R, V] storage) and a storage offset."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(9, 1007, generator=g)
    y = torch.randint(0, 1007, (5,), generator=g)
    ops = native.ops()
    want = ops.local_support_teacher(z[4:].T.contiguous(), y, 7, 1.3)
    got = ops.local_support_teacher(z[4:].T, y.int(), 7, 1.3)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def _case(N, K, H, V, dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=g)
    hs = torch.randn(N, H, **f64)
    w = torch.randn(V, H, **f64) * 0.5
    b = torch.randn(V, **f64) if bias else None
    row = torch.arange(N).repeat_interleave(K)
    ht = hs[row] + 0.5 * torch.randn(N * K, H, **f64)
    y = torch.randint(0, max(V, 1), (N * K,), generator=g)
    valid = torch.ones(N * K, dtype=torch.bool)
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return cast(hs), cast(w), cast(b), cast(ht), row, y, valid


def _check_against_reference(hs, w, b, ht, row, y, valid, k, temperature, tol=1e-12):
    """Values and (hs, W, b) gradients of the native op against local_support_terms_ref in
    float64 with the teacher side constant."""
    leaves = [None if x is None else x.detach().clone().requires_grad_(True) for x in (hs, w, b)]
    out = local_support_op(*leaves, ht, row, y, valid, k, temperature, "native")
    r = [None if x is None else x.detach().double().requires_grad_(True) for x in (hs, w, b)]
    zs = r[0][row] @ r[1].T + (0 if r[2] is None else r[2])
    zt = ht.double() @ r[1].detach().T + (0 if r[2] is None else r[2].detach())
    s_y, t_y, kl, size = local_support_terms_ref(zs / temperature, zt / temperature, y, k)
    on = valid.double()
    torch.testing.assert_close(out[0].double(), ((t_y - s_y) * on).detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(out[1].double(), (kl * on).detach(), rtol=tol, atol=tol)
    assert torch.equal(out[2].double(), size * on)
    if out[1].numel() == 0:
        return
    g = torch.randn(out[1].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    live = [x for x in leaves if x is not None]
    got = torch.autograd.grad((out[1].double() * g).sum(), live)
    want = torch.autograd.grad((kl * on * g).sum(), [x for x in r if x is not None])
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "N,K,H,V,k",
    [
        (3, 2, 8, 1, 5),
        (3, 2, 1, 40, 5),
        (3, 2, 8, 10, 50),
        (3, 2, 8, 10, 10),
        (1, 1, 61, 1007, 1),
        (4, 2, 8, 70, 69),
    ],  # fmt: skip
    ids=["V1", "H1", "k>V", "k=V", "N1-k1", "k=V-1"],
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_degenerate_shapes_match_reference(N, K, H, V, k, bias, one_thread):
    _check_against_reference(*_case(N, K, H, V, bias=bias), k, 1.1)


def test_no_valid_rows(one_thread):
    hs, w, b, ht, row, y, valid = _case(3, 2, 8, 40)
    _check_against_reference(hs, w, b, ht, row, y, torch.zeros_like(valid), 5, 1.0)
    _check_against_reference(*_case(0, 2, 8, 40), 5, 1.0)  # no rows at all


def test_non_contiguous_inputs_and_odd_rows(one_thread):
    hs, w, b, ht, row, y, valid = _case(6, 2, 16, 40)
    big = torch.randn(10, 32, dtype=torch.float64)
    cases = {
        "transposed W": (hs, w.T.contiguous().T, b, ht, row, y),
        "strided hidden": (big[:6, ::2], w, b, ht, row, y),
        "offset hidden": (big[4:, 16:], w, b, ht, row, y),
        "expanded teacher": (hs, w, b, hs[:1].expand(12, 16), row, y),
        "strided bias": (hs, w, torch.randn(80, dtype=torch.float64)[::2], ht, row, y),
        "one repeated target": (hs, w, b, ht, row, torch.full_like(y, 3)),
        "unsorted student rows": (hs, w, b, ht, row.flip(0), y),
        "int32 ids": (hs, w, b, ht, row.int(), y.int()),
    }
    for name, args in cases.items():
        try:
            _check_against_reference(*args, valid, 5, 1.0)
        except AssertionError as exc:
            raise AssertionError(name) from exc


@pytest.mark.parametrize("temperature", [0.05, 20.0])
def test_extreme_temperatures_and_large_logits(temperature, one_thread):
    hs, w, b, ht, row, y, valid = _case(4, 2, 16, 40)
    _check_against_reference(hs * 30, w, b, ht * 30, row, y, valid, 5, temperature, tol=1e-10)


def test_gradcheck_hidden_fp64(one_thread):
    """Finite differences on the student rows (W and b also feed the constant teacher, so
    their finite differences would move the support: those are checked against the
    reference's autograd above)."""
    hs, w, b, ht, row, y, valid = _case(3, 2, 5, 9)
    valid[1] = False

    def f(h):
        return local_support_op(h, w, b, ht, row, y, valid, 3, 1.1, "native")[1]

    assert torch.autograd.gradcheck(f, (hs.requires_grad_(True),))


@pytest.mark.parametrize("needs", ["hidden", "weight", "bias", "weight+bias"])
def test_only_some_inputs_require_grad(needs, one_thread):
    hs, w, b, ht, row, y, valid = _case(5, 2, 16, 40, dtype=torch.float32)
    leaves = {"hidden": hs, "weight": w, "bias": b}
    for name, x in leaves.items():
        x.requires_grad_(name in needs)
    out = local_support_op(hs, w, b, ht, row, y, valid, 5, 1.1, "native")
    live = [x for x in leaves.values() if x.requires_grad]
    got = torch.autograd.grad(out[1].sum(), live)
    ref = {n: x.detach().clone().requires_grad_(True) for n, x in leaves.items()}
    want_out = local_support_op(*ref.values(), ht, row, y, valid, 5, 1.1, "native")
    want = torch.autograd.grad(want_out[1].sum(), [ref[n] for n in leaves if n in needs])
    for a, e in zip(got, want):
        assert torch.equal(a, e)


def test_double_backward_is_refused():
    hs, w, b, ht, row, y, valid = _case(3, 2, 8, 40)
    hs.requires_grad_(True)
    kl = local_support_op(hs, w, b, ht, row, y, valid, 5, 1.0, "native")[1]
    (gh,) = torch.autograd.grad(kl.sum(), hs, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula was registered"):
        gh.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_meta_tensors_give_shapes_and_dtypes(dtype):
    hs, w, b, ht, row, y, valid = (
        None if x is None else x.to("meta") for x in _case(3, 2, 8, 40, dtype=dtype)
    )
    out = local_support_op(hs, w, b, ht, row, y, valid, 50, 1.0, "native")
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    assert [o.shape for o in out] == [(6,), (6,), (6,), (6, 41), (6, 41)]
    assert [o.dtype for o in out] == [compute] * 3 + [torch.long, compute]
    assert all(o.device.type == "meta" for o in out)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
def test_bitwise_repeatable_across_runs_and_threads(dtype, threads):
    case = _case(64, 3, 61, 1007, dtype=dtype)
    results = []
    for n in (1, 2, 2, 1):
        threads(n)
        leaves = [x.detach().clone().requires_grad_(True) for x in case[:3]]
        out = local_support_op(*leaves, *case[3:], 7, 1.1, "native")
        results.append((*out, *torch.autograd.grad(out[1].sum(), leaves)))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_rejects_bad_arguments():
    ops = native.ops()
    z, y = torch.randn(40, 3), torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match="targets must be an integer tensor, got Float"):
        ops.local_support_teacher(z, torch.tensor([0.7, 1.2, 2.9]), 3, 1.0)
    with pytest.raises(RuntimeError, match="targets must be an integer tensor, got Bool"):
        ops.local_support_teacher(z, torch.tensor([True, False, True]), 3, 1.0)
    for bad in (float("inf"), float("nan"), -1.0):
        with pytest.raises(RuntimeError, match="inv_temperature must be finite and > 0, got"):
            ops.local_support_teacher(z, y, 3, bad)
    cols, t_loc, keep = ops.local_support_teacher(z, y, 3, 1.0)
    h, w, row = torch.randn(2, 8), torch.randn(40, 8), torch.tensor([0, 1, 1])
    with pytest.raises(RuntimeError, match="student_row must be an integer tensor, got Float"):
        ops.local_support_student(h, w, None, row.float() + 0.5, cols, t_loc, keep, 1.0)
    msg = r"columns must be \[M, k\+1\] int64 with k \+ 1 >= 1, got \[3, 0\] Long"
    with pytest.raises(RuntimeError, match=msg):
        ops.local_support_student(h, w, None, row, cols[:, :0], t_loc[:, :0], keep[:, :0], 1.0)
    with pytest.raises(RuntimeError, match=r"columns must be \[M, k\+1\] int64.*got \[\] Long"):
        ops.local_support_student(h, w, None, row, cols[0, 0], t_loc, keep, 1.0)
    with pytest.raises(RuntimeError, match="local_support_student: inv_temperature must be finite"):
        ops.local_support_student(h, w, None, row, cols, t_loc, keep, float("inf"))
    with pytest.raises(RuntimeError, match="local_support_backward: inv_temperature must be"):
        ops.local_support_backward(torch.ones(3), h, w, None, row, cols, t_loc, keep, 0.0, True)


_DISPATCH = textwrap.dedent(
    """
    import torch, sgsd_kernels as sk
    from sgsd_kernels.runtime import resolve_backend
    print("auto ->", resolve_backend("auto", torch.device("cpu")))
    g = torch.Generator().manual_seed(0)
    hs, w = torch.randn(1, 4, 8, generator=g), torch.randn(40, 8, generator=g)
    th = hs.unsqueeze(1) + 0.5 * torch.randn(1, 2, 4, 8, generator=g)
    args = (hs, w, torch.randint(0, 40, (1, 4), generator=g), torch.ones(1, 4, dtype=torch.bool),
            torch.tensor([1.0]), torch.rand(1, 2, generator=g))
    kw = dict(teacher_hidden=th, local_support_top_k=5, confidence_threshold=0.0)
    auto = sk.linear_gated_kd_loss(*args, **kw, backend="auto").loss
    ref = sk.linear_gated_kd_loss(*args, **kw, backend="reference").loss
    print("auto matches reference:", bool(torch.allclose(auto, ref, rtol=1e-5, atol=1e-6)))
    try:
        sk.linear_gated_kd_loss(*args, **kw, backend="native")
    except Exception as exc:
        print(type(exc).__name__, exc)
    """
)


def test_dispatch_when_the_extension_is_not_built(tmp_path):
    """A fresh process with an empty cache and no compiler: "auto" runs the torch backend
    (it never compiles); "native" raises NativeUnavailable naming the missing compiler."""
    env = {**os.environ, "CXX": "/nonexistent/bin/c++", "SGSD_CACHE": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", _DISPATCH], env=env, capture_output=True, text=True, timeout=600
    )
    lines = out.stdout.splitlines()
    assert lines[:2] == ["auto -> torch", "auto matches reference: True"], out.stdout + out.stderr
    assert lines[2].startswith("NativeUnavailable"), out.stdout
    assert "no C++ compiler: '/nonexistent/bin/c++' is not on PATH" in lines[2]


_TEACHER_PEAK = textwrap.dedent(
    """
    import torch
    from sgsd_kernels import native

    def status_kib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    ops = native.ops()
    torch.set_num_threads(1)
    V, R = 1 << 20, 16
    z, y = torch.randn(V, R), torch.zeros(R, dtype=torch.long)
    ops.local_support_teacher(z[:1000, :2].contiguous(), y[:2], 999, 1.0)
    before = status_kib("VmRSS")
    # "5" resets this process's peak RSS (VmHWM) to its current RSS, so the peak read
    # after the call is this call's, whatever torch's import or randn peaked at before.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        raise SystemExit(f"SKIP {e}")
    out = ops.local_support_teacher(z, y, V - 1, 1.0)
    print((status_kib("VmHWM") - before) * 1024)
    """
)


def test_teacher_buffer_is_at_most_v_slots_per_row():
    """k = V − 1: the outputs ([R, V] int64 + fp32 + bool) plus the candidate buffer, which
    must hold at most V packed 8-byte keys per row (2·k slots would be 2·V)."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    out = subprocess.run(
        [sys.executable, "-c", _TEACHER_PEAK], capture_output=True, text=True, timeout=600
    )
    if "SKIP" in out.stderr:
        pytest.skip(f"cannot reset the peak RSS here: {out.stderr.strip()[-200:]}")
    growth = int(out.stdout.strip() or -1)
    R, V = 16, 1 << 20
    outputs, buffer = R * (V + 1) * (8 + 4 + 1), R * V * 8
    assert 0 < growth < outputs + 1.5 * buffer, (growth, out.stderr[-2000:])


def test_concurrent_calls_match_a_serial_one():
    """Four Python threads in the kernels at once (they release the GIL): no shared state,
    every result bitwise equal to a serial call."""
    import threading

    case = _case(64, 2, 61, 4099, dtype=torch.float32)

    def once():
        leaves = [x.detach().clone().requires_grad_(True) for x in case[:3]]
        out = local_support_op(*leaves, *case[3:], 100, 1.1, "native")
        return (*out, *torch.autograd.grad(out[1].sum(), leaves))

    serial = once()
    results = [None] * 4

    def work(i):
        results[i] = once()

    workers = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    for got in results:
        assert got is not None
        for a, b in zip(got, serial):
            assert torch.equal(a, b)


@pytest.mark.parametrize("seed", range(24))
def test_random_public_calls_against_the_float64_reference(seed, one_thread):
    """The public loss (``local_support_top_k``) on seeded random shapes, dtypes, k (up to
    beyond V), temperatures, bias, masks and ignored targets: native against the float64
    reference under the docs/design.md §8 rule (eager reference in the same dtype as the
    yardstick)."""
    import random

    rng = random.Random(seed)
    B, K, T = rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 6)
    H, V = rng.choice([1, 3, 16, 61]), rng.choice([1, 2, 7, 40, 257, 1007])
    k = rng.choice([1, 2, 7, 100, V, V + 5])
    temperature = rng.choice([0.7, 1.0, 1.1, 2.5])
    dtype = (torch.float64, torch.float32, torch.bfloat16, torch.float16)[seed % 4]
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=g)
    hs, w = torch.randn(B, T, H, **f64), torch.randn(V, H, **f64) * 0.5
    b = torch.randn(V, **f64) if seed % 3 else None
    th = hs.unsqueeze(1) + 0.5 * torch.randn(B, K, T, H, **f64)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    targets[~mask & (torch.rand(B, T, generator=g) > 0.5)] = -100
    rewards, tw = torch.randn(B, **f64).sign(), torch.rand(B, K, **f64)

    def run(dt, backend):
        leaves = [None if x is None else x.to(dt).requires_grad_(True) for x in (hs, w, b)]
        out = sk.linear_gated_kd_loss(
            leaves[0], leaves[1], targets, mask, rewards.to(dt), tw.to(dt),
            teacher_hidden=th.to(dt), bias=leaves[2], temperature=temperature,
            local_support_top_k=k, confidence_threshold=0.0, backend=backend,
        )  # fmt: skip
        live = [x for x in leaves if x is not None]
        return (out.loss.detach(), *torch.autograd.grad(out.loss, live))

    oracle, eager, got = (
        run(torch.float64, "reference"),
        run(dtype, "reference"),
        run(dtype, "native"),
    )
    for name, a, e, o in zip(("loss", "d_hidden", "d_weight", "d_bias"), got, eager, oracle):
        err = (a.double() - o).abs().max().item()
        bound = 2 * (e.double() - o).abs().max().item() + REL_ATOL[dtype] * max(
            o.abs().max().item(), 1
        )
        assert err <= bound, f"{name}: {err:.3e} > {bound:.3e}"
