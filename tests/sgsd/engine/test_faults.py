"""Faults injected into real runs (tiny model, CPU, HF rollouts): a resume keeps the
experiment, damaged checkpoints are found and named, a raised --max-steps gives a defined
learning rate, bad inputs are one line before anything loads, and a kill during a
checkpoint write leaves a run that resumes. Each case asserts the message, the exit code
and, where the command is refused, that nothing in the run directory changed."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train_run import FAST, REPO, TRAIN, _env, metrics

pytestmark = pytest.mark.slow


def train(out: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(TRAIN), *args, "--output-dir", str(out)]
    return subprocess.run(
        cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def start(out: Path, *args: str) -> subprocess.Popen:
    """A run in the background (stderr kept for the test to read)."""
    cmd = [sys.executable, str(TRAIN), *FAST, *args, "--output-dir", str(out)]
    return subprocess.Popen(
        cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def error_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, res.stderr[-3000:]
    (line,) = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert line.startswith("sgsd-train: error: ")
    return line


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory) -> Path:
    """A 3-step run, K = 2, lr 1e-4, a checkpoint every step (the last with model/)."""
    out = tmp_path_factory.mktemp("faults") / "run"
    res = train(out, *FAST, "--max-steps", "3", "--lr", "1e-4", "--checkpoint-every", "1")
    assert res.returncode == 0, res.stderr[-4000:]
    return out


@pytest.fixture
def run(three_steps, tmp_path) -> Path:
    """A private copy of the 3-step run."""
    out = tmp_path / "run"
    shutil.copytree(three_steps, out)
    return out


def test_resume_keeps_the_options_and_raising_max_steps_keeps_a_defined_rate(run):
    res = train(run, "--resume", "--max-steps", "5")
    assert res.returncode == 0, res.stderr[-4000:]
    assert "sgsd-train: changed on resume: --max-steps 3 -> 5" in res.stderr
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["teachers_per_rollout"] <= 2 for r in rows)  # K = 2 kept, not the default
    # linear schedule of the current --max-steps: steps 4 and 5 at 2/5 and 1/5 of 1e-4
    assert [r["lr"] for r in rows[3:]] == pytest.approx([1e-4 * 2 / 5, 1e-4 / 5])
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == [f"step_{s:06d}" for s in range(1, 6)]  # --checkpoint-every 1 kept
    assert "num_teachers: 2" in (run / "config.yaml").read_text()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--num-teachers", "4"], "--num-teachers 4 (the run has 2)"),
        (["--lr", "0.001"], "--lr 0.001 (the run has 0.0001)"),
        (["--loss", "grpo"], "--loss 'grpo' (the run has 'sgsd')"),
    ],
)
def test_an_experiment_option_changed_on_resume_is_refused(run, args, message):
    before = snapshot(run)
    line = error_line(train(run, "--resume", "--max-steps", "5", *args))
    assert message in line and "keeps its experiment's options" in line
    assert snapshot(run) == before


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "name,damage,message",
    [
        ("model/model.safetensors", _truncate, "model/model.safetensors has 100 bytes"),
        ("trainable.safetensors", _flip, "trainable.safetensors does not match its sha256"),
        ("optimizer.pt", Path.unlink, "optimizer.pt is missing"),
    ],
    ids=["truncated-export", "flipped-byte", "missing-optimizer"],
)
def test_a_damaged_checkpoint_is_named_and_latest_falls_back(run, name, damage, message):
    newest = run / "checkpoints" / "step_000003"
    damage(newest / name)
    before = snapshot(run)
    line = error_line(train(run, "--resume", str(newest), "--max-steps", "4"))
    assert message in line and "damaged checkpoint" in line
    assert snapshot(run) == before
    res = train(run, "--resume", "--max-steps", "4")
    assert res.returncode == 0, res.stderr[-4000:]
    assert f"skipped the damaged checkpoint {newest}: {message}" in res.stderr
    assert "from" in res.stderr and "step_000002 at step 2" in res.stderr
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]  # step 3 trained again


@pytest.mark.parametrize(
    "content,flag,message",
    [
        ('{"general_skills": [', "--skill-bank", "not valid JSON"),
        ('{"general_skills": [], "common_mistakes": []}', "--skill-bank", "yields no teacher"),
        ('{"problem": "What is 1+1?", "foo": "2"}\n', "--dataset", "Pass --answer-field FIELD"),
    ],
    ids=["bank-not-json", "empty-bank", "data-without-answer"],
)
def test_bad_inputs_are_one_line_before_anything_loads(tmp_path, content, flag, message):
    path = tmp_path / ("bank.json" if flag == "--skill-bank" else "data.jsonl")
    path.write_text(content)
    start = time.perf_counter()
    line = error_line(train(tmp_path / "out", "--max-steps", "1", flag, str(path)))
    assert message in line and line.startswith(f"sgsd-train: error: {flag} {path}")
    assert time.perf_counter() - start < 30  # no model was loaded (seconds, not minutes)
    assert not (tmp_path / "out").exists()


def test_a_kill_during_a_checkpoint_write_leaves_a_run_that_resumes(tmp_path):
    """SIGKILL while step 2's checkpoint is being written (its temporary directory
    exists): what is left is the step-1 checkpoint, verified, and the resume finishes."""
    out = tmp_path / "run"
    proc = start(out, "--max-steps", "3", "--checkpoint-every", "1")
    deadline = time.monotonic() + 240
    tmp = out / "checkpoints" / ".tmp-step_000002"
    while time.monotonic() < deadline and proc.poll() is None and not tmp.exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert tmp.exists() or (out / "checkpoints" / "step_000002").exists()
    res = train(out, "--resume")
    assert res.returncode == 0, res.stderr[-4000:]
    assert [r["step"] for r in metrics(out)][-1] == 3
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert (out / "checkpoints" / "step_000003" / "manifest.json").is_file()


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path):
    out = tmp_path / "run"
    proc = start(out, "--max-steps", "1000", "--checkpoint-every", "0")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and metrics(out):
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    last = metrics(out)[-1]["step"]
    assert f"stopping at step {last}" in err and "Traceback" not in err
    assert (out / "checkpoints" / f"step_{last:06d}" / "manifest.json").is_file()


def test_a_planted_pickle_payload_is_refused_on_resume(run, tmp_path):
    """Someone hands you a checkpoint whose optimizer.pt would run code when unpickled
    (and a manifest that matches it): the resume refuses it, naming the file, before
    anything loads; the payload never runs and the run directory is unchanged."""
    import torch

    from sgsd.engine.rundir import write_manifest

    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    newest = run / "checkpoints" / "step_000003"
    torch.save({"state": {}, "param_groups": [], "x": Payload()}, newest / "optimizer.pt")
    write_manifest(newest)
    before = snapshot(run)
    line = error_line(train(run, "--resume", "--max-steps", "4"))
    assert f"--resume {newest}: optimizer.pt is refused" in line
    assert not marker.exists() and snapshot(run) == before
