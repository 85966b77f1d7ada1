"""The stand-in's ``cupyx`` (with ``cupyx.scipy.special``): only names real cupyx has.

``scatter_add``/``scatter_max``/``scatter_min`` are NumPy's unbuffered ``ufunc.at`` on the
wrapped buffers (CuPy uses atomics: same sums up to the order of float additions);
``cupyx.scipy.special`` is SciPy's ``scipy.special`` behind CuPy's rules (host arrays refused,
results wrapped).
"""
from __future__ import annotations

import numpy as _numpy
import scipy.special as _special

from npdiffusion.cupy_standin import _array
from npdiffusion.cupy_standin.cupy import _expose_only, _function, _namespace, ufunc as _ufunc
from npdiffusion.cupy_standin.names import NAMES as _NAMES


def _scatter(np_ufunc, name):
    def scatter(a, slices, value):
        if not isinstance(a, _array.ndarray):
            raise TypeError(f"cupyx.{name}: a must be a cupy.ndarray, got {type(a)}")
        index = _array._unwrap_index(slices)
        value = value._a if isinstance(value, _array.ndarray) else _array.unwrap_operand(value, f"cupyx.{name}")
        np_ufunc.at(a._a, index, value)

    scatter.__name__ = name
    return scatter


def _special_member(name):
    value = getattr(_special, name)
    if isinstance(value, _numpy.ufunc):
        return _ufunc(value)
    if callable(value) and not isinstance(value, type):
        return _function(name, value, f"cupyx.scipy.special.{name}")
    return value


special = _namespace("cupyx.scipy.special", _NAMES["cupyx.scipy.special"], {
    n: _special_member(n) for n in _NAMES["cupyx.scipy.special"] if hasattr(_special, n)
})
scipy = _namespace("cupyx.scipy", _NAMES["cupyx.scipy"], {"special": special})

_EXPORTS = {
    "scatter_add": _scatter(_numpy.add, "scatter_add"),
    "scatter_max": _scatter(_numpy.maximum, "scatter_max"),
    "scatter_min": _scatter(_numpy.minimum, "scatter_min"),
    "scipy": scipy,
    "errstate": _numpy.errstate, "seterr": _numpy.seterr, "geterr": _numpy.geterr,
}
_PUBLIC = frozenset(_NAMES["cupyx"])
assert set(_EXPORTS) <= _PUBLIC, set(_EXPORTS) - _PUBLIC
__getattr__, __dir__ = _expose_only(globals(), "cupyx", _PUBLIC, _EXPORTS)
