"""Two GRPO steps of TRL's GRPOTrainer whose per-token log-probs come from
``sgsd_kernels.linear_logprobs`` (``LinearLogprobsGRPOTrainer``), on CPU, offline.

The model is the project's tiny random Qwen3 with its tokenizer (``sgsd.tiny``), saved to
a temporary directory (TRL builds the reference model from a path); the reward is a rule.

    python examples/trl_grpo.py [--steps 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def variety(completions, **_):
    """Rule-based reward: the fraction of distinct characters in the completion."""
    return [len(set(c)) / max(len(c), 1) for c in completions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    steps = parser.parse_args().steps

    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig

    from sgsd.tiny.model import save_tiny_model
    from sgsd_kernels.integrations.trl import LinearLogprobsGRPOTrainer

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(save_tiny_model(os.path.join(tmp, "tiny")))
        args = GRPOConfig(
            output_dir=os.path.join(tmp, "out"),
            per_device_train_batch_size=4,
            num_generations=4,
            max_completion_length=16,
            max_steps=steps,
            learning_rate=1e-4,
            beta=0.04,
            logging_steps=1,
            report_to="none",
            use_cpu=True,
            bf16=False,
            save_strategy="no",
            disable_tqdm=True,
        )
        trainer = LinearLogprobsGRPOTrainer(
            model=model_dir,
            reward_funcs=variety,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": ["1+1=", "2+3=", "7*6=", "9-4="] * 4}),
            processing_class=AutoTokenizer.from_pretrained(model_dir),
        )
        trainer.train()
        for entry in trainer.state.log_history:
            if "loss" in entry:
                print(
                    f"step {entry['step']}: loss {entry['loss']:.4f}, "
                    f"reward {entry['reward']:.3f}, entropy {entry['entropy']:.3f}"
                )


if __name__ == "__main__":
    main()
