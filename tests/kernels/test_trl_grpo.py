"""sgsd_kernels.integrations.trl: two GRPO steps of TRL's own GRPOTrainer on the tiny
offline Qwen3, with and without LinearLogprobsGRPOTrainer, from the same seed: the same
completions, per-token log-probs and entropies within the fp32 oracle tolerance, and the
same logged losses."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from sgsd.tiny.model import save_tiny_model  # noqa: E402
from sgsd_bench.measure import MemMeter  # noqa: E402
from sgsd_kernels.integrations.trl import LinearLogprobsGRPOTrainer  # noqa: E402

pytestmark = pytest.mark.slow


def variety(completions, **_):
    """Rule-based reward: the fraction of distinct characters (varies between samples of
    a random model, so the advantages and the loss are not 0)."""
    return [len(set(c)) / max(len(c), 1) for c in completions]


class _Recording:
    """Keeps every (logps, entropies) the trainer computes, and the peak memory of the
    call above its start (the process's RSS high-water mark; reported, not asserted)."""

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        meter = MemMeter("cpu")
        meter.start()
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        self.peaks.append(meter.peak())
        self.seen.append(
            (out[0].detach().clone(), None if out[1] is None else out[1].detach().clone())
        )
        return out


class RecordingTRL(_Recording, GRPOTrainer):
    pass


class RecordingFused(_Recording, LinearLogprobsGRPOTrainer):
    pass


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # a path, not a model object: TRL builds the reference model from it
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0))


def _run(trainer_class, out_dir, model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = ["1+1=", "2+3=", "7*6=", "9-4="]
    args = GRPOConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=2,
        learning_rate=1e-3,
        beta=0.1,  # a reference model: its log-probs take the same path
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,  # TRL's default autocasts to bf16; fp32 compares within its tolerance
        seed=0,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = trainer_class(
        model=model_dir,
        reward_funcs=variety,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts * 2}),
        processing_class=tok,
    )
    trainer.seen, trainer.peaks = [], []
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return trainer.seen, losses, max(trainer.peaks)


def test_two_grpo_steps_match_trl(tmp_path, tiny_dir, record_property):
    trl_seen, trl_losses, trl_peak = _run(RecordingTRL, tmp_path / "trl", tiny_dir)
    fused_seen, fused_losses, fused_peak = _run(RecordingFused, tmp_path / "fused", tiny_dir)
    for name, peak in [("trl", trl_peak), ("sgsd_kernels", fused_peak)]:
        record_property(f"logprob_step_peak_mib_{name}", round(peak / 2**20, 1))
    print(f"log-prob step peak: TRL {trl_peak / 2**20:.1f} MiB, ours {fused_peak / 2**20:.1f} MiB")
    assert len(fused_seen) == len(trl_seen) >= 4  # 2 steps x (reference + policy)
    assert len(trl_losses) == len(fused_losses) == 2
    for (lp, ent), (want, want_ent) in zip(fused_seen, trl_seen):
        assert lp.shape == want.shape and lp.dtype == torch.float32
        assert torch.any(lp != 0)
        # fp32 rule (docs/design.md §8): 1e-5 of the largest |log-prob|
        torch.testing.assert_close(lp, want, rtol=0, atol=1e-5 * max(want.abs().max(), 1))
        assert (ent is None) == (want_ent is None)
        if ent is not None:
            torch.testing.assert_close(ent, want_ent, rtol=0, atol=1e-5 * max(want_ent.max(), 1))
    assert any(loss != 0 for loss in trl_losses)
    torch.testing.assert_close(
        torch.tensor(fused_losses), torch.tensor(trl_losses), rtol=1e-4, atol=1e-6
    )
