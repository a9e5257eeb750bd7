"""SGSD trainer: Skill-Conditioned Gated Self-Distillation (arXiv 2605.28791).

Kept deliberately light: importing ``sgsd`` imports nothing heavy (no torch,
transformers, vLLM, math-verify). Import the submodules you need:

* :mod:`sgsd.skills`     -- skill bank (published SGSD format), BM25 teacher retrieval
* :mod:`sgsd.prompts`    -- student / teacher prompts, token-aligned rendering, format mask
* :mod:`sgsd.verify`     -- math-verify based answer checking with a hard timeout
* :mod:`sgsd.data`       -- problem sets (bundled demo set, local files, HF datasets)
* :mod:`sgsd.tiny_model` -- tiny offline Qwen3 model + tokenizer for tests and demos
"""

__version__ = "0.1.0"
