"""The optimizer base class and the state-dict format every optimizer (and EMA) shares.

An optimizer works on a whole ``Module``: it reads ``module.named_parameters()`` and
``module.named_grads()`` (same names, same order) and updates each parameter array *in place*,
so the module keeps the very same array objects (anything holding a reference sees the update).
Per-parameter state (moments, momentum buffers) lives in ``optimizer.state[slot][param_name]``,
allocated on the first step in the parameter's dtype and on the active backend.

State dict (plain data: arrays, numbers, strings)::

    {"type": "AdamW", "step": 12,
     "hyperparameters": {"lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-08, "weight_decay": 0.01},
     "state": {"exp_avg": {"conv_in.weight": array, ...}, "exp_avg_sq": {...}}}

``save_state(path, state_dict)`` stores it in one safetensors file: each array as the tensor
``<slot>.<param name>`` (``exp_avg.conv_in.weight``) and everything else as JSON in the metadata
entry ``npdiffusion.state``; ``load_state(path)`` rebuilds the dict. Floats go through JSON with
Python's shortest round-trip repr and arrays through raw bytes, so a resumed run is bit-identical.
See docs/optim.md ("Saving and resuming").
"""
from __future__ import annotations

import json
import math

from npdiffusion.backend import asarray, xp
from npdiffusion.checks import check_int
from npdiffusion.io.safetensors import load_with_metadata, save_file

STATE_METADATA_KEY = "npdiffusion.state"


