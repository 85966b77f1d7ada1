"""The standard-normal draws of the stochastic steps, and per-sample scale factors for a batch.

Shapes: ref, noise (B, C, H, W) (any shape with a batch axis first); values (B,) on the host.
"""
from __future__ import annotations

import numpy

from npdiffusion.backend import asarray
from npdiffusion.schedulers.validation import check_same_shape, check_sample


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
