"""Token sequences as model inputs: prompt + completion rows, right-padded, and the
positions whose hidden states predict each completion token (student and teachers alike)."""

from __future__ import annotations

import torch

from sgsd import prompts

__all__ = ["gather_positions", "sequences_batch"]


def sequences_batch(
    prefixes: list[list[int]], completions: list[list[int]], pad_id: int, device: torch.device
):
    """Right-padded ``prefix + completion`` batch and, for each completion token t, the
    position whose hidden state predicts it (``len(prefix) - 1 + t``).

    Returns ``input_ids [N, L]``, ``attention_mask [N, L]``, ``positions [N, T]``,
    ``targets [N, T]`` (0 where padded) and ``valid [N, T]`` (bool), T = longest completion.
    """
    n = len(prefixes)
    width = max(len(p) + len(c) for p, c in zip(prefixes, completions))
    t_max = max(1, max(len(c) for c in completions))
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    pos = torch.zeros((n, t_max), dtype=torch.long)
    targets = torch.zeros((n, t_max), dtype=torch.long)
    valid = torch.zeros((n, t_max), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prefixes, completions)):
        seq, start = prompts.concat_prompt_and_completion(p, c)
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        pos[i] = start - 1  # padded slots point at a real position; masked out below
        pos[i, : len(c)] = torch.arange(start - 1, start - 1 + len(c))
        targets[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        valid[i, : len(c)] = True
    return ids.to(device), attn.to(device), pos.to(device), targets.to(device), valid.to(device)


def gather_positions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``hidden [N, L, H]`` at ``positions [N, T]`` -> ``[N, T, H]``."""
    return hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
