"""Element-wise activations as forward/backward pairs: SiLU, GELU (erf and tanh), QuickGELU.

Shapes: x (...) -> y (...) of the same shape and dtype. Derivations: docs/ops/activations.md.

Each forward caches only x (one reference, no copy); the backward recomputes the cheap
transcendental it needs, as torch does, so an activation costs no extra memory in training.

    silu(x)       = x s(x),               s = sigmoid,  silu'  = s (1 + x (1 - s))
    gelu(x)       = x Phi(x),             Phi(x) = (1 + erf(x/sqrt 2))/2,
                                          gelu'  = Phi(x) + x phi(x),  phi(x) = exp(-x^2/2)/sqrt(2 pi)
    gelu_tanh(x)  = x (1 + tanh(u))/2,    u = c (x + 0.044715 x^3),  c = sqrt(2/pi)
                                          gelu_tanh' = (1 + t)/2 + x (1 - t^2) c (1 + 3*0.044715 x^2)/2
    quick_gelu(x) = x s(1.702 x),         quick_gelu' = s + 1.702 x s (1 - s)

Speed on the CPU: every op runs as a kernel over cache-sized blocks of the flattened arrays, on the
CPU's threads (``_map``, npdiffusion/parallel.py), so its several passes find the block in cache.
On NumPy the sigmoid is 1/(1 + exp(-x)) with exp's overflow ignored (exact limits 0 and 1; faster
than scipy's ``expit``), and float32 erf is a rational minimax approximation (``_erf_float32``: max
absolute error 4.5e-7, faster than scipy's float32 erf); float64 erf stays ``scipy.special.erf``.
Measurements: docs/ops/activations.md. On CuPy both come from ``cupyx.scipy.special``.
"""
from __future__ import annotations

import math

import numpy

from npdiffusion.backend import get_backend, xp
from npdiffusion.parallel import BLOCK_ENTRIES, parallel_for

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_C = math.sqrt(2.0 / math.pi)
_TANH_K = 0.044715
_QUICK = 1.702

# erf(x) ~ x P(x^2) / Q(x^2) on [-4, 4] (erf = +-1 in float32 beyond): the float32 minimax
# coefficients of Eigen's generic_fast_erf_float, highest degree first.
_ERF_P = tuple(numpy.float32(c) for c in (
    -2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
    -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02))
_ERF_Q = tuple(numpy.float32(c) for c in (
    -1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
    -1.42647390514189e-02))


def _special():
    """scipy.special on the NumPy backend, cupyx.scipy.special on the CuPy backend."""
    if get_backend() == "cupy":
        import cupyx.scipy.special as special  # noqa: PLC0415 - only with the CuPy backend
    else:
        import scipy.special as special  # noqa: PLC0415 - imported on first use
    return special


def _erf_float32(x, out):
    """erf of a float32 array into ``out`` (may be x): x P(x^2)/Q(x^2) with x clipped to [-4, 4]."""
    t = xp.clip(x, -4.0, 4.0, out=out)
    x2 = t * t
    p = x2 * _ERF_P[0]
    p += _ERF_P[1]
    for c in _ERF_P[2:]:
        p *= x2
        p += c
    p *= t
    q = x2 * _ERF_Q[0]
    q += _ERF_Q[1]
    for c in _ERF_Q[2:]:
        q *= x2
        q += c
    return xp.divide(p, q, out=out)


def _erf(x, out):
    """erf element-wise into ``out`` (may be x itself)."""
    if x.dtype == numpy.float32 and get_backend() == "numpy":
        return _erf_float32(x, out)
    return _special().erf(x, out=out)


def _sigmoid(x, out):
    """1/(1 + exp(-x)) element-wise into ``out`` (may be x), exact at both tails."""
    if get_backend() != "numpy":
        return _special().expit(x, out=out)
    with numpy.errstate(over="ignore"):         # exp(-x) = inf for x << 0 gives 1/(1 + inf) = 0
        xp.negative(x, out=out)
        xp.exp(out, out=out)
    out += 1.0
    return xp.reciprocal(out, out=out)


def _check(x, op):
    if not hasattr(x, "dtype") or x.dtype.kind != "f":
        raise TypeError(f"{op}: x must be a floating array, got {getattr(x, 'dtype', type(x).__name__)}")


def _map(kernel, x, *more):
    """``kernel(x_block, *more_blocks, out_block)`` over cache-sized blocks of the flattened arrays
    (all of x's shape), on the CPU's threads; returns the result in x's shape and dtype. float16 is
    computed in float32 (as torch does on the CPU)."""
    cdt = numpy.dtype(numpy.float32) if x.dtype.itemsize < 4 else x.dtype
    flat = [xp.ascontiguousarray(a).reshape(-1) for a in (x, *more)]   # views when contiguous
    out = xp.empty(flat[0].shape, dtype=cdt)

    def block(lo, hi):
        kernel(*(a[lo:hi].astype(cdt, copy=False) for a in flat), out[lo:hi])

    parallel_for(block, out.size, 1, BLOCK_ENTRIES)
    return out.reshape(x.shape).astype(x.dtype, copy=False)


