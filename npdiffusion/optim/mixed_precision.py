"""Mixed precision: float16 compute, float32 master weights, dynamic loss scaling.

Shapes: every array here has the shape of the parameter it belongs to (no shapes of its own);
S is the loss scale, a Python float that is always a float32 value (as torch keeps it).

Two objects, used together::

    master = MasterWeights(unet, compute_dtype="float16")  # float32 copies; unet now holds float16
    opt = AdamW(master, lr=1e-4)                             # the optimizer updates the masters
    scaler = DynamicLossScaler()                             # torch.amp.GradScaler's schedule
    for batch in data:
        master.zero_grad()                                   # clears the unet's gradients too
        out = unet(x16, t, ctx16)                            # float16 forward
        loss, dout = ...                                     # the loss and dL/dout, in float32
        unet.backward(scaler.scale(dout, dtype=unet.dtype))  # backward of S * L in float16
        scaler.unscale_(opt)                                 # masters' grads = float32(g16) * (1/S)
        clip_grad_norm_(master, 1.0)                         # optional, on true-scale gradients
        scaler.step(opt)                                     # skipped if a gradient is not finite;
        scaler.update()                                      #   else AdamW, then masters -> unet

* ``MasterWeights(module, compute_dtype)`` keeps a float32 copy of every parameter of ``module``
  and casts ``module`` to ``compute_dtype``. It looks like a module to the optimizers, ``EMA`` and
  ``clip_grad_norm_`` (``named_parameters`` / ``named_grads`` / ``zero_grad``, same names), so
  ``AdamW(master)`` keeps float32 moments and updates float32 weights; ``load_grads`` copies the
  module's (scaled) gradients into float32 master gradients, ``copy_to_module`` rounds the masters
  back into the module's arrays in place. The masters and their gradients are views of one float32
  buffer each (``flat_parameters``, npdiffusion/nn/flat_parameters.py), so the optimizer, the EMA
  and the clipping each run over one array; when the module is in flat storage too, with the same
  order, loading the gradients and copying the weights back are one call each.
* ``DynamicLossScaler`` multiplies the loss gradient by S before the float16 backward, so small
  gradients do not flush to zero, and divides it out in float32. A step whose gradients hold inf
  or NaN (float16 overflow, or a real divergence) is skipped: the optimizer does not run, so the
  master weights, the module and the optimizer state stay bitwise unchanged; S is multiplied by
  ``backoff_factor`` and the skip is counted. After ``growth_interval`` good steps in a row S is
  multiplied by ``growth_factor``. ``max_consecutive_skips`` skips in a row raise
  ``NonFiniteGradientError``: a run that no scale can fix stops with a clear message.

The scale schedule is torch.amp.GradScaler's (``_amp_update_scale_``): a new scale is the float64
product of S and the factor rounded to float32, a growth that would overflow float32 is not
applied, and 1/S is the float32 rounding of the float64 reciprocal.

bfloat16 is not offered: NumPy has no bfloat16 type, CuPy's (through ``ml_dtypes``, experimental
since CuPy 14) is not supported by ``cupyx.scipy.special``, which the activations use, and
``Module.to`` accepts float16/32/64 only.

Why each piece is there, with the float16 numbers: docs/gpu.md ("Mixed precision").
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy

from npdiffusion.backend import to_numpy, xp
from npdiffusion.checks import check_dtype, check_positive_int
from npdiffusion.nn import flat_parameters as flat_storage
from npdiffusion.optim.optimizer import check_float, check_module

#: Compute dtypes ``MasterWeights`` accepts (float32 = masters and module agree: a plain run).
COMPUTE_DTYPES = ("float16", "float32")
MASTER_DTYPE = numpy.dtype(numpy.float32)


class NonFiniteGradientError(RuntimeError):
    """Too many consecutive steps had non-finite gradients: training cannot go on as it is."""


def _compute_dtype(dtype) -> numpy.dtype:
    name = getattr(dtype, "name", None) or (dtype if isinstance(dtype, str) else getattr(dtype, "__name__", None))
    if name == "bfloat16":
        raise ValueError("MasterWeights: compute_dtype 'bfloat16' is not available: NumPy has no bfloat16 type, "
                         "and CuPy's experimental one is not supported by cupyx.scipy.special, which the "
                         "activations use; use 'float16' (docs/gpu.md, 'Mixed precision')")
    return check_dtype("compute_dtype", dtype, COMPUTE_DTYPES, "MasterWeights", error=ValueError)


# ============================================================================ master weights
class MasterWeights:
    """float32 master copies of ``module``'s parameters; ``module`` computes in ``compute_dtype``.

    Built from the module's current parameters (copied before the cast, so a float32 module's
    masters are its exact weights). Afterwards the module's parameters are the float16 roundings
    of the masters, refreshed by ``copy_to_module`` after each optimizer step (``DynamicLossScaler
    .step`` does it; without a scaler call it yourself after ``optimizer.step()``). Pass this object, not the module, to the optimizer, ``EMA`` and
    ``clip_grad_norm_``; save ``state_dict()`` (the float32 masters) in checkpoints for an exact
    resume, since the float16 module weights alone lose the low bits.
    """

    def __init__(self, module, compute_dtype="float16"):
        self.module = check_module("MasterWeights", module)
        self.compute_dtype = _compute_dtype(compute_dtype)
        named = list(module.named_parameters())
        for name, p in named:
            if p.dtype.kind != "f":
                raise TypeError(f"MasterWeights: parameter {name!r} must be floating, got dtype {p.dtype}")
        self._flat = flat_storage.FlatParameters([(name, p.astype(MASTER_DTYPE), None) for name, p in named])
        views = self._flat.named_views()
        self._params = OrderedDict((name, views[name][0]) for name, _ in named)
        self._grads = {name: views[name][1] for name, _ in named}
        self._stale = True                     # nothing loaded since zero_grad: named_grads loads
        self.nonfinite = []                    # names whose gradient was not finite at the last load
        module.to(self.compute_dtype)

    # ----------------------------------------------------------------- the module-like face
    def named_parameters(self, prefix: str = ""):
        """``(name, float32 master array)`` in the module's order and with its names."""
        for name, p in self._params.items():
            yield (f"{prefix}.{name}" if prefix else name), p

    def parameters(self):
        return list(self._params.values())

    def num_parameters(self) -> int:
        return int(sum(p.size for p in self._params.values()))

    @property
    def flat_parameters(self):
        """The masters and their gradients as one float32 buffer each (a ``FlatParameters``), the
        gradients loaded first as ``named_grads`` does."""
        if self._stale:
            self.load_grads(1.0)
        return self._flat

    def named_grads(self, prefix: str = ""):
        """``(name, float32 master gradient)``: what ``load_grads`` wrote since the last ``zero_grad``.

        When nothing was loaded since then (a run without a loss scaler), the module's current
        gradients are loaded first, unscaled, so an optimizer never sees stale or missing ones.
        """
        if self._stale:
            self.load_grads(1.0)
        for name, g in self._grads.items():
            yield (f"{prefix}.{name}" if prefix else name), g

    def zero_grad(self) -> None:
        """Clear the module's gradients (the masters' are reloaded from them before they are read)."""
        self.module.zero_grad()
        self._stale = True

    @property
    def dtype(self):
        return MASTER_DTYPE

    # ----------------------------------------------------------------- moving values across
    def _module_items(self, items, what: str):
        """Pair the module's ``(name, array)`` items with the masters, or a clear error."""
        seen = 0
        for name, a in items:
            if name not in self._params:
                raise KeyError(f"MasterWeights: the module's {what} {name!r} has no master copy "
                               "(was the module changed after MasterWeights was built?)")
            seen += 1
            yield name, a
        if seen != len(self._params):
            raise KeyError(f"MasterWeights: the module has {seen} parameters, the masters {len(self._params)}")

    def load_grads(self, inv_scale: float = 1.0, check: bool = True) -> bool | None:
        """Master gradients <- float32(module gradient) * float32(inv_scale), for every parameter.

        Returns whether every gradient is finite; when not, ``self.nonfinite`` names the culprits.
        One host synchronization in all (the finiteness flags are reduced on the device first).
        ``check=False``: no check and no synchronization (returns None; ``nonfinite_names`` later).
        """
        inv = numpy.float32(inv_scale)
        pair = self._flat_pair()
        if pair is not None:                   # one call for all: the module's flat buffer -> the masters'
            src, dst = pair
            if inv == 1.0:
                dst[...] = src
            else:
                xp.multiply(src, inv, out=dst, dtype=MASTER_DTYPE)
            self._stale = False
            if not check:
                return None
            ok = bool(xp.isfinite(dst).all())
            self.nonfinite = [] if ok else self.nonfinite_names()
            return ok
        names, flags = [], []
        for name, g in self._module_items(self.module.named_grads(), "gradient"):
            m = self._grads[name]
            if inv == 1.0:
                m[...] = g
            else:
                xp.multiply(g, inv, out=m, dtype=MASTER_DTYPE)
            names.append(name)
            if check:
                flags.append(xp.isfinite(m).all())
        self._stale = False
        if not check:
            return None
        if not flags:
            self.nonfinite = []
            return True
        stacked = xp.stack(flags)
        ok = bool(stacked.all())
        self.nonfinite = [] if ok else [n for n, f in zip(names, to_numpy(stacked)) if not f]
        return ok

    def nonfinite_names(self) -> list[str]:
        """The parameters whose master gradient holds inf or NaN (one host synchronization each)."""
        return [name for name, m in self._grads.items() if m is not None and not bool(xp.isfinite(m).all())]

    def _flat_pair(self, which: str = "grads"):
        """``(module buffer, master buffer)`` of the gradients (``which="grads"``) or the weights
        (``"params"``) when the module is in flat storage with one group in the masters' order; else None."""
        module_flat = flat_storage.current(self.module)
        if module_flat is None or len(module_flat.groups) != 1 or module_flat.order != self._flat.order:
            return None
        return getattr(module_flat.groups[0], which), getattr(self._flat.groups[0], which)

    def copy_to_module(self) -> None:
        """The module's parameters <- the masters rounded to the compute dtype (in place)."""
        pair = self._flat_pair("params")
        if pair is not None:
            xp.copyto(pair[0], pair[1], casting="same_kind")
            return
        for name, p in self._module_items(self.module.named_parameters(), "parameter"):
            xp.copyto(p, self._params[name], casting="same_kind")

    # ----------------------------------------------------------------- state
    def state_dict(self) -> "OrderedDict[str, object]":
        """The float32 master weights by parameter name (the live arrays)."""
        return OrderedDict(self._params)

    def load_state_dict(self, state_dict) -> None:
        """Copy float32 masters in (every name, matching shapes), then refresh the module from them."""
        if not hasattr(state_dict, "items"):
            raise TypeError(f"MasterWeights.load_state_dict: expected a mapping of names to arrays, "
                            f"got {type(state_dict).__name__}")
        missing = [k for k in self._params if k not in state_dict]
        unexpected = [k for k in state_dict if k not in self._params]
        if missing or unexpected:
            raise KeyError(f"MasterWeights.load_state_dict: missing {missing[:10]}, unexpected {unexpected[:10]}")
        for name, p in self._params.items():
            value = state_dict[name]
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"MasterWeights.load_state_dict: {name!r} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(p.shape)}")
        for name, p in self._params.items():
            p[...] = xp.asarray(state_dict[name], dtype=MASTER_DTYPE)
        self.copy_to_module()


