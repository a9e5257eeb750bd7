"""A tiny, offline, deterministic Qwen3-architecture model and tokenizer.

(A little over 450 lines on purpose: the tokenizer corpus, the model config, the cache
key and the save/load path of one artefact; the warm start lives in
``sgsd.tiny.warm_start``.)

The trainer and the test-suite need a real causal LM that runs anywhere (CPU, no hub
access). :func:`build_tiny_model` builds one from scratch:

* **Tokenizer** -- a byte-level BPE trained with the ``tokenizers`` library on text this
  project ships (a built-in math/chat corpus plus the bundled demo problems and default
  skill bank), so math text tokenises into sensible pieces. The pre-tokeniser is the
  Qwen2/Qwen3 split regex (digits are split one by one, as in Qwen), followed by the
  GPT-2 byte-level mapping, so any UTF-8 string round-trips. It carries the Qwen3 special
  tokens ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` (special) and ``<think>``,
  ``</think>`` (added but *not* special, exactly as in the real Qwen3 tokenizer, so they
  survive ``decode(..., skip_special_tokens=True)``), and a Qwen3-style chat template that
  honours ``enable_thinking``. ``eos = <|im_end|>``, ``pad = <|endoftext|>``.
* **Model** -- ``Qwen3ForCausalLM`` with random init: hidden 128, 2 layers, 2 query heads
  of head_dim 64 sharing 1 KV head (so grouped-query attention is exercised, as in the
  real Qwen3 models), intermediate 256, untied embeddings (``lm_head`` is its own
  ``[V, H]`` matrix, which is what the fused log-prob kernels consume; the 1.7B Qwen3 ties
  them, which changes nothing for the kernels). head_dim 64 because vLLM's CPU attention
  rejects small head dims (16 fails). ``vocab_size == len(tokenizer)`` exactly.

Everything is a pure function of ``seed`` and the bundled text, so two processes (or two
machines with the same library versions) produce bit-identical weights and token ids.
:func:`save_tiny_model` writes a ``save_pretrained`` directory loadable by
``transformers.AutoModelForCausalLM`` / ``AutoTokenizer`` and by ``vllm.LLM``;
:func:`default_tiny_model_dir` is the cache location used by the trainer.

``warm_start=True`` (:func:`build_tiny_model`, :func:`save_tiny_model`) gives the model
after a short supervised warm start on the demo set's train split
(:mod:`sgsd.tiny.warm_start`), which is right sometimes; that is what ``--model tiny``
means to the trainer and to ``sgsd.evaluate``. It is trained once and cached.

CLI: ``python -m sgsd.tiny.model OUT_DIR [--seed N] [--warm-start]`` (``OUT_DIR`` defaults
to the cache).

(Slightly over the usual file size: tokenizer, template, model and cache belong together.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

log = logging.getLogger("sgsd.tiny.model")  # also under `python -m sgsd.tiny.model`

if TYPE_CHECKING:  # heavy imports stay lazy: `import sgsd.tiny.model` must be cheap
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "TINY_MODEL_CONFIG",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "default_tiny_model_dir",
    "save_tiny_model",
    "tiny_model_fingerprint",
]

# Bump when anything that changes the produced files changes (template, corpus layout,
# config keys...). It is part of the fingerprint, hence of the cache directory name.
_FORMAT_VERSION = 1
_MARKER = "sgsd_tiny_model.json"
_ASSETS = Path(__file__).resolve().parent.parent / "assets"

#: Architecture hyper-parameters (everything except ``vocab_size`` and token ids).
TINY_MODEL_CONFIG: dict = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
}

#: Target BPE vocabulary (an upper bound: the trainer stops early when the corpus runs
#: out of pairs seen at least twice).
_BPE_VOCAB_SIZE = 4096

#: Special tokens, in id order right after the byte alphabet... see _train_tokenizer.
#: ``True`` = special (skipped by ``skip_special_tokens``), as in Qwen3's tokenizer.
SPECIAL_TOKENS: dict[str, bool] = {
    "<|endoftext|>": True,
    "<|im_start|>": True,
    "<|im_end|>": True,
    "<think>": False,
    "</think>": False,
}

# The Qwen2/Qwen3 pre-tokenisation regex: contractions, letter runs (with one leading
# non-letter), single digits, punctuation runs, newlines, whitespace.
_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: Qwen3-style chat template (the official one minus tool calling). ``enable_thinking``
#: false -> the generation prompt ends with an empty ``<think>\n\n</think>\n\n`` block;
#: true/undefined -> it ends at ``<|im_start|>assistant\n`` and the model opens
#: ``<think>`` itself. Past assistant turns have their reasoning stripped (as Qwen3 does);
#: the final assistant turn keeps it.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- set content = m.content if m.content is string else '' -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set reasoning = '' -%}"
    "{%- if m.reasoning_content is string -%}{%- set reasoning = m.reasoning_content -%}"
    "{%- elif '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1]"
    ".lstrip('\\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{%- if loop.index0 > ns.last_user and (loop.last or reasoning) -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

# Built-in corpus: chat/prompt boilerplate, LaTeX that competition math uses, and short
# worked solutions. Together with the bundled assets it gives the BPE enough repeated
# structure to learn useful merges (``\frac``, ``\boxed``, `` the``...).
_BUILTIN_CORPUS = r"""
<|im_start|>system
You are a helpful assistant.<|im_end|>
<|im_start|>user
Solve the following math problem. Please reason step by step, and put your final answer within \boxed{}.<|im_end|>
<|im_start|>assistant
<think>
Let me think about this step by step. First, I need to understand what the problem asks.
</think>

