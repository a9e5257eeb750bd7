"""The trainer's command line end to end, as a user runs it: torchrun with 2 ranks, the
``sgsd-train`` launcher, ``python -m sgsd.train``; real tiny model, tokenizer, HF
rollouts, math-verify and BM25 bank. One 2-step 2-rank run is shared by the tests that
need a finished run."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sgsd.config import load_config, user_options
from sgsd.console import NoiseFilter
from sgsd.engine.rundir import plan_run

REPO = Path(__file__).resolve().parents[2]
FAST = [
    "--rollout-backend",
    "hf",
    "--max-completion-tokens",
    "8",
    "--problems-per-step",
    "2",
    "--rollouts-per-problem",
    "2",
    "--num-teachers",
    "2",
    "--micro-batch-size",
    "2",
    "--progress-bar",
    "false",
]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
LAUNCH = [sys.executable, "-c", "from sgsd.cli import launch; raise SystemExit(launch())"]
MODULE = [sys.executable, "-m", "sgsd.train"]


def _env() -> dict:
    # OMP_NUM_THREADS: what torchrun sets anyway; set here, torchrun prints no banner
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run(cmd: list[str], *, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, f"{res.args}:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """``torchrun --nproc_per_node=2 --module sgsd.train``: 2 steps, a checkpoint each."""
    out = tmp_path_factory.mktemp("cli") / "run"
    res = ok(
        run(
            [
                *TORCHRUN,
                "--nproc_per_node=2",
                "--module",
                "sgsd.train",
                *FAST,
                "--max-steps",
                "2",
                "--checkpoint-every",
                "1",
                "--output-dir",
                str(out),
            ]
        )
    )
    assert res.stdout.count("step     2 |") == 1  # rank 0 alone prints
    return out


def test_copied_run_directory_refuses_a_fresh_start_then_overwrite_replaces_it(
    finished_run, tmp_path
):
    """The copied-directory scenario: a fresh start into a copy of a finished run refuses
    and changes nothing; --overwrite (2 ranks, through the launcher) leaves nothing of the
    old run; a bare --resume then continues the new run, not the old one."""
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    old_id = metrics(copy)[0]["run_id"]
    before = snapshot(copy)

    res = run([*MODULE, *FAST, "--max-steps", "1", "--output-dir", str(copy)])
    assert res.returncode == 2 and res.stdout == ""
    (line,) = res.stderr.splitlines()
    assert line.startswith(f"sgsd-train: error: --output-dir {copy} holds another run")
    assert "checkpoints of steps 1, 2" in line and "--resume" in line and "--overwrite" in line
    assert snapshot(copy) == before

    ok(run([*LAUNCH, "--nproc-per-node", "2", *FAST, "--max-steps", "1", "--overwrite",
            "--output-dir", str(copy)]))  # fmt: skip
    assert checkpoints(copy) == ["step_000001"]
    rows = metrics(copy)
    assert [r["step"] for r in rows] == [1] and rows[0]["run_id"] != old_id
    state = json.loads((copy / "checkpoints" / "step_000001" / "trainer_state.json").read_text())
    assert state["run_id"] == rows[0]["run_id"] and state["world_size"] == 2
    assert not (copy / "samples.jsonl").exists()  # tiny profile: sample_every=5, 1 step

    res = ok(run([*MODULE, *FAST, "--resume", "--max-steps", "1", "--output-dir", str(copy)]))
    assert res.stdout.startswith("sgsd-train: nothing to do:") and "step 1" in res.stdout
    argv = ["--resume", "--max-steps", "2", "--output-dir", str(copy)]
    plan = plan_run(load_config(argv), 2, user_options(argv))
    assert plan.checkpoint == copy / "checkpoints" / "step_000001"
    assert plan.run_id == rows[0]["run_id"]


def test_failed_start_leaves_the_directory_byte_identical(finished_run, tmp_path):
    """A start that fails after validation (here: no problem fits the prompt limit, found
    once the tokenizer has loaded) writes nothing, not even with --overwrite planned."""
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    before = snapshot(copy)
    res = run([*MODULE, *FAST, "--overwrite", "--max-prompt-tokens", "1",
               "--output-dir", str(copy)])  # fmt: skip
    assert res.returncode != 0 and "fits max_prompt_tokens=1" in res.stderr
    assert snapshot(copy) == before
    res = run([*MODULE, "--max-steps", "-3", "--output-dir", str(copy)])
    assert res.returncode == 2 and snapshot(copy) == before


def test_bad_flag_under_torchrun_is_one_line_from_rank_0(tmp_path):
    out = tmp_path / "never"
    res = run([*TORCHRUN, "--nproc_per_node=2", "--module", "sgsd.train", "--max-steps", "-3",
               "--output-dir", str(out)], timeout=120)  # fmt: skip
    text = res.stdout + res.stderr
    assert res.returncode != 0 and not out.exists()
    # torchrun then reports its failed workers (its own traceback and summary); before that
    # report, the workers printed one line and no traceback
    ours = text.split("Traceback (most recent call last):")[0]
    if len(text) > len(ours):
        assert "ChildFailedError" in text and "exitcode  : 2" in text
    lines = [line for line in ours.splitlines() if line.strip()]
    assert len(lines) <= 3, text
    assert lines.count("sgsd-train: error: --max-steps must be >= 1, got -3") == 1


@pytest.mark.parametrize(
    "cmd",
    [
        [*LAUNCH, "--nproc-per-node", "2", "--nonexistent-flag", "1"],
        [*LAUNCH, "--nproc-per-node", "0"],
        [*LAUNCH, "--nproc-per-node", "two"],
        [*LAUNCH, "--nproc-per-node", "2", "--problems-per-step", "3"],
        [*MODULE, "--max-stpes", "3"],
        [sys.executable, str(REPO / "sgsd" / "train.py"), "--output-dir"],
    ],
)
def test_bad_flags_print_one_line_and_exit_2_before_torch_loads(cmd):
    res = run(cmd, timeout=60)
    assert res.returncode == 2 and res.stdout == ""
    (line,) = res.stderr.splitlines()
    assert line.startswith("sgsd-train: error: ")


def test_validation_imports_no_torch():
    code = (
        "import sys; from sgsd.cli import validate; rc = validate(['--max-steps', '0']); "
        "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    res = run([sys.executable, "-c", code], timeout=60)
    assert res.stdout.split() == ["2", "False", "False"]


def test_merged_model_export_loads_in_transformers_from_a_fresh_process(finished_run):
    """model/ is standalone (config, weights, tokenizer) and equals base + adapter/."""
    ck = finished_run / "checkpoints" / "step_000002"
    assert not (ck / "model" / "adapter_config.json").exists()
    code = f"""
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
ck = {str(ck)!r}
model = AutoModelForCausalLM.from_pretrained(ck + "/model")
tok = AutoTokenizer.from_pretrained(ck + "/model")
base_path = json.load(open(ck + "/adapter/adapter_config.json"))["base_model_name_or_path"]
base = AutoModelForCausalLM.from_pretrained(base_path)
ids = torch.tensor([tok.encode("What is 2 + 3?")])
with torch.no_grad():
    before = base(ids).logits
    merged = model(ids).logits
    adapted = PeftModel.from_pretrained(base, ck + "/adapter")(ids).logits
