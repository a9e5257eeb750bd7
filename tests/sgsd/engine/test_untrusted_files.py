"""Files a user is handed (docs/threat-model.md): a checkpoint's .pt files load as tensors
and plain data only, a planted pickle payload is refused by name and never runs, RNG
states round-trip exactly (and those of older checkpoints still load); a model that ships
its own code is refused unless --trust-remote-code."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sgsd.cli import preflight
from sgsd.config import ConfigError, load_config
from sgsd.engine.checkpoint import (
    CheckpointError,
    check_loadable,
    load_pt,
    rng_state,
    set_rng_state,
)
from sgsd.engine.model_files import remote_code_classes, remote_code_problem

REPO = Path(__file__).resolve().parents[3]


class _Payload:
    """Unpickling it creates ``path`` (what a malicious checkpoint would do)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_rng_states_round_trip_as_plain_data(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rank0.pt")
    want = _draws()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_pt(tmp_path / "rank0.pt"))
    assert _draws() == want


def test_rng_files_of_older_checkpoints_still_load(tmp_path):
    """Before, the python and numpy states were pickled as tuples (with a numpy array)."""
    (tmp_path / "rng").mkdir()
    random.seed(4), np.random.seed(5), torch.manual_seed(6)
    legacy = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    torch.save(legacy, tmp_path / "rng" / "rank0.pt")
    want = _draws()
    set_rng_state(load_pt(tmp_path / "rng" / "rank0.pt"))
    assert _draws() == want


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng/rank0.pt", "teacher.pt"])
def test_a_planted_pickle_payload_is_refused_and_never_runs(tmp_path, name):
    ck = tmp_path / "step_000002"
    (ck / "rng").mkdir(parents=True)
    torch.save({"state": {}, "param_groups": []}, ck / "optimizer.pt")
    torch.save({"last_epoch": 2}, ck / "scheduler.pt")
    torch.save(rng_state(), ck / "rng" / "rank0.pt")
    torch.save({"w": torch.zeros(2)}, ck / "teacher.pt")
    check_loadable(ck)  # the honest checkpoint loads
    marker = tmp_path / "payload-ran"
    torch.save({"state": {}, "x": _Payload(marker)}, ck / name)
    with pytest.raises(CheckpointError) as info:
        check_loadable(ck)
    message = str(info.value)
    assert message.startswith(f"{name} is refused") and "\n" not in message
    assert "open" in message  # the global it would have called
    assert not marker.exists()


def _remote_code_model(tiny_model_dir: Path, dest: Path) -> Path:
    """The tiny model with an ``auto_map`` whose module would leave a marker if imported."""
    shutil.copytree(tiny_model_dir, dest)
    config = json.loads((dest / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    config["model_type"] = "sgsd-evil"  # no built-in class: only its own code could load it
    (dest / "config.json").write_text(json.dumps(config))
    marker = dest.parent / "remote-code-ran"
    (dest / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import Qwen3Config\n"
        "class EvilConfig(Qwen3Config):\n    model_type = 'sgsd-evil'\n"
    )
    return dest


def test_a_model_that_ships_code_is_refused_before_anything_loads(tiny_model_dir, tmp_path):
    model = _remote_code_model(tiny_model_dir, tmp_path / "model")
    assert remote_code_classes(str(model)) == ["configuration_evil.EvilConfig"]
    assert remote_code_classes(str(tiny_model_dir)) == []
    assert remote_code_problem(str(model), trusted=True) is None
    cfg = load_config(["--model", str(model), "--output-dir", str(tmp_path / "out")])
    with pytest.raises(ConfigError, match="pass --trust-remote-code if you trust its source"):
        preflight(cfg, 1)
    assert not (tmp_path / "remote-code-ran").exists()


def test_loading_a_model_that_ships_code_never_runs_it(tiny_model_dir, tmp_path):
    """Past the check (e.g. a hub id), transformers itself refuses: trust_remote_code is
    passed as False, and the message names our flag."""
    pytest.importorskip("transformers")
    from sgsd.engine.model import load_policy

    model = _remote_code_model(tiny_model_dir, tmp_path / "model")
    cfg = load_config(["--model", str(model), "--finetune", "full"])
    with pytest.raises(ValueError, match="--trust-remote-code"):
        load_policy(cfg, torch.device("cpu"))
    assert not (tmp_path / "remote-code-ran").exists()


@pytest.mark.parametrize("command", ["sgsd.evaluate", "sgsd.build_skill_bank"])
def test_every_cli_refuses_remote_code_in_one_line(tiny_model_dir, tmp_path, command):
    model = _remote_code_model(tiny_model_dir, tmp_path / "model")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            command,
            "--model",
            str(model),
            "--dataset" if "bank" in command else "--datasets",
            "demo",
            "--output",
            str(tmp_path / "o"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--trust-remote-code" in lines[0], res.stderr[-2000:]
    assert not (tmp_path / "remote-code-ran").exists()
