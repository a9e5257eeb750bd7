"""The tiny offline Qwen3 model: determinism, tokenizer, chat template, save/load, vLLM."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sgsd.tiny.model import (  # noqa: E402 (after the importorskips)
    SPECIAL_TOKENS,
    TINY_MODEL_CONFIG,
    build_tiny_model,
    default_tiny_model_dir,
    save_tiny_model,
    tiny_model_fingerprint,
)


def _weights_digest(model) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_architecture_and_vocab(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    cfg = model.config
    assert cfg.model_type == "qwen3"
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert cfg.head_dim >= 64  # vLLM's CPU attention rejects small head dims
    assert cfg.head_dim == TINY_MODEL_CONFIG["head_dim"]
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert cfg.vocab_size == len(tok)
    assert model.get_output_embeddings().weight.shape == (len(tok), cfg.hidden_size)
    assert 256 < len(tok) <= 8192  # byte alphabet + merges + specials; "a few thousand"
    assert not model.training


def test_special_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    vocab = tok.get_vocab()
    for content in SPECIAL_TOKENS:
        assert content in vocab, content
        # Each marker is one token, never split by the BPE.
        assert tok.encode(content, add_special_tokens=False) == [vocab[content]]
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|endoftext|>"
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>"} <= set(tok.all_special_tokens)
    # As in Qwen3: <think> is an added but non-special token, kept by skip_special_tokens.
    ids = tok.encode("<|im_start|><think>x</think><|im_end|>", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == "<think>x</think>"


@pytest.mark.parametrize(
    "text",
    [
        "Compute $\\frac{1}{2} + 3^{10}$ and put it in \\boxed{}.",
        "  leading spaces, tabs\tand\n\nnewlines\r\n",
        "Unicode: αβγ ∑ √2 ≤ π — 日本語 😀",
        "",
        "12345678901234567890",
    ],
)
def test_tokenizer_round_trips(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert tiny_tokenizer.decode(ids) == text


def test_digits_are_single_tokens(tiny_tokenizer):
    # Qwen-style pre-tokenisation splits numbers digit by digit.
    ids = tiny_tokenizer.encode("2025", add_special_tokens=False)
    assert tiny_tokenizer.convert_ids_to_tokens(ids) == ["2", "0", "2", "5"]


def test_math_text_gets_merged_tokens(tiny_tokenizer):
    # Trained on math text: \frac and \boxed are not spelled byte by byte.
    for piece in ("\\frac", "\\boxed"):
        n = len(tiny_tokenizer.encode(piece, add_special_tokens=False))
        assert n <= 3, (piece, n)


def test_chat_template_thinking_modes(tiny_tokenizer):
    msgs = [{"role": "user", "content": "Hi"}]
    off = tiny_tokenizer.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    on = tiny_tokenizer.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert on == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert off == on + "<think>\n\n</think>\n\n"
    # A finished conversation: the last assistant turn keeps its reasoning block.
    full = tiny_tokenizer.apply_chat_template(
        msgs + [{"role": "assistant", "content": "<think>\nhmm\n</think>\n\nHello"}],
        tokenize=False,
    )
    assert full.endswith("<|im_start|>assistant\n<think>\nhmm\n</think>\n\nHello<|im_end|>\n")


def test_build_is_deterministic_and_seeded():
    torch.manual_seed(1234)
    before = torch.rand(1)
    m0, t0 = build_tiny_model(seed=0)
    torch.manual_seed(1234)
    assert torch.equal(torch.rand(1), before)  # caller's RNG untouched (fork_rng)
    m0b, t0b = build_tiny_model(seed=0)
    m1, _ = build_tiny_model(seed=1)
    assert _weights_digest(m0) == _weights_digest(m0b)
    assert _weights_digest(m0) != _weights_digest(m1)
    assert t0.backend_tokenizer.to_str() == t0b.backend_tokenizer.to_str()
    assert tiny_model_fingerprint(0) == tiny_model_fingerprint(0) != tiny_model_fingerprint(1)


def test_forward_and_generate(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "1+1?"}], tokenize=False, add_generation_prompt=True
    )
    enc = tok(ids, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()
    out = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]


def test_save_load_round_trip(tiny_model_dir, tiny_model_and_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = tiny_model_and_tokenizer
    loaded = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ltok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert _weights_digest(loaded) == _weights_digest(model)
    text = "Find $x$ if $2x+3=7$. \\boxed{2}"
    assert ltok.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert ltok.eos_token == "<|im_end|>" and ltok.pad_token == "<|endoftext|>"
    msgs = [{"role": "user", "content": "q"}]
    assert ltok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False
    ) == tok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert ltok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]


def test_save_is_idempotent_and_refuses_foreign_dirs(tiny_model_dir, tmp_path):
    stamp = {p.name: p.stat().st_mtime_ns for p in tiny_model_dir.iterdir()}
    assert save_tiny_model(tiny_model_dir, seed=0) == tiny_model_dir
    assert {p.name: p.stat().st_mtime_ns for p in tiny_model_dir.iterdir()} == stamp
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a tiny-model directory"):
        save_tiny_model(foreign)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_stale_copy_is_replaced(tmp_path):
    out = save_tiny_model(tmp_path / "m", seed=1)
    marker = json.loads((out / "sgsd_tiny_model.json").read_text())
    assert marker["seed"] == 1
    # Same directory asked for another seed: rewritten, not silently reused.
    save_tiny_model(out, seed=2)
    assert json.loads((out / "sgsd_tiny_model.json").read_text())["seed"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_default_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SGSD_CACHE", str(tmp_path))
    d = default_tiny_model_dir()
    assert d.parent == tmp_path
    assert d.name == f"tiny-qwen3-{tiny_model_fingerprint(0)[:16]}"


def test_cli_writes_model(tmp_path):
    out = tmp_path / "cli"
    res = subprocess.run(
        [sys.executable, "-m", "sgsd.tiny.model", str(out), "--seed", "0"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == str(out)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


_VLLM_SCRIPT = textwrap.dedent(
    """
    import json, sys
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        path, prompt_ids = sys.argv[1], json.loads(sys.argv[2])
        # enforce_eager: skip torch.compile / graph capture (halves CPU start-up time).
        llm = LLM(model=path, gpu_memory_utilization=0.2, max_model_len=512, seed=0,
                  dtype="float32", enforce_eager=True)
        out = llm.generate([{"prompt_token_ids": prompt_ids}],
                           SamplingParams(max_tokens=8, temperature=1.0, seed=1, logprobs=0))
        comp = list(out[0].outputs[0].token_ids)
        sampled = [lp[t].logprob for lp, t in zip(out[0].outputs[0].logprobs, comp)]
        scored = llm.generate([{"prompt_token_ids": prompt_ids + comp}],
                              SamplingParams(max_tokens=1, prompt_logprobs=0))
        plp = scored[0].prompt_logprobs[len(prompt_ids):]
        teacher = [d[t].logprob for d, t in zip(plp, comp)]
        print("RESULT " + json.dumps({"completion": comp, "sampled": sampled,
                                      "teacher": teacher}))
    """
)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed")
def test_vllm_loads_generates_and_matches_hf(tiny_model_dir, tiny_model_and_tokenizer, tmp_path):
    """vLLM (CPU) loads the saved model, samples, and its log-probs equal HF's."""
    model, tok = tiny_model_and_tokenizer
    from sgsd.prompts import render_prompt_ids, student_messages

    prompt_ids = render_prompt_ids(tok, student_messages("What is $2+3$?"))
    script = tmp_path / "vllm_check.py"
    script.write_text(_VLLM_SCRIPT)
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false")
    res = subprocess.run(
        [sys.executable, str(script), str(tiny_model_dir), json.dumps(prompt_ids)],
        capture_output=True,
        text=True,
        timeout=500,
        env=env,
        check=False,
    )
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert res.returncode == 0 and lines, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT ") :])
    comp = out["completion"]
    assert 1 <= len(comp) <= 8 and all(0 <= t < len(tok) for t in comp)
    # HF log-probs of the same tokens: vLLM's rollout and HF's scoring agree.
    ids = torch.tensor([prompt_ids + comp])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    start = len(prompt_ids)
    hf = [logp[start - 1 + i, t].item() for i, t in enumerate(comp)]
    assert out["teacher"] == pytest.approx(hf, abs=2e-3)
    assert out["sampled"] == pytest.approx(hf, abs=2e-3)
