"""The inference timesteps of a ``timestep_spacing``: which N of the T training steps a sampler visits.

Shapes: T = num_train_timesteps, N = number of inference steps; the result is (N,) on the host.
"""
from __future__ import annotations

import numpy

TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


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
