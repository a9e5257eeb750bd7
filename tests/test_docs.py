"""The README and docs/ against the tree: every relative link points at a file that
exists, every ``python -m MODULE`` and console script they name exists, every
``--flag`` given to ``sgsd-train`` / ``python -m sgsd.train`` is an option, the README
stays the front door (at most 300 lines, with the two commands after install), and the
README's main job runs as written (tests/sgsd/test_train_run.py runs the same loop at
more settings)."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "benchmarks" / "README.md"]
PAGES += sorted((ROOT / "docs").glob("*.md"))
TEXT = {p: p.read_text(encoding="utf-8") for p in PAGES}


def _commands(text: str) -> list[str]:
    """Shell commands of the page: lines of ```bash blocks (continuations joined)."""
    out = []
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


COMMANDS = [(p.relative_to(ROOT).as_posix(), c) for p in PAGES for c in _commands(TEXT[p])]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_exist(page):
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", TEXT[page]):
        if re.match(r"[a-z]+://|mailto:|#", target):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists():
            missing.append(target)
    assert missing == []


def test_modules_run_with_python_m_exist():
    named = set()
    for text in TEXT.values():
        named |= set(re.findall(r"python -m ((?:sgsd|sgsd_kernels)(?:\.\w+)*)", text))
    assert "sgsd.evaluate" in named and "sgsd.build_skill_bank" in named
    missing = [m for m in sorted(named) if importlib.util.find_spec(m) is None]
    assert missing == []


def test_console_scripts_named_in_the_docs_are_installed():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    named = {c.split()[0] for _, c in COMMANDS if c.startswith("sgsd-")}
    for text in TEXT.values():  # inline, with arguments: `sgsd-train --help`
        named |= set(re.findall(r"`(sgsd-[a-z-]+) [^`]*`", text))
    named -= {"sgsd-kernels"}  # the distribution's name
    assert named and named <= set(scripts), named - set(scripts)


def test_trainer_flags_in_the_docs_are_options():
    from sgsd.config import TrainConfig, flag

    known = {flag(f) for f in TrainConfig.__dataclass_fields__} | {
        "--config",
        "--help",
        "--nproc-per-node",
    }
    bad = []
    for page, cmd in COMMANDS:
        words = shlex.split(cmd)
        if not (words[:1] == ["sgsd-train"] or words[:3] == ["python", "-m", "sgsd.train"]):
            continue
        for w in words:
            if w.startswith("--"):
                name = w.split("=")[0].replace("_", "-")
                if name not in known:
                    bad.append((page, name))
    assert bad == []


def test_readme_is_the_front_door():
    text = TEXT[ROOT / "README.md"]
    assert text.count("\n") <= 300
    start = text.index("## After install")
    first = _commands(text[start:])[:2]
    assert first[0].startswith("sgsd-train ") and first[1] == "python -m pytest tests -q"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest tests -q\n" in ci  # CI runs the README's test command


@pytest.mark.slow
def test_readme_main_job_runs_as_written(tmp_path):
    """The README's first command after install, in a fresh directory."""
    text = TEXT[ROOT / "README.md"]
    cmd = _commands(text[text.index("## After install") :])[0]
    words = shlex.split(cmd)
    assert words[0] == "sgsd-train"
    argv = [sys.executable, "-c", "from sgsd.cli import launch; raise SystemExit(launch())"]
    res = subprocess.run(
        [*argv, *words[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "runs" / "demo"
    assert (out / "metrics.jsonl").read_text().count("\n") == 3
    assert (out / "checkpoints" / "step_000003" / "model").is_dir()
