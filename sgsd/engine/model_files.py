"""What a model directory asks for before anything loads it (no torch, no transformers).

A model on disk whose ``config.json`` or ``tokenizer_config.json`` has an ``auto_map``
ships Python code that transformers (and vLLM) import to build it. The project never lets
them (``trust_remote_code`` stays off) unless the user passes ``--trust-remote-code``
(docs/threat-model.md); :func:`remote_code_problem` says so in one line, before anything
loads. For a hub id the same refusal comes from transformers at load time.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["REMOTE_CODE_FLAG", "remote_code_classes", "remote_code_problem"]

REMOTE_CODE_FLAG = "--trust-remote-code"


def remote_code_classes(source: str) -> list[str]:
    """The ``module.Class`` names a local model directory's ``auto_map`` entries point
    at (code shipped with the model); [] for a hub id or a model without any."""
    path = Path(source).expanduser()
    found: list[str] = []
    for name in ("config.json", "tokenizer_config.json"):
        try:
            data = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        for value in (auto_map or {}).values():
            values = value if isinstance(value, list) else [value]
            found += [v.split("--")[-1] for v in values if isinstance(v, str)]
    return sorted(set(found))


def remote_code_problem(source: str, trusted: bool, option: str = "--model") -> str | None:
    """One line when ``source`` needs its own code and the user did not allow it."""
    classes = remote_code_classes(source)
    if trusted or not classes:
        return None
    return (
        f"{option} {source}: loading it runs code shipped with the model "
        f"({', '.join(classes[:3])}); pass {REMOTE_CODE_FLAG} if you trust its source"
    )
