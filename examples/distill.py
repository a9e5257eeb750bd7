"""On-policy-style distillation from hidden states: a tiny student learns a tiny teacher's
next-token distributions through ``LinearDivergenceLoss`` (β-JSD over the full vocabulary,
no [B, T, V] logits), with TRL GKD's reductions. CPU, offline, random models.

    python examples/distill.py [--steps 20] [--beta 0.5]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

from sgsd_kernels.integrations.trl import LinearDivergenceLoss  # noqa: E402


def tiny(seed: int, layers: int) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = transformers.Qwen3Config(
        vocab_size=2048,
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=48,
    )
    return transformers.Qwen3ForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--beta", type=float, default=0.5)
    opts = parser.parse_args()

    teacher = tiny(1, layers=3).eval()
    student = tiny(0, layers=2)
    loss_fn = LinearDivergenceLoss(beta=opts.beta, temperature=1.0, reduction="token")
    optim = torch.optim.AdamW(student.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2048, (8, 24), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100  # a 6-token prompt: only the response positions count
    first = None
    for step in range(opts.steps):
        loss = loss_fn.from_models(student, teacher, ids, torch.ones_like(ids), labels)
        loss.backward()
        optim.step()
        optim.zero_grad()
        first = loss.item() if first is None else first
        if step % 5 == 0 or step == opts.steps - 1:
            print(f"step {step}: β-JSD {loss.item():.4f}")
    assert loss.item() < first, "the student did not move towards the teacher"


if __name__ == "__main__":
    main()
