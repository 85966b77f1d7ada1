"""``EMA(module, decay=0.9999, ...)``: an exponential moving average of a module's weights.

Shadow weights s (one per parameter, same dtype, starting as a copy of the parameters) follow::

    s <- s - (1 - d_k) (s - p)          after the k-th optimizer step, k = 1, 2, ...

with the decay d_k chosen by ``warmup``:

* ``"diffusers"`` (default; diffusers' ``EMAModel`` rule): with j = k - update_after_step - 1,
  d_k = 0 for j <= 0 (copy), else clip((1 + j) / (10 + j), min_decay, decay).
* ``"power"`` (diffusers' ``use_ema_warmup=True``): d_k = clip(1 - (1 + j / inv_gamma)^-power,
  min_decay, decay), 0 for j <= 0.
* ``"none"``: d_k = decay for every k > update_after_step (0 before, i.e. copy).

``copy_to(module)`` writes the averages into a module in place; ``store`` / ``restore`` keep
and put back the training weights around an evaluation. On a tracked module in flat training
storage (npdiffusion/nn/flat_parameters.py) the averages live in buffers of the same layout and an
update runs over each buffer in cache-sized blocks: the same operations on every entry as per
parameter. Derivation: docs/optim.md ("EMA").
"""
from __future__ import annotations

from npdiffusion.backend import asarray, xp
from npdiffusion.checks import check_int
from npdiffusion.nn import flat_parameters
from npdiffusion.optim.optimizer import check_float, check_module
from npdiffusion.parallel import BLOCK_ENTRIES, parallel_for

WARMUPS = ("diffusers", "power", "none")


