"""What every scheduler shares: config handling, timestep spacing, noise draws and the step output.

Shapes: sample, model_output, noise (B, C, H, W) (any shape with a batch axis first); T =
num_train_timesteps, N = number of inference steps; ``timesteps`` (N,) on the host.

Config semantics are diffusers' (``configuration_utils.py``), so configs move freely between our
schedulers and diffusers' in both directions (docs/schedulers.md, "Config"):

* the constructor's keyword arguments are the config keys, with diffusers' defaults;
* ``config`` is a read-only dict of every constructor argument, plus ``_class_name`` and
  ``_use_default_values`` (the keys that were left at their default). ``from_config`` drops the
  ``_use_default_values`` keys, so ``EulerDiscreteScheduler.from_config(PNDMScheduler().config)``
  gets Euler's own default spacing, "linspace", while a key that was set explicitly (or read from a
  JSON file) carries over: ``DDIMScheduler.from_config(sd_pndm.config)`` keeps "leading" and
  ``steps_offset=1``;
* ``from_config`` ignores keys the class does not take and keys that start with "_", but keeps
  them in the new config (so a chain of moves loses nothing), as diffusers does;
* ``save_config(folder)`` writes ``folder/scheduler_config.json`` (sorted keys, no
  ``_use_default_values``); ``from_pretrained(folder, subfolder=None)`` reads it back. Local
  folders only: nothing is downloaded.
"""
from __future__ import annotations

import functools
import inspect
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.diffusion import schedules
from npdiffusion.io.atomic import atomic_write_text
from npdiffusion.io.pretrained import check_config_finite
from npdiffusion.schedulers.validation import check_timestep, noise_timesteps, schedule_positions

logger = logging.getLogger(__name__)

SCHEDULER_CONFIG_NAME = "scheduler_config.json"
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
#: config keys that may be +-inf in a scheduler_config.json (diffusers' DPM-Solver default is -inf); NaN never
INFINITE_OK = ("lambda_min_clipped",)


# --------------------------------------------------------------------------------------------- output

@dataclass
class SchedulerOutput:
    """What ``step`` returns: ``prev_sample`` (B, ...) and, for schedulers that form one,
    ``pred_original_sample`` (the model's x0 estimate, (B, ...)). Indexing ``out[0]`` works as in
    diffusers (over the fields that are not None); ``to_tuple()`` gives them as a tuple."""

    prev_sample: Any
    pred_original_sample: Any = None

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]


# --------------------------------------------------------------------------------------------- config

