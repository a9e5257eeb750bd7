"""sgsd.config: defaults, the tiny profile, file + CLI overrides, validation, save."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from sgsd.config import (
    RESUMABLE,
    TINY_PROFILE,
    ConfigError,
    TrainConfig,
    field_docs,
    load_config,
    resumed_config,
    usage,
    user_options,
)


def test_paper_defaults_when_a_real_model_is_named():
    cfg = load_config(
        ["--model", "Qwen/Qwen3-1.7B", "--dataset", "BytedTsinghua-SIA/DAPO-Math-17k"]
    )
    assert (cfg.num_teachers, cfg.gate_tau, cfg.clip_delta, cfg.confidence_threshold) == (
        8,
        1.0,
        3.0,
        0.05,
    )
    assert (cfg.lr, cfg.max_grad_norm, cfg.lora_r, cfg.lora_alpha) == (5e-6, 0.1, 64, 128)
    assert (cfg.temperature, cfg.top_p, cfg.top_k) == (1.1, 0.95, 20)
    assert (cfg.max_completion_tokens, cfg.max_steps, cfg.checkpoint_every) == (1024, 200, 25)
    assert cfg.finetune == "lora"
    assert set(cfg.lora_target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


def test_tiny_profile_applies_only_to_unset_fields():
    cfg = load_config([])
    assert cfg.model == "tiny"
    for key, value in TINY_PROFILE.items():
        assert getattr(cfg, key) == value
    cfg = load_config(["--lr", "0.5", "--max-steps", "3"])
    assert cfg.lr == 0.5 and cfg.max_steps == 3
    assert cfg.max_completion_tokens == TINY_PROFILE["max_completion_tokens"]


def test_file_then_cli_precedence_and_parsing(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {"max-steps": 7, "lr": 1e-4, "tensorboard": True, "lora_target_modules": ["q_proj"]}
        )
    )
    cfg = load_config(
        [
            "--config",
            str(path),
            "--lr=2e-4",
            "--gradient-checkpointing",
            "false",
            "--resume",
            "none",
            "--adam-betas",
            "0.8,0.9",
        ]
    )
    assert cfg.max_steps == 7 and cfg.lr == 2e-4 and cfg.tensorboard is True
    assert cfg.gradient_checkpointing is False and cfg.resume is None
    assert cfg.lora_target_modules == ["q_proj"] and cfg.adam_betas == [0.8, 0.9]


def test_save_round_trips(tmp_path):
    cfg = load_config(["--max-steps", "3", "--wandb-project", "p"])
    cfg.save(tmp_path / "config.yaml")
    cfg.save(tmp_path / "config.json")
    assert load_config(["--config", str(tmp_path / "config.yaml")]) == cfg
    assert TrainConfig(**json.loads((tmp_path / "config.json").read_text())) == cfg


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--gate-tau", "0"], "--gate-tau must be finite and > 0, got 0.0"),
        (["--clip-delta", "-1"], "--clip-delta must be > 0 (inf: no clipping), got -1.0"),
        (["--clip-delta", "nan"], "--clip-delta must be > 0 (inf: no clipping), got nan"),
        (
            ["--loss", "grpo", "--polarity", "false"],
            "--polarity is an ablation of --loss sgsd, not of --loss grpo",
        ),
        (
            ["--loss", "opsd", "--token-mask", "false"],
            "--token-mask is an ablation of --loss sgsd, not of --loss opsd",
        ),
        (["--confidence-threshold", "-0.1"], "--confidence-threshold must be finite and >= 0"),
        (["--confidence-threshold", "nan"], "--confidence-threshold must be finite and >= 0"),
        (["--num-teachers", "0"], "--num-teachers must be >= 1, got 0"),
        (["--finetune", "qlora"], "--finetune must be one of lora|full, got 'qlora'"),
        (["--rollout-backend", "sglang"], "--rollout-backend must be one of auto|vllm|hf"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
        (["--max-steps", "zero"], "--max-steps expects an integer, got 'zero'"),
        (["--max-steps", "-3"], "--max-steps must be >= 1, got -3"),
        (["--max_steps=-3"], "--max_steps must be >= 1, got -3"),  # the flag as typed
        (["--no-such-key", "1"], "unknown option --no-such-key"),
        (["--max-stpes", "3"], "unknown option --max-stpes (did you mean --max-steps?)"),
        (["--output-dir", "--max-steps", "3"], "--output-dir expects a value"),
        (["--max-steps"], "--max-steps expects a value"),
        (["--tensorboard", "maybe"], "--tensorboard expects true or false, got 'maybe'"),
        (["--parallelism", "fsdp"], "--parallelism must be one of ddp|fsdp2, got 'fsdp'"),
        (["--kernel-backend", "cuda"], "--kernel-backend must be one of auto|triton|torch"),
        (["positional"], "unexpected argument 'positional'"),
        (["--config", "/nonexistent/c.yaml"], "--config /nonexistent/c.yaml: no such file"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_flag(argv, message):
    with pytest.raises(ConfigError) as info:
        load_config(argv)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_config_file_errors_name_the_file_and_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"max_stepz": 3}))
    with pytest.raises(ConfigError, match=r"unknown option max_stepz in .*c\.yaml \(did you"):
        load_config(["--config", str(path)])
    path.write_text(yaml.safe_dump({"max_steps": 0}))
    with pytest.raises(ConfigError, match=r"^max_steps \(in .*c\.yaml\) must be >= 1, got 0"):
        load_config(["--config", str(path)])
    path.write_text("max_steps: [1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: not valid yaml"):
        load_config(["--config", str(path)])


def test_the_paper_s_ablations_are_flags_recorded_in_the_config(tmp_path):
    argv = ["--polarity", "false", "--token-mask", "false", "--clip-delta", "inf"]
    cfg = load_config([*argv, "--confidence-threshold", "0", "--num-teachers", "1"])
    assert (cfg.polarity, cfg.token_mask, cfg.clip_delta) == (False, False, math.inf)
    cfg.save(tmp_path / "config.yaml")
    assert load_config(["--config", str(tmp_path / "config.yaml")]) == cfg


def test_only_booleans_and_resume_stand_alone():
    cfg = load_config(["--resume", "--tensorboard", "--max-steps", "2"])
    assert cfg.resume == "latest" and cfg.tensorboard is True and cfg.max_steps == 2
    assert load_config(["--tensorboard=false"]).tensorboard is False
    assert load_config(["--resume", "runs/x/checkpoints/step_000002"]).resume.endswith("02")
    assert load_config(["--overwrite"]).overwrite is True


def test_every_field_is_documented_and_listed_in_help():
    from dataclasses import fields

    docs = field_docs()
    names = [f.name for f in fields(TrainConfig)]
    assert set(docs) == set(names) and all(docs[n] for n in names)
    text = usage()
    assert all(f"--{n.replace('_', '-')} " in text for n in names)
    assert "[tiny: 64]" in text  # max_completion_tokens' tiny-profile value is shown


def test_kernel_backend_choices_are_the_runtimes():
    from sgsd_kernels.runtime import BACKENDS

    for backend in BACKENDS:
        assert load_config(["--kernel-backend", backend]).kernel_backend == backend


def test_importing_sgsd_and_its_config_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, sgsd, sgsd.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- resume
def _saved(*args: str) -> dict:
    """What a checkpoint's trainer_state.json holds as its config."""
    return json.loads(json.dumps(load_config(list(args)).to_dict()))


