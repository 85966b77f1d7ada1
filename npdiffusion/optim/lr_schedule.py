"""Learning-rate schedules: factor functions of the step, and ``LRScheduler`` that applies them.

A schedule is a function ``fn(step) -> factor``; ``LRScheduler(optimizer, fn)`` sets
``optimizer.lr = base_lr * fn(step)``, starting with step 0 at construction and advancing by one
on each ``scheduler.step()`` (call it after ``optimizer.step()``), exactly like torch's
``LambdaLR`` and therefore like ``diffusers.optimization.get_scheduler``. With a warm-up, the
first optimizer step runs at ``lr = 0``, as it does in diffusers' training scripts.

Factors (w = warmup steps, T = total steps, s = step):

* ``constant_with_warmup(s, w)`` = s / max(1, w) while s < w, then 1.
* ``cosine_with_warmup(s, w, T, min_ratio=0)`` = s / max(1, w) while s < w, then
  min_ratio + (1 - min_ratio) max(0, (1 + cos(2 pi c progress)) / 2), progress = (s - w) / max(1, T - w),
  c = num_cycles = 0.5 (one half cosine from 1 to min_ratio).
* ``linear_with_warmup(s, w, T)`` = s / max(1, w) while s < w, then max(0, (T - s) / max(1, T - w)).

See docs/optim.md ("Learning-rate schedules").
"""
from __future__ import annotations

import math
from functools import partial

from npdiffusion.optim.optimizer import check_float


def _warmup(step: int, warmup: int) -> float:
    return float(step) / float(max(1, warmup))


def constant(step: int) -> float:
    """Factor 1 for every step."""
    return 1.0


def constant_with_warmup(step: int, warmup: int) -> float:
    """Linear warm-up from 0 to 1 over ``warmup`` steps, then 1 (diffusers "constant_with_warmup")."""
    if step < warmup:
        return _warmup(step, warmup)
    return 1.0


def cosine_with_warmup(step: int, warmup: int, total: int, min_ratio: float = 0.0, num_cycles: float = 0.5) -> float:
    """Linear warm-up, then a cosine from 1 down to ``min_ratio`` at ``total`` (diffusers "cosine" when
    ``min_ratio == 0``)."""
    if step < warmup:
        return _warmup(step, warmup)
    progress = float(step - warmup) / float(max(1, total - warmup))
    f = max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))
    return f if min_ratio == 0.0 else min_ratio + (1.0 - min_ratio) * f


def linear_with_warmup(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then linear decay to 0 at ``total`` (diffusers "linear")."""
    if step < warmup:
        return _warmup(step, warmup)
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


class LRScheduler:
    """Sets ``optimizer.lr = base_lr * fn(step)``; ``base_lr`` is the optimizer's lr at construction."""

    def __init__(self, optimizer, fn):
        if not hasattr(optimizer, "lr"):
            raise TypeError(f"LRScheduler: optimizer must have an lr attribute, got {type(optimizer).__name__}")
        if not callable(fn):
            raise TypeError(f"LRScheduler: fn must be a function of the step, got {type(fn).__name__}")
        self.optimizer = optimizer
        self.fn = fn
        self.base_lr = float(optimizer.lr)
        self.step_count = 0
        self._apply()

    def _apply(self) -> None:
        self.optimizer.lr = self.base_lr * float(self.fn(self.step_count))

    def step(self) -> None:
        """Advance one step and set the optimizer's lr for the next optimizer step."""
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> float:
        return self.optimizer.lr

    def state_dict(self) -> dict:
        return {"type": "LRScheduler", "step": self.step_count, "base_lr": self.base_lr}

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or state_dict.get("type") != "LRScheduler":
            raise ValueError("LRScheduler.load_state_dict: expected a state dict of type 'LRScheduler'")
        step = state_dict["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"LRScheduler.load_state_dict: step must be a non-negative int, got {step!r}")
        self.base_lr = check_float("LRScheduler", "base_lr", state_dict["base_lr"])
        self.step_count = step
        self._apply()


SCHEDULES = ("constant", "constant_with_warmup", "cosine", "linear")


def get_scheduler(name: str, optimizer, num_warmup_steps: int = 0, num_training_steps: int | None = None,
                  min_ratio: float = 0.0) -> LRScheduler:
    """diffusers' ``get_scheduler`` for ``name`` in ``SCHEDULES``, as an ``LRScheduler``."""
    if name not in SCHEDULES:
        raise ValueError(f"get_scheduler: name must be one of {SCHEDULES}, got {name!r}")
    if isinstance(num_warmup_steps, bool) or not isinstance(num_warmup_steps, int) or num_warmup_steps < 0:
        raise ValueError(f"get_scheduler: num_warmup_steps must be a non-negative int, got {num_warmup_steps!r}")
    if name in ("cosine", "linear") and (not isinstance(num_training_steps, int) or num_training_steps <= 0):
        raise ValueError(f"get_scheduler: {name!r} needs num_training_steps as a positive int, "
                         f"got {num_training_steps!r}")
    if name == "constant":
        fn = constant
    elif name == "constant_with_warmup":
        fn = partial(constant_with_warmup, warmup=num_warmup_steps)
    elif name == "cosine":
        fn = partial(cosine_with_warmup, warmup=num_warmup_steps, total=num_training_steps, min_ratio=min_ratio)
    else:
        fn = partial(linear_with_warmup, warmup=num_warmup_steps, total=num_training_steps)
    return LRScheduler(optimizer, fn)
