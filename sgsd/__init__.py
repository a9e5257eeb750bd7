"""SGSD trainer: Skill-Conditioned Gated Self-Distillation (arXiv 2605.28791).

Kept deliberately light: importing ``sgsd`` imports nothing heavy (no torch,
transformers, vLLM, math-verify). Import the parts you need; the map (docs/design.md,
"Architecture"):

* :mod:`sgsd.train`     -- the training loop: setup, ``train_step``, finish
* :mod:`sgsd.cli`       -- the command line: validation before any heavy import, launcher
* :mod:`sgsd.config`    -- ``TrainConfig``: every option, its default, validation, ``--help``
* :mod:`sgsd.prompts`   -- student / teacher / skill-bank prompts, token-aligned rendering
* :mod:`sgsd.data`      -- problem sets (bundled demo set, local files, HF datasets)
* :mod:`sgsd.metrics`   -- how loss metrics combine; metrics.jsonl, console, TB / W&B
* :mod:`sgsd.console`   -- quiet console: known third-party noise filtered (``--verbose``)
* :mod:`sgsd.methods`   -- training methods (SGSD, GRPO, OPSD, local support) and the registry
* :mod:`sgsd.skills`    -- the skill bank: format, BM25, extraction, merge, online update,
  cold start
* :mod:`sgsd.eval`      -- the verifier, evaluation metrics, the evaluator
* :mod:`sgsd.engine`    -- what the loop drives: model, rollouts, scoring, teacher weights,
  checkpoints, run directories, process setup
* :mod:`sgsd.tiny`      -- the tiny offline model and its warm start

Entry points: ``python -m sgsd.train`` (also ``python sgsd/train.py``, ``torchrun``,
``sgsd-train``), ``python -m sgsd.evaluate``, ``python -m sgsd.build_skill_bank``.
"""

__version__ = "0.1.0"
