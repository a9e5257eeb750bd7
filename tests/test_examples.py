"""The scripts in examples/ run as written (shortened by their own options) on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

CASES = [
    ("hf_logprobs.py", [], "unpatched: the model returns logits again"),
    ("distill.py", ["--steps", "4"], "step 3: β-JSD"),
    ("trl_grpo.py", ["--steps", "1"], "step 1: loss"),
]


@pytest.mark.parametrize(("script", "args", "expect"), CASES, ids=[c[0] for c in CASES])
def test_example_runs(script, args, expect):
    needs = {"distill.py": "trl", "trl_grpo.py": "trl"}.get(script)
    if needs:
        pytest.importorskip(needs)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    res = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    assert expect in res.stdout, res.stdout[-2000:]
