"""sgsd_kernels.hf: hidden states + LM head of HF causal LMs, without computing logits."""

from __future__ import annotations

import pytest
import torch

import sgsd_kernels as sk
from sgsd_kernels import hf

transformers = pytest.importorskip("transformers")


def _tiny_qwen3(seed: int = 0, *, tie: bool = False, head_bias: bool = False):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(
        vocab_size=1007,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
    )
    model = transformers.Qwen3ForCausalLM(cfg).double().eval()
    if head_bias:
        head = torch.nn.Linear(64, 1007, bias=True, dtype=torch.float64)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            head.bias.normal_(0, 0.5)
        model.lm_head = head
    return model


def _inputs(batch=2, length=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1007, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding in the second row
    return ids, mask


class _NoLogits:
    """Fails the test if the LM head's forward runs (that would be a [B, T, V] tensor)."""

    def __init__(self, model):
        self.handle = (
            hf.unwrap_causal_lm(model).get_output_embeddings().register_forward_hook(self._fail)
        )

    @staticmethod
    def _fail(*_):
        raise AssertionError("the LM head ran: logits were computed")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _check_against_forward(model, ids, mask):
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    with _NoLogits(model):
        hidden = hf.last_hidden_states(model, ids, attention_mask=mask)
        weight, bias = hf.lm_head_parameters(model)
        targets = ids[:, 1:]
        lp = sk.linear_logprobs(hidden[:, :-1], weight, targets, bias=bias)
    torch.testing.assert_close(hidden, ref.hidden_states[-1])
    expected = (
        torch.log_softmax(ref.logits[:, :-1].double(), -1)
        .gather(-1, targets.unsqueeze(-1))
        .squeeze(-1)
    )
    valid = mask[:, 1:].bool()
    torch.testing.assert_close(lp[valid].double(), expected[valid], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("tie,head_bias", [(False, False), (True, False), (False, True)])
def test_plain_model_matches_forward(tie, head_bias):
    model = _tiny_qwen3(tie=tie, head_bias=head_bias)
    _check_against_forward(model, *_inputs())
    weight, bias = hf.lm_head_parameters(model)
    assert weight is model.lm_head.weight
    assert (bias is not None) == head_bias
    if tie:
        assert weight is model.model.embed_tokens.weight


def _lora(model, targets):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0)
    wrapped = peft.get_peft_model(model, cfg)
    with torch.no_grad():  # B starts at 0; make the adapters do something
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return wrapped


def test_peft_lora_model_matches_forward_and_trains_adapters():
    model = _lora(_tiny_qwen3(), ["q_proj", "v_proj", "down_proj"])
    ids, mask = _inputs()
    _check_against_forward(model, ids, mask)
    assert isinstance(hf.unwrap_causal_lm(model), transformers.Qwen3ForCausalLM)
    # gradients reach the adapters through the backbone
    hidden = hf.last_hidden_states(model, ids, attention_mask=mask)
    weight, bias = hf.lm_head_parameters(model)
    sk.linear_logprobs(hidden[:, :-1], weight, ids[:, 1:], bias=bias).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_lora_on_the_head_is_merged_into_the_weight():
    model = _lora(_tiny_qwen3(), ["q_proj", "lm_head"])
    weight, _ = hf.lm_head_parameters(model)
    base = hf.unwrap_causal_lm(model).lm_head.base_layer.weight
    assert not torch.equal(weight, base)  # the delta is in
    _check_against_forward(model, *_inputs())


def test_ddp_and_compile_wrappers_are_peeled():
    model = _tiny_qwen3()

    class Holder(torch.nn.Module):  # what DDP looks like from outside: .module
        pass

    wrapped = torch.nn.DataParallel(model)  # same .module peeling as DDP, no process group
    assert hf.unwrap_causal_lm(wrapped) is model
    assert hf.backbone(wrapped) is model.model
    with pytest.raises(TypeError, match="causal LM"):
        hf.unwrap_causal_lm(Holder())
