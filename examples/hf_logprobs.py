"""Per-token log-probs and the loss of a Hugging Face causal LM without [B, T, V] logits.

Patches a tiny random Qwen3 (built from a config, offline) with
``sgsd_kernels.hf.patch_causal_lm``, checks the result against the unpatched model's own
``log_softmax(logits)``, trains a few steps on the fused loss, and unpatches.

    python examples/hf_logprobs.py
"""

from __future__ import annotations

import torch
import transformers

from sgsd_kernels import hf


def main() -> None:
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        vocab_size=4096,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
    )
    model = transformers.Qwen3ForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (4, 32))
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :8] = -100  # score only the "response" after an 8-token prompt

    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits  # the usual [B, T, V] path
    hf.patch_causal_lm(model, return_entropy=True)
    out = model(ids, attention_mask=mask, labels=labels)
    print(f"logits: {out.logits}, log_probs: {tuple(out.log_probs.shape)}, loss {out.loss:.4f}")

    # log_probs[:, t] is log p(labels[:, t] | tokens before t); 0 at t = 0 and at -100 labels
    want = torch.log_softmax(logits[:, :-1].float(), -1)
    want = want.gather(-1, labels[:, 1:, None].clamp(min=0))[..., 0]
    valid = labels[:, 1:] != -100
    err = (out.log_probs[:, 1:] - want)[valid].abs().max().item()
    print(f"max |patched - log_softmax(logits)| = {err:.2e}")
    assert err < 1e-4

    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(3):
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
        print(f"step {step}: loss {loss.item():.4f}")

    hf.unpatch_causal_lm(model)
    assert model(ids, attention_mask=mask, labels=labels).logits is not None
    print("unpatched: the model returns logits again")


if __name__ == "__main__":
    main()
