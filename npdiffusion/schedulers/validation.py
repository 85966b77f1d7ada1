"""The checks every scheduler runs on its call arguments (step, scale_model_input, add_noise, set_timesteps).

What they refuse, with a ValueError (TypeError for a wrong kind of value) that names the argument,
what was expected and what came (docs/schedulers.md, "Argument checks"):

* a timestep that is not a finite number in [0, T) (T = num_train_timesteps), or, for the
  schedulers that index ``alphas_cumprod`` with it (DDPM, DDIM, PNDM), not a whole number;
* a timestep that is not one of the current schedule's ``timesteps``, where the scheduler looks it
  up (DDPM after ``set_timesteps``, PNDM, Euler, Euler ancestral, Heun, DPM-Solver);
* ``add_noise`` timesteps that are not one per batch item (or one for the whole batch);
* custom ``timesteps=`` / ``sigmas=`` lists that are empty, not 1-d, not finite, outside [0, T)
  (timesteps) or negative (sigmas).

The constructor checks (``check_schedule_options``, ``check_int``, ``check_real``, ``check_choice``) and
the array checks of ``step`` and ``add_noise`` (``check_sample``, ``check_array_pair``) are here too; the
beta ranges are checked by ``training_schedule.make_betas``.
"""
from __future__ import annotations

import math

import numpy

from npdiffusion.backend import to_numpy
from npdiffusion.schedulers.timesteps import TIMESTEP_SPACINGS


def timestep_scalar(where: str, timestep):
    """A timestep given as int/float, NumPy scalar or 1-element host/device array, as a Python number."""
    if hasattr(timestep, "shape"):
        arr = to_numpy(timestep)
        if arr.size != 1:
            raise ValueError(f"{where}: timestep must be a scalar, got an array of shape {arr.shape}")
        if arr.dtype.kind not in "iuf":
            raise TypeError(f"{where}: timestep must be a number, got an array of dtype {arr.dtype}")
        return arr.reshape(()).item()
    if isinstance(timestep, (numpy.integer, numpy.floating)):
        return timestep.item()
    if isinstance(timestep, bool) or not isinstance(timestep, (int, float)):
        raise TypeError(f"{where}: timestep must be a number, got {type(timestep).__name__} {timestep!r}")
    return timestep


def check_timestep(where: str, timestep, num_train_timesteps: int, integer: bool = True):
    """The timestep as a Python number in [0, T): an int when ``integer`` (whole floats such as 981.0 pass)."""
    t = timestep_scalar(where, timestep)
    if not (math.isfinite(t) and 0 <= t < num_train_timesteps):
        raise ValueError(f"{where}: timestep must lie in [0, {num_train_timesteps - 1}], got {t!r}")
    if integer:
        if t != int(t):
            raise ValueError(f"{where}: timestep must be a whole number (an index into the training "
                             f"schedule), got {t!r}")
        return int(t)
    return t


def schedule_positions(where: str, timestep, schedule: numpy.ndarray) -> numpy.ndarray:
    """The indices of ``timestep`` in ``schedule`` (the scheduler's ``timesteps``); none is an error."""
    t = timestep_scalar(where, timestep)
    found = numpy.flatnonzero(schedule == t)
    if found.size == 0:
        span = f"from {schedule[0]:g} down to {schedule[-1]:g}" if schedule.size else "none"
        raise ValueError(f"{where}: timestep {t!r} is not one of the scheduler's timesteps "
                         f"({schedule.size} values {span}; pass values from .timesteps)")
    return found


def noise_timesteps(where: str, timesteps, batch: int) -> numpy.ndarray:
    """``add_noise``'s timesteps as a host 1-d array of 1 or ``batch`` entries (one per item, or one for all)."""
    ts = to_numpy(timesteps) if hasattr(timesteps, "shape") else numpy.asarray(timesteps)
    ts = numpy.atleast_1d(ts).reshape(-1)
    if ts.dtype.kind not in "iuf":
        raise TypeError(f"{where}: timesteps must be numbers, got {timesteps!r}")
    if ts.size not in (1, batch):
        raise ValueError(f"{where}: timesteps must have 1 or {batch} entries (the batch size of original_samples), "
                         f"got {ts.size}")
    return ts


def check_custom_timesteps(where: str, timesteps, num_train_timesteps: int, integer: bool = False,
                           descending: bool = False) -> numpy.ndarray:
    """A custom ``timesteps=`` list as a host 1-d array: non-empty, finite, in [0, T).

    ``integer``: whole numbers (returned as int64); ``descending``: strictly decreasing (DDPM, as diffusers).
    """
    ts = to_numpy(timesteps) if hasattr(timesteps, "shape") else numpy.asarray(timesteps)
    if ts.ndim != 1 or ts.size == 0 or ts.dtype.kind not in "iuf":
        raise ValueError(f"{where}: timesteps must be a non-empty 1-d list of numbers, got {timesteps!r}")
    T = num_train_timesteps
    if not numpy.all(numpy.isfinite(ts)) or ts.min() < 0 or ts.max() >= T:
        raise ValueError(f"{where}: timesteps must lie in [0, {T - 1}], got {ts.tolist()}")
    if integer and not numpy.all(ts == numpy.round(ts)):
        raise ValueError(f"{where}: timesteps must be whole numbers, got {ts.tolist()}")
    if descending and numpy.any(numpy.diff(ts) >= 0):
        raise ValueError(f"{where}: custom timesteps must be strictly descending, got {ts.tolist()}")
    return ts.astype(numpy.int64) if integer else ts


def check_custom_sigmas(where: str, sigmas) -> numpy.ndarray:
    """A custom ``sigmas=`` list (N+1 noise levels, the last the final one): 1-d, >= 2 finite values >= 0."""
    s = to_numpy(sigmas) if hasattr(sigmas, "shape") else numpy.asarray(sigmas)
    if s.ndim != 1 or s.size < 2 or s.dtype.kind not in "iuf":
        raise ValueError(f"{where}: sigmas must be a 1-d list of at least 2 numbers (N steps need N + 1), "
                         f"got {sigmas!r}")
    if not numpy.all(numpy.isfinite(s)) or s.min() < 0:
        raise ValueError(f"{where}: sigmas must be finite and >= 0, got {s.tolist()}")
    return s


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
