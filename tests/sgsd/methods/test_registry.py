"""sgsd.methods.registry: the one list of training methods behind ``--loss``: choices,
validation, ``--help`` and a method's defaults all come from it; a new method is one file
and one registration."""

from __future__ import annotations

import pytest

from sgsd.config import ConfigError, load_config, usage
from sgsd.methods import METHODS, build_method, method_names, register_method


def test_the_published_methods_are_registered():
    assert method_names() == ("sgsd", "grpo", "opsd")
    for m in METHODS.values():
        assert m.summary and m.factory.count(":") == 1


def test_loss_choices_come_from_the_registry():
    with pytest.raises(ConfigError, match=r"--loss must be one of .*sgsd.*grpo.*opsd"):
        load_config(["--loss", "ppo"])
    text = usage()
    for name, m in METHODS.items():
        assert f"  {name}" in text and m.summary.split()[0] in text


def test_a_method_s_defaults_apply_to_what_the_user_did_not_set():
    cfg = load_config(["--loss", "grpo"])
    assert (cfg.rollouts_per_problem, cfg.temperature, cfg.num_iterations) == (8, 1.2, 2)
    cfg = load_config(["--loss", "grpo", "--temperature", "0.9"])
    assert cfg.temperature == 0.9 and cfg.num_iterations == 2
    assert load_config(["--loss", "sgsd"]).num_iterations == 1


def test_a_new_method_is_one_registration(monkeypatch, tiny_tokenizer):
    """Registered, it is a valid --loss, listed by --help, with its defaults, and built."""
    monkeypatch.setattr("sgsd.methods.registry.METHODS", dict(METHODS))
    import sgsd.config
    import sgsd.methods.registry as registry

    monkeypatch.setattr(sgsd.config, "METHODS", registry.METHODS)
    register_method(
        "grpo-one-pass",
        "sgsd.methods.grpo:GRPOLoss",
        summary="GRPO with a single optimiser pass",
        defaults={"num_iterations": 1, "rollouts_per_problem": 4},
    )
    assert "grpo-one-pass" in registry.method_names()
    cfg = load_config(["--loss", "grpo-one-pass"])
    assert (cfg.num_iterations, cfg.rollouts_per_problem) == (1, 4)
    assert "grpo-one-pass" in usage()
    strategy = build_method(cfg)
    assert type(strategy).__name__ == "GRPOLoss" and strategy.num_iterations == 1


def test_variants_pick_the_local_support_gate():
    from sgsd.methods.local_support import LocalSupportSGSDLoss
    from sgsd.methods.sgsd import SGSDLoss

    assert type(build_method(load_config([]))) is SGSDLoss
    strategy = build_method(load_config(["--local-support-top-k", "5"]))
    assert isinstance(strategy, LocalSupportSGSDLoss) and strategy.local_support_top_k == 5
    with pytest.raises(ConfigError, match="--local-support-top-k is a gate of --loss sgsd"):
        load_config(["--loss", "grpo", "--local-support-top-k", "5"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "sgsd", "factory": "sgsd.methods.sgsd:SGSDLoss"}, "already registered"),
        ({"name": "x", "factory": "sgsd.methods.sgsd.SGSDLoss"}, "'module:callable'"),
        (
            {"name": "y", "factory": "a:b", "variants": {"lora_r": "no-colon"}},
            "'module:callable'",
        ),
    ],
)
def test_bad_registrations_say_what_is_wrong(kwargs, match):
    before = dict(METHODS)
    with pytest.raises(ValueError, match=match):
        register_method(summary="s", **kwargs)
    assert METHODS == before


def test_build_method_names_the_choices_for_an_unknown_loss():
    class Cfg:
        loss = "nope"

    with pytest.raises(ValueError, match="loss must be one of sgsd, grpo, opsd, got 'nope'"):
        build_method(Cfg())
