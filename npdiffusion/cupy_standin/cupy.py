"""The stand-in's ``cupy`` namespace: only names real CuPy has (``names.NAMES["cupy"]``).

Installed as ``sys.modules["cupy"]`` by ``npdiffusion.cupy_standin.install()``. Each name is, in
this order: one written here (array creation and transfer, ``cuda``, ``linalg``, the memory pool),
NumPy's ufunc of that name behind CuPy's operand rules, NumPy's type or constant of that name
(``cupy.float32 is numpy.float32`` in CuPy too), or NumPy's function of that name with host arrays
refused and results wrapped. A CuPy name with no NumPy twin and no code here raises
AttributeError saying the stand-in does not implement it.
"""
from __future__ import annotations

import os as _os
import types as _types

import numpy as _numpy

from npdiffusion.cupy_standin import _array
from npdiffusion.cupy_standin.names import NAMES as _NAMES

ndarray = _array.ndarray
_PUBLIC = frozenset(_NAMES["cupy"])
_UFUNC_ATTRS = frozenset(_NAMES["cupy.ufunc"])


class ufunc:  # noqa: N801 - CuPy's name
    """A NumPy ufunc behind CuPy's rules: operands are device arrays or scalars, else TypeError."""

    def __init__(self, np_ufunc):
        self._u = np_ufunc
        self.__name__ = self.name = np_ufunc.__name__
        self.nin, self.nout, self.nargs = np_ufunc.nin, np_ufunc.nout, np_ufunc.nargs
        self.types = np_ufunc.types

    def __call__(self, *args, **kwargs):
        where = f"cupy.{self.name}"
        args = tuple(_array.unwrap_operand(a, where) for a in args)
        out = kwargs.get("out")
        if out is not None:
            outs = out if isinstance(out, tuple) else (out,)
            for o in outs:
                if not isinstance(o, ndarray):
                    raise TypeError(f"Output arrays of cupy.{self.name} must be cupy.ndarray, got {type(o)}")
            kwargs["out"] = tuple(o._a for o in outs) if isinstance(out, tuple) else out._a
        with _numpy.errstate(all="ignore"):  # CuPy's kernels never warn about inf/NaN
            result = self._u(*args, **kwargs)
        if out is not None:
            return out
        return _array.wrap(result)

    def __getattr__(self, name):
        if name.startswith("_") or name not in _UFUNC_ATTRS:
            raise AttributeError(f"'cupy.ufunc' object has no attribute {name!r}")
        method = getattr(self._u, name)

        def bound(*args, **kwargs):
            return _array.call(method, f"cupy.{self.name}.{name}", args, kwargs)

        return bound

    def __dir__(self):
        return sorted(_UFUNC_ATTRS)

    def __repr__(self):
        return f"<ufunc 'cupy_{self.name}' (CuPy stand-in)>"


# Functions that only read dtypes or shapes: CuPy hands host arrays to NumPy there, so do we.
_METADATA = frozenset({"result_type", "can_cast", "min_scalar_type", "common_type", "ndim", "shape",
                       "size", "iscomplexobj", "isrealobj", "isscalar"})


def _function(name, fn, where=None):
    where = where or f"cupy.{name}"

    def wrapped(*args, **kwargs):
        if name in _METADATA:
            return fn(*_array.unwrap_host_data(args), **kwargs)
        return _array.call(fn, where, args, kwargs)

    wrapped.__name__ = wrapped.__qualname__ = name
    wrapped.__doc__ = f"NumPy's {name} on device arrays (CuPy stand-in)."
    return wrapped


# ---------------------------------------------------------------- transfer and creation

def asarray(a, dtype=None, order=None, *, blocking=False):
    """Host data -> a device array (a copy); a device array stays itself unless ``dtype`` differs."""
    if isinstance(a, ndarray):
        return a if dtype is None or _numpy.dtype(dtype) == a.dtype else a.astype(dtype)
    return ndarray._from(_numpy.array(_array.unwrap_host_data(a), dtype=dtype, order=order or "K",
                                      copy=True))


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    if isinstance(obj, ndarray):
        host = obj._a
        return ndarray._from(_numpy.array(host, dtype=dtype, copy=copy, order=order, ndmin=ndmin))
    return ndarray._from(_numpy.array(_array.unwrap_host_data(obj), dtype=dtype, copy=True,
                                      order=order, ndmin=ndmin))


asanyarray = asarray


def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    """A device array -> a NumPy array (a host synchronization); anything else -> numpy.asarray."""
    if isinstance(a, ndarray):
        _array.record_sync("asnumpy")
        host = _numpy.array(a._a, order=order, copy=True)
        if out is not None:
            out[...] = host
            return out
        return host
    return _numpy.asarray(a, order=order)


def get_array_module(*args):
    import sys  # noqa: PLC0415

    if any(isinstance(a, ndarray) for a in args):
        return sys.modules[__name__]
    return _numpy


def isscalar(element):
    return _numpy.isscalar(element)


# ---------------------------------------------------------------- memory and device

class _MemoryPool:
    """What ``cupy.get_default_memory_pool()`` answers: nothing is pooled on the host."""

    def free_bytes(self):
        return 0

    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0

    def free_all_blocks(self, stream=None):
        return None

    def set_limit(self, size=None, fraction=None):
        return None

    def get_limit(self):
        return 0


