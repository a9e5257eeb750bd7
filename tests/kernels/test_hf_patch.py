"""sgsd_kernels.hf.patch_causal_lm: a patched transformers causal LM called with labels
returns per-token log-probs, entropy and the loss from the fused kernels, no logits.

Tiny random models of five architectures, built from configs (no downloads), against the
same models' own ``log_softmax(logits)`` and ``labels=`` loss."""

from __future__ import annotations

import pytest
import torch

from sgsd_kernels import hf

transformers = pytest.importorskip("transformers")
from tests.kernels.conftest import REL_ATOL, assert_close_to_oracle  # noqa: E402

V, H = 1007, 64
_SMALL = dict(
    vocab_size=V,
    hidden_size=H,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
)


def _config(arch: str):
    if arch == "qwen3":
        return transformers.Qwen3Config(**_SMALL, head_dim=32, tie_word_embeddings=False)
    if arch == "llama":
        return transformers.LlamaConfig(**_SMALL, tie_word_embeddings=True)
    if arch == "qwen2":
        return transformers.Qwen2Config(**_SMALL, tie_word_embeddings=False)
    if arch == "gemma2":  # final_logit_softcapping = 30 by default
        return transformers.Gemma2Config(**_SMALL, head_dim=32, sliding_window=4)
    if arch == "gemma3":  # Gemma 3 text: no final soft-capping by default
        return transformers.Gemma3TextConfig(**_SMALL, head_dim=32, sliding_window=4)
    if arch == "gemma3-softcap":
        return transformers.Gemma3TextConfig(
            **_SMALL, head_dim=32, sliding_window=4, final_logit_softcapping=5.0
        )
    if arch == "cohere":  # logit_scale = 0.0625
        return transformers.CohereConfig(**_SMALL)
    raise AssertionError(arch)


def _model(arch: str, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    cfg = _config(arch)
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    with torch.no_grad():  # random heads give near-uniform softmaxes; sharpen them
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def _lora(model):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], lora_dropout=0.0)
    wrapped = peft.get_peft_model(model, cfg)
    with torch.no_grad():  # B starts at 0; make the adapters change the outputs
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return wrapped


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :2] = -100  # an ignored prompt
    return ids, mask, labels


def _gathered(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits) at labels, transformers' shift, 0 at ignored and t = 0."""
    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    lp = lp.gather(-1, labels[:, 1:, None].clamp(min=0))[..., 0]
    return torch.nn.functional.pad(lp.masked_fill(labels[:, 1:] == -100, 0), (1, 0))


def _oracle_logits(model, ids, mask) -> torch.Tensor:
    """The model's own last hidden state, then its head and logit transform in float64."""
    hidden = hf.last_hidden_states(model, ids, attention_mask=mask).double()
    weight, bias = hf.lm_head_parameters(model)
    z = hidden @ weight.double().T + (0 if bias is None else bias.double())
    cfg = hf.unwrap_causal_lm(model).config
    if getattr(cfg, "logit_scale", None) is not None:  # Cohere
        z = z * cfg.logit_scale
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap is not None:  # Gemma
        z = torch.tanh(z / cap) * cap
    return z


ARCHS = [
    "qwen3",
    "llama",
    "qwen2",
    "gemma3",
    "gemma2",
    "gemma3-softcap",
    "cohere",
]


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_patched_log_probs_match_the_models_own_logits(arch, dtype, lora):
    model = _model(arch, dtype)
    if lora:
        model = _lora(model)
    ids, mask, labels = _batch()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, labels=labels)
        oracle = _oracle_logits(model, ids, mask)
    hf.patch_causal_lm(model, return_entropy=True)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels)
    assert out.logits is None and out.log_probs.shape == labels.shape
    assert out.log_probs.dtype == torch.float32
    valid = torch.nn.functional.pad(labels[:, 1:] != -100, (1, 0))
    assert torch.all(out.log_probs[~valid] == 0) and torch.all(out.entropy[~valid] == 0)
    expected = _gathered(oracle, labels)
    eager = _gathered(ref.logits, labels)
    assert_close_to_oracle(
        f"{arch} log_probs", out.log_probs, eager, expected, rel_atol=REL_ATOL[dtype]
    )
    z = oracle[:, :-1]
    entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    entropy = torch.nn.functional.pad(entropy.masked_fill(labels[:, 1:] == -100, 0), (1, 0))
    ez = ref.logits[:, :-1].double()
    eager_entropy = -(ez.softmax(-1) * ez.log_softmax(-1)).sum(-1)
    eager_entropy = torch.nn.functional.pad(
        eager_entropy.masked_fill(labels[:, 1:] == -100, 0), (1, 0)
    )
    assert_close_to_oracle(
        f"{arch} entropy", out.entropy, eager_entropy, entropy, rel_atol=REL_ATOL[dtype]
    )
    # the loss is transformers' own labels= loss
    assert_close_to_oracle(
        f"{arch} loss", out.loss, ref.loss, -expected.sum() / valid.sum(), rel_atol=REL_ATOL[dtype]
    )