We compute the answer step by step. Therefore, the final answer is $\boxed{42}$.<|im_end|>
Let $x$ be a real number such that $x^2 - 5x + 6 = 0$. Then $(x-2)(x-3) = 0$, so $x = 2$ or $x = 3$.
The sum of the roots is $\frac{5}{1} = 5$ and the product is $6$. The answer is $\boxed{5}$.
Find the number of positive integers $n \le 100$ such that $n$ is divisible by $3$ or $5$.
By inclusion-exclusion, $\left\lfloor \frac{100}{3} \right\rfloor + \left\lfloor \frac{100}{5}
\right\rfloor - \left\lfloor \frac{100}{15} \right\rfloor = 33 + 20 - 6 = 47$.
In triangle $ABC$, $AB = 3$, $BC = 4$ and $\angle ABC = 90^\circ$, so $AC = \sqrt{3^2 + 4^2} = 5$.
The area of a circle of radius $r$ is $\pi r^2$; its circumference is $2\pi r$.
Compute $\sum_{k=1}^{n} k = \frac{n(n+1)}{2}$ and $\prod_{k=1}^{n} k = n!$.
The number of ways to choose $k$ objects from $n$ is $\binom{n}{k} = \frac{n!}{k!(n-k)!}$.
We have $a \equiv b \pmod{m}$ if and only if $m \mid a - b$; $\gcd(a, b) \cdot \operatorname{lcm}(a, b) = ab$.
Since $\sin^2 \theta + \cos^2 \theta = 1$ and $\tan \theta = \frac{\sin \theta}{\cos \theta}$,
we get $\log_2 8 = 3$, $\sqrt[3]{27} = 3$, $e^{i\pi} + 1 = 0$, $|z|^2 = z \bar{z}$.
If $f(x) = 2x + 1$ then $f(f(x)) = 4x + 3$. For all $x \in \mathbb{R}$, $x^2 \geq 0$.
The probability is $\frac{m}{n}$ where $m$ and $n$ are relatively prime positive integers. Find $m + n$.
Hence $\cdot$ $\times$ $\div$ $\pm$ $\neq$ $\leq$ $\ge$ $\infty$ $\alpha$ $\beta$ $\gamma$ $\triangle$.
Check the answer: substitute back, verify each case, and make sure no case is missing.
Therefore, the answer is \boxed{\frac{14}{3}}. So the final answer is \boxed{(3, \frac{\pi}{2})}.
"""


def _asset_text() -> str:
    """Text of the bundled assets used as tokenizer training data ('' if absent)."""
    parts = []
    for name in ("demo_problems.jsonl", "default_skill_bank.json"):
        f = _ASSETS / name
        if not f.is_file():
            continue
        raw = f.read_text(encoding="utf-8")
        # Train on the human-readable strings, not JSON syntax/escapes.
        if name.endswith(".jsonl"):
            for line in raw.splitlines():
                if line.strip():
                    row = json.loads(line)
                    parts.extend(str(v) for v in row.values() if isinstance(v, str))
        else:
            parts.extend(_strings_in(json.loads(raw)))
    return "\n".join(parts)


def _strings_in(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings_in(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings_in(v)]
    return []


@lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    text = _BUILTIN_CORPUS + "\n" + _asset_text()
    # One training "document" per line keeps the BPE input deterministic and small.
    return tuple(line for line in text.splitlines() if line.strip())


def tiny_model_fingerprint(seed: int = 0, *, warm_start: bool = False) -> str:
    """Hex digest identifying the files :func:`save_tiny_model` would write for ``seed``.

    Covers the seed, architecture, template, tokenizer corpus, the warm-start settings and
    the text of its examples (student and teacher prompts, solutions) when ``warm_start``,
    and the versions
    of the libraries whose behaviour determines the bytes (init and BPE training are only
    guaranteed reproducible within one version).
    """
    from importlib.metadata import version  # no heavy imports just to name a cache dir

    h = hashlib.sha256()
    payload = {
        "format": _FORMAT_VERSION,
        "seed": int(seed),
        "config": TINY_MODEL_CONFIG,
        "bpe_vocab": _BPE_VOCAB_SIZE,
        "special": SPECIAL_TOKENS,
        "template": CHAT_TEMPLATE,
        "regex": _SPLIT_REGEX,
        "versions": [version("torch"), version("transformers"), version("tokenizers")],
    }
    if warm_start:
        from sgsd.tiny.warm_start import WARM_START, data_digest

        payload["warm_start"] = WARM_START
        payload["warm_start_data"] = data_digest()
    h.update(json.dumps(payload, sort_keys=True).encode())
    for line in _corpus():
        h.update(line.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def _train_tokenizer():
    """Train the byte-level BPE (a ``tokenizers.Tokenizer``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # Special tokens are *not* given to the trainer: they are appended after the learned
    # vocabulary, as in Qwen (ids at the end), via add_tokens/add_special_tokens below.
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(list(_corpus()), trainer=trainer)
    return tok


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Build the tiny model's tokenizer (deterministic; no files read besides assets)."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    tok = _train_tokenizer()
    for content, special in SPECIAL_TOKENS.items():
        added = AddedToken(
            content,
            special=special,
            normalized=False,
            single_word=False,
            lstrip=False,
            rstrip=False,
        )
        if special:
            tok.add_special_tokens([added])
        else:
            tok.add_tokens([added])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        # Listed so that `all_special_ids` covers the chat markers (Qwen3 lists them too).
        additional_special_tokens=[t for t, special in SPECIAL_TOKENS.items() if special],
        clean_up_tokenization_spaces=False,
        model_max_length=TINY_MODEL_CONFIG["max_position_embeddings"],
        chat_template=CHAT_TEMPLATE,
    )
    hf.padding_side = "left"  # decoder-only batching convention
    return hf


