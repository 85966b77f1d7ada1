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

The constructor checks (beta ranges, spacing, prediction type) live in base.py.
"""
from __future__ import annotations

import math

import numpy

from npdiffusion.backend import to_numpy


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
