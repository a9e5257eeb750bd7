"""The ``torch`` backend: portable PyTorch kernels, one module per op, that never
materialise N×V logits (row chunks × vocabulary blocks, recompute in the backward)."""

# 2**24 fp32 logits = 64 MiB of workspace (one reused buffer). Chosen on the 2-core CI CPU
# (V=32768, H=256, N=2048, fp32, loaded machine), in multiples of one [N,H]@[H,V] GEMM:
#   2**22 (128 rows): fwd 2.2 G, bwd 6.8 G;  2**23: fwd 1.7 G, bwd 5.5 G;
#   2**24 (512 rows): fwd 1.6 G, bwd 4.1 G.
# The backward gains most: each row chunk re-reads and re-writes the whole fp32 dW
# accumulator (V×H), so fewer, larger chunks halve that traffic. 64 MiB stays ~30× below
# the reference's peak at the docs/design.md §6 CPU shape (3 GiB). The kernels read it at
# call time, so tests can shrink it to force many blocks.
WORKSPACE_ELEMENTS = 1 << 24
