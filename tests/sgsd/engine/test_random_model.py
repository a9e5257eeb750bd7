"""``--model random:NAME[:VOCAB]`` (sgsd.engine.model): a random-init Qwen3 of a named shape
built from its config alone, with the tiny tokenizer, loadable by the trainer."""

from __future__ import annotations

import pytest
import torch

from sgsd.config import TrainConfig
from sgsd.engine.model import (
    QWEN3_VOCAB,
    RANDOM_SHAPES,
    load_policy,
    model_source,
    random_model_spec,
)

pytest.importorskip("peft")


def test_spec_parsing():
    assert random_model_spec("tiny") is None
    assert random_model_spec("Qwen/Qwen3-1.7B") is None
    assert random_model_spec("random:qwen3-1.7b") == ("qwen3-1.7b", QWEN3_VOCAB)
    assert random_model_spec("random:cpu:4096") == ("cpu", 4096)
    for bad in ("random:qwen3-99b", "random:cpu:many", "random:"):
        with pytest.raises(ValueError, match="random:NAME"):
            random_model_spec(bad)


def test_qwen3_shapes_are_the_published_configs():
    for name, hidden, inter in (("qwen3-0.6b", 1024, 3072), ("qwen3-1.7b", 2048, 6144)):
        shape = RANDOM_SHAPES[name]
        assert (shape["hidden_size"], shape["intermediate_size"]) == (hidden, inter)
        assert shape["num_hidden_layers"] == 28 and shape["head_dim"] == 128
        assert (shape["num_attention_heads"], shape["num_key_value_heads"]) == (16, 8)


def test_random_cpu_model_loads_as_the_policy(tmp_path, monkeypatch):
    monkeypatch.setenv("SGSD_CACHE", str(tmp_path))
    cfg = TrainConfig(model="random:cpu:2048", lora_r=4, lora_alpha=8)
    source = model_source(cfg)
    assert source.startswith(str(tmp_path)) and model_source(cfg) == source  # cached
    policy, tokenizer, _ = load_policy(cfg, torch.device("cpu"))
    weight, bias = policy.lm_head()
    assert weight.shape == (2048, RANDOM_SHAPES["cpu"]["hidden_size"]) and bias is None
    assert policy.model.config.tie_word_embeddings
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id < 2048
    ids = torch.tensor([[tokenizer.pad_token_id, 7, 2047]])
    assert policy(ids, torch.ones_like(ids)).shape == (1, 3, weight.shape[1])
    with pytest.raises(ValueError, match="VOCAB must be"):
        model_source(TrainConfig(model="random:cpu:64"))