class FrozenConfig(dict):
    """A read-only dict whose keys are also attributes (``config.num_train_timesteps``), as diffusers' FrozenDict."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def _readonly(self, *args, **kwargs):
        raise TypeError("a scheduler config is read-only: build a new scheduler with "
                        "Scheduler.from_config(config, key=value) instead")

    __setitem__ = __delitem__ = update = pop = popitem = setdefault = clear = _readonly
    __setattr__ = __delattr__ = _readonly

    def __reduce__(self):
        return (FrozenConfig, (dict(self),))


def register_to_config(init):
    """Decorator for a scheduler ``__init__``: records every argument (passed or default) as the config.

    As diffusers' decorator of the same name: private keyword arguments (leading "_") are not passed
    to ``__init__`` but stored in the config; ``_use_default_values`` lists the keys left at their default.
    """
    signature = inspect.signature(init)
    params = [(name, p.default) for i, (name, p) in enumerate(signature.parameters.items()) if i > 0]
    names = [n for n, _ in params]

    @functools.wraps(init)
    def inner(self, *args, **kwargs):
        cls_name = type(self).__name__
        private = {k: v for k, v in kwargs.items() if k.startswith("_")}
        public = {k: v for k, v in kwargs.items() if not k.startswith("_")}
        if len(args) > len(names):
            raise TypeError(f"{cls_name}: takes at most {len(names)} positional arguments, got {len(args)}")
        unknown = sorted(set(public) - set(names))
        if unknown:
            raise TypeError(f"{cls_name}: unexpected keyword argument(s) {unknown}; the config keys are {names}")
        values = dict(zip(names, args))
        clash = sorted(set(values) & set(public))
        if clash:
            raise TypeError(f"{cls_name}: got multiple values for {clash}")
        values.update({n: public.get(n, default) for n, default in params if n not in values})
        passed = set(public) | set(names[: len(args)])
        config = dict(private)
        config.update(values)
        config["_use_default_values"] = [n for n in names if n not in passed]
        config["_class_name"] = cls_name
        object.__setattr__(self, "_config", config)
        init(self, *args, **public)

    inner._config_keys = tuple(names)
    return inner


def _json_ready(value):
    if isinstance(value, numpy.ndarray):
        return value.tolist()
    if isinstance(value, (numpy.floating, numpy.integer, numpy.bool_)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


class SchedulerMixin:
    """Config handling shared by all schedulers (see the module docstring)."""

    config_name = SCHEDULER_CONFIG_NAME
    order = 1
    #: set by ``set_timesteps``; ``step`` refuses to run before it (DDPM excepted: its default is the full chain)
    _timesteps_set = False
    #: the scheduler families diffusers marks as interchangeable (``KarrasDiffusionSchedulers``)
    _compatibles = ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler",
                    "EulerDiscreteScheduler", "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                    "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler",
                    "KDPM2AncestralDiscreteScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler",
                    "DPMSolverSDEScheduler", "EDMEulerScheduler")

    # ---- config
    @property
    def config(self) -> FrozenConfig:
        """Every constructor argument, ``_class_name`` and ``_use_default_values``; read-only."""
        return FrozenConfig(self._config)

    def _update_config(self, **values) -> None:
        """Overwrite config entries (used where diffusers rewrites a value, e.g. deprecated aliases)."""
        self._config.update(values)

    @classmethod
    def config_keys(cls) -> tuple:
        """The constructor's argument names, which are the config keys."""
        return cls.__init__._config_keys

    @classmethod
    def from_config(cls, config: Mapping | None = None, return_unused_kwargs: bool = False, **kwargs):
        """A scheduler built from any diffusers scheduler config (a dict), with ``kwargs`` overriding it.

        Keys in the config's ``_use_default_values`` are dropped (this class's defaults apply); keys
        this class does not take and keys starting with "_" are ignored but kept in the new config.
        With ``return_unused_kwargs=True`` returns ``(scheduler, unused)``, where ``unused`` holds
        the ignored keys, as diffusers does.
        """
        if config is None:
            config = {}
        if not isinstance(config, Mapping):
            raise TypeError(f"{cls.__name__}.from_config: config must be a dict (a scheduler's .config), "
                            f"got {type(config).__name__}; use from_pretrained(folder) for a folder")
        config = dict(config)
        used_defaults = config.get("_use_default_values", []) or []
        config = {k: v for k, v in config.items() if k not in used_defaults and k != "_use_default_values"}
        original = dict(config)
        expected = cls.config_keys()
        init_dict = {}
        for key in expected:
            if key in kwargs:
                init_dict[key] = kwargs.pop(key)
            elif key in config:
                init_dict[key] = config[key]
        ignored = {k: v for k, v in config.items() if k not in init_dict and not k.startswith("_")}
        if ignored:
            logger.debug("%s.from_config ignores the keys %s", cls.__name__, sorted(ignored))
        scheduler = cls(**init_dict)
        hidden = {k: v for k, v in original.items() if k not in init_dict}
        if "_class_name" in hidden:
            hidden["_class_name"] = cls.__name__
        scheduler._config.update(hidden)
        if return_unused_kwargs:
            return scheduler, {**ignored, **kwargs, **hidden}
        if kwargs:
            raise TypeError(f"{cls.__name__}.from_config: unexpected keyword argument(s) {sorted(kwargs)}; "
                            f"the config keys are {list(expected)}")
        return scheduler

    def save_config(self, save_directory) -> str:
        """Write the config to ``save_directory/scheduler_config.json`` (created if needed); returns the path.

        Sorted keys, two-space indent, ``_use_default_values`` left out (as diffusers writes it).
        Written with ``io.atomic.atomic_write_text`` (temporary name, fsync, rename), so a crash never
        leaves half a file.
        """
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"save_config: save_directory must be a folder, got the file {save_directory!r}")
        os.makedirs(save_directory, exist_ok=True)
        data = {k: _json_ready(v) for k, v in self._config.items() if k != "_use_default_values"}
        data["_class_name"] = type(self).__name__
        path = os.path.join(save_directory, self.config_name)
        atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
        return path

    save_pretrained = save_config

    @classmethod
    def load_config(cls, pretrained_model_name_or_path, subfolder: str | None = None) -> dict:
        """The dict stored in ``folder[/subfolder]/scheduler_config.json`` (a local folder or the file itself)."""
        path = os.fspath(pretrained_model_name_or_path)
        if subfolder:
            path = os.path.join(path, subfolder)
        if os.path.isdir(path):
            path = os.path.join(path, cls.config_name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{cls.__name__}.from_pretrained: no {cls.config_name} at {path!r} "
                                    "(only local folders are read; nothing is downloaded)")
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{cls.__name__}.from_pretrained: {path!r} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}.from_pretrained: {path!r} must hold a JSON object, "
                             f"got {type(data).__name__}")
        check_config_finite(data, path, infinite_ok=INFINITE_OK)
        return data

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None,
                        return_unused_kwargs: bool = False, **kwargs):
        """``from_config(load_config(folder, subfolder), **kwargs)``: load a saved scheduler config."""
        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder)
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def __len__(self) -> int:
        return self._config["num_train_timesteps"]

    # ---- call checks (validation.py)
    def _require_timesteps(self, method: str = "step") -> None:
        """``step`` (or ``scale_model_input``) before ``set_timesteps`` is refused."""
        if not self._timesteps_set:
            raise ValueError(f"{type(self).__name__}.{method}: call set_timesteps(num_inference_steps) first")

    def _check_timestep(self, method: str, timestep, integer: bool = True):
        """The timestep as a number in [0, num_train_timesteps) (an int when ``integer``)."""
        return check_timestep(f"{type(self).__name__}.{method}", timestep, self._config["num_train_timesteps"],
                              integer=integer)

    def _identity_scale(self, sample, timestep):
        """``scale_model_input`` of the schedulers that feed x_t unscaled: checks, then returns ``sample``."""
        check_sample(type(self).__name__, "sample", sample)
        if timestep is not None:
            self._check_timestep("scale_model_input", timestep, integer=False)
        return sample

    def __repr__(self) -> str:
        shown = {k: _json_ready(v) for k, v in self._config.items() if k != "_use_default_values"}
        return f"{type(self).__name__} {json.dumps(shown, sort_keys=True)}"


