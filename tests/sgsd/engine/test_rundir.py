"""sgsd.engine.rundir and sgsd.cli.preflight: one run per output directory, decided before any
model loads, with nothing written until the run starts. Checkpoints here are directories
with the trainer_state.json a real checkpoint holds (the end-to-end runs in
test_train_cli.py use real ones)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sgsd.cli import preflight
from sgsd.config import ConfigError, load_config
from sgsd.engine.rundir import (
    MANIFEST,
    RUN_FILES,
    NothingToDo,
    checkpoint_problem,
    plan_run,
    start_run,
    write_manifest,
)


def fake_run(out: Path, run_id: str, steps: list[int], world_size: int = 1) -> None:
    for step in steps:
        ck = out / "checkpoints" / f"step_{step:06d}"
        ck.mkdir(parents=True)
        meta = {"step": step, "data_position": step, "world_size": world_size, "run_id": run_id}
        (ck / "trainer_state.json").write_text(json.dumps(meta))
    (out / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "run_id": run_id}) + "\n" for s in range(1, steps[-1] + 1))
    )
    (out / "samples.jsonl").write_text("{}\n")


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def cfg(out: Path, *args: str):
    return load_config(["--output-dir", str(out), "--max-steps", "7", *args])


def test_fresh_start_into_an_empty_or_missing_directory(tmp_path):
    plan = plan_run(cfg(tmp_path / "new"), 1)
    assert plan.checkpoint is None and plan.resume_step == 0 and plan.run_id
    assert not (tmp_path / "new").exists()  # planning writes nothing
    assert plan_run(cfg(tmp_path / "new"), 1).run_id != plan.run_id


def test_fresh_start_into_another_run_refuses_in_one_line(tmp_path):
    fake_run(tmp_path, "old", [3, 5, 6])
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError) as info:
        plan_run(cfg(tmp_path), 1)
    message = str(info.value)
    assert "\n" not in message and "checkpoints of steps 3, 5, 6" in message
    assert "--resume" in message and "--overwrite" in message
    assert snapshot(tmp_path) == before


def test_overwrite_clears_every_file_of_the_earlier_run_when_the_run_starts(tmp_path):
    fake_run(tmp_path, "old", [3, 5, 6])
    for name in ("skill_bank", "tb"):
        (tmp_path / name).mkdir()
    (tmp_path / "notes.txt").write_text("the user's own file")
    c = cfg(tmp_path, "--overwrite")
    plan = plan_run(c, 1)
    assert plan.checkpoint is None and plan.overwrite
    removed = start_run(plan, c)
    assert set(removed) >= {"checkpoints", "metrics.jsonl", "samples.jsonl", "skill_bank", "tb"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "notes.txt"]
    assert load_config(["--config", str(tmp_path / "config.yaml")]) == c


def test_bare_resume_continues_the_newest_checkpoint(tmp_path):
    fake_run(tmp_path, "r1", [3, 5, 6])
    plan = plan_run(cfg(tmp_path, "--resume"), 1)
    assert plan.checkpoint == tmp_path / "checkpoints" / "step_000006"
    assert (plan.run_id, plan.resume_step) == ("r1", 6)


def test_resume_with_no_checkpoint_starts_fresh_only_in_a_clean_directory(tmp_path):
    assert plan_run(cfg(tmp_path / "empty", "--resume"), 1).checkpoint is None
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.jsonl").write_text('{"step": 1, "run_id": "x"}\n')
    with pytest.raises(ConfigError, match="holds another run"):
        plan_run(cfg(tmp_path / "logs", "--resume"), 1)


def test_resume_at_max_steps_has_nothing_to_do(tmp_path):
    fake_run(tmp_path, "r1", [7])
    with pytest.raises(NothingToDo, match="step 7 and --max-steps is 7"):
        plan_run(cfg(tmp_path, "--resume"), 1)


def test_resume_checks_checkpoint_and_metrics_are_one_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    fake_run(a, "run-a", [2])
    fake_run(b, "run-b", [4])
    with pytest.raises(ConfigError, match="from run run-a but --output-dir .* holds run run-b"):
        plan_run(cfg(b, "--resume", str(a / "checkpoints" / "step_000002")), 1)
    # into a directory of its own (none yet) it continues its run
    plan = plan_run(cfg(tmp_path / "c", "--resume", str(a / "checkpoints" / "step_000002")), 1)
    assert (plan.run_id, plan.resume_step) == ("run-a", 2)


def test_resume_from_an_earlier_step_drops_the_newer_checkpoints_at_start(tmp_path):
    fake_run(tmp_path, "r1", [2, 4, 6])
    c = cfg(tmp_path, "--resume", str(tmp_path / "checkpoints" / "step_000004"))
    plan = plan_run(c, 1)
    assert start_run(plan, c) == ["checkpoints/step_000006"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_000002",
        "step_000004",
    ]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--resume", "/no/such/ckpt"], "--resume /no/such/ckpt: not a checkpoint directory"),
        (["--overwrite", "--resume"], "--overwrite starts a new run and --resume continues one"),
    ],
)
def test_bad_resume_options(tmp_path, args, message):
    with pytest.raises(ConfigError, match=message):
        plan_run(cfg(tmp_path, *args), 1)


def test_resume_needs_the_same_number_of_ranks(tmp_path):
    fake_run(tmp_path, "r1", [2], world_size=2)
    with pytest.raises(ConfigError, match="written by 2 ranks; .* \\(got 1\\)"):
        plan_run(cfg(tmp_path, "--resume"), 1)


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        plan_run(cfg(tmp_path / "f"), 1)


@pytest.mark.parametrize(
    "args,world_size,message",
    [
        (["--problems-per-step", "3"], 2, "--problems-per-step must be divisible by"),
        (["--dataset", "./no/such.jsonl"], 1, "--dataset ./no/such.jsonl: no such file"),
        (["--skill-bank", "/no/bank.json"], 1, "--skill-bank /no/bank.json: no such file"),
        (["--model", "/no/model"], 1, "--model /no/model: no such file or directory"),
        (
            ["--parallelism", "fsdp2", "--rollout-backend", "hf"],
            2,
            "--parallelism fsdp2 needs vLLM rollouts",
        ),
    ],
)
def test_preflight_rejects_before_any_model_loads(tmp_path, args, world_size, message):
    with pytest.raises(ConfigError, match=message):
        preflight(cfg(tmp_path, *args), world_size)


def test_run_files_cover_what_the_trainer_writes():
    assert {"checkpoints", "metrics.jsonl", "samples.jsonl", "config.yaml"} <= set(RUN_FILES)


# --------------------------------------------------------------------------- manifests
def real_files(ck: Path) -> None:
    """Checkpoint-like files of a few sizes, then the manifest, as save_checkpoint does."""
    (ck / "rng").mkdir(exist_ok=True)
    (ck / "rng" / "rank0.pt").write_bytes(bytes(range(256)) * 3)
    (ck / "trainable.safetensors").write_bytes(b"\x01" * 5000)
    (ck / "model").mkdir(exist_ok=True)
    (ck / "model" / "model.safetensors").write_bytes(b"\x02" * 7000)
    write_manifest(ck)


def test_a_manifest_covers_every_file_and_verifies(tmp_path):
    fake_run(tmp_path, "r1", [2])
    ck = tmp_path / "checkpoints" / "step_000002"
    real_files(ck)
    files = json.loads((ck / MANIFEST).read_text())["files"]
    assert set(files) == {
        "trainer_state.json",
        "rng/rank0.pt",
        "trainable.safetensors",
        "model/model.safetensors",
    }
    assert files["model/model.safetensors"]["size"] == 7000
    assert checkpoint_problem(ck) is None


@pytest.mark.parametrize(
    "damage,message",
    [
        (
            lambda ck: (ck / "model" / "model.safetensors").write_bytes(b"\x02" * 100),
            "model/model.safetensors has 100 bytes, the manifest says 7000",
        ),
        (
            lambda ck: _flip(ck / "trainable.safetensors", 1234),
            "trainable.safetensors does not match its sha256",
        ),
        (lambda ck: (ck / "rng" / "rank0.pt").unlink(), "rng/rank0.pt is missing"),
        (lambda ck: (ck / MANIFEST).write_text("{"), "manifest.json is unreadable"),
    ],
    ids=["truncated", "flipped-byte", "missing", "bad-manifest"],
)
def test_damage_is_named(tmp_path, damage, message):
    fake_run(tmp_path, "r1", [2])
    ck = tmp_path / "checkpoints" / "step_000002"
    real_files(ck)
    damage(ck)
    assert message in checkpoint_problem(ck)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_resume_latest_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path):
    fake_run(tmp_path, "r1", [2, 4, 6])
    for step in (2, 4, 6):
        real_files(tmp_path / "checkpoints" / f"step_{step:06d}")
    _flip(tmp_path / "checkpoints" / "step_000006" / "trainable.safetensors", 10)
    before = snapshot(tmp_path)
    plan = plan_run(cfg(tmp_path, "--resume"), 1)
    assert plan.resume_step == 4 and plan.checkpoint.name == "step_000004"
    (note,) = [n for n in plan.notes if "damaged" in n]
    assert "step_000006" in note and "trainable.safetensors" in note
    assert snapshot(tmp_path) == before  # planning writes nothing
    # an explicit --resume of the damaged one is refused, naming the file
    with pytest.raises(ConfigError, match="damaged checkpoint, trainable.safetensors does not"):
        plan_run(cfg(tmp_path, "--resume", str(tmp_path / "checkpoints" / "step_000006")), 1)


def test_resume_latest_with_no_checkpoint_that_verifies_is_an_error(tmp_path):
    fake_run(tmp_path, "r1", [2])
    real_files(tmp_path / "checkpoints" / "step_000002")
    (tmp_path / "checkpoints" / "step_000002" / "trainable.safetensors").unlink()
    with pytest.raises(ConfigError, match="no checkpoint in .* verifies.*--overwrite"):
        plan_run(cfg(tmp_path, "--resume"), 1)


def test_a_checkpoint_without_manifest_resumes_with_a_note(tmp_path):
    fake_run(tmp_path, "r1", [2])
    plan = plan_run(cfg(tmp_path, "--resume"), 1)
    assert plan.resume_step == 2 and any("not verified" in n for n in plan.notes)


# --------------------------------------------------------------------------- inputs
@pytest.mark.parametrize(
    "content,args,message",
    [
        ('{"general_skills": [', ["--skill-bank"], "not valid JSON"),
        (
            '{"general_skills": [], "common_mistakes": []}',
            ["--skill-bank"],
            "yields no teacher .*--allow-empty-bank",
        ),
        ('{"problem": "What is 1+1?", "foo": "2"}\n', ["--dataset"], "Pass --answer-field FIELD"),
        ("", ["--dataset"], "holds no problem"),
    ],
    ids=["bank-json", "empty-bank", "no-answer-field", "empty-data"],
)
def test_inputs_are_read_before_any_model_loads(tmp_path, content, args, message):
    suffix = ".json" if args == ["--skill-bank"] else ".jsonl"
    path = tmp_path / f"input{suffix}"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as info:
        preflight(cfg(tmp_path / "out", *args, str(path)), 1)
    assert "\n" not in str(info.value) and str(info.value).startswith(args[0])
    assert not (tmp_path / "out").exists()


def test_an_empty_bank_is_allowed_when_asked_for(tmp_path):
    path = tmp_path / "bank.json"
    path.write_text('{"general_skills": [], "common_mistakes": []}')
    plan = preflight(cfg(tmp_path / "out", "--skill-bank", str(path), "--allow-empty-bank"), 1)
    assert plan.config.allow_empty_bank
    # methods without teachers do not need any
    preflight(cfg(tmp_path / "out2", "--skill-bank", str(path), "--loss", "grpo"), 1)
