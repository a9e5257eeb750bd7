"""The README and docs/ against the tree: every relative link points at a file that
exists, every ``python -m MODULE`` and console script they name exists, every
``--flag`` given to ``sgsd-train`` / ``python -m sgsd.train`` is an option, the README
stays the front door (at most 300 lines, with the two commands after install), and every
command of the README and the trainer's pages runs as written, in order, on CPU (those
that cannot run here are skipped with the reason in NOT_RUN)."""

from __future__ import annotations

import importlib.util
import os
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


# Commands the runner below does not run, first match wins: (pattern, why).
NOT_RUN = [
    (r"^python -m venv|^pip |^\. ", "an install step: .ci/run runs it on a clean machine"),
    (r"\bpytest\b", "the test suite itself"),
    (r"^ruff ", ".ci/run runs the linters"),
    (r"sgsd_kernels\.native build", ".ci/run builds the native backend"),
    (r"bench_gated_kd\.py", "the benchmark: minutes on 2 cores (tests/bench runs its CLI)"),
    (r"skillworld\.py", "the skill world experiment: minutes on 2 cores (tests/sgsd/skillworld)"),
    (r"Qwen/|BytedTsinghua|hmmt25", "needs the Hugging Face hub and a GPU-sized model"),
    (r"nproc[-_]per[-_]node[= ]8", "needs 8 GPUs"),
    (r"\.\.\.", "a template, not a command"),
    (r"--max-steps 200|step_000200", "the 200-step demo runs: half an hour on 2 cores"),
]
SHARED_DATA = ROOT.parent / "shared" / "data"
RUN_PAGES = ["README.md", "docs/training.md", "docs/evaluation.md", "docs/skill-bank.md"]
RUNNABLE = [(page, cmd) for page, cmd in COMMANDS if page in RUN_PAGES]


@pytest.fixture(scope="module")
def page_dirs(tmp_path_factory):
    """One working directory per page: its commands run in order and may use what the
    earlier ones wrote (a resume, an evaluated checkpoint)."""
    return {page: tmp_path_factory.mktemp(page.replace("/", "-")) for page in RUN_PAGES}


@pytest.mark.slow
@pytest.mark.parametrize(("page", "cmd"), RUNNABLE, ids=[c[:60] for _, c in RUNNABLE])
def test_every_command_runs_as_written(page, cmd, page_dirs):
    for pattern, why in NOT_RUN:
        if re.search(pattern, cmd):
            pytest.skip(why)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if re.search(r"aime2[45]|math500", cmd):
        if not SHARED_DATA.is_dir():
            pytest.skip(f"needs the public data files in {SHARED_DATA}")
        env["SGSD_DATA_DIR"] = str(SHARED_DATA)
    cwd = page_dirs[page]
    line = cmd.replace("/tmp/", f"{cwd}/")
    line = line.replace("sgsd/train.py", str(ROOT / "sgsd" / "train.py"))
    res = subprocess.run(
        ["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, f"{line}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    assert "Traceback" not in res.stderr, res.stderr[-4000:]
    if cmd.startswith("sgsd-train --max-steps 3 --output-dir runs/demo"):
        out = cwd / "runs" / "demo"
        assert (out / "metrics.jsonl").read_text().count("\n") == 3
        assert (out / "checkpoints" / "step_000003" / "model").is_dir()
