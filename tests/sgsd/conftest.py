"""Shared fixtures for the trainer-component tests (tiny model, shared data)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# Real public files live beside the repo (never copied into it); see its README.
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """``<repo>/../shared/data``; skips the test when the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA}")
    return SHARED_DATA


def _shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"shared data file not found: {path}")
    return path


@pytest.fixture(scope="session")
def shared_file():
    """``shared_file(name)`` -> path of a shared data file; skips the test if it is absent."""
    return _shared_file


@pytest.fixture(scope="session")
def tiny_model_and_tokenizer():
    """The tiny offline Qwen3 model (seed 0) and its tokenizer, built once per session."""
    pytest.importorskip("transformers")
    from sgsd.tiny.model import build_tiny_model

    return build_tiny_model(seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_and_tokenizer):
    return tiny_model_and_tokenizer[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny model written once with ``save_tiny_model`` into a session temp dir."""
    from sgsd.tiny.model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


# --------------------------------------------------------------------------- skill bank
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def skill_replies() -> dict:
    """Recorded model replies to the skill-bank prompts (fixtures/skill_replies.json)."""
    import json

    return json.loads((FIXTURES / "skill_replies.json").read_text(encoding="utf-8"))


class ReplayLLM:
    """Plays back recorded replies in call order, one per prompt, and keeps every prompt
    it was sent (so tests check what the pipeline asked as well as what it did)."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.prompts: list[str] = []

    def __call__(self, conversations):
        out = []
        for conv in conversations:
            self.prompts.append(conv[-1]["content"])
            if not self.replies:
                raise AssertionError(f"no recorded reply left for prompt #{len(self.prompts)}")
            out.append(self.replies.pop(0))
        return out


@pytest.fixture
def replay_llm():
    """``replay_llm(replies)`` -> a :class:`ReplayLLM`."""
    return ReplayLLM
