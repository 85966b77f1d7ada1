"""Parameter initialization as torch.nn does it by default (drawn on the host, then moved).

``kaiming_uniform`` with a = sqrt(5) reduces to U(-1/sqrt(fan_in), 1/sqrt(fan_in)), which is
torch's default for both the weight and the bias of Linear and Conv2d.
"""
from __future__ import annotations

import math

import numpy

from npdiffusion.random import default_rng


def uniform_fan_in(shape, fan_in: int, dtype=numpy.float32) -> numpy.ndarray:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) of ``shape`` (torch's Linear/Conv default)."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return default_rng().uniform(-bound, bound, size=shape).astype(dtype)


def normal(shape, std: float = 1.0, dtype=numpy.float32) -> numpy.ndarray:
    """N(0, std^2) of ``shape`` (torch's Embedding default is std 1)."""
    return (default_rng().standard_normal(size=shape) * std).astype(dtype)