# ------------------------------------------------------------------------------------ argument checks

def check_choice(cls_name: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{cls_name}: {name} must be one of {tuple(choices)}, got {value!r}")


def check_int(cls_name: str, name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, numpy.integer)) or value < minimum:
        raise ValueError(f"{cls_name}: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_real(cls_name: str, name: str, value, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, numpy.integer, numpy.floating)):
        raise TypeError(f"{cls_name}: {name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def check_sample(cls_name: str, name: str, x, min_ndim: int = 1) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{cls_name}: {name} must be an array, got {type(x).__name__}")
    if numpy.dtype(x.dtype).kind != "f":
        raise TypeError(f"{cls_name}: {name} must be a floating-point array, got dtype {x.dtype}")
    if len(x.shape) < min_ndim:
        raise ValueError(f"{cls_name}: {name} must have at least {min_ndim} dimension(s), got shape {tuple(x.shape)}")


def check_same_shape(cls_name: str, name: str, x, ref_name: str, ref) -> None:
    if tuple(x.shape) != tuple(ref.shape):
        raise ValueError(f"{cls_name}: {name} must have the shape of {ref_name} {tuple(ref.shape)}, "
                         f"got {tuple(x.shape)}")


def check_num_inference_steps(cls_name: str, n, num_train_timesteps: int | None = None) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, numpy.integer)) or n < 1:
        raise ValueError(f"{cls_name}.set_timesteps: num_inference_steps must be a positive int, got {n!r}")
    if num_train_timesteps is not None and n > num_train_timesteps:
        raise ValueError(f"{cls_name}.set_timesteps: num_inference_steps must be <= num_train_timesteps "
                         f"({num_train_timesteps}), got {n}")
    return int(n)


