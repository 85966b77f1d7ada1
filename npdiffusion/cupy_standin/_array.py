"""The stand-in's ``ndarray``: a NumPy array behind CuPy's rules, and the host-synchronization log.

Shapes: any. Every public attribute an array offers is one ``cupy.ndarray`` has
(``names.NAMES["cupy.ndarray"]``); everything else raises AttributeError.
"""
from __future__ import annotations

import os
import sys
from collections import Counter

import numpy

from npdiffusion.cupy_standin.names import NAMES

_NDARRAY_NAMES = frozenset(NAMES["cupy.ndarray"])
_HERE = os.path.dirname(os.path.abspath(__file__))
_BACKEND = os.path.join(os.path.dirname(_HERE), "backend.py")
_ROOT = os.path.dirname(os.path.dirname(_HERE))
_SCALARS = (bool, int, float, complex, numpy.generic)

IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. "
            "Please use `.get()` to construct a NumPy array explicitly.")


# ---------------------------------------------------------------- host synchronizations

class SyncLog:
    """Host synchronizations seen while it was open: ``events`` holds ``(kind, site)`` pairs.

    ``kind`` is what synchronized (``"get"``, ``"asnumpy"``, ``"float"``, ``"int"``, ``"bool"``,
    ``"index"``, ``"item"``, ``"tolist"``, ``"repr"``); ``site`` is ``path:line (function)`` of the
    first caller outside the stand-in and ``npdiffusion/backend.py`` (so a ``to_numpy`` is charged
    to its caller).
    """

    def __init__(self):
        self.events: list[tuple[str, str]] = []

    @property
    def total(self) -> int:
        return len(self.events)

    def by_site(self) -> Counter:
        return Counter(site for _, site in self.events)

    def by_kind(self) -> Counter:
        return Counter(kind for kind, _ in self.events)

    def report(self) -> str:
        """One line per call site, most frequent first."""
        counts = Counter(self.events)
        return "\n".join(f"{n:5d} {kind:8s} {site}" for (kind, site), n in counts.most_common())


_open_logs: list[SyncLog] = []


def _call_site() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not path.startswith(_HERE) and path != _BACKEND:
            break
        frame = frame.f_back
    if frame is None:
        return "?"
    path = os.path.abspath(frame.f_code.co_filename)
    shown = os.path.relpath(path, _ROOT) if path.startswith(_ROOT + os.sep) else path
    return f"{shown}:{frame.f_lineno} ({frame.f_code.co_name})"


def record_sync(kind: str) -> None:
    """Charge one host synchronization of ``kind`` to the caller's call site, in every open log."""
    if _open_logs:
        site = _call_site()
        for log in _open_logs:
            log.events.append((kind, site))


# ---------------------------------------------------------------- host/device rules

def refuse_host(value, where: str):
    raise TypeError(f"Unsupported type {type(value)} (the CuPy stand-in: {where} got a host "
                    "numpy.ndarray; move it to the device with cupy.asarray first)")


def unwrap(value, where: str):
    """Device arrays -> their NumPy buffers, through lists, tuples and dicts; host arrays refused."""
    if isinstance(value, ndarray):
        return value._a
    if isinstance(value, numpy.ndarray):
        refuse_host(value, where)
    if isinstance(value, (list, tuple)):
        return type(value)(unwrap(v, where) for v in value)
    if isinstance(value, dict):
        return {k: unwrap(v, where) for k, v in value.items()}
    return value


def unwrap_operand(value, where: str):
    """An operand of a ufunc: a device array or a scalar, as CuPy's kernels take (``Unsupported type``)."""
    if isinstance(value, ndarray):
        return value._a
    if value is None or isinstance(value, _SCALARS):
        return value
    raise TypeError(f"Unsupported type {type(value)}" + (
        f" (the CuPy stand-in: {where} got a host numpy.ndarray; move it with cupy.asarray first)"
        if isinstance(value, numpy.ndarray) else ""))


def unwrap_host_data(value):
    """The argument of ``cupy.asarray``/``array``: host data as it is, device arrays unwrapped."""
    if isinstance(value, ndarray):
        return value._a
    if isinstance(value, (list, tuple)):
        return type(value)(unwrap_host_data(v) for v in value)
    return value


