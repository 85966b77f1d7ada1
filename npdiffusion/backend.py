"""The active array backend: NumPy on the CPU or CuPy on an NVIDIA GPU.

Op bodies never import numpy or cupy themselves; they use the proxy ``xp`` from this module,
which forwards every attribute to the active array module::

    from npdiffusion.backend import xp
    y = xp.matmul(a, b)

The backend is chosen once, by ``set_backend("numpy" | "cupy")`` or the environment variable
``NPDIFFUSION_BACKEND``, before models are built. CuPy is imported only when it is asked for.
``NPDIFFUSION_CUPY_STANDIN=1`` makes "cupy" the strict CPU stand-in of ``npdiffusion.cupy_standin``
(for tests without a GPU).

Also here: moving arrays between host and device (``asarray``, ``to_numpy``) and ``scatter_add``,
an unbuffered indexed add that is correct with repeated indices on both backends.
"""
from __future__ import annotations

import os

import numpy

BACKENDS = ("numpy", "cupy")

_state = {"name": None, "module": None}


def _import_cupy():
    if os.environ.get("NPDIFFUSION_CUPY_STANDIN") == "1":  # tests: the CPU stand-in (npdiffusion/cupy_standin)
        from npdiffusion import cupy_standin  # noqa: PLC0415

        if not cupy_standin.is_installed():
            cupy_standin.install()
    try:
        import cupy  # noqa: PLC0415 - imported lazily on purpose
    except ImportError as exc:
        raise RuntimeError(
            "the 'cupy' backend needs CuPy: install it with `pip install \"npdiffusion[gpu]\"` "
            "(cupy-cuda12x) on a machine with an NVIDIA GPU and CUDA 12"
        ) from exc
    try:
        cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError has no stable import path
        raise RuntimeError(f"the 'cupy' backend needs a CUDA GPU, but CuPy found none: {exc}") from exc
    return cupy


def set_backend(name: str) -> None:
    """Choose the array module for every op: ``"numpy"`` (CPU) or ``"cupy"`` (GPU)."""
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    name = name.lower()
    _state["module"] = numpy if name == "numpy" else _import_cupy()
    _state["name"] = name


def get_backend() -> str:
    """The name of the active backend, ``"numpy"`` or ``"cupy"``."""
    _ensure()
    return _state["name"]


def is_available(name: str) -> bool:
    """Whether ``set_backend(name)`` would succeed on this machine."""
    if name == "numpy":
        return True
    try:
        _import_cupy()
    except RuntimeError:
        return False
    return True


def _ensure():
    if _state["module"] is None:
        set_backend(os.environ.get("NPDIFFUSION_BACKEND", "numpy"))
    return _state["module"]


class _ArrayModuleProxy:
    """Forwards attribute access to the active array module (numpy or cupy)."""

    __slots__ = ()

    def __getattr__(self, attr):
        return getattr(_state["module"] or _ensure(), attr)

    def __repr__(self):
        return f"<array module proxy for {get_backend()}>"


xp = _ArrayModuleProxy()


def asarray(a, dtype=None):
    """``a`` as an array of the active backend (copied to the GPU when the backend is CuPy)."""
    return _ensure().asarray(a, dtype=dtype)


def to_numpy(a) -> numpy.ndarray:
    """``a`` as a NumPy array on the host (copied from the GPU when it lives there)."""
    if isinstance(a, numpy.ndarray):
        return a
    get = getattr(a, "get", None)
    if get is not None and not isinstance(a, numpy.generic):
        return get()
    return numpy.asarray(a)


def to_host_floats(values) -> list[float]:
    """``[float(v) for v in values]`` with one host synchronization for all the device arrays among them.

    ``values``: Python or NumPy scalars, host arrays and device arrays of one element each. The device
    ones are cast to float64 (exact for float16/32/64), stacked and copied to the host in one read, so
    a training step's loss, its extra metrics and the gradient norm cost one synchronization on CuPy,
    not one each. The floats are the same as ``float(to_numpy(v))`` would give.
    """
    values = list(values)
    out = [None] * len(values)
    device = []
    for i, v in enumerate(values):
        if isinstance(v, (numpy.ndarray, numpy.generic)) or not hasattr(v, "shape"):
            out[i] = float(v)
        else:
            device.append(i)
    if device:
        module = _ensure()
        stacked = module.stack([values[i].reshape(()).astype(module.float64) for i in device])
        for i, f in zip(device, to_numpy(stacked).tolist()):
            out[i] = f
    return out


def is_array(a) -> bool:
    """Whether ``a`` is an array of NumPy or of the active backend."""
    return isinstance(a, numpy.ndarray) or isinstance(a, _ensure().ndarray)


def scatter_add(target, indices, values) -> None:
    """``target[indices] += values`` with every repeated index counted (unbuffered), in place.

    ``indices`` indexes the first axis of ``target``. NumPy's ``np.add.at`` and CuPy's
    ``cupyx.scatter_add`` both accumulate repeats; plain ``target[idx] += v`` would not.
    """
    module = _ensure()
    if module is numpy:
        numpy.add.at(target, indices, values)
    else:
        import cupyx  # noqa: PLC0415

        cupyx.scatter_add(target, indices, values)
