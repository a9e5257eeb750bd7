"""The native C++ local-support kernels (``sgsd_kernels/csrc/local_support.cpp``, docs/design.md
§3.2) through the ``sgsd::local_support`` op with ``backend="native"``: values and gradients
against a float64 oracle (ties at the k-th teacher value included), the teacher top-k
against torch.topk, masks, chunking, 1- vs 2-thread bitwise equality and the C++ messages.

The public loss on the native backend is checked against the reference by
``tests/kernels/test_local_support.py`` (its backend list includes ``native``).
"""

from __future__ import annotations

import pytest
import torch

from sgsd_kernels import native
from sgsd_kernels.ops.local_support import local_support_op
from sgsd_kernels.ops.native_backend import local_support as native_kernels
from sgsd_kernels.reference import local_support_terms_ref

from .conftest import REL_ATOL, assert_close_to_oracle

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# (N student rows, K teacher rows per student row, H, V): N = 1; odd H and V; tiny V.
SHAPES = [(1, 1, 61, 1007), (9, 3, 61, 1007), (5, 2, 16, 40)]


pytestmark = pytest.mark.usefixtures("native_built")


def _case(N, K, H, V, dtype, with_bias, ties=False, seed=0):
    """Student rows hs [N, H], W [V, H], b [V] or None, teacher rows ht [N·K, H] near their
    student row, student_row [N·K], targets [N·K], valid [N·K]. With ``ties`` the bias takes
    a few values and every other teacher row is zero, so its logits are exactly b: many
    columns tie at the k-th place (all of them when there is no bias)."""
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=g)
    hs = torch.randn(N, H, **f64) * 0.8
    w = torch.randn(V, H, **f64) * 0.4
    b = torch.randn(V, **f64) if with_bias else None
    row = torch.arange(N).repeat_interleave(K)
    ht = hs[row] + torch.randn(N * K, H, **f64) * 0.5
    if ties:
        ht[::2] = 0.0
        if b is not None:
            b = (b * 2).round() / 2  # multiples of 1/2: exact in every dtype
    targets = torch.randint(0, V, (N * K,), generator=g)
    z0 = ht[0] @ w.T + (0 if b is None else b)
    targets[0] = int(z0.argmax())  # y_t inside the top-k: its extra slot is off
    valid = torch.rand(N * K, generator=g) > 0.2
    valid[0] = True
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return cast(hs), cast(w), cast(b), cast(ht), row, targets, valid


def _oracle(hs, w, b, ht, row, targets, valid, k, temperature, dtype):
    """docs/design.md §3.2 per row with autograd, computed in ``dtype`` from the given
    inputs. The support is the teacher's top-k by a stable sort (equal values: lower index
    first) ∪ {y_t}. Returns (Δ̃, KL̃, size) and the leaves (hs, W, b)."""
    leaves = [None if x is None else x.detach().to(dtype).requires_grad_(True) for x in (hs, w, b)]
    hs_, w_, b_ = leaves
    k = min(k, w.shape[0])
    zs = hs_[row] @ w_.T + (0 if b_ is None else b_)
    zt = ht.to(dtype) @ w_.detach().T + (0 if b_ is None else b_.detach())
    zs, zt = zs / temperature, zt / temperature
    top = torch.sort(zt, dim=-1, descending=True, stable=True).indices[:, :k]
    y = targets[:, None]
    columns = torch.cat([top, y], -1)
    keep = torch.cat([torch.ones_like(top, dtype=torch.bool), ~(top == y).any(-1, True)], -1)
    ls = torch.log_softmax(zs.gather(1, columns).masked_fill(~keep, float("-inf")), -1)
    lt = torch.log_softmax(zt.gather(1, columns).masked_fill(~keep, float("-inf")), -1)
    zero = torch.zeros((), dtype=dtype)
    delta = torch.where(keep & (columns == y), lt - ls, zero).sum(-1)
    kl = torch.where(keep, lt.exp() * (lt - ls), zero).sum(-1)
    size = keep.sum(-1).to(dtype)
    on = valid.to(dtype)
    return (delta * on, kl * on, size * on), leaves