def wrap(value):
    """NumPy results -> device arrays; NumPy scalars -> 0-d device arrays (CuPy's reductions)."""
    if isinstance(value, numpy.ndarray):
        return ndarray._from(value)
    if isinstance(value, numpy.generic):
        return ndarray._from(numpy.asarray(value))
    if isinstance(value, tuple):
        return tuple(wrap(v) for v in value)
    if isinstance(value, list):
        return [wrap(v) for v in value]
    return value


def call(fn, where: str, args, kwargs):
    """``fn`` on unwrapped arguments, its result wrapped (no floating-point warnings, as in CuPy)."""
    args, kwargs = unwrap(args, where), unwrap(kwargs, where)
    with numpy.errstate(all="ignore"):
        return wrap(fn(*args, **kwargs))


# ---------------------------------------------------------------- the array

class ndarray:  # noqa: N801 - CuPy's name
    """A device array of the stand-in: a NumPy array that only CuPy's operations reach."""

    __slots__ = ("_a",)
    __array_priority__ = 100  # CuPy's
    __hash__ = None

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        if memptr is not None or strides is not None:
            raise NotImplementedError("the CuPy stand-in does not emulate device memory pointers")
        self._a = numpy.empty(shape, dtype=dtype, order=order)

    @classmethod
    def _from(cls, a: numpy.ndarray) -> ndarray:
        out = object.__new__(cls)
        out._a = a
        return out

    # --- what CuPy refuses or synchronizes on
    def __array__(self, *args, **kwargs):
        raise TypeError(IMPLICIT)

    def get(self, stream=None, order="C", out=None, blocking=True):
        record_sync("get")
        host = numpy.array(self._a, order=order if order != "A" else "K", copy=True)
        if out is not None:
            out[...] = host
            return out
        return host

    def set(self, arr, stream=None):
        if not isinstance(arr, numpy.ndarray):
            raise TypeError(f"Only numpy.ndarray can be set to cupy.ndarray, got {type(arr)}")
        self._a[...] = arr

    def _scalar(self, kind):
        if self._a.size != 1:
            # NumPy's and CuPy's message for bool()/float() of a larger array
            return self._a.__bool__() if kind == "bool" else getattr(self._a, f"__{kind}__")()
        record_sync(kind)
        return getattr(self._a, f"__{kind}__")()

    def __float__(self):
        return self._scalar("float")

    def __int__(self):
        return self._scalar("int")

    def __bool__(self):
        return self._scalar("bool")

    def __complex__(self):
        return self._scalar("complex")

    def __index__(self):
        record_sync("index")
        return self._a.__index__()

    def item(self, *args):
        record_sync("item")
        return self._a.item(*args)

    def tolist(self):
        record_sync("tolist")
        return self._a.tolist()

    def __repr__(self):
        record_sync("repr")
        return repr(self._a)

    def __str__(self):
        record_sync("repr")
        return str(self._a)

    def __format__(self, spec):
        record_sync("repr")
        return format(self._a.item() if self._a.ndim == 0 else self._a, spec)

    # --- plain attributes
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    strides = property(lambda self: self._a.strides)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: ndarray._from(self._a.T))
    mT = property(lambda self: ndarray._from(self._a.mT))
    real = property(lambda self: ndarray._from(self._a.real))
    imag = property(lambda self: ndarray._from(self._a.imag))
    base = property(lambda self: None if self._a.base is None else ndarray._from(self._a.base))

    @property
    def data(self):
        """A ``MemoryPointer`` (``.ptr``: the address of the first element; memory.py)."""
        from npdiffusion.cupy_standin.memory import MemoryPointer  # noqa: PLC0415

        return MemoryPointer(self._a)

    @shape.setter
    def shape(self, value):
        self._a.shape = value

    def __getattr__(self, name):
        if name.startswith("_") or name not in _NDARRAY_NAMES:
            raise AttributeError(f"'cupy.ndarray' object has no attribute {name!r}")
        method = getattr(self._a, name, None)
        if method is None or not callable(method):
            raise AttributeError(f"the CuPy stand-in does not implement cupy.ndarray.{name}")

        def bound(*args, **kwargs):
            return call(method, f"cupy.ndarray.{name}", args, kwargs)

        return bound

    def __dir__(self):
        return sorted(_NDARRAY_NAMES)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        if self._a.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (ndarray._from(self._a[i]) for i in range(len(self._a)))

    def __copy__(self):
        return ndarray._from(self._a.copy())

    def __deepcopy__(self, memo):
        return ndarray._from(self._a.copy())

    def __reduce__(self):
        return (_rebuild, (self._a.copy(),))

    # --- indexing: host index arrays are accepted (CuPy copies them); host values are not
    def __getitem__(self, index):
        return wrap(self._a[_unwrap_index(index)])

    def __setitem__(self, index, value):
        if isinstance(value, numpy.ndarray) and value.ndim:
            raise ValueError("non-scalar numpy.ndarray cannot be used for fill (the CuPy stand-in: "
                             "a host array assigned into a device array; use cupy.asarray first)")
        if isinstance(value, (list, tuple)):
            raise TypeError(f"Unsupported type {type(value)} (the CuPy stand-in: assign a device array)")
        self._a[_unwrap_index(index)] = value._a if isinstance(value, ndarray) else value

    # --- NumPy's protocols dispatch to the stand-in's functions, as CuPy's do
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        from npdiffusion.cupy_standin import cupy as namespace  # noqa: PLC0415 - cycle

        ours = getattr(namespace, ufunc.__name__, None)
        if ours is None:
            return NotImplemented
        if method == "__call__":
            return ours(*inputs, **kwargs)
        return getattr(ours, method)(*inputs, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        from npdiffusion.cupy_standin import cupy as namespace  # noqa: PLC0415 - cycle

        module = namespace
        for part in func.__module__.split(".")[1:]:
            if part.startswith("_"):
                continue
            module = getattr(module, part, None)
        ours = getattr(module, func.__name__, None)
        if ours is None:
            return NotImplemented
        return ours(*args, **kwargs)


ndarray.__module__ = "cupy"  # as CuPy's error messages and reprs name it


def _rebuild(a):
    return ndarray._from(a)


def _unwrap_index(index):
    if isinstance(index, ndarray):
        return index._a
    if isinstance(index, tuple):
        return tuple(i._a if isinstance(i, ndarray) else i for i in index)
    return index


def _operator(ufunc_name, reflected=False, inplace=False):
    def op(self, other):
        from npdiffusion.cupy_standin import cupy as namespace  # noqa: PLC0415 - cycle

        fn = getattr(namespace, ufunc_name)
        if inplace:
            return fn(self, other, out=self)
        return fn(other, self) if reflected else fn(self, other)

    op.__name__ = ufunc_name
    return op


for _name, _ufunc in [("add", "add"), ("sub", "subtract"), ("mul", "multiply"),
                      ("truediv", "true_divide"), ("floordiv", "floor_divide"), ("mod", "remainder"),
                      ("pow", "power"), ("matmul", "matmul"), ("and", "bitwise_and"),
                      ("or", "bitwise_or"), ("xor", "bitwise_xor"), ("lshift", "left_shift"),
                      ("rshift", "right_shift")]:
    setattr(ndarray, f"__{_name}__", _operator(_ufunc))
    setattr(ndarray, f"__r{_name}__", _operator(_ufunc, reflected=True))
    setattr(ndarray, f"__i{_name}__", _operator(_ufunc, inplace=True))
for _name, _ufunc in [("lt", "less"), ("le", "less_equal"), ("gt", "greater"),
                      ("ge", "greater_equal"), ("eq", "equal"), ("ne", "not_equal")]:
    setattr(ndarray, f"__{_name}__", _operator(_ufunc))
for _name, _ufunc in [("neg", "negative"), ("pos", "positive"), ("abs", "absolute"),
                      ("invert", "invert")]:
    setattr(ndarray, f"__{_name}__",
            (lambda u: lambda self: getattr(__import__("npdiffusion.cupy_standin.cupy",
                                                       fromlist=["x"]), u)(self))(_ufunc))
