"""Inverted dropout with an explicit random generator, as a forward/backward pair.

Shapes: x (...) -> y (...) of the same shape and dtype; the mask has x's shape.
Derivation: docs/ops/activations.md (section "Dropout").

y = x * m with m = keep / (1 - p), keep ~ Bernoulli(1 - p) per element, so E[y] = x and
evaluation needs no rescaling. dx = dy * m, with the *same* mask (the cache keeps it).

The keep mask is drawn on the host from a NumPy ``Generator`` (``rng.random(x.shape) >= p``, in
float64 whatever x's dtype) and moved to the backend with ``backend.asarray``: the same generator
state gives the same mask on NumPy and on CuPy, in float32 and in float64, and the state can be
saved and restored exactly (``rng.bit_generator.state``).
"""
from __future__ import annotations

import numpy

from npdiffusion.backend import asarray, xp
from npdiffusion.checks import check_probability


def dropout_forward(x, p, rng):
    """Zero each element of x with probability p and scale the rest by 1/(1-p).

    ``rng`` is a ``numpy.random.Generator``. p = 0 returns x itself (no copy) and draws nothing;
    p = 1 returns zeros and draws nothing. Returns ``(y, cache)``; cache = the scaled mask m
    (x's shape and dtype), or None for p = 0, or 0.0 for p = 1.
    """
    p = check_probability("p", p, "dropout")
    if not hasattr(x, "dtype") or x.dtype.kind != "f":
        raise TypeError(f"dropout: x must be a floating array, got {getattr(x, 'dtype', type(x).__name__)}")
    if p == 0.0:
        return x, None
    if p == 1.0:
        return xp.zeros_like(x), 0.0
    if not isinstance(rng, numpy.random.Generator):
        raise TypeError(f"dropout: rng must be a numpy.random.Generator, got {type(rng).__name__}")
    keep = rng.random(x.shape) >= p                                      # host bool, x's shape
    mask = asarray(keep).astype(x.dtype)
    mask *= 1.0 / (1.0 - p)
    return x * mask, mask


def dropout_backward(dy, cache):
    """dx = dy * m with the forward's mask (a fresh array; dy itself is never returned)."""
    mask = cache
    if mask is None:
        return dy.copy()
    if isinstance(mask, float):
        return xp.zeros_like(dy)
    return dy * mask