def _native(hs, w, b, ht, row, targets, valid, k, temperature):
    leaves = [None if x is None else x.detach().clone().requires_grad_(True) for x in (hs, w, b)]
    out = local_support_op(
        leaves[0], leaves[1], leaves[2], ht, row, targets, valid, k, temperature, "native"
    )
    return out, leaves


def _grads(kl, leaves, seed=3):
    g = torch.randn(kl.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    live = [x for x in leaves if x is not None]
    return torch.autograd.grad((kl.double() * g).sum(), live)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-K{}-H{}-V{}".format(*s))
@pytest.mark.parametrize("k", [1, 7, "V"])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_matches_float64_oracle(dtype, shape, k, ties, one_thread):
    N, K, H, V = shape
    k = V if k == "V" else k
    case = _case(N, K, H, V, dtype, with_bias=N > 1, ties=ties)
    temperature = 1.1
    (o_delta, o_kl, o_size), o_leaves = _oracle(*case, k, temperature, torch.float64)
    o_grads = _grads(o_kl, o_leaves)
    eager_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    (e_delta, e_kl, _), e_leaves = _oracle(*case, k, temperature, eager_dtype)
    e_grads = _grads(e_kl, e_leaves)
    (delta, kl, size, columns, t_local), leaves = _native(*case, k, temperature)
    grads = _grads(kl, leaves)
    rel = REL_ATOL[dtype]
    assert kl.dtype == eager_dtype
    assert torch.equal(size, o_size.to(size.dtype))
    assert_close_to_oracle("delta", delta, e_delta, o_delta, rel_atol=rel)
    assert_close_to_oracle("local_kl", kl, e_kl, o_kl, rel_atol=rel)
    for name, a, e, o in zip(("d_hidden", "d_weight", "d_bias"), grads, e_grads, o_grads):
        assert a.dtype == dtype
        assert_close_to_oracle(name, a, e, o, rel_atol=rel)
    valid = case[-1]
    assert (delta[~valid] == 0).all() and (kl[~valid] == 0).all()
    assert (grads[0][~torch.isin(torch.arange(N), case[4][valid])] == 0).all()
    assert columns.shape == t_local.shape == (N * K, min(k, V) + 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("R,V", [(1, 1007), (37, 1007), (4, 40)])
@pytest.mark.parametrize("k", [1, 7, "V"])
def test_teacher_top_k_is_torch_topk(dtype, R, V, k):
    """Distinct logits: the support columns are torch.topk's, in its order, then y_t; the
    local log-probs are log_softmax of the support logits / T."""
    k = V if k == "V" else k
    g = torch.Generator().manual_seed(R + V + k)
    z = torch.randn(R, V, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, V, (R,), generator=g)
    cols, t_local, keep = native.ops().local_support_teacher(z.T.contiguous(), y, k, 1 / 0.7)
    top = torch.topk(z, k, dim=-1)
    assert torch.equal(cols[:, :k], top.indices)
    assert torch.equal(cols[:, k], y)
    assert torch.equal(keep[:, k], ~(top.indices == y[:, None]).any(-1))
    zs = torch.cat([top.values, z.gather(1, y[:, None])], -1) / 0.7
    want = torch.log_softmax(zs.masked_fill(~keep, float("-inf")), -1)
    torch.testing.assert_close(
        t_local, want, rtol=0, atol=1e-12 if dtype == torch.float64 else 3e-6
    )


def test_ties_go_to_the_lower_index():
    """All logits equal: the top-k is columns 0..k−1 whatever the chunk's row count."""
    V, k = 1007, 7
    for R in (1, 33):
        cols, _, _ = native.ops().local_support_teacher(
            torch.zeros(V, R), torch.full((R,), 3), k, 1.0
        )
        assert torch.equal(cols[:, :k], torch.arange(k).expand(R, k))
    z = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0, 2.0]]).T.contiguous()
    cols, _, _ = native.ops().local_support_teacher(z, torch.tensor([0]), 3, 1.0)
    assert cols.tolist() == [[1, 2, 4, 0]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_nan_and_inf_rank_as_torch_topk(dtype):
    """NaN above every number, −inf below (as torch.topk); equal −inf by lower index."""
    z = torch.tensor([[0.5, float("-inf"), float("nan"), 2.0, float("-inf"), -1.0]], dtype=dtype)
    cols, t_local, _ = native.ops().local_support_teacher(
        z.T.contiguous(), torch.tensor([3]), 5, 1.0
    )
    assert cols.tolist() == [[2, 3, 0, 5, 1, 3]]
    assert torch.equal(torch.topk(z, 4).indices, cols[:, :4])
    assert t_local[0, :5].isnan().all()  # a NaN logit in the support: NaN like log_softmax


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_many_chunks_match_one(dtype, monkeypatch, one_thread):
    """Teacher rows in chunks of 2 give the op's results of one chunk."""
    case = _case(9, 3, 61, 1007, dtype, with_bias=True)
    whole, leaves = _native(*case, 7, 1.3)
    g_whole = _grads(whole[1], leaves)
    monkeypatch.setattr(native_kernels, "TOPK_ELEMENTS", 2 * 1007)
    monkeypatch.setattr(native_kernels, "MIN_ROWS", 1)
    assert native_kernels.chunk_rows(27, 1007) == 2
    chunked, leaves = _native(*case, 7, 1.3)
    g_chunked = _grads(chunked[1], leaves)
    assert torch.equal(whole[3], chunked[3])
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip((*whole, *g_whole), (*chunked, *g_chunked)):
        torch.testing.assert_close(a, b, **tol)


@pytest.fixture
def threads():
    previous = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(previous)


def test_chunk_rows():
    assert native_kernels.chunk_rows(1024, 32768) == 128  # 2**22 elements
    assert native_kernels.chunk_rows(1024, 151936) == native_kernels.MIN_ROWS
    assert native_kernels.chunk_rows(5, 151936) == 5
    assert native_kernels.chunk_rows(100, 7, workspace=20, min_rows=1) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_and_two_threads_bitwise_equal(dtype, threads):
    case = _case(64, 2, 61, 1007, dtype, with_bias=True)
    results = []
    for n in (1, 2):
        threads(n)
        out, leaves = _native(*case, 7, 1.0)
        results.append((*out, *_grads(out[1], leaves)))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_rejects_bad_inputs():
    ops = native.ops()
    z, y = torch.randn(40, 3), torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match=r"k must be in \[1, V\] = \[1, 40\], got 0"):
        ops.local_support_teacher(z, y, 0, 1.0)
    with pytest.raises(RuntimeError, match=r"k must be in \[1, V\] = \[1, 40\], got 41"):
        ops.local_support_teacher(z, y, 41, 1.0)
    with pytest.raises(RuntimeError, match=r"targets must be in \[0, V\) = \[0, 40\)"):
        ops.local_support_teacher(z, torch.tensor([0, 40, 1]), 3, 1.0)
    with pytest.raises(RuntimeError, match=r"targets must be \[R\] = \[3\]"):
        ops.local_support_teacher(z, y[:2], 3, 1.0)
    with pytest.raises(RuntimeError, match="logits must be float32 or float64, got Half"):
        ops.local_support_teacher(z.half(), y, 3, 1.0)
    with pytest.raises(RuntimeError, match="inv_temperature must be finite and > 0, got 0"):
        ops.local_support_teacher(z, y, 3, 0.0)
    h, w = torch.randn(2, 8), torch.randn(40, 8)
    cols, t_loc, keep = ops.local_support_teacher(z, y, 3, 1.0)
    row = torch.tensor([0, 1, 1])
    with pytest.raises(RuntimeError, match=r"student_row must be in \[0, N\) = \[0, 2\)"):
        ops.local_support_student(h, w, None, torch.tensor([0, 2, 1]), cols, t_loc, keep, 1.0)
    with pytest.raises(RuntimeError, match=r"columns must be in \[0, V\) = \[0, 40\)"):
        ops.local_support_student(h, w, None, row, cols + 40, t_loc, keep, 1.0)
    with pytest.raises(RuntimeError, match="must share H"):
        ops.local_support_student(h, w[:, :7], None, row, cols, t_loc, keep, 1.0)
    with pytest.raises(RuntimeError, match="must share a dtype, got Float and Double"):
        ops.local_support_student(h, w.double(), None, row, cols, t_loc, keep, 1.0)
    with pytest.raises(RuntimeError, match=r"bias must be \[V\] = \[40\]"):
        ops.local_support_student(h, w, torch.zeros(39), row, cols, t_loc, keep, 1.0)
    with pytest.raises(RuntimeError, match=r"t_local must be \[M, k\+1\] in Float"):
        ops.local_support_student(h, w, None, row, cols, t_loc.double(), keep, 1.0)
    with pytest.raises(RuntimeError, match=r"grad must be \[M\] = \[3\]"):
        ops.local_support_backward(torch.ones(2), h, w, None, row, cols, t_loc, keep, 1.0, True)


