"""The tiny offline model: a Qwen3-architecture model and tokenizer built from a config
with no download (:mod:`sgsd.tiny.model`), and the short supervised warm start that gives
it a non-trivial success rate on the demo set (:mod:`sgsd.tiny.warm_start`).
"""
