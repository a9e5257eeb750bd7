"""The log-prob step of a TRL GRPO step, with and without sgsd_kernels' integration.

TRL 1.16's GRPOTrainer computes per-token log-probs and entropies through its own chunked
PyTorch LM head (``add_fused_lm_head``); ``LinearLogprobsGRPOTrainer`` computes them with
``sgsd_kernels.linear_logprobs`` from the last hidden states. This script builds both
trainers around copies of one random Qwen3-shaped model (no downloads), then times
``_get_per_token_logps_and_entropies(..., compute_entropy=True)`` plus the backward of the
mean completion log-prob -- what a GRPO training step spends on log-probs -- interleaved
in one process (the order alternates each repeat), and reports medians and the peak memory
above the inputs (CPU: the process's RSS high-water mark, reset before each measurement,
with MALLOC_MMAP_THRESHOLD_=65536 so that RSS follows freed tensors; CUDA:
max_memory_allocated). Writes ``trl_logprobs.csv`` and ``trl_logprobs.md`` to --out.

    python benchmarks/bench_trl_logprobs.py --out benchmarks/results/cpu-trl-20261207
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PRESETS = {
    # a small Qwen-like head on CPU: V = 32768, H = 256, B = 8 rollouts of 64 + 192 tokens
    "cpu": dict(vocab=32768, hidden=256, layers=2, batch=8, prompt=64, completion=192),
    # Qwen3-1.7B's head and a GRPO group of 8 rollouts of 1024 completion tokens (CUDA)
    "qwen3-1.7b-head": dict(
        vocab=151936, hidden=2048, layers=2, batch=8, prompt=256, completion=1024
    ),
}


def _model(p: dict):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(
        vocab_size=p["vocab"],
        hidden_size=p["hidden"],
        intermediate_size=2 * p["hidden"],
        num_hidden_layers=p["layers"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=p["hidden"] // 4,
        max_position_embeddings=p["prompt"] + p["completion"],
        tie_word_embeddings=False,
    )
    return transformers.Qwen3ForCausalLM(cfg).train()


def _trainer(cls, model, tok, out_dir: str):
    from datasets import Dataset
    from trl import GRPOConfig

    args = GRPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=8,
        num_generations=8,
        beta=0.0,
        report_to="none",
        use_cpu=not _cuda(),
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
    )
    return cls(
        model=model,
        reward_funcs=lambda completions, **_: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["1+1="] * 8}),
        processing_class=tok,
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    opts = parser.parse_args()
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # glibc reads it at start: re-exec
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    sys.path.insert(0, str(HERE))
    import torch
    from trl import GRPOTrainer

    from sgsd.tiny.model import build_tiny_tokenizer
    from sgsd_bench.env import run_meta
    from sgsd_bench.measure import MemMeter
    from sgsd_kernels.integrations.trl import LinearLogprobsGRPOTrainer
    from sgsd_kernels.runtime import resolve_backend

    p = PRESETS[opts.preset]
    device = torch.device("cuda" if _cuda() else "cpu")
    base = _model(p)
    tok = build_tiny_tokenizer()
    tmp = tempfile.mkdtemp()
    providers = {
        "trl (chunked torch head)": _trainer(GRPOTrainer, copy.deepcopy(base), tok, tmp),
        "sgsd-kernels linear_logprobs": _trainer(
            LinearLogprobsGRPOTrainer, copy.deepcopy(base), tok, tmp
        ),
    }
    del base
    g = torch.Generator().manual_seed(1)
    T = p["prompt"] + p["completion"]
    ids = torch.randint(0, p["vocab"], (p["batch"], T), generator=g).to(device)
    mask = torch.ones_like(ids)
    for row in range(1, p["batch"], 2):  # half the rollouts end early (right padding)
        mask[row, T - p["completion"] // 2 :] = 0
    k = p["completion"]

    def step(trainer):
        trainer.model.zero_grad(set_to_none=True)
        lp, ent, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, mask, k, compute_entropy=True
        )
        (-(lp * mask[:, -k:]).sum() / mask[:, -k:].sum()).backward()
        return lp.detach(), ent.detach()

    results = {name: step(t) for name, t in providers.items()}  # warm-up and check
    (lp_a, ent_a), (lp_b, ent_b) = results.values()
    check = {
        "max |Δ log-prob|": (lp_a - lp_b).abs().max().item(),
        "max |Δ entropy|": (ent_a - ent_b).abs().max().item(),
    }
    del results, lp_a, lp_b, ent_a, ent_b
    meter = MemMeter(device)
    times = {name: [] for name in providers}
    peaks = {name: [] for name in providers}
    names = list(providers)
    for r in range(opts.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            trainer = providers[name]
            trainer.model.zero_grad(set_to_none=True)
            gc.collect()
            meter.start()
            t0 = time.perf_counter()
            step(trainer)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
            peaks[name].append(meter.peak())

    meta = run_meta(opts.preset, str(device), "float32")
    meta["timestamp"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    import trl

    meta["trl"] = trl.__version__
    meta["backend"] = resolve_backend("auto", device)
    if device.type == "cpu":
        meta["mem_method"] = (
            "process RSS high-water mark via /proc/self/clear_refs, reset before each "
            "measurement, MALLOC_MMAP_THRESHOLD_=65536"
        )
    opts.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        rows.append(
            {
                "provider": name,
                "median_ms": round(1e3 * statistics.median(times[name]), 1),
                "min_ms": round(1e3 * min(times[name]), 1),
                "peak_mib": round(statistics.median(peaks[name]) / 2**20, 1),
                "repeats": opts.repeats,
            }
        )
    with open(opts.out / "trl_logprobs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    shape = (
        f"B = {p['batch']}, T = {T} ({k} completion tokens, half the rows padded after "
        f"{k // 2}), V = {p['vocab']}, H = {p['hidden']}, {p['layers']} layers, fp32"
    )
    lines = [
        f"# TRL GRPO log-prob step ({opts.preset})",
        "",
        "`_get_per_token_logps_and_entropies(..., compute_entropy=True)` + backward of the "
        "mean completion log-prob; medians of interleaved repeats in one process.",
        "",
        f"{shape}. {meta['device']}, torch {meta['torch']}, TRL {meta['trl']}, "
        f"sgsd-kernels backend auto = {meta['backend']}, "
        f"{meta['version']}, {meta['timestamp']}. Memory: {meta['mem_method']}.",
        "",
        "| provider | median ms | min ms | peak MiB above inputs |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['provider']} | {row['median_ms']} | {row['min_ms']} | {row['peak_mib']} |"
        )
    a, b = rows
    lines += [
        "",
        f"sgsd-kernels / TRL: time {b['median_ms'] / a['median_ms']:.2f}×, peak memory "
        f"{b['peak_mib'] / max(a['peak_mib'], 1e-9):.2f}×. Agreement: "
        + ", ".join(f"{k} = {v:.2e}" for k, v in check.items())
        + ".",
        "",
        f"Command: `python benchmarks/bench_trl_logprobs.py --preset {opts.preset} "
        f"--repeats {opts.repeats} --out {opts.out}`",
    ]
    (opts.out / "trl_logprobs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