def test_oracle_is_the_reference_without_ties():
    """The stable-sort oracle above equals the reference formulation on distinct logits."""
    hs, w, b, ht, row, targets, valid = _case(9, 3, 61, 1007, torch.float64, with_bias=True)
    (delta, kl, size), _ = _oracle(hs, w, b, ht, row, targets, torch.ones_like(valid), 7, 1.1,
                                   torch.float64)  # fmt: skip
    zs, zt = (hs[row] @ w.T + b) / 1.1, (ht @ w.T + b) / 1.1
    s_y, t_y, r_kl, r_size = local_support_terms_ref(zs, zt, targets, 7)
    torch.testing.assert_close(delta, (t_y - s_y).detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kl, r_kl.detach(), rtol=1e-12, atol=1e-12)
    assert torch.equal(size, r_size)


def test_opcheck():
    hs, w, b, ht, row, targets, valid = _case(9, 3, 16, 40, torch.float32, with_bias=True)
    leaves = [x.requires_grad_(True) for x in (hs, w, b)]
    torch.library.opcheck(local_support_op, (*leaves, ht, row, targets, valid, 5, 1.1, "native"))


@pytest.mark.parametrize(
    "options",
    [
        dict(backend="aot_eager", fullgraph=False),
        dict(backend="aot_eager", fullgraph=True),
        dict(backend="inductor", dynamic=True),
    ],
    ids=["aot_eager", "aot_eager-fullgraph", "inductor-dynamic"],
)
def test_compiled_matches_eager(options):
    """torch.compile traces the op as one node; the native kernels run inside it."""
    import sgsd_kernels as sk

    B, K, T, H, V = 2, 2, 5, 16, 40
    g = torch.Generator().manual_seed(0)
    hs, w = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) * 0.5
    th = hs.unsqueeze(1) + 0.5 * torch.randn(B, K, T, H, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    rewards, tw = torch.tensor([1.0, -1.0]), torch.rand(B, K, generator=g)

    def loss(hs, w):
        return sk.linear_gated_kd_loss(
            hs, w, targets, mask, rewards, tw, teacher_hidden=th, local_support_top_k=5,
            confidence_threshold=0.0, backend="native",
        ).loss  # fmt: skip

    compiled = torch.compile(loss, **options)
    results = []
    for fn in (loss, compiled):
        leaves = [hs.clone().requires_grad_(True), w.clone().requires_grad_(True)]
        value = fn(*leaves)
        results.append((value.detach(), *torch.autograd.grad(value, leaves)))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_allocates_nothing_proportional_to_n_times_v():
    """Peak memory of the native local-support loss in a fresh subprocess (the harness of
    test_divergence_memory.py): flat in N, far below the materialising reference's."""
    from .test_divergence_memory import flat_peaks

    flat_peaks("local_support", "native", 1 / 8)
