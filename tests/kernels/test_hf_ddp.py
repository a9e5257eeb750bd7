"""sgsd_kernels.hf under DistributedDataParallel: two gloo ranks train a tiny Qwen3 on
different inputs through ``hf.last_hidden_states(ddp_model, ...)`` or through the loss of a
``hf.patch_causal_lm``-patched model called by DDP; every rank must end with the same
gradients, the average of the ranks' own ones (DDP's all-reduce ran)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sgsd_kernels as sk
from sgsd_kernels import hf

pytest.importorskip("transformers")
from tests.kernels.test_hf import _tiny_qwen3  # noqa: E402 (after the importorskip)

pytestmark = pytest.mark.slow

WORLD = 2


def _model() -> torch.nn.Module:
    return _tiny_qwen3().train()


def _batch(rank: int) -> torch.Tensor:
    return torch.randint(0, 1007, (2, 7), generator=torch.Generator().manual_seed(100 + rank))


def _loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    hidden = hf.last_hidden_states(model, ids, attention_mask=torch.ones_like(ids))
    weight, bias = hf.lm_head_parameters(model)
    return -sk.linear_logprobs(hidden[:, :-1], weight, ids[:, 1:], bias=bias).mean()


def _patched_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, attention_mask=torch.ones_like(ids), labels=ids).loss


LOSSES = {"helper": _loss, "patched": _patched_loss}


def _grads(model: torch.nn.Module) -> torch.Tensor:
    inner = hf.unwrap_causal_lm(model)
    return torch.cat([p.grad.reshape(-1) for p in inner.parameters() if p.grad is not None])


def _rank(rank: int, store: str, out: str, how: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        model = _model()
        if how == "patched":
            hf.patch_causal_lm(model)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        LOSSES[how](ddp, _batch(rank)).backward()
        torch.save(_grads(ddp), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("how", ["helper", "patched"])
def test_gradients_through_the_helper_or_the_patch_are_all_reduced(tmp_path, how):
    args = (str(tmp_path / "store"), str(tmp_path), how)
    mp.spawn(_rank, args=args, nprocs=WORLD, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    own = []
    for r in range(WORLD):  # each rank's gradients alone, unpatched, in this process
        model = _model()
        _loss(model, _batch(r)).backward()
        own.append(_grads(model))
    assert not torch.allclose(own[0], own[1])  # the ranks' batches differ
    assert torch.equal(got[0], got[1]), "ranks hold different gradients: no all-reduce"
    torch.testing.assert_close(got[0], (own[0] + own[1]) / WORLD, rtol=1e-10, atol=1e-12)


def test_the_wrapper_forward_runs_and_the_inner_forward_is_restored():
    """DataParallel stands in for DDP here (same .module, no process group): the helper
    calls the wrapper, whose forward sees the call, and leaves no patched forward behind."""
    model = _model()
    wrapper = torch.nn.DataParallel(model)
    seen = []
    wrapper.register_forward_pre_hook(lambda *_: seen.append("wrapper"))
    ids = _batch(0)
    hidden = hf.last_hidden_states(wrapper, ids)
    assert seen == ["wrapper"] and "forward" not in model.__dict__
    plain = hf.last_hidden_states(model, ids)
    torch.testing.assert_close(hidden, plain, rtol=0, atol=0)
    out = model(ids, output_hidden_states=True)  # the model's own forward is intact
    torch.testing.assert_close(out.hidden_states[-1], plain, rtol=1e-12, atol=1e-12)
