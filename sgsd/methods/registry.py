"""The one registry of training methods: ``--loss NAME`` -> a loss strategy.

A method is one file in ``sgsd/methods/`` (a :class:`sgsd.methods.base.LossStrategy`) and
one :func:`register_method` call in ``sgsd/methods/__init__.py``. The ``--loss`` choices,
their validation, the ``--help`` text and a method's default settings all come from here.

The registry names its factory as ``"module:callable"`` and imports it only when a run
builds the strategy: option validation (``sgsd.config``) reads the registry before torch is
imported, so that a bad flag is an instant one-line error.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["METHODS", "Method", "build_method", "method_names", "register_method"]


@dataclass(frozen=True)
class Method:
    name: str
    """The ``--loss`` value."""
    factory: str
    """``"module:callable"``: called with the run's ``TrainConfig``, returns the strategy."""
    summary: str
    """One line for ``--help``."""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    """Settings applied to the options the user did not set (after the tiny profile)."""
    variants: Mapping[str, str] = field(default_factory=dict)
    """``{option: "module:callable"}``: the factory to use instead when that option is set
    (not None), e.g. SGSD's top-k local support gate."""


METHODS: dict[str, Method] = {}


def register_method(
    name: str,
    factory: str,
    *,
    summary: str,
    defaults: Mapping[str, Any] | None = None,
    variants: Mapping[str, str] | None = None,
) -> Method:
    """Add a method under ``name`` (the ``--loss`` value); names are unique."""
    if name in METHODS:
        raise ValueError(f"method {name!r} is already registered ({METHODS[name].factory})")
    for target in (factory, *(variants or {}).values()):
        if target.count(":") != 1:
            raise ValueError(f"factory must be 'module:callable', got {target!r}")
    METHODS[name] = Method(name, factory, summary, dict(defaults or {}), dict(variants or {}))
    return METHODS[name]


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def build_method(cfg):
    """The loss strategy ``cfg.loss`` names (``cfg``: a validated ``sgsd.config.TrainConfig``)."""
    try:
        method = METHODS[cfg.loss]
    except KeyError:
        raise ValueError(
            f"loss must be one of {', '.join(method_names())}, got {cfg.loss!r}"
        ) from None
    chosen = [f for option, f in method.variants.items() if getattr(cfg, option) is not None]
    module, attr = (chosen[0] if chosen else method.factory).split(":")
    return getattr(importlib.import_module(module), attr)(cfg)
