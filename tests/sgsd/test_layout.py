"""The trainer's layout (docs/design.md, "Architecture"): no import cycle among ``sgsd``
modules, counting imports inside functions and the import of each parent package, and
dependencies that point one way (the loop imports the rooms; no room imports the loop)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "sgsd"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The sgsd module an imported dotted name lives in (``sgsd.x.y`` may be an attribute)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> set[str]:
    """Every sgsd module ``module`` imports, wherever the import statement stands, plus
    the parent packages that importing them executes."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    is_pkg = MODULES[module].name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = module if is_pkg else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}".rstrip(".")
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for name in names:
            target = _resolve(name)
            while target and target != "sgsd":
                found.add(target)
                target = target.rpartition(".")[0]
    found.discard(module)
    # A package's own __init__ is run by importing any of its modules: not an edge back.
    return {m for m in found if not module.startswith(m + ".")}


GRAPH = {m: _imports(m) for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in GRAPH[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_graph_sees_the_imports_it_must():
    """The checker itself: lazy imports and parent packages are edges."""
    assert "sgsd.methods.registry" in GRAPH["sgsd.config"]
    assert "sgsd.methods" in GRAPH["sgsd.config"]  # the parent package runs first
    assert "sgsd.cli" in GRAPH["sgsd.train"]  # imported inside `if __name__ == ...`
    assert "sgsd.tiny.model" in GRAPH["sgsd.engine.model"]  # imported inside a function
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_no_import_cycle():
    assert _cycles(GRAPH) == []


@pytest.mark.parametrize("room", ["sgsd.methods", "sgsd.skills", "sgsd.eval", "sgsd.engine"])
def test_rooms_never_import_the_loop(room):
    members = [m for m in MODULES if m == room or m.startswith(room + ".")]
    assert members
    for m in members:
        bad = _reachable(m) & {"sgsd.train", "sgsd.cli"}
        assert not bad, f"{m} imports {bad}"


def test_methods_see_neither_engine_nor_config():
    """A method gets its settings from the run's config object and its inputs as a
    ScoredBatch: it imports neither the engine nor the options (which import it)."""
    for m in MODULES:
        if m.startswith("sgsd.methods."):
            bad = {d for d in GRAPH[m] if d.startswith(("sgsd.engine", "sgsd.config"))}
            assert not bad, f"{m} imports {bad}"


def test_the_engine_never_imports_the_evaluator_or_the_skill_bank():
    """The loop hands the engine the bank it needs; the evaluator drives the engine, not
    the other way round. (The tiny model's warm start reads the bank: through sgsd.tiny.)"""
    evaluator = {"sgsd.eval.evaluator", "sgsd.eval.during_training"}
    for m in MODULES:
        if m.startswith("sgsd.engine."):
            direct = {d for d in GRAPH[m] if d.startswith("sgsd.skills")}
            assert not direct, f"{m} imports {direct}"
            assert not _reachable(m) & evaluator, f"{m} reaches {_reachable(m) & evaluator}"


def test_files_stay_short_or_say_why():
    """At most 450 lines per module in sgsd/ and sgsd_kernels/, unless the module's
    opening docstring says why it is longer; sgsd/train.py has no such excuse."""
    long = []
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "sgsd_kernels").rglob("*.py")]:
        text = path.read_text(encoding="utf-8")
        if text.count("\n") <= 450:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if "450 lines" not in doc or path == PACKAGE / "train.py":
            long.append(str(path.relative_to(ROOT)))
    assert long == []
