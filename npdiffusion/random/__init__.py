"""Random numbers: the generator that initializes parameters, and seeding.

Parameters are drawn on the host from a NumPy ``Generator`` (PCG64) and then moved to the active
backend, so a seed gives the same initial weights on NumPy and on CuPy.
"""
from __future__ import annotations

import numpy

_state = {"rng": numpy.random.default_rng(0)}


def manual_seed(seed: int) -> numpy.random.Generator:
    """Reseed the generator used for parameter initialization; returns it."""
    if not isinstance(seed, (int, numpy.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    _state["rng"] = numpy.random.default_rng(int(seed))
    return _state["rng"]


def default_rng() -> numpy.random.Generator:
    """The generator used for parameter initialization."""
    return _state["rng"]


from npdiffusion.random.torch_generator import TorchGenerator, randn_tensor, torch_rand, torch_randn  # noqa: E402

__all__ = ["manual_seed", "default_rng", "TorchGenerator", "torch_randn", "torch_rand", "randn_tensor"]
