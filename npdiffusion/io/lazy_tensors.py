"""Tensors read (or computed) only when used, so that a whole checkpoint can be held without its memory.

Shapes: R rows (the first axis), ``rest`` the other axes of a tensor.

A ``LazyTensor`` has ``shape``, ``dtype`` and ``ndim``, and becomes a NumPy array when
``numpy.asarray(t)`` (its ``__array__``) asks for it. ``Module.load_state_dict`` (it checks shapes,
then copies each tensor with ``asarray``) and ``io.safetensors.save_file`` (it writes each tensor
with ``numpy.ascontiguousarray``) take them as they are, so a state dict of lazy tensors is loaded
into a model, or written to a file, one tensor at a time: the peak is the model (or nothing) plus
the largest tensor, never a second copy of the checkpoint.

* ``file_tensors(path)``: every tensor of a safetensors file, each read by its own
  ``seek`` + ``readinto`` from the file's byte range (only the header is read up front; nothing stays
  mapped, so the file can be replaced while they exist). Each read is checked for NaN / inf
  (``io.pretrained.check_finite``).
* ``take_rows(t, lo, hi)``: rows ``[lo, hi)`` of ``t`` (R, *rest); of a file tensor it reads only
  those rows' bytes (C order keeps them contiguous).
* ``derived(shape, dtype, fn, *inputs)``: ``fn(*arrays)`` when used (a reshape, a concatenation, a
  transpose of tensors that may themselves be lazy).

Docs: docs/checkpoints.md ("Original single-file checkpoints").
"""
from __future__ import annotations

import os

import numpy

from npdiffusion.backend import to_numpy
from npdiffusion.io.pretrained import check_finite
from npdiffusion.io.safetensors import TensorInfo, loaded_dtype, read_header, read_tensor


class LazyTensor:
    """An array of ``shape`` and ``dtype`` that ``load()`` produces when it is used (module docstring)."""

    __slots__ = ("shape", "dtype", "_load", "_source")

    def __init__(self, shape, dtype, load, source=None):
        self.shape = tuple(int(d) for d in shape)
        self.dtype = numpy.dtype(dtype)
        self._load = load
        self._source = source            # (path, data_start, name, TensorInfo) of a file tensor, else None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __array__(self, dtype=None, copy=None):
        arr = self._load()
        if tuple(arr.shape) != self.shape:
            raise ValueError(f"lazy tensor: expected shape {self.shape}, the source gave {tuple(arr.shape)}")
        return arr if dtype is None else arr.astype(dtype, copy=False)

    def __repr__(self):
        return f"LazyTensor(shape={self.shape}, dtype={self.dtype})"


def _read_range(path: str, data_start: int, name: str, info: TensorInfo) -> numpy.ndarray:
    with open(path, "rb") as f:
        f.seek(data_start + info.data_offsets[0])
        arr = read_tensor(f, name, info, repr(path))
    check_finite({name: arr}, path)
    return arr


def _file_tensor(path: str, data_start: int, name: str, info: TensorInfo) -> LazyTensor:
    source = (path, data_start, name, info)
    return LazyTensor(info.shape, loaded_dtype(info.dtype), lambda: _read_range(*source), source)


def file_tensors(path) -> dict:
    """{name: LazyTensor} of the safetensors file at ``path`` (only its validated header is read now)."""
    path = os.fspath(path)
    header = read_header(path)
    return {name: _file_tensor(path, header.data_start, name, info) for name, info in header.tensors.items()}


def derived(shape, dtype, fn, *inputs) -> LazyTensor:
    """A LazyTensor equal to ``fn(*[numpy.asarray(x) for x in inputs])`` (inputs: arrays or lazy tensors)."""
    return LazyTensor(shape, dtype, lambda: fn(*[to_numpy(x) for x in inputs]))


def take_rows(t, lo: int, hi: int) -> LazyTensor:
    """Rows ``[lo, hi)`` of ``t`` (R, *rest) -> (hi - lo, *rest); a file tensor's rows are read alone."""
    shape = (hi - lo,) + tuple(t.shape[1:])
    source = getattr(t, "_source", None)
    if source is None:
        return derived(shape, t.dtype, lambda a: numpy.ascontiguousarray(a[lo:hi]), t)
    path, data_start, name, info = source
    row = info.nbytes // max(int(info.shape[0]), 1)
    begin = info.data_offsets[0] + lo * row
    return _file_tensor(path, data_start, name, TensorInfo(info.dtype, shape, (begin, begin + (hi - lo) * row)))


def reshaped(t, shape) -> LazyTensor:
    """``t`` reshaped to ``shape`` (the same number of entries)."""
    return derived(shape, t.dtype, lambda a: a.reshape(shape), t)


def concatenated(tensors) -> LazyTensor:
    """The tensors (R_i, *rest) stacked along the first axis -> (sum R_i, *rest)."""
    shape = (sum(t.shape[0] for t in tensors),) + tuple(tensors[0].shape[1:])
    return derived(shape, tensors[0].dtype, lambda *arrays: numpy.concatenate(arrays), *tensors)


def transposed(t) -> LazyTensor:
    """The transpose of a matrix ``t`` (R, K) -> (K, R), C-ordered."""
    return derived(tuple(reversed(t.shape)), t.dtype, lambda a: numpy.ascontiguousarray(a.T), t)