_POOL = _MemoryPool()


def get_default_memory_pool():
    return _POOL


def get_default_pinned_memory_pool():
    return _POOL


def _host_memory():
    try:
        page = _os.sysconf("SC_PAGE_SIZE")
        return page * _os.sysconf("SC_AVPHYS_PAGES"), page * _os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30, 8 << 30


def _module_hooks(qualname, public, members):
    """``__getattr__`` and ``__dir__`` for a stand-in module: ``members`` are listed, a CuPy name of
    ``public`` it lacks says so, any other name is unknown."""
    def __getattr__(name):
        if name in public:
            raise AttributeError(f"the CuPy stand-in does not implement {qualname}.{name} "
                                 "(real CuPy has it)")
        raise AttributeError(f"module {qualname!r} has no attribute {name!r}")

    return __getattr__, lambda: sorted(members)


def _namespace(qualname, public, members):
    """A module object exposing ``members`` (all in CuPy's ``public`` list), other CuPy names refused."""
    module = _types.ModuleType(qualname, f"The CuPy stand-in's {qualname}.")
    public = frozenset(public)
    for key, value in members.items():
        if key not in public:
            raise AssertionError(f"the stand-in would expose {qualname}.{key}, which CuPy lacks")
        setattr(module, key, value)
    module.__getattr__, module.__dir__ = _module_hooks(qualname, public, members)
    return module


def _expose_only(namespace: dict, qualname, public, exports):
    """Leave only ``exports`` (and private names) in a stand-in module's ``namespace``; returns its
    ``__getattr__`` and ``__dir__`` (``_module_hooks``)."""
    for key in [k for k in list(namespace) if not k.startswith("_") and k not in exports]:
        del namespace[key]
    namespace.update(exports)
    return _module_hooks(qualname, public, exports)


class _Device:
    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)

    def synchronize(self):
        return None

    def use(self):
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Stream:
    """The null stream: the stand-in runs every operation when it is called, so there is nothing to wait for."""

    ptr = 0

    def synchronize(self):
        return None


def _device_count():
    """How many GPUs the stand-in says this host has: NPDIFFUSION_CUPY_STANDIN_DEVICES (default 1), so
    that N ranks on one host may each take "their" GPU (distributed/nccl.py)."""
    value = _os.environ.get("NPDIFFUSION_CUPY_STANDIN_DEVICES", "1")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def _nccl_namespace():
    from npdiffusion.cupy_standin import nccl as module  # noqa: PLC0415

    public = _NAMES["cupy.cuda.nccl"]
    return _namespace("cupy.cuda.nccl", public, {n: getattr(module, n) for n in public if hasattr(module, n)})


runtime = _namespace("cupy.cuda.runtime", _NAMES["cupy.cuda.runtime"], {
    "getDeviceCount": _device_count,
    "getDevice": lambda: 0,
    "deviceSynchronize": lambda: None,
    "memGetInfo": _host_memory,
    "runtimeGetVersion": lambda: 12000,
    "driverGetVersion": lambda: 12000,
})
cuda = _namespace("cupy.cuda", _NAMES["cupy.cuda"], {
    "runtime": runtime, "Device": _Device, "is_available": lambda: True, "nccl": _nccl_namespace(),
    "get_current_stream": lambda device=None: _Stream(),
})
linalg = _namespace("cupy.linalg", _NAMES["cupy.linalg"], {
    n: _function(n, getattr(_numpy.linalg, n), f"cupy.linalg.{n}")
    for n in _NAMES["cupy.linalg"] if callable(getattr(_numpy.linalg, n, None))
    and not isinstance(getattr(_numpy.linalg, n), type)
} | {"LinAlgError": _numpy.linalg.LinAlgError})

_OWN = {
    "ndarray": ndarray, "ufunc": ufunc, "asarray": asarray, "array": array,
    "asanyarray": asanyarray, "asnumpy": asnumpy, "get_array_module": get_array_module,
    "isscalar": isscalar, "get_default_memory_pool": get_default_memory_pool,
    "get_default_pinned_memory_pool": get_default_pinned_memory_pool, "cuda": cuda,
    "linalg": linalg,
}
_NOT_HERE = {"fft", "random", "testing", "polynomial", "lib", "sparse", "cublas", "cusolver",
             "cusparse", "cutensor", "nccl", "cudnn", "fuse", "ElementwiseKernel", "RawKernel",
             "RawModule", "ReductionKernel", "annotations"}


def _build():
    exports = {}
    for name in _PUBLIC:
        if name in _OWN:
            exports[name] = _OWN[name]
            continue
        if name in _NOT_HERE or not hasattr(_numpy, name):
            continue
        value = getattr(_numpy, name)
        if isinstance(value, _numpy.ufunc):
            exports[name] = ufunc(value)
        elif isinstance(value, (type, int, float, complex, str, _numpy.generic)) or value is None:
            exports[name] = value
        elif callable(value) and not isinstance(value, _types.ModuleType):
            exports[name] = _function(name, value)
    return exports


_EXPORTS = _build()
__getattr__, __dir__ = _expose_only(globals(), "cupy", _PUBLIC, _EXPORTS)
