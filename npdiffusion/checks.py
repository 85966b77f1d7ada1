"""Argument checks for the whole package: one rule per kind of argument, one message shape.

Every check raises with a message that names the argument, what was expected and what came:
``"{where}: {name} must be {expected}, got {value!r}"`` (``where`` - the op, module or class - is
left out when the caller's name already says it). A value of the wrong kind raises TypeError, a
value of the right kind out of range raises ValueError; counts (ints) raise ValueError either way,
as torch's constructors do. Each check returns the value normalized (a Python int or float, a pair,
a NumPy dtype), so callers write ``self.n = check_int("n", n)``.

Shape legend for the array checks: B batch.
"""
from __future__ import annotations

import json
import math
import numbers

import numpy


def _prefix(where) -> str:
    return f"{where}: " if where else ""


# ------------------------------------------------------------------------------------------ numbers
def check_int(name: str, value, minimum: int | None = 1, where: str | None = None) -> int:
    """``value`` (an int, not a bool; NumPy ints too) >= ``minimum`` as a Python int, else ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (minimum is not None
                                                                              and value < minimum):
        what = ("an int" if minimum is None else "a positive int" if minimum == 1
                else "a non-negative int" if minimum == 0 else f"an int >= {minimum}")
        raise ValueError(f"{_prefix(where)}{name} must be {what}, got {value!r}")
    return int(value)


def check_positive_int(name: str, value, where: str | None = None) -> int:
    """``check_int`` with minimum 1: sizes and counts."""
    return check_int(name, value, 1, where)


def check_real(name: str, value, minimum: float | None = None, maximum: float | None = None,
               where: str | None = None, finite: bool = True, exclusive_maximum: bool = False) -> float:
    """``value`` (a real number, not a bool) as a Python float: TypeError for another kind, ValueError
    outside ``[minimum, maximum]`` (``[minimum, maximum)`` with ``exclusive_maximum``) or, with
    ``finite``, for inf and NaN."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{_prefix(where)}{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if finite and not math.isfinite(value):
        raise ValueError(f"{_prefix(where)}{name} must be finite, got {value!r}")
    low = minimum is not None and not value >= minimum
    high = maximum is not None and not (value < maximum if exclusive_maximum else value <= maximum)
    if low or high:
        if minimum is not None and maximum is not None:
            what = f"a number in [{minimum}, {maximum}{')' if exclusive_maximum else ']'}"
        elif minimum is not None:
            what = f">= {minimum}"
        else:
            what = f"{'<' if exclusive_maximum else '<='} {maximum}"
        raise ValueError(f"{_prefix(where)}{name} must be {what}, got {value!r}")
    return value


def check_probability(name: str, value, where: str | None = None) -> float:
    """``value`` in [0, 1] as a float (dropout rates), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{_prefix(where)}{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def check_pair(name: str, value, minimum: int, where: str | None = None) -> tuple[int, int]:
    """An int or a pair of ints, each >= ``minimum``, as a pair (kernel sizes, strides, padding)."""
    what = "positive" if minimum == 1 else "non-negative" if minimum == 0 else f">= {minimum}"
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in pair):
        raise TypeError(f"{_prefix(where)}{name} must be a {what} int or a pair of {what} ints, got {value!r}")
    if any(v < minimum for v in pair):
        raise ValueError(f"{_prefix(where)}{name} must be a {what} int or a pair of {what} ints, got {value!r}")
    return int(pair[0]), int(pair[1])


# ------------------------------------------------------------------------------------------- dtypes
def check_dtype(name: str, dtype, allowed, where: str | None = None, error=TypeError) -> numpy.dtype:
    """``dtype`` (a NumPy dtype, type or name) as a NumPy dtype whose name is in ``allowed``."""
    try:
        dt = numpy.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in allowed:
        raise error(f"{_prefix(where)}{name} must be one of {tuple(sorted(allowed))}, got {dtype!r}")
    return dt


def compute_dtype(dtype, where: str | None = None, name: str = "x") -> numpy.dtype:
    """The dtype an op computes in for inputs of ``dtype``: float16 in float32 (NumPy has no fast
    float16 kernels; torch's CPU ops upcast too), float32 and float64 in themselves. TypeError for
    a dtype that is not floating."""
    dtype = numpy.dtype(dtype)
    if dtype.kind != "f":
        raise TypeError(f"{_prefix(where)}{name} must be a floating array, got dtype {dtype}")
    return numpy.dtype(numpy.float32) if dtype.itemsize < 4 else dtype


# ------------------------------------------------------------------------------------------- arrays
def check_float_array(name: str, a, where: str | None = None, ndim: int | None = None) -> None:
    """TypeError unless ``a`` is a floating array; ValueError unless it has ``ndim`` axes (if given)."""
    if not hasattr(a, "dtype") or not hasattr(a, "shape") or a.dtype.kind != "f":
        got = f"dtype {a.dtype}" if hasattr(a, "dtype") else type(a).__name__
        raise TypeError(f"{_prefix(where)}{name} must be a floating array, got {got}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{_prefix(where)}{name} must have {ndim} dimensions, got shape {tuple(a.shape)}")


def check_batch(module: str, name: str, x) -> None:
    """A model entry refuses an empty batch (B = 0): there is nothing to compute, so it is a caller's bug.

    (The conv2d op itself, like torch's, maps an empty batch to an empty result.)"""
    if x.shape[0] == 0:
        raise ValueError(f"{module}: {name} has batch size 0; expected at least 1")


def check_input(module: str, name: str, x, ndim=None, min_ndim=None, axis=None, size=None) -> None:
    """Raise TypeError/ValueError unless ``x`` is an array of the given rank and axis size."""
    shape = getattr(x, "shape", None)
    if shape is None or not hasattr(x, "dtype"):
        raise TypeError(f"{module}: {name} must be an array, got {type(x).__name__}")
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"{module}: {name} must have {ndim} dimensions, got shape {tuple(shape)}")
    if min_ndim is not None and len(shape) < min_ndim:
        raise ValueError(f"{module}: {name} must have at least {min_ndim} dimensions, got shape {tuple(shape)}")
    if axis is not None and shape[axis] != size:
        raise ValueError(
            f"{module}: {name} must have {size} entries on axis {axis}, got shape {tuple(shape)}"
        )


# --------------------------------------------------------------------------------------------- JSON
def read_json_object(path: str, where: str, error=ValueError) -> dict:
    """The JSON object stored at ``path``; ``error`` (naming ``where`` and the path) when the file is
    not UTF-8 JSON or holds something other than an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as exc:
        raise error(f"{_prefix(where)}{path!r} is not UTF-8 text ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise error(f"{_prefix(where)}{path!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{_prefix(where)}{path!r} must hold a JSON object, got a JSON {type(data).__name__}")
    return data


def check_sample(name: str, x) -> None:
    """TypeError unless ``x`` is a floating array; ValueError unless it has a batch axis (B, ...)."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if x.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating array, got dtype {x.dtype}")
    if x.ndim < 1:
        raise ValueError(f"{name} must have a batch axis, got shape {tuple(x.shape)}")


def check_same_shape(name_a: str, a, name_b: str, b) -> None:
    """ValueError unless ``b`` has the shape of ``a``."""
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"{name_b} must have the shape of {name_a} {tuple(a.shape)}, got {tuple(b.shape)}")
