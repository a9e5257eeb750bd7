"""Which weights the SGSD teachers score with: ``live``, ``frozen``, ``ema`` or ``periodic``.

The teachers are the policy model itself under skill-conditioned prompts
(docs/design.md §2); the paper's ablations vary *which weights* that model has while
scoring:

* ``live`` (default, the paper's method) -- the current weights; nothing is kept.
* ``frozen`` -- the weights at the start of training. Under LoRA that is exactly the base
  model with the adapter disabled (``peft``'s ``disable_adapter``; nothing is copied);
  under full fine-tuning a copy of the initial trainable parameters is kept.
* ``ema`` -- an exponential moving average of the trainable parameters, updated after
  every optimiser step: ``e = decay · e + (1 - decay) · θ`` (published decay 0.999). The
  average is kept in float32 whatever the parameter dtype: at decay 0.999 a bfloat16
  average (8 mantissa bits) would round most updates away.
* ``periodic`` -- a copy of the trainable parameters refreshed every ``every`` optimiser
  steps (published: 50).

Kept weights are swapped into the model only around the teacher forwards
(:meth:`TeacherWeights.active`, no grad; the live values are copied back afterwards), so
the student forward and the optimiser always see the live parameters. Only trainable
parameters are kept: frozen ones never change, so the teacher shares them.

:meth:`TeacherWeights.state_dict` / :meth:`load_state_dict` hold everything a resumed
run needs (the kept tensors and the step of the last refresh), so ``ema`` and
``periodic`` resume exactly. Sharded (FSDP2) parameters are supported for ``live`` and
LoRA ``frozen`` only.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

__all__ = ["TEACHER_MODES", "TeacherWeights"]

TEACHER_MODES = ("live", "frozen", "ema", "periodic")


class TeacherWeights:
    """The teacher-weight policy of one run (see the module docstring)."""

    def __init__(self, mode: str, policy, *, ema_decay: float = 0.999, every: int = 50):
        if mode not in TEACHER_MODES:
            raise ValueError(f"teacher mode must be one of {TEACHER_MODES}, got {mode!r}")
        if not (isinstance(ema_decay, float) and 0.0 < ema_decay < 1.0):
            raise ValueError(f"ema_decay must be a float in (0, 1), got {ema_decay!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"periodic refresh interval must be an int >= 1, got {every!r}")
        self.mode = mode
        self.decay = ema_decay
        self.every = every
        self.refreshed_at = 0  # optimiser step of the last copy (periodic)
        self._use_adapter_switch = mode == "frozen" and getattr(policy, "is_peft", False)
        self.kept: dict[str, torch.Tensor] = {}
        if mode == "live" or self._use_adapter_switch:
            return
        params = self._params(policy)
        if any(_is_dtensor(p) for p in params.values()):
            raise ValueError(
                f"teacher={mode!r} keeps a copy of the trainable parameters, which is not "
                "supported with sharded (FSDP2) parameters; use teacher=live, or "
                "teacher=frozen with LoRA, or parallelism=ddp"
            )
        dtype = torch.float32 if mode == "ema" else None
        self.kept = {n: p.detach().to(dtype or p.dtype, copy=True) for n, p in params.items()}

    @staticmethod
    def _params(policy) -> dict[str, torch.Tensor]:
        return {n: p for n, p in policy.named_parameters() if p.requires_grad}

    # ---------------------------------------------------------------- training hooks
    @torch.no_grad()
    def after_optimizer_step(self, policy, step: int) -> None:
        """Update the kept weights after optimiser step ``step`` (1-based)."""
        if self.mode == "ema":
            for name, p in self._params(policy).items():
                self.kept[name].lerp_(p.detach().to(self.kept[name].dtype), 1.0 - self.decay)
        elif self.mode == "periodic" and step % self.every == 0:
            for name, p in self._params(policy).items():
                self.kept[name].copy_(p.detach())
            self.refreshed_at = step

    def active(self, policy):
        """Context in which ``policy`` computes with the teacher's weights (no grad)."""
        if self.mode == "live":
            return nullcontext()
        if self._use_adapter_switch:
            return _no_grad(policy.model.disable_adapter())
        return self._swapped(policy)

    @contextmanager
    def _swapped(self, policy):
        params = self._params(policy)
        with torch.no_grad():
            live = {n: p.detach().clone() for n, p in params.items()}
            for n, p in params.items():
                p.copy_(self.kept[n])
        try:
            with torch.no_grad():
                yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(live[n])

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """``{"mode", "refreshed_at", "tensors": {name: tensor}}`` (tensors on CPU)."""
        return {
            "mode": self.mode,
            "refreshed_at": self.refreshed_at,
            "tensors": {n: t.detach().cpu() for n, t in self.kept.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode") != self.mode:
            raise ValueError(
                f"checkpoint teacher state is for teacher={state.get('mode')!r}, "
                f"this run uses teacher={self.mode!r}"
            )
        tensors = state.get("tensors", {})
        if set(tensors) != set(self.kept):
            missing = sorted(set(self.kept) - set(tensors))[:3]
            raise ValueError(
                f"checkpoint teacher state does not match the trainable parameters "
                f"(missing e.g. {missing})"
            )
        with torch.no_grad():
            for n, t in tensors.items():
                self.kept[n].copy_(t)
        self.refreshed_at = int(state.get("refreshed_at", 0))


@contextmanager
def _no_grad(ctx):
    with torch.no_grad(), ctx:
        yield


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"