# --------------------------------------------------------------------------------- SiLU
# SiLU and QuickGELU are both x * sigmoid(beta x) ("swish"), beta = 1 and 1.702:
# d/dx = s + beta x s (1 - s) = s (1 + beta x (1 - s)),  s = sigmoid(beta x).
def _swish(x, out, beta=1.0):
    if beta == 1.0:
        _sigmoid(x, out)
    else:
        xp.multiply(x, beta, out=out)
        _sigmoid(out, out)
    out *= x


def _swish_grad(x, dy, out, beta=1.0):
    s = _sigmoid(x, out) if beta == 1.0 else _sigmoid(xp.multiply(x, beta, out=out), out)
    t = xp.subtract(1.0, s)           # 1 - s
    t *= x                            # x (1 - s)
    if beta != 1.0:
        t *= beta
    t += 1.0
    s *= t
    s *= dy


def silu_forward(x):
    """y = x * sigmoid(x) (a.k.a. swish). Returns ``(y, cache)``; cache = x."""
    _check(x, "silu")
    return _map(_swish, x), x


def silu_backward(dy, cache):
    """dx = dy * s (1 + x (1 - s)), s = sigmoid(x)."""
    return _map(_swish_grad, cache, dy)


# --------------------------------------------------------------------------------- GELU
def phi_cdf(x, out):
    """Phi(x) = (1 + erf(x / sqrt 2)) / 2 into ``out`` (may be x)."""
    xp.multiply(x, _SQRT_HALF, out=out)
    _erf(out, out)
    out += 1.0
    out *= 0.5
    return out


def _gelu(x, out):
    phi_cdf(x, out)
    out *= x


def _gelu_grad(x, dy, out):
    t = xp.multiply(x, x)
    t *= -0.5
    xp.exp(t, out=t)
    t *= x
    t *= _INV_SQRT_2PI               # x phi(x)
    phi_cdf(x, out)
    out += t
    out *= dy


def _gelu_tanh(x, out):
    xp.multiply(x, x, out=out)
    out *= _TANH_K
    out += 1.0
    out *= x
    out *= _TANH_C                    # u = c (x + k x^3)
    xp.tanh(out, out=out)
    out += 1.0
    out *= 0.5
    out *= x


def _gelu_tanh_grad(x, dy, out):
    x2 = xp.multiply(x, x)
    t = x2 * _TANH_K
    t += 1.0
    t *= x
    t *= _TANH_C
    xp.tanh(t, out=t)                 # t = tanh(u)
    xp.multiply(t, t, out=out)
    xp.subtract(1.0, out, out=out)    # 1 - t^2
    x2 *= 3.0 * _TANH_K
    x2 += 1.0
    out *= x2
    out *= x
    out *= _TANH_C                    # x (1 - t^2) u'
    out += t
    out += 1.0
    out *= 0.5
    out *= dy


_GELU = {"none": (_gelu, _gelu_grad), "tanh": (_gelu_tanh, _gelu_tanh_grad)}


def gelu_forward(x, approximate: str = "none"):
    """GELU: x * Phi(x) with the exact erf (``approximate="none"``, torch's default), or the tanh
    approximation 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (``approximate="tanh"``).
    Returns ``(y, cache)``; cache = (x, approximate)."""
    _check(x, "gelu")
    if approximate not in _GELU:
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _map(_GELU[approximate][0], x), (x, approximate)


def gelu_backward(dy, cache):
    """dx = dy * (Phi(x) + x phi(x)) (erf), or the derivative of the tanh form."""
    x, approximate = cache
    return _map(_GELU[approximate][1], x, dy)


# --------------------------------------------------------------------------------- QuickGELU
def _quick_gelu(x, out):
    _swish(x, out, _QUICK)


def _quick_gelu_grad(x, dy, out):
    _swish_grad(x, dy, out, _QUICK)


def quick_gelu_forward(x):
    """y = x * sigmoid(1.702 x) (CLIP's activation). Returns ``(y, cache)``; cache = x."""
    _check(x, "quick_gelu")
    return _map(_quick_gelu, x), x


def quick_gelu_backward(dy, cache):
    """dx = dy * (s + 1.702 x s (1 - s)), s = sigmoid(1.702 x)."""
    return _map(_quick_gelu_grad, cache, dy)
