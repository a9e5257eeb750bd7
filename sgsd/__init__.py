"""SGSD trainer: Skill-Conditioned Gated Self-Distillation (arXiv 2605.28791).

Kept deliberately light: importing ``sgsd`` imports nothing heavy (no torch,
transformers, vLLM, math-verify). Import the submodules you need:

* :mod:`sgsd.train`       -- the training loop: setup, ``train_step``, finish
* :mod:`sgsd.cli`         -- the command line: validation before any heavy import, launcher
* :mod:`sgsd.config`      -- ``TrainConfig``: every option, its default, validation, ``--help``
* :mod:`sgsd.rundir`      -- one run per output directory: fresh / resume / overwrite, run id
* :mod:`sgsd.console`     -- quiet console: known third-party noise filtered (``--verbose``)
* :mod:`sgsd.distributed` -- rank layout from torchrun's environment, seeding
* :mod:`sgsd.model`       -- the policy (+ LoRA): hidden states and LM head, FSDP2 sharding
* :mod:`sgsd.rollout`     -- rollout engines: vLLM in process, or HF ``generate``
* :mod:`sgsd.scoring`     -- rollouts, teacher log-probs, micro-batched forward/backward
* :mod:`sgsd.losses`      -- the loss-strategy interface and the SGSD loss
* :mod:`sgsd.metrics`     -- how loss metrics combine; metrics.jsonl, console, TB / W&B
* :mod:`sgsd.checkpoint`  -- atomic checkpoints, exact resume, graceful stop on a signal
* :mod:`sgsd.skills`      -- skill bank (published SGSD format), BM25 teacher retrieval
* :mod:`sgsd.prompts`     -- student / teacher prompts, token-aligned rendering, format mask
* :mod:`sgsd.verify`      -- math-verify based answer checking with a hard timeout
* :mod:`sgsd.data`        -- problem sets (bundled demo set, local files, HF datasets)
* :mod:`sgsd.tiny_model`  -- tiny offline Qwen3 model + tokenizer for tests and demos
"""

__version__ = "0.1.0"