def test_logits_to_keep_temperature_and_gradients_match_the_model():
    """float64: values and gradients (LoRA on the head included) equal the unpatched
    model's, at a temperature, on the last k labels only."""
    model = _lora(_model("qwen3", torch.float64))
    ids, mask, labels = _batch()
    ref = model(ids, attention_mask=mask)
    k, temp = 4, 0.7
    expected = _gathered(ref.logits / temp, labels)[:, -k:]
    count = (labels[:, -k:] != -100).sum()
    (-expected.sum() / count).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    hf.patch_causal_lm(model, temperature=temp)
    out = model(ids, attention_mask=mask, labels=labels, logits_to_keep=k)
    assert out.log_probs.shape == (2, k) and out.entropy is None
    torch.testing.assert_close(out.log_probs, expected, rtol=1e-10, atol=1e-10)
    out.loss.backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and any("lm_head.lora" in n for n in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-11, msg=name)
    # pre-shifted labels (sequence parallelism) are scored where they stand
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    pre = model(ids, attention_mask=mask, shift_labels=shifted)
    full = model(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(pre.log_probs[:, :-1], full.log_probs[:, 1:], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pre.loss, full.loss, rtol=1e-12, atol=1e-12)
    # num_items_in_batch (the Trainer's gradient-accumulation count) replaces the count
    summed = model(ids, attention_mask=mask, labels=labels, num_items_in_batch=100).loss
    full = model(ids, attention_mask=mask, labels=labels).log_probs
    torch.testing.assert_close(summed, -full.sum() / 100)


def test_without_labels_the_model_is_unchanged_and_unpatch_restores_it():
    model = _model("qwen3")
    ids, mask, labels = _batch()
    before = model(ids, attention_mask=mask).logits
    hf.patch_causal_lm(model)
    assert "forward" in model.__dict__
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, before, rtol=0, atol=0)
    greedy = model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert greedy.shape == (1, 7)
    with pytest.raises(RuntimeError, match="already patched"):
        hf.patch_causal_lm(model)
    hf.unpatch_causal_lm(model)
    assert "forward" not in model.__dict__
    out = model(ids, attention_mask=mask, labels=labels)
    assert out.logits is not None and not hasattr(out, "log_probs")
    with pytest.raises(ValueError, match="not patched"):
        hf.unpatch_causal_lm(model)


def test_an_existing_instance_forward_is_kept_and_restored():
    """A forward another library already put on the instance (TRL does) runs when no
    labels are given and is back in place after unpatching."""
    model = _model("qwen3")
    calls = []
    own = model.forward

    def theirs(*args, **kwargs):
        calls.append(1)
        return own(*args, **kwargs)

    model.forward = theirs
    ids, mask, labels = _batch()
    hf.patch_causal_lm(model)
    model(ids, attention_mask=mask)
    assert calls == [1]
    model(ids, attention_mask=mask, labels=labels)
    assert calls == [1]  # with labels the patched path runs instead
    hf.unpatch_causal_lm(model)
    assert model.forward is theirs


def test_bad_inputs_name_the_problem():
    model = _model("qwen3")
    with pytest.raises(TypeError, match="causal LM"):
        hf.patch_causal_lm(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="no LM head"):
        hf.patch_causal_lm(model.model)  # the backbone alone: get_output_embeddings() is None
    with pytest.raises(ValueError, match="temperature"):
        hf.patch_causal_lm(model, temperature=0.0)
    with pytest.raises(TypeError, match="return_entropy"):
        hf.patch_causal_lm(model, return_entropy=1)
    with pytest.raises(ValueError, match="backend"):
        hf.patch_causal_lm(model, backend="cuda")
    assert "forward" not in model.__dict__  # a refused patch leaves nothing behind
    with pytest.raises(ValueError, match="not patched"):
        hf.unpatch_causal_lm(model)
    granite = transformers.GraniteConfig(**_SMALL, logits_scaling=4.0)
    with pytest.raises(NotImplementedError, match="logits_scaling=4.0"):
        hf.patch_causal_lm(transformers.AutoModelForCausalLM.from_config(granite))
    hf.patch_causal_lm(model)
    ids, mask, labels = _batch()
    with pytest.raises(TypeError, match="logits_to_keep must be an int"):
        model(ids, attention_mask=mask, labels=labels, logits_to_keep=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"labels must have shape \[B, T\]"):
        model(ids, attention_mask=mask, labels=labels[:, 1:])
