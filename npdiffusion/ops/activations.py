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

The logistic sigmoid and erf come from ``scipy.special`` on NumPy and ``cupyx.scipy.special`` on
CuPy (``_special``), both stable for every finite input (no overflow in exp(-x)).
"""
from __future__ import annotations

import math

from npdiffusion.backend import get_backend, xp

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_C = math.sqrt(2.0 / math.pi)
_TANH_K = 0.044715
_QUICK = 1.702


def _special():
    """scipy.special on the NumPy backend, cupyx.scipy.special on the CuPy backend."""
    if get_backend() == "cupy":
        import cupyx.scipy.special as special  # noqa: PLC0415 - only with the CuPy backend
    else:
        import scipy.special as special  # noqa: PLC0415 - imported on first use
    return special


def _erf(x, out=None):
    """erf element-wise on the active backend (``out`` may be x itself)."""
    return _special().erf(x, out=out) if out is not None else _special().erf(x)


def _sigmoid(x, out=None):
    """1/(1 + exp(-x)) element-wise, stable for large |x| (scipy's / cupyx's ``expit``)."""
    return _special().expit(x, out=out) if out is not None else _special().expit(x)


def _like(a, x):
    """``a`` in x's dtype and shape (scipy's float16 results come back as float32; 0-d inputs are
    computed as (1,) because NumPy ufuncs turn 0-d arrays into scalars, which ``out=`` rejects)."""
    a = a if a.dtype == x.dtype else a.astype(x.dtype)
    return a.reshape(x.shape) if a.shape != x.shape else a


def _1d(a):
    """0-d arrays as (1,) views (see ``_like``); everything else unchanged."""
    return a.reshape(1) if a.ndim == 0 else a


def _check(x, op):
    if not hasattr(x, "dtype") or x.dtype.kind != "f":
        raise TypeError(f"{op}: x must be a floating array, got {getattr(x, 'dtype', type(x).__name__)}")


# --------------------------------------------------------------------------------- SiLU
def silu_forward(x):
    """y = x * sigmoid(x) (a.k.a. swish). Returns ``(y, cache)``; cache = x."""
    _check(x, "silu")
    x1 = _1d(x)
    y = _sigmoid(x1)
    y *= x1
    return _like(y, x), x


def silu_backward(dy, cache):
    """dx = dy * s (1 + x (1 - s)), s = sigmoid(x)."""
    x = cache
    x1, dy = _1d(x), _1d(dy)
    s = _sigmoid(x1)
    dx = xp.subtract(1.0, s)          # 1 - s
    dx *= x1                          # x (1 - s)
    dx += 1.0
    dx *= s
    dx *= dy
    return _like(dx, x)


# --------------------------------------------------------------------------------- GELU
def _phi_cdf(x):
    """Phi(x) = (1 + erf(x / sqrt 2)) / 2, a fresh array."""
    p = xp.multiply(x, _SQRT_HALF)
    _erf(p, out=p)
    p += 1.0
    p *= 0.5
    return p


def gelu_forward(x, approximate: str = "none"):
    """GELU: x * Phi(x) with the exact erf (``approximate="none"``, torch's default), or the tanh
    approximation 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (``approximate="tanh"``).
    Returns ``(y, cache)``; cache = (x, approximate)."""
    _check(x, "gelu")
    x1 = _1d(x)
    if approximate == "none":
        y = _phi_cdf(x1)
        y *= x1
    elif approximate == "tanh":
        y = xp.multiply(x1, x1)
        y *= _TANH_K
        y += 1.0
        y *= x1
        y *= _TANH_C                  # u = c (x + k x^3)
        xp.tanh(y, out=y)
        y += 1.0
        y *= 0.5
        y *= x1
    else:
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _like(y, x), (x, approximate)


def gelu_backward(dy, cache):
    """dx = dy * (Phi(x) + x phi(x)) (erf), or the derivative of the tanh form."""
    x0, approximate = cache
    x, dy = _1d(x0), _1d(dy)
    if approximate == "none":
        dx = xp.multiply(x, x)
        dx *= -0.5
        xp.exp(dx, out=dx)
        dx *= x
        dx *= _INV_SQRT_2PI          # x phi(x)
        dx += _phi_cdf(x)
    else:
        x2 = xp.multiply(x, x)
        t = x2 * _TANH_K
        t += 1.0
        t *= x
        t *= _TANH_C
        xp.tanh(t, out=t)            # t = tanh(u)
        dx = xp.multiply(t, t)
        xp.subtract(1.0, dx, out=dx)  # 1 - t^2
        x2 *= 3.0 * _TANH_K
        x2 += 1.0
        dx *= x2
        dx *= x
        dx *= _TANH_C                # x (1 - t^2) u'
        dx += t
        dx += 1.0
        dx *= 0.5
    dx *= dy
    return _like(dx, x0)


# --------------------------------------------------------------------------------- QuickGELU
def quick_gelu_forward(x):
    """y = x * sigmoid(1.702 x) (CLIP's activation). Returns ``(y, cache)``; cache = x."""
    _check(x, "quick_gelu")
    x1 = _1d(x)
    y = xp.multiply(x1, _QUICK)
    _sigmoid(y, out=y)
    y *= x1
    return _like(y, x), x


def quick_gelu_backward(dy, cache):
    """dx = dy * (s + 1.702 x s (1 - s)), s = sigmoid(1.702 x)."""
    x0 = cache
    x, dy = _1d(x0), _1d(dy)
    s = xp.multiply(x, _QUICK)
    _sigmoid(s, out=s)
    dx = xp.subtract(1.0, s)          # 1 - s
    dx *= x
    dx *= _QUICK
    dx += 1.0
    dx *= s
    dx *= dy
    return _like(dx, x0)
