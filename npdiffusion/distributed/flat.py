"""Pack arrays into one flat host buffer per dtype (the all-reduce "buckets") and unpack them back.

Shape legend: P the total number of entries of the arrays of one dtype.

``pack(arrays)`` -> ``[(dtype, buffer (P,), [(index, offset, shape)])]``: one contiguous NumPy buffer
per dtype, in the arrays' order, so a communicator sends a few large messages instead of one per
parameter. ``unpack(buckets, arrays)`` writes each buffer's slices back into the arrays in place.
Device (CuPy) arrays go through the host (``backend.to_numpy`` / ``asarray``), unless
``pack(..., device=True)``: then the buffers are device arrays of the active backend (for NCCL) and
nothing crosses to the host.
"""
from __future__ import annotations

import numpy

from npdiffusion.backend import to_numpy, xp


def pack(arrays, device: bool = False) -> list:
    """One flat buffer per dtype of ``arrays`` (a list of arrays), on the host unless ``device``;
    see the module docstring."""
    groups: dict = {}
    for i, a in enumerate(arrays):
        groups.setdefault(numpy.dtype(a.dtype), []).append(i)
    buckets = []
    for dtype, members in groups.items():
        total = sum(int(arrays[i].size) for i in members)
        buf = (xp if device else numpy).empty(total, dtype=dtype)
        layout, offset = [], 0
        for i in members:
            a = arrays[i]
            buf[offset:offset + a.size] = (a if device else to_numpy(a)).ravel()
            layout.append((i, offset, a.shape))
            offset += a.size
        buckets.append((dtype, buf, layout))
    return buckets


def unpack(buckets, arrays) -> None:
    """Write every bucket's slices back into ``arrays`` (the same list given to ``pack``), in place."""
    for _, buf, layout in buckets:
        for i, offset, shape in layout:
            part = buf[offset:offset + int(numpy.prod(shape, dtype=numpy.int64))].reshape(shape)
            arrays[i][...] = part if isinstance(arrays[i], numpy.ndarray) else xp.asarray(part)