def check_schedule_options(cls_name: str, prediction_type, prediction_types, timestep_spacing,
                           steps_offset) -> None:
    """The constructor checks every scheduler makes: ``prediction_type`` among the class's
    ``prediction_types``, ``timestep_spacing`` one of :data:`TIMESTEP_SPACINGS`, ``steps_offset`` an int >= 0."""
    check_choice(cls_name, "prediction_type", prediction_type, prediction_types)
    check_choice(cls_name, "timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
    check_int(cls_name, "steps_offset", steps_offset)


def check_reals(cls_name: str, **values) -> None:
    """``check_real`` on each keyword (name = value), in order: float options such as ``sample_max_value``."""
    for key, value in values.items():
        check_real(cls_name, key, value)


def check_array_pair(cls_name: str, name: str, x, ref_name: str, ref) -> None:
    """Two array arguments (B, ...): both floating-point arrays (``x`` checked first), ``x`` of ``ref``'s shape.

    ``step``'s model_output against sample; ``add_noise``'s noise against original_samples.
    """
    check_sample(cls_name, name, x)
    check_sample(cls_name, ref_name, ref)
    check_same_shape(cls_name, name, x, ref_name, ref)


def check_exactly_one(cls_name: str, **options) -> None:
    """``set_timesteps`` takes one way of giving the schedule: exactly one keyword here is not None."""
    given = [k for k, v in options.items() if v is not None]
    if len(given) != 1:
        raise ValueError(f"{cls_name}.set_timesteps: pass exactly one of {', '.join(options)}; got {given}")


def merge_noise_alias(cls_name: str, noise, variance_noise):
    """``noise``, or diffusers' name for it, ``variance_noise`` (B, ...); passing both is refused."""
    if noise is not None and variance_noise is not None:
        raise ValueError(f"{cls_name}.step: pass noise or variance_noise, not both")
    return noise if noise is not None else variance_noise


def step_output(return_dict: bool, prev_sample, pred_original_sample=None):
    """What ``step`` returns: a :class:`SchedulerOutput`, or with ``return_dict=False`` its tuple
    (``(prev_sample, pred_original_sample)``, or ``(prev_sample,)`` for schedulers that form no x0)."""
    out = SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
    return out if return_dict else out.to_tuple()


# ---------------------------------------------------------------------------------- timestep spacing

def spaced_timesteps(spacing: str, num_train_timesteps: int, num_inference_steps: int,
                     steps_offset: int = 0, as_float: bool = False) -> numpy.ndarray:
    """The N inference timesteps, descending, for a ``timestep_spacing`` (Lin et al. 2023, Table 2).

    * ``"leading"``: t_i = i * (T // N) + steps_offset, i = N-1 .. 0 (SD1.x: 981, 961, ..., 1 with offset 1);
    * ``"trailing"``: round(T - i T/N) - 1, i = 0 .. N-1 (starts at T-1: 999, 979, ..., 19);
    * ``"linspace"``: N points evenly spaced over [0, T-1], reversed (999, 979, 958, ...).

    ``as_float=False`` (DDPM, DDIM): int64, ``linspace`` rounded. ``as_float=True`` (Euler, Euler
    ancestral, Heun): float32, ``linspace`` left fractional. Same NumPy expressions as diffusers,
    so edge cases (e.g. trailing with T/N not exact) come out the same.
    """
    T, n = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        if as_float:
            return numpy.linspace(0, T - 1, n, dtype=numpy.float32)[::-1].copy()
        return numpy.linspace(0, T - 1, n).round()[::-1].copy().astype(numpy.int64)
    if spacing == "leading":
        step_ratio = T // n
        ts = (numpy.arange(0, n) * step_ratio).round()[::-1].copy().astype(
            numpy.float32 if as_float else numpy.int64)
        ts += steps_offset
        return ts
    if spacing == "trailing":
        step_ratio = T / n
        ts = numpy.round(numpy.arange(T, 0, -step_ratio)).astype(numpy.float32 if as_float else numpy.int64)
        ts -= 1
        return ts
    raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")


# ------------------------------------------------------------------------------------------- noise

def standard_normal_like(cls_name: str, ref, noise=None, rng=None, dtype=None):
    """The standard-normal draw a stochastic step uses, shaped like ``ref``, in ``dtype`` (default ``ref``'s).

    ``noise`` (an array of ``ref``'s shape, host or device) is used as given (cast to the dtype and
    moved to the backend); otherwise it is drawn on the host from ``rng`` (a ``numpy.random.Generator``;
    a fresh unseeded one when None, like diffusers without a generator) and moved with
    ``backend.asarray``, so a seed gives the same noise on NumPy and CuPy.
    """
    dtype = numpy.dtype(dtype if dtype is not None else ref.dtype)
    if noise is not None:
        if rng is not None:
            raise ValueError(f"{cls_name}.step: pass either noise or rng, not both")
        check_sample(cls_name, "noise", noise)
        check_same_shape(cls_name, "noise", noise, "model_output", ref)
        return asarray(noise).astype(dtype, copy=False)
    if rng is None:
        rng = numpy.random.default_rng()
    if not isinstance(rng, numpy.random.Generator):
        raise TypeError(f"{cls_name}.step: rng must be a numpy.random.Generator, got {type(rng).__name__}")
    draw_dtype = dtype if dtype in (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64)) else numpy.float32
    return asarray(rng.standard_normal(tuple(ref.shape), dtype=draw_dtype)).astype(dtype, copy=False)


