"""The tiny model's supervised warm start (sgsd.tiny.warm_start): its data (student and
teacher-context rows from the demo train split only), the cache key, determinism, bad
settings, and that the embedded run it feeds shows every SGSD polarity class."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from sgsd import prompts  # noqa: E402 (after the importorskips)
from sgsd.config import TINY_PROFILE, TrainConfig  # noqa: E402
from sgsd.data import load_problems  # noqa: E402
from sgsd.methods.sgsd import SGSDLoss  # noqa: E402
from sgsd.skills.bank import SkillBank  # noqa: E402
from sgsd.tiny import warm_start as tiny_warm_start  # noqa: E402
from sgsd.tiny.model import build_tiny_model, tiny_model_fingerprint  # noqa: E402


@pytest.fixture(scope="module")
def examples(tiny_tokenizer):
    return (
        tiny_warm_start.sft_examples(tiny_tokenizer),
        tiny_warm_start.teacher_sft_examples(tiny_tokenizer),
    )


def test_teacher_rows_are_the_trainers_teacher_prompts(tiny_tokenizer, examples):
    """Each teacher row's prompt is token for token what the trainer's SGSD teachers
    score with under the tiny profile (same retrieval, style, K, chat template), and its
    target is the student row's target."""
    student, teacher = examples
    train = load_problems("demo", split="train")
    assert len(student) == len(teacher) == len(train)
    cfg = TrainConfig(**{k: TINY_PROFILE[k] for k in ("num_teachers", "teacher_thinking")})
    strategy, bank = SGSDLoss(cfg), SkillBank.default()
    for i in (0, 57, len(train) - 1):
        contexts = strategy.teachers(train[i], bank)
        assert len(teacher[i]) == len(contexts) == TINY_PROFILE["num_teachers"]
        s_ids, s_start = student[i]
        for (ids, start), (messages, _) in zip(teacher[i], contexts):
            # The tiny profile renders teachers in non-thinking mode: the trainer's prompt
            # ends with the empty think block, which the row has as its first targets.
            want = prompts.render_prompt_ids(
                tiny_tokenizer, messages, enable_thinking=cfg.teacher_thinking
            )
            assert start < len(want) and ids[: len(want)] == want
            assert ids[start:] == s_ids[s_start:]  # same assistant turn after either prompt
            assert "### General Principles" in tiny_tokenizer.decode(ids[:start])


def test_examples_never_hold_a_test_problem(tiny_tokenizer, examples):
    student, teacher = examples
    seen = [tiny_tokenizer.decode(ids) for ids, _ in student]
    seen += [tiny_tokenizer.decode(ids) for rows in teacher for ids, _ in rows]
    test = load_problems("demo", split="test")
    assert test
    for p in test:
        assert not any(p.problem in text for text in seen), p.id


def test_cache_key_follows_the_recipe(monkeypatch):
    base = tiny_model_fingerprint(0, warm_start=True)
    assert base == tiny_model_fingerprint(0, warm_start=True) != tiny_model_fingerprint(0)
    assert len(tiny_warm_start.data_digest()) == 64
    monkeypatch.setitem(tiny_warm_start.WARM_START, "teacher_rows", 0)
    assert tiny_model_fingerprint(0, warm_start=True) != base


def _digest(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "config",
    [
        {"steps": 3, "batch_size": 3, "teacher_rows": 2, "warmup": 1},
        {"steps": 2, "batch_size": 1, "teacher_rows": 0, "warmup": 0},  # student rows only
    ],
)
def test_warm_start_is_deterministic_and_learns(dtype, config):
    """Two runs from the same init give the same weights; the caller's RNG state is
    untouched; the weights move and the returned loss is finite."""
    runs = []
    for _ in range(2):
        model, tok = build_tiny_model(seed=0)
        model = model.to(dtype)
        before = _digest(model)
        torch.manual_seed(7)
        expected = torch.rand(1)
        torch.manual_seed(7)
        loss = tiny_warm_start.warm_start(model, tok, seed=3, config=config)
        assert torch.equal(torch.rand(1), expected)  # the caller's RNG state is untouched
        assert not model.training and 0.0 < loss < 20.0
        assert any(not torch.equal(a, b) for a, b in zip(before, _digest(model)))
        runs.append(_digest(model))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize(
    "config, message",
    [
        ({"epochs": 2}, "unknown warm-start setting(s) ['epochs']"),
        ({"steps": 0}, "warm-start steps must be an int >= 1, got 0"),
        ({"batch_size": 2.0}, "warm-start batch_size must be an int >= 1, got 2.0"),
        ({"teacher_rows": -1}, "warm-start teacher_rows must be an int >= 0, got -1"),
        ({"warmup": True}, "warm-start warmup must be an int >= 0, got True"),
        ({"lr": 0.0}, "warm-start lr must be a finite number > 0, got 0.0"),
        ({"lr": float("nan")}, "warm-start lr must be a finite number > 0, got nan"),
    ],
)
def test_bad_settings_are_refused(tiny_model_and_tokenizer, config, message):
    model, tok = tiny_model_and_tokenizer
    with pytest.raises(ValueError) as err:
        tiny_warm_start.warm_start(model, tok, config=config)
    assert message in str(err.value)


@pytest.mark.slow
def test_embedded_run_shows_every_polarity_class(tmp_path):
    """The README's main command (embedded default: warm-started tiny model, demo train
    split, bundled bank; HF rollouts to spare a vLLM engine): rewards of both signs, and
    helpful, harmful and neutral teachers (docs/design.md §3) all occur."""
    from test_train_run import metrics, run_train  # tests/sgsd is on sys.path (its conftest)

    out = tmp_path / "demo"
    run_train(["--max-steps", "3", "--rollout-backend", "hf", "--output-dir", str(out)])
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    correct = [r["correct_frac"] for r in rows]
    assert max(correct) > 0.0 and min(correct) < 1.0, correct
    for key in ("teacher_helpful_frac", "teacher_harmful_frac", "teacher_neutral_frac"):
        assert sum(r[key] for r in rows) > 0.0, (key, rows)
