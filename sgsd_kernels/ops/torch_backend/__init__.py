"""The ``torch`` backend: portable PyTorch kernels, one module per op, that never
materialise N×V logits (row chunks × vocabulary blocks, recompute in the backward)."""

# The most logits one workspace buffer may hold: 2**24 fp32 = 64 MiB, ~30× below the
# reference's peak at the docs/design.md §6 CPU shape (3 GiB). logprobs_from_logits uses it
# as its row-chunk size; linear_logprobs runs a smaller cache-sized tile (see its
# TILE_ROWS, TILE_VOCAB) and uses this only as a cap. The kernels read it at call time,
# so tests can shrink it to force many blocks.
WORKSPACE_ELEMENTS = 1 << 24