class EMA:
    """Moving average of ``module``'s parameters, updated by ``update()`` after each optimizer step."""

    def __init__(self, module, decay: float = 0.9999, min_decay: float = 0.0, update_after_step: int = 0,
                 warmup: str = "diffusers", inv_gamma: float = 1.0, power: float = 2 / 3):
        self.module = check_module("EMA", module)
        self._set_hyperparameters({"decay": decay, "min_decay": min_decay, "update_after_step": update_after_step,
                                   "warmup": warmup, "inv_gamma": inv_gamma, "power": power})
        self.shadow = {name: p.copy() for name, p in module.named_parameters()}
        self.optimization_step = 0
        self.cur_decay_value = None
        self._stored = None
        self._flat_shadow = None        # (storage, shadow dict, [buffer per group]), see _shadow_buffers

    def _set_hyperparameters(self, hp: dict) -> None:
        self.decay = check_float("EMA", "decay", hp["decay"], 0.0, 1.0)
        self.min_decay = check_float("EMA", "min_decay", hp["min_decay"], 0.0, 1.0)
        after = hp["update_after_step"]
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise ValueError(f"EMA: update_after_step must be a non-negative int, got {after!r}")
        self.update_after_step = after
        if hp["warmup"] not in WARMUPS:
            raise ValueError(f"EMA: warmup must be one of {WARMUPS}, got {hp['warmup']!r}")
        self.warmup = hp["warmup"]
        self.inv_gamma = check_float("EMA", "inv_gamma", hp["inv_gamma"], low_open=True)
        self.power = check_float("EMA", "power", hp["power"], low_open=True)

    def hyperparameters(self) -> dict:
        return {"decay": self.decay, "min_decay": self.min_decay, "update_after_step": self.update_after_step,
                "warmup": self.warmup, "inv_gamma": self.inv_gamma, "power": self.power}

    def get_decay(self, optimization_step: int) -> float:
        """The decay d_k used by the ``optimization_step``-th update (see the module docstring)."""
        step = max(0, optimization_step - self.update_after_step - 1)
        if self.warmup == "none":
            return self.decay if optimization_step > self.update_after_step else 0.0
        if step <= 0:
            return 0.0
        if self.warmup == "power":
            value = 1 - (1 + step / self.inv_gamma) ** -self.power
        else:
            value = (1 + step) / (10 + step)
        return max(min(value, self.decay), self.min_decay)

    def _pairs(self, module):
        module = self.module if module is None else check_module("EMA", module)
        out = []
        for name, p in module.named_parameters():
            s = self.shadow.get(name)
            if s is None:
                raise KeyError(f"EMA: module parameter {name!r} has no moving average (EMA built on another model?)")
            if s.shape != p.shape:
                raise ValueError(f"EMA: average of {name!r} has shape {tuple(s.shape)}, parameter has {tuple(p.shape)}")
            out.append((name, s, p))
        return out

    def _shadow_buffers(self, flat) -> list:
        """The averages as one buffer per group of the flat storage ``flat``, ``self.shadow[name]``
        views of them; rebuilt (values copied) when the storage or ``self.shadow`` was replaced."""
        cached = self._flat_shadow
        if cached is not None and cached[0] is flat and cached[1] is self.shadow:
            return cached[2]
        missing = [name for name in flat.order if name not in self.shadow]
        if missing:
            raise KeyError(f"EMA: module parameter {missing[0]!r} has no moving average (EMA built on another model?)")
        buffers, self.shadow = flat.gather(self.shadow, "EMA average")
        self._flat_shadow = (flat, self.shadow, buffers)
        return buffers

    def update(self, module=None) -> float:
        """Fold the current weights of ``module`` (default: the tracked one) into the averages.

        Returns the decay used.
        """
        flat = flat_parameters.current(self.module) if module is None or module is self.module else None
        if flat is not None:
            pairs = list(zip(self._shadow_buffers(flat), (group.params for group in flat.groups)))
        else:
            pairs = [(s, p) for _, s, p in self._pairs(module)]
        self.optimization_step += 1
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay
        one_minus = 1 - decay

        def fold(s, p):
            tmp = xp.subtract(s, p)
            tmp *= one_minus
            s -= tmp

        for s, p in pairs:
            if flat is None:
                fold(s, p)
            else:
                parallel_for(lambda lo, hi, s=s, p=p: fold(s[lo:hi], p[lo:hi]), s.size, 1, BLOCK_ENTRIES)
        return decay

    step = update  # diffusers' name

    def copy_to(self, module=None) -> None:
        """Write the averages into ``module``'s parameters in place (same array objects)."""
        for _, s, p in self._pairs(module):
            p[...] = s

    def store(self, module=None) -> None:
        """Keep a copy of ``module``'s current weights, for ``restore`` after evaluating with the EMA."""
        self._stored = {name: p.copy() for name, _, p in self._pairs(module)}

    def restore(self, module=None) -> None:
        """Put back the weights saved by ``store`` (in place) and forget them."""
        if self._stored is None:
            raise RuntimeError("EMA.restore: call store() first")
        for name, _, p in self._pairs(module):
            p[...] = self._stored[name]
        self._stored = None

    def state_dict(self) -> dict:
        """``{"type": "EMA", "step": k, "hyperparameters": {...}, "state": {"shadow": {name: array}}}``."""
        return {"type": "EMA", "step": self.optimization_step, "hyperparameters": self.hyperparameters(),
                "state": {"shadow": dict(self.shadow)}}

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or state_dict.get("type") != "EMA":
            raise ValueError("EMA.load_state_dict: expected a state dict of type 'EMA'")
        shadow = state_dict.get("state", {}).get("shadow", {})
        if set(shadow) != set(self.shadow):
            missing = sorted(set(self.shadow) - set(shadow))
            extra = sorted(set(shadow) - set(self.shadow))
            raise KeyError(f"EMA.load_state_dict: missing averages {missing[:10]}, unexpected {extra[:10]}")
        new = {}
        for name, current in self.shadow.items():
            arr = shadow[name]
            if tuple(arr.shape) != tuple(current.shape):
                raise ValueError(f"EMA.load_state_dict: {name!r} has shape {tuple(arr.shape)}, "
                                 f"expected {tuple(current.shape)}")
            new[name] = asarray(arr, dtype=current.dtype).copy()
        step = check_int("step", state_dict.get("step", 0), 0, "EMA.load_state_dict")
        self._set_hyperparameters({**self.hyperparameters(), **state_dict.get("hyperparameters", {})})
        self.optimization_step = step
        self.shadow = new
