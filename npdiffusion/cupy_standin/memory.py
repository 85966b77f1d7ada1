"""Device pointers of the stand-in: ``ndarray.data`` (a ``MemoryPointer``) and the way back from a
raw pointer to the memory it names, for the stand-in's NCCL (``nccl.py``), which, like the real
one, receives ``arr.data.ptr``, an element count and a data type instead of arrays.

Shape legend: nbytes the bytes a call reads or writes from ``ptr``.

A stand-in device array's memory is its NumPy array's host memory, so ``ptr`` is that memory's real
address (``numpy.ndarray.ctypes.data``). Taking ``.data`` registers the array (by a weak reference);
``view(ptr, nbytes, dtype)`` returns a NumPy view of the bytes ``[ptr, ptr + nbytes)`` only when
they lie inside a registered, still living array, and raises otherwise, as NCCL rejects a pointer
that is not device memory (the address of a host NumPy array, say) instead of reading it.
"""
from __future__ import annotations

import ctypes
import weakref

import numpy

_registered: dict = {}      # id(numpy array) -> weakref to it


class MemoryPointer:
    """What ``cupy.ndarray.data`` gives, restricted to ``ptr`` (an int address)."""

    __slots__ = ("ptr", "_owner")

    def __init__(self, a: numpy.ndarray):
        self._owner = a                          # the memory lives while the pointer object does
        self.ptr = int(a.ctypes.data)
        key = id(a)
        if key not in _registered:
            _registered[key] = weakref.ref(a, lambda _, key=key: _registered.pop(key, None))

    def __repr__(self):
        return f"<MemoryPointer 0x{self.ptr:x} (CuPy stand-in)>"


def _span(a: numpy.ndarray):
    """[first, last) byte addresses that ``a`` covers (any strides)."""
    start = end = int(a.ctypes.data)
    for n, stride in zip(a.shape, a.strides):
        if n == 0:
            return start, start
        if stride < 0:
            start += (n - 1) * stride
        else:
            end += (n - 1) * stride
    return start, end + a.itemsize


def view(ptr: int, nbytes: int, dtype, where: str) -> numpy.ndarray:
    """The registered device memory ``[ptr, ptr + nbytes)`` as a writable 1-d NumPy array of ``dtype``."""
    for ref in list(_registered.values()):
        a = ref()
        if a is None:
            continue
        first, last = _span(a)
        if first <= ptr and ptr + nbytes <= last:
            if nbytes == 0:
                return numpy.empty(0, dtype=dtype)
            raw = (ctypes.c_byte * nbytes).from_address(ptr)
            return numpy.ctypeslib.as_array(raw).view(dtype)
    raise ValueError(f"{where}: 0x{ptr:x} + {nbytes} bytes is not device memory (the CuPy stand-in knows "
                     "only pointers taken from living cupy.ndarray.data; NCCL would refuse it too)")