print(float((merged - adapted).abs().max()), float((merged - before).abs().max()))
"""
    res = ok(run([sys.executable, "-c", code], timeout=300))
    diff_adapter, diff_base = map(float, res.stdout.split()[-2:])
    assert diff_adapter < 1e-4  # model/ is base + the trained adapter, merged
    assert diff_base > 1e-6  # and the adapter is not a no-op


def test_noise_filter_drops_known_third_party_lines_and_keeps_real_ones():
    f = NoiseFilter()

    def record(name: str, msg: str) -> logging.LogRecord:
        return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, None, None)

    assert not f.filter(record("vllm.worker", "libtcmalloc is not found in LD_PRELOAD. ..."))
    assert not f.filter(record("vllm.x", "Model Runner V2 requires Triton; using V1"))
    assert f.filter(record("vllm.worker", "out of KV-cache blocks: preempting request 3"))
    assert f.filter(record("sgsd.train", "libtcmalloc is not found in LD_PRELOAD"))


def test_missing_train_extra_names_the_extra():
    """``python -S`` leaves site-packages off sys.path, as an install without the train
    extra would (the repo stays importable through PYTHONPATH)."""
    res = run([sys.executable, "-S", "-m", "sgsd.train", "--max-steps", "1"], timeout=60)
    assert res.returncode == 2 and res.stdout == ""
    (line,) = res.stderr.splitlines()
    assert line.startswith("sgsd-train: error: the trainer needs transformers")
    assert line.endswith('pip install "sgsd-kernels[train]"')


@pytest.mark.vllm
@pytest.mark.slow
def test_merged_model_export_loads_in_vllm(finished_run):
    pytest.importorskip("vllm")
    model = finished_run / "checkpoints" / "step_000002" / "model"
    code = f"""
from vllm import LLM, SamplingParams
llm = LLM(model={str(model)!r}, dtype="float32", gpu_memory_utilization=0.2,
          max_model_len=256, enforce_eager=True)
out = llm.generate(["What is 2 + 3?"], SamplingParams(max_tokens=4, temperature=0))
print("generated", len(out[0].outputs[0].token_ids))
"""
    env_code = "import os; os.environ['VLLM_ENABLE_V1_MULTIPROCESSING'] = '0'\n" + code
    res = ok(run([sys.executable, "-c", env_code], timeout=400))
    assert "generated 4" in res.stdout


def test_console_scripts_point_at_callables():
    import importlib

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["sgsd-train"] == "sgsd.cli:launch"
    for target in scripts.values():
        module, attr = target.split(":")
        assert callable(getattr(importlib.import_module(module), attr)), target