def broadcast_per_sample(values: numpy.ndarray, x):
    """A host vector (B,) as a backend array (B, 1, ..., 1) in ``x``'s dtype, to scale a batch ``x``."""
    values = numpy.asarray(values).reshape(-1)
    shape = (values.shape[0],) + (1,) * (len(x.shape) - 1)
    return asarray(values.reshape(shape).astype(x.dtype, copy=False))


def threshold_sample(sample, ratio: float, max_value: float):
    """Dynamic thresholding (Imagen, Saharia et al. 2022) of an x0 estimate (B, ...), per sample.

    s = clamp(quantile(|x0|, ratio), 1, max_value) over each sample's entries; x0 <- clamp(x0, -s, s) / s.
    Half precision is upcast to float32 for the quantile and cast back, as diffusers does.
    """
    from npdiffusion.backend import xp  # noqa: PLC0415

    dtype = sample.dtype
    b = sample.shape[0]
    flat = sample.reshape(b, -1)
    if numpy.dtype(dtype) not in (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64)):
        flat = flat.astype(numpy.float32)
    s = xp.quantile(xp.abs(flat), ratio, axis=1)
    s = xp.clip(s, 1, max_value).astype(flat.dtype)[:, None]
    out = xp.minimum(xp.maximum(flat, -s), s) / s
    return out.reshape(sample.shape).astype(dtype, copy=False)


def clip_or_threshold(pred_original_sample, config: Mapping, thresholding: bool = False,
                      clip_sample: bool = False):
    """x0_hat (B, ...) limited as a scheduler's step does it: dynamic thresholding when ``thresholding``
    (with the config's ``dynamic_thresholding_ratio`` and ``sample_max_value``), else clipped to
    [-clip_sample_range, clip_sample_range] when ``clip_sample``, else unchanged.

    The caller passes the flags its class has (Heun only clips, DPM-Solver only thresholds): a config
    loaded with ``from_config`` may hold other classes' keys, which must not switch anything on.
    """
    from npdiffusion.backend import xp  # noqa: PLC0415

    if thresholding:
        return threshold_sample(pred_original_sample, config["dynamic_thresholding_ratio"],
                                config["sample_max_value"])
    if clip_sample:
        r = float(config["clip_sample_range"])
        return xp.clip(pred_original_sample, -r, r)
    return pred_original_sample


# ------------------------------------------------------------------------------ float32 scalar math

def _via_float64(fn, x):
    out = fn(numpy.asarray(x, dtype=numpy.float64)).astype(numpy.float32)
    return out[()] if out.ndim == 0 else out


def f32_log(x):
    """log in float32, correctly rounded (computed in float64, rounded once).

    Stands in for torch's float32 ``log``/``exp`` on schedule scalars: NumPy's own float32
    ``log``/``exp`` loops are faster approximations that differ from torch's in the last bit far
    more often (measured: ``exp`` on ~40% of inputs, against ~1% for the correctly rounded value).
    """
    with numpy.errstate(divide="ignore"):
        return _via_float64(numpy.log, x)


def f32_exp(x):
    """exp in float32, correctly rounded (see :func:`f32_log`)."""
    with numpy.errstate(over="ignore"):
        return _via_float64(numpy.exp, x)


# ------------------------------------------------------------------------------ training schedule

def make_betas(cls_name: str, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
               allowed=("linear", "scaled_linear", "squaredcos_cap_v2")) -> numpy.ndarray:
    """The float32 betas (T,) a scheduler's constructor arguments ask for (``trained_betas`` wins).

    Every scheduler builds its schedule here: ``trained_betas``, and ``beta_start`` / ``beta_end`` of
    the schedules that use them, must be finite and in (0, 1) with ``beta_end >= beta_start``
    (``schedules.check_betas``, ``schedules.betas_for``); a ValueError names the argument otherwise.
    """
    check_int(cls_name, "num_train_timesteps", num_train_timesteps, minimum=1)
    if trained_betas is not None:
        betas = numpy.asarray(to_numpy(trained_betas) if hasattr(trained_betas, "shape") else trained_betas)
        if betas.ndim != 1 or betas.size == 0 or betas.dtype.kind not in "fiu":
            raise ValueError(f"{cls_name}: trained_betas must be a non-empty 1-d list of reals, "
                             f"got shape {betas.shape} dtype {betas.dtype}")
        if betas.shape[0] != num_train_timesteps:                # the timesteps index them: one per step
            raise ValueError(f"{cls_name}: trained_betas must have num_train_timesteps = {num_train_timesteps} "
                             f"entries (one per training timestep), got {betas.shape[0]}")
    else:
        check_choice(cls_name, "beta_schedule", beta_schedule, allowed)
        check_real(cls_name, "beta_start", beta_start)
        check_real(cls_name, "beta_end", beta_end)
    try:
        if trained_betas is not None:
            return schedules.check_betas("trained_betas", betas).astype(numpy.float32)
        return schedules.betas_for(beta_schedule, num_train_timesteps, beta_start, beta_end)
    except ValueError as exc:
        raise ValueError(f"{cls_name}: {exc}") from None