def build_tiny_model(
    seed: int = 0, *, warm_start: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Build ``(model, tokenizer)``: a random-init Qwen3 causal LM and its tokenizer.

    Deterministic in ``seed`` and does not disturb the caller's global RNG state. The
    model is float32 in eval mode; ``model.config.vocab_size == len(tokenizer)``.

    ``warm_start=True``: the model after :func:`sgsd.tiny.warm_start.warm_start` (right
    sometimes on the demo set), loaded from the on-disk cache
    (:func:`default_tiny_model_dir`), which is filled on first use.
    """
    if warm_start:
        from transformers import AutoModelForCausalLM

        path = save_tiny_model(default_tiny_model_dir(seed, warm_start=True), seed, warm_start=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
        model.eval()
        return model, build_tiny_tokenizer()
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_tiny_tokenizer()
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    cfg = dict(TINY_MODEL_CONFIG)
    rope_theta = cfg.pop("rope_theta")
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        bos_token_id=pad_id,  # Qwen3 uses <|endoftext|> as bos id (never prepended)
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
        **cfg,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.eval()
    # Stop on either end marker, as Qwen3-Instruct's generation_config does.
    model.generation_config = GenerationConfig(
        bos_token_id=pad_id, eos_token_id=[eos_id, pad_id], pad_token_id=pad_id
    )
    return model, tokenizer


def default_tiny_model_dir(seed: int = 0, *, warm_start: bool = False) -> Path:
    """Cache directory for the tiny model: ``$SGSD_CACHE`` (or ``$XDG_CACHE_HOME/sgsd``,
    or ``~/.cache/sgsd``) ``/tiny-qwen3-<fingerprint[:16]>``."""
    root = os.environ.get("SGSD_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
        root = os.path.join(xdg, "sgsd")
    return Path(root) / f"tiny-qwen3-{tiny_model_fingerprint(seed, warm_start=warm_start)[:16]}"


def _is_complete(path: Path, fingerprint: str) -> bool:
    marker = path / _MARKER
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return meta.get("fingerprint") == fingerprint and all(
        (path / f).is_file() for f in meta.get("files", [])
    )


def _portable_tokenizer_config(path: Path) -> None:
    """transformers 5 writes ``tokenizer_class: TokenizersBackend``, a name transformers 4
    cannot resolve; ``PreTrainedTokenizerFast`` loads the same tokenizer.json in both."""
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def save_tiny_model(
    path: str | os.PathLike | None = None, seed: int = 0, *, warm_start: bool = False
) -> Path:
    """Write the tiny model + tokenizer to ``path`` (default: :func:`default_tiny_model_dir`)
    with ``save_pretrained`` and return the path. ``warm_start``: the warm-started model
    (:mod:`sgsd.tiny.warm_start`; trained once, then copied from the default cache dir).

    Idempotent and safe under concurrency (e.g. every torchrun rank calling it): if a
    complete copy with the same fingerprint is already there it is reused; otherwise the
    files are written to a temporary sibling directory and moved into place, so a reader
    never sees a half-written model. An existing directory that is not a tiny-model copy
    and not empty is never overwritten (``FileExistsError``).
    """
    path = Path(path) if path is not None else default_tiny_model_dir(seed, warm_start=warm_start)
    fingerprint = tiny_model_fingerprint(seed, warm_start=warm_start)
    if _is_complete(path, fingerprint):
        return path
    if path.exists() and not (path / _MARKER).is_file() and any(path.iterdir()):
        raise FileExistsError(
            f"{path} exists, is not empty and is not a tiny-model directory; refusing to "
            "overwrite it"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    cache = default_tiny_model_dir(seed, warm_start=True)
    if warm_start and path != cache and _is_complete(cache, fingerprint):
        model, tokenizer = build_tiny_model(seed, warm_start=True)  # from the cache
    else:
        log.info("building the tiny model into %s (once: it is cached)", path)
        model, tokenizer = build_tiny_model(seed)
        if warm_start:
            from sgsd.tiny.warm_start import warm_start as _warm_start

            _warm_start(model, tokenizer, seed=seed)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; a cache dir should not be
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _portable_tokenizer_config(tmp)
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        meta = {
            "fingerprint": fingerprint,
            "seed": int(seed),
            "warm_start": bool(warm_start),
            "files": files,
        }
        (tmp / _MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        if path.exists():  # stale copy (other seed/version) or empty dir: replace it
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, path)
        except OSError:
            # Another process finished first; accept its copy if it is the same model.
            if not _is_complete(path, fingerprint):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m sgsd.tiny.model",
        description="Write the tiny offline Qwen3 model + tokenizer (save_pretrained format).",
    )
    ap.add_argument(
        "out_dir",
        nargs="?",
        default=None,
        help="output directory (default: the cache dir, see default_tiny_model_dir)",
    )
    ap.add_argument("--seed", type=int, default=0, help="init seed (default 0)")
    ap.add_argument(
        "--warm-start",
        action="store_true",
        help="the supervised warm start on the demo train split (sgsd.tiny.warm_start)",
    )
    args = ap.parse_args(argv)
    from sgsd import console

    console.configure_logging(0, verbose=False)
    out = save_tiny_model(args.out_dir, seed=args.seed, warm_start=args.warm_start)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
