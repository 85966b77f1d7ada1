"""Argument checks shared by the modules: clear errors naming the argument, expected and got."""
from __future__ import annotations


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


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