def training_schedule(cls_name: str, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                      rescale_betas_zero_snr: bool = False, allowed=("linear", "scaled_linear", "squaredcos_cap_v2"),
                      terminal_floor: bool = False):
    """``(betas, alphas, alphas_cumprod)``, each (T,) float32: the training schedule of a constructor.

    betas from :func:`make_betas`, rescaled to zero terminal SNR when ``rescale_betas_zero_snr``
    (Lin et al. 2023); alphas = 1 - betas; alphas_cumprod = abar_t = prod_{s <= t} alpha_s. With
    ``terminal_floor`` (the sigma-space schedulers) a zero-SNR abar_{T-1} = 0 is raised to 2^-24, so
    that sigma = sqrt((1 - abar)/abar) stays finite, as diffusers does.
    """
    betas = make_betas(cls_name, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                       allowed=allowed)
    if rescale_betas_zero_snr:
        betas = schedules.rescale_zero_terminal_snr(betas)
    alphas = (numpy.float32(1.0) - betas).astype(numpy.float32)
    alphas_cumprod = schedules.alphas_cumprod(betas)
    if rescale_betas_zero_snr and terminal_floor:
        alphas_cumprod[-1] = numpy.float32(2.0 ** -24)
    return betas, alphas, alphas_cumprod


def alpha_bar_pair(alphas_cumprod: numpy.ndarray, t: int, prev_t: int, final_alpha_cumprod):
    """``(abar_t, abar_t', 1 - abar_t, 1 - abar_t')``, float32 host scalars, for a sampling step t -> t'.

    abar_t' is ``final_alpha_cumprod`` past the end (t' < 0): 1, or abar_0 (DDIM's and PNDM's
    ``set_alpha_to_one=False``).
    """
    alpha_prod_t = alphas_cumprod[t]
    alpha_prod_t_prev = alphas_cumprod[prev_t] if prev_t >= 0 else final_alpha_cumprod
    return alpha_prod_t, alpha_prod_t_prev, numpy.float32(1.0) - alpha_prod_t, numpy.float32(1.0) - alpha_prod_t_prev


def alpha_bar_coefficients(where: str, alphas_cumprod: numpy.ndarray, timesteps, x):
    """sqrt(abar_t) and sqrt(1 - abar_t) at ``timesteps`` (B,) or (1,), as (B, 1, ..., 1) arrays in ``x``'s dtype.

    As diffusers' ``add_noise``: abar is first cast to the sample dtype, then square-rooted in it.
    ``where`` ("Class.add_noise") prefixes the errors.
    """
    t = noise_timesteps(where, timesteps, x.shape[0])
    if not numpy.all(numpy.isfinite(t)) or not numpy.all(t == numpy.round(t)):
        raise ValueError(f"{where}: timesteps must be whole numbers, got {t.tolist()}")
    t = t.astype(numpy.int64)
    T = alphas_cumprod.shape[0]
    if t.min() < 0 or t.max() >= T:
        raise ValueError(f"{where}: timesteps must lie in [0, {T - 1}], got min {t.min()} max {t.max()}")
    a = alphas_cumprod.astype(numpy.dtype(x.dtype))[t]
    one = a.dtype.type(1)
    return broadcast_per_sample(numpy.sqrt(a), x), broadcast_per_sample(numpy.sqrt(one - a), x)


