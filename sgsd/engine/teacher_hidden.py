"""Teacher hidden states for losses that need the teacher's whole next-token distribution
(OPSD's full-vocabulary divergence, SGSD's top-k local support; docs/design.md §3.1-§3.2).

The live model scores each rollout's completion under each teacher context with no grad:
one forward per (rollout, teacher) in bounded micro-batches, keeping only the last hidden
states at the completion positions, ``[B, K, T, H]``. The ``[T, V]`` logits are never
formed; the loss ops stream them from these and the LM head.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from sgsd.engine.model import is_fsdp
from sgsd.engine.sequences import gather_positions, sequences_batch


@torch.no_grad()
def teacher_hidden_states(
    policy,
    rollouts,
    num_teachers: int,
    t_max: int,
    micro_batch_size: int,
    pad_id: int,
    device: torch.device,
    context=contextlib.nullcontext,
) -> torch.Tensor:
    """``[B, K, T, H]`` last hidden states of each rollout's completion positions under
    each of its teacher contexts (zeros for missing teachers and padding; their weight or
    mask is 0). ``context()`` wraps every teacher forward, e.g. disabling LoRA for a
    fixed base-weights teacher. Hidden states keep the model's dtype."""
    jobs = [
        (b, k, ids)
        for b, r in enumerate(rollouts)
        for k, (ids, _) in enumerate(r.teachers[:num_teachers])
    ]
    out = None
    chunks = [jobs[lo : lo + micro_batch_size] for lo in range(0, len(jobs), micro_batch_size)]
    for chunk in chunks:
        completions = [rollouts[b].completion_ids for b, _, _ in chunk]
        ids, attn, pos, _, _ = sequences_batch([j[2] for j in chunk], completions, pad_id, device)
        with context():
            hidden = gather_positions(policy(ids, attn), pos)
        if out is None:
            shape = (len(rollouts), num_teachers, t_max, hidden.shape[-1])
            out = torch.zeros(shape, dtype=hidden.dtype, device=device)
        for row, (b, k, _) in enumerate(chunk):
            n = len(rollouts[b].completion_ids)
            out[b, k, :n] = hidden[row, :n]
    if is_fsdp(policy):  # every forward is a collective: match the busiest rank's count
        count = torch.tensor([len(chunks)], device=device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        dummy = torch.full((1, 1), pad_id, dtype=torch.long, device=device)
        for _ in range(int(count.item()) - len(chunks)):
            with context():
                policy(dummy, torch.ones_like(dummy))
    if out is None:  # no teacher at all in this micro-batch
        H = policy.lm_head()[0].shape[1]
        shape = (len(rollouts), num_teachers, t_max, H)
        out = torch.zeros(shape, dtype=next(policy.parameters()).dtype, device=device)
    return out