def test_a_resume_takes_the_run_s_options_not_the_defaults():
    saved = _saved("--num-teachers", "2", "--lr", "1e-4", "--checkpoint-every", "1")
    argv = ["--max-steps", "4", "--resume"]
    cfg, changes = resumed_config(load_config(argv), saved, user_options(argv))
    assert (cfg.num_teachers, cfg.lr, cfg.checkpoint_every) == (2, 1e-4, 1)
    assert cfg.max_steps == 4 and cfg.resume == "latest"
    assert changes == [f"--max-steps {saved['max_steps']!r} -> 4"]


def test_an_experiment_option_changed_on_resume_is_an_error_naming_it():
    saved = _saved("--num-teachers", "2")
    argv = ["--resume", "--num-teachers", "4", "--gate-tau", "2"]
    with pytest.raises(ConfigError) as info:
        resumed_config(load_config(argv), saved, user_options(argv))
    message = str(info.value)
    assert message.startswith("--gate-tau 2.0 (the run has 1.0), --num-teachers 4 (the run has 2)")
    assert "\n" not in message and "--max-steps" in message  # lists what may change
    # given again with the run's own value, it is no change
    argv = ["--resume", "--num-teachers", "2"]
    cfg, changes = resumed_config(load_config(argv), saved, user_options(argv))
    assert cfg.num_teachers == 2 and changes == []


@pytest.mark.parametrize("name", RESUMABLE)
def test_every_resumable_option_is_an_option(name):
    assert name in TrainConfig.__dataclass_fields__


def test_options_from_a_config_file_count_as_given(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("num_teachers: 3\nmax_steps: 9\n")
    assert user_options(["--config", str(path), "--lr", "1"]) == {
        "num_teachers",
        "max_steps",
        "lr",
    }


def test_the_learning_rate_after_max_steps_is_raised_on_resume():
    import torch

    from sgsd.engine.optim import build_optimizer, build_scheduler, resume_schedule

    def trained(max_steps: int, steps: int):
        cfg = load_config(["--max-steps", str(max_steps), "--lr", "1e-3", "--warmup-steps", "0"])
        param = torch.nn.Parameter(torch.zeros(1))
        opt = build_optimizer(cfg, [param])
        sched = build_scheduler(cfg, opt)
        rates = []
        for _ in range(steps):
            rates.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return opt, sched, rates

    opt3, sched3, rates = trained(3, 3)
    assert rates == pytest.approx([1e-3, 2e-3 / 3, 1e-3 / 3])
    for max_steps, want in ((3, opt3.param_groups[0]["lr"]), (5, 1e-3 * 2 / 5)):
        cfg = load_config(["--max-steps", str(max_steps), "--lr", "1e-3", "--warmup-steps", "0"])
        param = torch.nn.Parameter(torch.zeros(1))
        opt = build_optimizer(cfg, [param])
        opt.load_state_dict(opt3.state_dict())
        sched = build_scheduler(cfg, opt)
        sched.load_state_dict(sched3.state_dict())
        resume_schedule(sched)
        assert opt.param_groups[0]["lr"] == want and sched.get_last_lr() == [want]
        sched.step()
        if max_steps == 5:
            assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 / 5)