def check_float(owner: str, name: str, value, low: float = 0.0, high: float = math.inf,
                low_open: bool = False, high_open: bool = False, allow_inf: bool = False) -> float:
    """``value`` as a finite Python float in [low, high] (ends open when asked; +inf only with
    ``allow_inf``), else a ValueError naming ``owner`` and ``name`` (TypeError for a non-number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise TypeError(f"{owner}: {name} must be a number, got {type(value).__name__}")
    v = float(value)
    if math.isnan(v) or (math.isinf(v) and not allow_inf) or v < low or v > high or (low_open and v == low) \
            or (high_open and v == high):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{owner}: {name} must be in {interval}, got {value!r}")
    return v


def check_module(owner: str, module):
    if not (hasattr(module, "named_parameters") and hasattr(module, "named_grads")):
        raise TypeError(f"{owner}: module must be an npdiffusion Module (with named_parameters and named_grads), "
                        f"got {type(module).__name__}")
    return module


class Optimizer:
    """Base class: holds ``module``, ``lr``, the step counter and per-parameter state slots.

    Subclasses set ``slots`` (names of per-parameter state arrays), implement ``step()`` and
    ``hyperparameters()`` and ``_set_hyperparameters(d)``.
    """

    slots: tuple = ()

    def __init__(self, module, lr: float):
        self.module = check_module(type(self).__name__, module)
        self.lr = check_float(type(self).__name__, "lr", lr)
        self.step_count = 0
        self.state = {slot: {} for slot in self.slots}
        self._flat_state = None         # (storage, state dict, {slot: [buffer per group]}), see _flat_slots

    # ----------------------------------------------------------------- stepping
    def _params_and_grads(self):
        """``[(name, param, grad)]`` for every parameter of the module (zeros where no gradient)."""
        params = list(self.module.named_parameters())
        grads = list(self.module.named_grads())
        out = []
        for (name, p), (gname, g) in zip(params, grads):
            if name != gname:
                raise RuntimeError(f"{type(self).__name__}: parameters and gradients are out of order "
                                   f"({name!r} vs {gname!r})")
            if g.shape != p.shape:
                raise ValueError(f"{type(self).__name__}: gradient of {name!r} has shape {tuple(g.shape)}, "
                                 f"parameter has {tuple(p.shape)}")
            out.append((name, p, g))
        return out

    def _slot(self, slot: str, name: str, param):
        """The state array ``slot`` of parameter ``name`` (zeros in the parameter's dtype at first)."""
        arr = self.state[slot].get(name)
        if arr is None:
            arr = xp.zeros_like(param)
            self.state[slot][name] = arr
        elif arr.shape != param.shape:
            raise ValueError(f"{type(self).__name__}: state {slot!r} of {name!r} has shape {tuple(arr.shape)}, "
                             f"parameter has {tuple(param.shape)}")
        return arr

    def _flat_slots(self, flat) -> dict:
        """``{slot: [buffer per group of flat]}``: the state as buffers in the layout of the flat
        parameter storage ``flat``, ``self.state[slot][name]`` views of them (the state-dict format is
        unchanged). Built on first use and again when the storage or ``self.state`` was replaced (a
        re-flattened module, ``load_state_dict``), values copied: zeros where no state exists yet."""
        cached = self._flat_state
        if cached is not None and cached[0] is flat and cached[1] is self.state:
            return cached[2]
        buffers, state = {}, {}
        for slot in self.slots:
            buffers[slot], state[slot] = flat.gather(self.state.get(slot, {}), f"{type(self).__name__} state {slot!r}")
        self.state = state
        self._flat_state = (flat, state, buffers)
        return buffers

    def step(self) -> None:
        raise NotImplementedError

    def zero_grad(self) -> None:
        """Clear the module's gradients (``module.zero_grad()``)."""
        self.module.zero_grad()

    # ----------------------------------------------------------------- state
    def hyperparameters(self) -> dict:
        return {"lr": self.lr}

    def _set_hyperparameters(self, hp: dict) -> None:
        self.lr = check_float(type(self).__name__, "lr", hp["lr"])

    def state_dict(self) -> dict:
        """Plain-data state (see the module docstring). Arrays are the live state arrays, not copies."""
        return {"type": type(self).__name__, "step": self.step_count, "hyperparameters": self.hyperparameters(),
                "state": {slot: dict(arrays) for slot, arrays in self.state.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore step, hyper-parameters and state arrays (copied, cast to each parameter's dtype)."""
        owner = type(self).__name__
        if not isinstance(state_dict, dict) or state_dict.get("type") != owner:
            got = state_dict.get("type") if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"{owner}.load_state_dict: expected a state dict of type {owner!r}, got {got!r}")
        params = dict(self.module.named_parameters())
        state = state_dict.get("state", {})
        unknown = set(state) - set(self.slots)
        if unknown:
            raise ValueError(f"{owner}.load_state_dict: unknown state slots {sorted(unknown)} (expected {self.slots})")
        new = {slot: {} for slot in self.slots}
        for slot, arrays in state.items():
            for name, arr in arrays.items():
                if name not in params:
                    raise KeyError(f"{owner}.load_state_dict: state {slot!r} names {name!r}, "
                                   "which is not a parameter of the module")
                p = params[name]
                if tuple(arr.shape) != tuple(p.shape):
                    raise ValueError(f"{owner}.load_state_dict: state {slot!r} of {name!r} has shape "
                                     f"{tuple(arr.shape)}, parameter has {tuple(p.shape)}")
                new[slot][name] = asarray(arr, dtype=p.dtype).copy()
        step = check_int("step", state_dict.get("step", 0), 0, f"{owner}.load_state_dict")
        self._set_hyperparameters({**self.hyperparameters(), **state_dict.get("hyperparameters", {})})
        self.step_count = step
        self.state = new


# ============================================================================ files
def flatten_state(state_dict: dict) -> tuple[dict, dict]:
    """``(tensors, metadata)`` for ``save_file``: arrays as ``<slot>.<name>``, the rest as JSON."""
    tensors = {}
    for slot, arrays in state_dict.get("state", {}).items():
        if "." in slot:
            raise ValueError(f"state slot names cannot contain '.', got {slot!r}")
        for name, arr in arrays.items():
            tensors[f"{slot}.{name}"] = arr
    rest = {k: v for k, v in state_dict.items() if k != "state"}
    rest["slots"] = sorted(state_dict.get("state", {}))
    return tensors, {STATE_METADATA_KEY: json.dumps(rest, sort_keys=True, allow_nan=False)}


def unflatten_state(tensors: dict, metadata: dict) -> dict:
    """Inverse of ``flatten_state``."""
    if STATE_METADATA_KEY not in metadata:
        raise ValueError(f"not an npdiffusion state file: metadata has no {STATE_METADATA_KEY!r} entry")
    try:
        rest = json.loads(metadata[STATE_METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"state metadata is not valid JSON: {exc}") from None
    if not isinstance(rest, dict):
        raise ValueError(f"state metadata must be a JSON object, got {type(rest).__name__}")
    state = {slot: {} for slot in rest.pop("slots", [])}
    for key, arr in tensors.items():
        slot, _, name = key.partition(".")
        if slot not in state or not name:
            raise ValueError(f"state tensor {key!r} does not belong to any of the slots {sorted(state)}")
        state[slot][name] = arr
    rest["state"] = state
    return rest


def save_state(path, state_dict: dict) -> None:
    """Write an optimizer/EMA/scheduler ``state_dict`` to one safetensors file, atomically."""
    tensors, metadata = flatten_state(state_dict)
    save_file(tensors, path, metadata=metadata)


def load_state(path) -> dict:
    """Read a state dict written by ``save_state`` (arrays come back as NumPy arrays)."""
    tensors, metadata = load_with_metadata(path)
    return unflatten_state(tensors, metadata)
