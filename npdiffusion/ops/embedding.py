"""Embedding lookup (forward/backward) and the sinusoidal timestep embedding (forward only).

Shape legend: V vocabulary size (rows of the table), D embedding width, ids (...) any shape of
integers, N = ids.size, T number of timesteps. Derivations: docs/ops/embeddings.md.

Lookup: y[..., :] = W[ids[...], :]. Its gradient adds each upstream row into the row of W it came
from: dW[v] = sum over positions n with ids[n] = v of dy[n]. Repeated ids must accumulate, which a
plain ``dW[ids] += dy`` would not do. On NumPy the rows are sorted by id and summed per run with
``add.reduceat`` (faster than ``numpy.add.at`` whenever ids repeat: docs/ops/embeddings.md); on
CuPy ``backend.scatter_add`` (atomic adds; their order, so the last bits of float32 sums, can vary
from run to run).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy

from npdiffusion.backend import asarray, get_backend, scatter_add, xp


def check_ids(ids, num_embeddings, op):
    if not hasattr(ids, "dtype") or ids.dtype.kind not in "iu":
        got = getattr(ids, "dtype", type(ids).__name__)
        raise TypeError(f"{op}: ids must be an integer array, got {got}")
    if ids.size:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num_embeddings:
            raise ValueError(f"{op}: ids must lie in [0, {num_embeddings}) (the rows of weight), "
                             f"got values from {lo} to {hi}")


class EmbeddingCache(NamedTuple):
    """What ``embedding_backward`` needs from the forward."""
    ids: object           # (...) integers in [0, V)
    weight_shape: tuple   # (V, D)
    weight_dtype: object


def embedding_forward(ids, weight, checked=False):
    """y = weight[ids]: ids (...) integers in [0, V), weight (V, D) -> y (..., D).

    Returns ``(y, cache)``; cache an ``EmbeddingCache``. ids receive no gradient. The range of
    ``ids`` is checked (on CuPy a host synchronization for device ids) unless ``checked`` says
    the caller already did (``nn.Embedding`` checks host ids before moving them).
    """
    op = "embedding"
    if not hasattr(weight, "ndim") or weight.ndim != 2:
        raise ValueError(f"{op}: weight must have shape (V, D), got shape {getattr(weight, 'shape', None)}")
    if not checked:
        check_ids(ids, weight.shape[0], op)
    y = xp.take(weight, ids, axis=0)                                    # (..., D)
    return y, EmbeddingCache(ids, weight.shape, weight.dtype)


def embedding_backward(dy, cache):
    """Returns ``(None, dweight)``: no gradient for the integer ids; dweight (V, D) with
    dweight[v] = sum of dy[n] over every position n where ids[n] == v (repeats accumulate)."""
    ids, wshape, wdtype = cache
    d = wshape[1]
    flat_ids = ids.reshape(-1)                                           # (N,)
    rows = dy.reshape(-1, d).astype(wdtype, copy=False)                  # (N, D)
    dweight = xp.zeros(wshape, dtype=wdtype)                             # (V, D)
    if flat_ids.size == 0:
        return None, dweight
    if get_backend() == "numpy":
        order = xp.argsort(flat_ids, kind="stable")
        sorted_ids = flat_ids[order]
        starts = xp.flatnonzero(xp.concatenate(([True], sorted_ids[1:] != sorted_ids[:-1])))
        dweight[sorted_ids[starts]] = xp.add.reduceat(rows[order], starts, axis=0)
    else:
        scatter_add(dweight, flat_ids, rows)
    return None, dweight


def timestep_embedding(timesteps, dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1,
                       max_period=10000):
    """Sinusoidal embedding of timesteps (T,) -> (T, dim), float32, equal to diffusers'
    ``get_timestep_embedding`` (DDPM / "Attention is all you need" positions).

    half = dim // 2; freq_i = exp(-ln(max_period) * i / (half - downscale_freq_shift)),
    i = 0..half-1; arg = scale * t * freq; output [sin(arg) | cos(arg)], swapped to
    [cos | sin] when ``flip_sin_to_cos``; an odd ``dim`` gets one zero column at the end.
    Stable Diffusion's U-Net uses flip_sin_to_cos=True, downscale_freq_shift=0.

    Follows diffusers' float32 steps whatever the dtype of ``timesteps`` (ints or floats,
    fractional allowed): exponents, t * freq and the scaling are float32 products, and exp, sin,
    cos are correctly rounded to float32. torch's float32 exp and sin differ from correct
    rounding in a few entries, so results agree with diffusers to about one float32 ulp, plus
    t * ulp(freq) where torch's exp is off by an ulp (<= 6e-5 for t < 1000).

    This is a forward function only: it has no parameters, and timesteps are conditioning
    inputs that get no gradient.
    """
    op = "timestep_embedding"
    if isinstance(dim, bool) or not isinstance(dim, (int, numpy.integer)) or dim <= 0:
        raise ValueError(f"{op}: dim must be a positive int, got {dim!r}")
    t = asarray(timesteps)
    if t.ndim != 1:
        raise ValueError(f"{op}: timesteps must be a 1-D array (T,), got shape {tuple(t.shape)}")
    if t.dtype.kind not in "iuf":
        raise TypeError(f"{op}: timesteps must be integers or floats, got dtype {t.dtype}")
    half = int(dim) // 2
    if half and half == downscale_freq_shift:
        raise ValueError(f"{op}: dim // 2 ({half}) must differ from downscale_freq_shift "
                         f"({downscale_freq_shift}); their difference divides the exponents")
    # float32 steps as diffusers; exp, sin and cos are evaluated in float64 and rounded, which
    # matches torch's float32 results far more often than NumPy's own float32 exp/sin do.
    exponent = xp.arange(half, dtype=xp.float32) * float(-math.log(max_period))
    exponent /= float(half - downscale_freq_shift)
    freqs = xp.exp(exponent.astype(xp.float64)).astype(xp.float32)      # (half,)
    arg = t.astype(xp.float32)[:, None] * freqs[None, :]                 # (T, half), float32 product
    arg *= float(scale)
    arg = arg.astype(xp.float64)
    first, second = (xp.cos, xp.sin) if flip_sin_to_cos else (xp.sin, xp.cos)
    emb = xp.zeros((t.shape[0], int(dim)), dtype=xp.float32)             # odd dim: last column 0
    emb[:, :half] = first(arg)
    emb[:, half:2 * half] = second(arg)
    return emb
