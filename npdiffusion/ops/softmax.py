"""Softmax and log-softmax along one axis, as forward/backward pairs.

Shapes: x (...) with the normalized axis ``axis`` of length K; y has the shape of x.
Derivation: docs/ops/attention.md (section "Softmax").

Numerics:

* Stable: the row maximum is subtracted before ``exp``, so no entry overflows.
* float16 inputs are computed in float32 and the result is cast back to float16 (as transformers'
  CLIP does with ``softmax(dtype=float32)``); float32 and float64 stay as they are.
* A row whose entries are all ``-inf`` (a fully masked row) has no defined softmax. Here softmax
  gives zeros there and a zero gradient; log-softmax gives ``-inf`` and passes ``dy`` through
  (its log-sum-exp, ``-inf``, is treated as a constant). Torch's ``F.softmax`` gives NaN there;
  ``F.scaled_dot_product_attention`` gives zeros, like this file.
"""
from __future__ import annotations

from npdiffusion.backend import xp
from npdiffusion.checks import compute_dtype


def _normalize_axis(axis, ndim):
    if isinstance(axis, bool) or not isinstance(axis, int) or not -ndim <= axis < ndim:
        raise ValueError(f"softmax: axis must be an int in [{-ndim}, {ndim}), got {axis!r}")
    return axis % ndim


def _shifted(x, axis):
    """``(z, m)``: z = x - m (a fresh array in the compute dtype), m = max over ``axis`` (kept),
    with the maximum of an all ``-inf`` row replaced by 0 so that z stays ``-inf`` instead of NaN."""
    cdt = compute_dtype(x.dtype, "softmax")
    m = xp.max(x, axis=axis, keepdims=True).astype(cdt, copy=False)
    m = xp.where(m == -xp.inf, 0.0, m)
    z = xp.subtract(x, m, dtype=cdt)
    return z, m


def softmax_forward(x, axis: int = -1):
    """y = exp(x - max) / sum(exp(x - max)) along ``axis``. Returns ``(y, cache)``.

    cache = (y, axis): the output is all the backward needs.
    """
    if x.ndim == 0:
        raise ValueError("softmax: x must have at least one dimension, got a 0-d array")
    axis = _normalize_axis(axis, x.ndim)
    e, _ = _shifted(x, axis)
    xp.exp(e, out=e)                                   # in place: e = exp(x - m)
    s = xp.sum(e, axis=axis, keepdims=True)
    s = xp.reciprocal(xp.where(s == 0, 1.0, s))        # fully masked rows: 0 * 1 = 0, not 0 / 0
    e *= s
    y = e.astype(x.dtype, copy=False)
    return y, (y, axis)


def softmax_backward(dy, cache):
    """dx = y * (dy - sum(dy * y, axis)). Returns dx (a fresh array of y's dtype)."""
    y, axis = cache
    cdt = compute_dtype(y.dtype, "softmax")
    yc = y.astype(cdt, copy=False)
    dx = xp.multiply(dy, yc, dtype=cdt)                # dy * y
    s = xp.sum(dx, axis=axis, keepdims=True)           # sum_k dy_k y_k
    dx -= yc * s                                       # y * dy - y * s
    return dx.astype(y.dtype, copy=False)


def log_softmax_forward(x, axis: int = -1):
    """y = (x - max) - log(sum(exp(x - max))) along ``axis``. Returns ``(y, cache)``.

    cache = (y, axis). A fully ``-inf`` row gives ``-inf`` everywhere (see the module docstring).
    """
    if x.ndim == 0:
        raise ValueError("log_softmax: x must have at least one dimension, got a 0-d array")
    axis = _normalize_axis(axis, x.ndim)
    z, _ = _shifted(x, axis)
    s = xp.sum(xp.exp(z), axis=axis, keepdims=True)
    z -= xp.log(xp.where(s == 0, 1.0, s))              # fully masked rows: z stays -inf, not NaN
    y = z.astype(x.dtype, copy=False)
    return y, (y, axis)


def log_softmax_backward(dy, cache):
    """dx = dy - exp(y) * sum(dy, axis). Returns dx (a fresh array of y's dtype)."""
    y, axis = cache
    cdt = compute_dtype(y.dtype, "softmax")
    p = xp.exp(y.astype(cdt, copy=False))              # the softmax; 0 on fully masked rows
    p *= xp.sum(dy, axis=axis, keepdims=True, dtype=cdt)
    dx = xp.subtract(dy, p, dtype=cdt)
    return dx.astype(y.dtype, copy=False)