def alpha_bar_add_noise(cls_name: str, alphas_cumprod, original_samples, noise, timesteps):
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, per sample (diffusers' ``add_noise``). (B, ...)."""
    check_array_pair(cls_name, "noise", noise, "original_samples", original_samples)
    sa, so = alpha_bar_coefficients(f"{cls_name}.add_noise", alphas_cumprod, timesteps, original_samples)
    return sa * original_samples + so * noise


def alpha_bar_velocity(cls_name: str, alphas_cumprod, sample, noise, timesteps):
    """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022; diffusers' ``get_velocity``). (B, ...)."""
    check_array_pair(cls_name, "noise", noise, "sample", sample)
    sa, so = alpha_bar_coefficients(f"{cls_name}.get_velocity", alphas_cumprod, timesteps, sample)
    return sa * noise - so * sample


class AlphaBarNoiseMixin:
    """``add_noise`` of the schedulers that work with abar_t directly (DDPM, DDIM, PNDM); needs ``alphas_cumprod``."""

    def add_noise(self, original_samples, noise, timesteps):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, one t per batch item. (B, ...)."""
        return alpha_bar_add_noise(type(self).__name__, self.alphas_cumprod, original_samples, noise, timesteps)


class AlphaBarVelocityMixin(AlphaBarNoiseMixin):
    """``add_noise`` and ``get_velocity`` (the v-prediction target) of DDPM and DDIM."""

    def get_velocity(self, sample, noise, timesteps):
        """The v-prediction target sqrt(abar_t) noise - sqrt(1 - abar_t) x_0. (B, ...)."""
        return alpha_bar_velocity(type(self).__name__, self.alphas_cumprod, sample, noise, timesteps)


# ------------------------------------------------------------------------ sigma-space schedulers

def convert_sigmas(cls_name: str, kind: str, in_sigmas: numpy.ndarray, num_inference_steps: int,
                   sigma_min=None, sigma_max=None) -> numpy.ndarray:
    """Respace a descending sigma schedule (N,) as "karras", "exponential" or "beta" noise levels (float64).

    sigma_min / sigma_max default to the last / first entry of ``in_sigmas`` (diffusers'
    ``_convert_to_karras`` / ``_convert_to_exponential`` / ``_convert_to_beta``).
    """
    lo = float(sigma_min) if sigma_min is not None else float(in_sigmas[-1])
    hi = float(sigma_max) if sigma_max is not None else float(in_sigmas[0])
    if kind == "karras":
        return schedules.karras_sigmas(lo, hi, num_inference_steps)
    if kind == "exponential":
        return schedules.exponential_sigmas(lo, hi, num_inference_steps)
    if kind == "beta":
        return schedules.beta_sigmas(lo, hi, num_inference_steps)
    raise ValueError(f"{cls_name}: unknown sigma spacing {kind!r}")


def sigma_kind(cls_name: str, use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas) -> str | None:
    """Which of the mutually exclusive ``use_*_sigmas`` flags is set (None for none)."""
    chosen = [k for k, on in (("karras", use_karras_sigmas), ("exponential", use_exponential_sigmas),
                              ("beta", use_beta_sigmas)) if on]
    if len(chosen) > 1:
        raise ValueError(f"{cls_name}: only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas "
                         f"can be True, got {chosen}")
    return chosen[0] if chosen else None


class StepIndexMixin:
    """Step-index bookkeeping of the schedulers that keep a sigma list (Euler, Euler ancestral, Heun, DPM).

    The first ``scale_model_input``/``step`` call finds the step index from its timestep (the second
    match when the timestep repeats, as in image-to-image where the schedule is entered midway),
    unless ``set_begin_index`` fixed it; each ``step`` then advances it by one.
    """

    _step_index = None
    _begin_index = None

    @property
    def step_index(self):
        """The index of the current step into ``sigmas`` (None before the first call)."""
        return self._step_index

    @property
    def begin_index(self):
        """The first step's index when set with ``set_begin_index`` (pipelines that start midway)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = check_int(type(self).__name__, "begin_index", begin_index)

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """The step index of ``timestep`` (the second match when it repeats); unknown timesteps are refused."""
        schedule = self.timesteps if schedule_timesteps is None else numpy.asarray(schedule_timesteps)
        found = schedule_positions(type(self).__name__, timestep, schedule)
        return int(found[1] if found.size > 1 else found[0])

    def _init_step_index(self, timestep) -> None:
        if self._begin_index is None:
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def _reset_step_index(self) -> None:
        """Forget the step and begin indices (a new schedule: the constructor and ``set_timesteps``)."""
        self._step_index = None
        self._begin_index = None

    def _locate(self, method: str, timestep) -> None:
        """``timestep`` must be one of the schedule's (every call); the first call also finds the step index."""
        self._require_timesteps(method)
        schedule_positions(f"{type(self).__name__}.{method}", timestep, self.timesteps)
        if self._step_index is None:
            self._init_step_index(timestep)

    def _enter_step(self, timestep) -> None:
        """Start a ``step`` call: check the timestep, find the step index on the first call; refuse a call
        past the last sigma."""
        self._locate("step", timestep)
        if self._step_index + 1 >= len(self.sigmas):
            raise ValueError(f"{type(self).__name__}.step: all {len(self.sigmas) - 1} steps are done; "
                             "call set_timesteps again")

    def _sigma_add_noise(self, original_samples, noise, timesteps):
        """x = x_0 + sigma noise at each item's timestep (B, ...): diffusers' sigma-space ``add_noise``."""
        sigma = self._add_noise_sigmas(original_samples, noise, timesteps)
        return original_samples + noise * broadcast_per_sample(sigma, original_samples)

    def _add_noise_sigmas(self, original_samples, noise, timesteps) -> numpy.ndarray:
        """Check the ``add_noise`` arguments; the sigma (B,) of each item, in the samples' dtype.

        An item's step is found from its timestep, unless a begin index (or a running step index)
        is set, which then applies to the whole batch, as in diffusers.
        """
        name = type(self).__name__
        check_array_pair(name, "noise", noise, "original_samples", original_samples)
        ts = noise_timesteps(f"{name}.add_noise", timesteps, original_samples.shape[0])
        for t in ts:  # every timestep must be the schedule's, also where a begin index picks the step
            schedule_positions(f"{name}.add_noise", t, self.timesteps)
        if self._begin_index is None:
            indices = [self.index_for_timestep(t) for t in ts]
        elif self._step_index is not None:
            indices = [self._step_index] * ts.shape[0]
        else:
            indices = [self._begin_index] * ts.shape[0]
        return self.sigmas.astype(numpy.dtype(original_samples.dtype))[indices]

    def _sigma_init_noise_sigma(self) -> float:
        """max sigma (linspace/trailing spacing) or sqrt(max sigma^2 + 1) (leading), in float32, as a float."""
        max_sigma = numpy.float32(numpy.max(self.sigmas))
        if self._config["timestep_spacing"] in ("linspace", "trailing"):
            return float(max_sigma)
        return float(numpy.sqrt(max_sigma * max_sigma + numpy.float32(1.0)))

    def _scale_by_sigma(self, sample, timestep):
        """x / sqrt(sigma^2 + 1): the model sees unit-variance input (Karras et al. c_in)."""
        check_sample(type(self).__name__, "sample", sample)
        self._locate("scale_model_input", timestep)
        sigma = self.sigmas[self._step_index]
        return sample / float(numpy.sqrt(sigma * sigma + numpy.float32(1.0)))


class SigmaScalingMixin(StepIndexMixin):
    """The sigma-space schedulers whose model sees x / sqrt(sigma^2 + 1) (Euler, Euler ancestral, Heun).

    They keep ``sigmas`` (host, float32) and ``timesteps``; the initial noise has std
    ``init_noise_sigma`` and ``add_noise`` is x_0 + sigma noise (the variance-exploding form).
    """

    @property
    def init_noise_sigma(self) -> float:
        """The std of the initial noise: max sigma (linspace/trailing) or sqrt(max sigma^2 + 1) (leading)."""
        return self._sigma_init_noise_sigma()

    def scale_model_input(self, sample, timestep):
        """x / sqrt(sigma^2 + 1) at this step's sigma. (B, ...)."""
        out = self._scale_by_sigma(sample, timestep)
        self.is_scale_input_called = True
        return out

    def add_noise(self, original_samples, noise, timesteps):
        """x = x_0 + sigma noise at each item's timestep (sigma-space forward process). (B, ...)."""
        return self._sigma_add_noise(original_samples, noise, timesteps)

    def _refuse_respaced_custom_timesteps(self, timesteps) -> None:
        """Custom ``timesteps`` fix the sigmas, so a ``use_*_sigmas`` respacing cannot apply to them."""
        if timesteps is not None and self._sigma_kind is not None:
            raise ValueError(f"{type(self).__name__}.set_timesteps: custom timesteps cannot be combined with "
                             f"use_{self._sigma_kind}_sigmas")


def reject_integer_timestep(cls_name: str, timestep) -> None:
    """diffusers' Euler-type ``step`` refuses integer timesteps (a likely enumerate() index)."""
    value = timestep
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        if numpy.dtype(value.dtype).kind in "iu":
            value = 0
        else:
            return
    if isinstance(value, (int, numpy.integer)) and not isinstance(value, bool):
        raise ValueError(f"{cls_name}.step: timestep must be one of scheduler.timesteps (floats), "
                         f"got the integer {timestep!r}; integer indices from enumerate() are not timesteps")
