"""The benchmark behind ``benchmarks/bench_gated_kd.py``, one concern per module.

- :mod:`.presets`   shapes (``Preset``, ``Case``) and the workload constants
- :mod:`.inputs`    deterministic inputs for one row
- :mod:`.providers` the provider registry: adding a provider is one entry there
- :mod:`.measure`   the float64 check, peak memory, timing and the GEMM yardstick
- :mod:`.worker`    one subprocess per shape and the orchestration around it
- :mod:`.env`       what a run records about where it ran
- :mod:`.report`    rows, the markdown table and the CSV
- :mod:`.plots`     time and memory against N and K
"""