# ============================================================================ loss scaling
def _f32(x) -> float:
    """``x`` rounded to float32, as a Python float (torch keeps the scale in a float32 tensor)."""
    with numpy.errstate(over="ignore"):
        return float(numpy.float32(x))


_AWAITING_CHECK = "awaiting record_finite"    # unscaled without a check; the caller reports finiteness


class DynamicLossScaler:
    """Dynamic loss scaling with torch.amp.GradScaler's schedule and a bounded run of skips.

    ``init_scale`` (S at the start, 2**16), ``growth_factor`` (> 1), ``backoff_factor`` (in (0, 1)),
    ``growth_interval`` (good steps in a row before S grows), ``max_consecutive_skips`` (skipped
    steps in a row that stop the run with ``NonFiniteGradientError``; 32 backoffs take 2**16 down
    to 2**-16, past any scale that float16 overflow could need). Counters: ``skipped_steps``
    (all skips), ``consecutive_skips`` (the current run), ``growth_tracker`` (good steps since S
    last changed). Each step: ``scale`` -> backward -> ``unscale_`` (optional) -> ``step`` -> ``update``.
    """

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, max_consecutive_skips: int = 32):
        self._set_hyperparameters({"growth_factor": growth_factor, "backoff_factor": backoff_factor,
                                   "growth_interval": growth_interval,
                                   "max_consecutive_skips": max_consecutive_skips})
        self._scale = _f32(check_float("DynamicLossScaler", "init_scale", init_scale, low_open=True))
        if self._scale == 0.0 or math.isinf(self._scale):
            raise ValueError(f"DynamicLossScaler: init_scale must be a positive float32 number, got {init_scale!r}")
        self.growth_tracker = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self._run_start_scale = self._scale
        self._found_inf = None                 # None: not unscaled yet this step
        self._nonfinite = []
        self._stepped = False

    def _set_hyperparameters(self, hp: dict) -> None:
        growth = check_float("DynamicLossScaler", "growth_factor", hp["growth_factor"])
        if growth <= 1.0:
            raise ValueError(f"DynamicLossScaler: growth_factor must be > 1, got {hp['growth_factor']!r}")
        self.growth_factor = growth
        self.backoff_factor = check_float("DynamicLossScaler", "backoff_factor", hp["backoff_factor"], 0.0, 1.0,
                                          low_open=True, high_open=True)
        self.growth_interval = check_positive_int("growth_interval", hp["growth_interval"], "DynamicLossScaler")
        self.max_consecutive_skips = check_positive_int("max_consecutive_skips", hp["max_consecutive_skips"], "DynamicLossScaler")

    # ----------------------------------------------------------------- per step
    def get_scale(self) -> float:
        """The current loss scale S."""
        return self._scale

    def scale(self, grad, dtype=None):
        """``grad * S`` as a fresh array in ``dtype`` (default: grad's), computed in grad's precision.

        ``grad`` is the gradient of the loss with respect to the model output (dL/dout); the
        model's backward of ``S * L`` then yields S times every gradient (backward is linear in
        its upstream gradient). Values past float16's range become inf, and the step is skipped.
        """
        if not hasattr(grad, "dtype") or grad.dtype.kind != "f":
            raise TypeError(f"DynamicLossScaler.scale: grad must be a floating array, "
                            f"got {getattr(grad, 'dtype', type(grad).__name__)}")
        with numpy.errstate(over="ignore"):
            out = grad * self._scale
            if dtype is not None and out.dtype != numpy.dtype(dtype):
                out = out.astype(dtype)
        return out

    def unscale_(self, optimizer, check: bool = True) -> bool | None:
        """Divide the gradients by S once, into float32 masters; returns whether all are finite.

        With a ``MasterWeights`` behind ``optimizer`` its ``load_grads`` does it; with a plain
        module the module's gradients are unscaled in place. Call it before gradient clipping;
        ``step`` calls it when you have not. ``check=False`` (MasterWeights only): unscale without
        reading the device; the caller then reports finiteness with ``record_finite``.
        """
        if self._found_inf is not None:
            raise RuntimeError("DynamicLossScaler.unscale_: already called for this step; call update() "
                               "to finish the step first")
        target = getattr(optimizer, "module", None)
        check_module("DynamicLossScaler.unscale_", target)
        inv = float(numpy.float32(1.0 / self._scale))    # torch: scale.double().reciprocal().float()
        if isinstance(target, MasterWeights):
            if not check:
                target.load_grads(inv, check=False)
                self._found_inf = _AWAITING_CHECK
                return None
            ok = target.load_grads(inv)
            bad = target.nonfinite
        else:
            names, flags = [], []
            for name, g in target.named_grads():
                g *= inv
                names.append(name)
                flags.append(xp.isfinite(g).all())
            stacked = xp.stack(flags) if flags else None
            ok = True if stacked is None else bool(stacked.all())
            bad = [] if ok else [n for n, f in zip(names, to_numpy(stacked)) if not f]
        self._found_inf = not ok
        self._nonfinite = bad
        return ok

    def record_finite(self, finite: bool, optimizer) -> None:
        """After ``unscale_(optimizer, check=False)``: whether every unscaled gradient is finite, as the
        caller read it (the training loop reads it from the gradients' norm, with the loss, in one device
        read); the culprits are named only when one is not."""
        if self._found_inf is not _AWAITING_CHECK:
            raise RuntimeError("DynamicLossScaler.record_finite: call unscale_(optimizer, check=False) first")
        self._found_inf = not finite
        self._nonfinite = [] if finite else optimizer.module.nonfinite_names()

    def step(self, optimizer) -> bool:
        """Run ``optimizer.step()`` unless a gradient is non-finite; returns whether it ran.

        After a step on ``MasterWeights`` the module's parameters are refreshed from the masters.
        A skipped step changes nothing: masters, module and optimizer state stay bitwise as they were.
        """
        if self._stepped:
            raise RuntimeError("DynamicLossScaler.step: already called for this step; call update() first")
        if self._found_inf is _AWAITING_CHECK:
            raise RuntimeError("DynamicLossScaler.step: unscale_(check=False) needs record_finite first")
        if self._found_inf is None:
            self.unscale_(optimizer)
        self._stepped = True
        if self._found_inf:
            return False
        optimizer.step()
        target = optimizer.module
        if isinstance(target, MasterWeights):
            target.copy_to_module()
        return True

    def update(self) -> None:
        """Finish the step: back S off after a skipped step, grow it after ``growth_interval`` good ones.

        Raises ``NonFiniteGradientError`` when ``max_consecutive_skips`` steps in a row were skipped.
        """
        if self._found_inf is None:
            raise RuntimeError("DynamicLossScaler.update: no gradients were checked this step; call "
                               "unscale_(optimizer) or step(optimizer) before update()")
        found_inf, names = self._found_inf, self._nonfinite
        self._found_inf, self._nonfinite, self._stepped = None, [], False
        if found_inf:
            if self.consecutive_skips == 0:
                self._run_start_scale = self._scale
            self._scale = _f32(self._scale * self.backoff_factor)     # float64 product, then float32
            self.growth_tracker = 0
            self.skipped_steps += 1
            self.consecutive_skips += 1
            if self.consecutive_skips >= self.max_consecutive_skips:
                shown = ", ".join(repr(n) for n in names[:5])
                if len(names) > 5:
                    shown += f" and {len(names) - 5} more"
                raise NonFiniteGradientError(
                    f"DynamicLossScaler: {self.consecutive_skips} steps in a row had non-finite gradients "
                    f"(last in {shown or 'the gradients'}); the loss scale went from {self._run_start_scale:g} "
                    f"down to {self._scale:g} without a finite step, so this is not float16 overflow but a "
                    "diverged model (NaN/inf in the forward or the loss): lower the learning rate, check the "
                    "inputs, and resume from the last good checkpoint")
            return
        self.consecutive_skips = 0
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            grown = _f32(self._scale * self.growth_factor)
            if math.isfinite(grown):
                self._scale = grown
            self.growth_tracker = 0

    # ----------------------------------------------------------------- state
    def hyperparameters(self) -> dict:
        return {"growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "max_consecutive_skips": self.max_consecutive_skips}

    def state_dict(self) -> dict:
        """JSON-able state: the scale, the hyper-parameters and the counters (exact resume)."""
        return {"type": "DynamicLossScaler", "scale": self._scale, "growth_tracker": self.growth_tracker,
                "skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips,
                "hyperparameters": self.hyperparameters()}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("type") != "DynamicLossScaler":
            raise ValueError("DynamicLossScaler.load_state_dict: expected a state dict of type 'DynamicLossScaler'")
        scale = _f32(check_float("DynamicLossScaler", "scale", state.get("scale"), low_open=True))
        counters = {}
        for key in ("growth_tracker", "skipped_steps", "consecutive_skips"):
            v = state.get(key, 0)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"DynamicLossScaler.load_state_dict: {key} must be a non-negative int, got {v!r}")
            counters[key] = v
        self._set_hyperparameters({**self.hyperparameters(), **state.get("hyperparameters", {})})
        self._scale = scale
        self._run_start_scale = scale
        self.growth_tracker = counters["growth_tracker"]
        self.skipped_steps = counters["skipped_steps"]
        self.consecutive_skips = counters["consecutive_skips"]
        self._found_inf, self._nonfinite, self._stepped = None, [], False
