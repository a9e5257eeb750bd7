"""Tile-level building blocks shared by the Triton kernels that compute logits x·Wᵀ on the
fly (docs/design.md §5)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dot_w_block(acc, x, W, cols, col_ok, hk, h_ok, stride_w, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr):  # fmt: skip
    """``acc + x · W[cols, hk]ᵀ``: loads the [BLOCK_V, BLOCK_H] block of the row-major
    [V, H] weight (zero past V and H) and accumulates its product with the [BLOCK_N, BLOCK_H]
    rows ``x``. ``UPCAST`` runs the dot in fp32 (the interpreter's bf16 ``tl.dot`` is
    wrong, docs/design.md §8); ``PRECISION`` is the fp32 input precision (ieee or tf32)."""
    w = tl.load(W + cols[:, None] * stride_w + hk[None, :],
                mask=col_ok[:, None] & h_ok[None, :], other=0.0)  # fmt: skip
    if UPCAST:
        x = x.to(tl.float32)
        w = w.to(tl.float32)
    # out_dtype spelled out: Triton 3.6 defaults it to fp32 and rejects an fp64 acc.
    return tl.dot(x, tl.trans(w), acc, input_precision=PRECISION, out_dtype=acc.dtype)
