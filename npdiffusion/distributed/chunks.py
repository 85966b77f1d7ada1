"""``gather_chunks(fn, n, chunk, comm)``: a row-wise computation over n rows, its chunks shared out among the ranks.

Shape legend: n rows, c = ``chunk`` rows per call, N ranks (``comm.size``), m the most rows one rank
computes; each output of ``fn`` is (rows, ...) with its own trailing shape.

One process calls ``fn(lo, hi)`` on the chunks [0, c), [c, 2c), ... and concatenates what each call
returns (a tuple of host arrays, one row per input row). With N ranks the same chunks are dealt out
in contiguous shares (``numpy.array_split`` of the chunk list: rank 0 the first share, ...), so every
chunk is computed by one rank exactly as one process computes it: the same rows in the same call,
hence the same bits. Each output is then all-gathered: every rank pads its rows to m, the
communicator gathers the N blocks (m, ...) in rank order, and the padding is dropped. Every rank ends
with the one-process result. With fewer chunks than ranks every rank computes everything (too little
work to share). The U-Net stage encodes its training images and captions through the frozen VAE and
text encoder this way (docs/distributed.md, "The frozen encoders, once, over the ranks").
"""
from __future__ import annotations

import numpy

from npdiffusion.backend import to_numpy


def chunk_ranges(n: int, chunk: int) -> list[tuple[int, int]]:
    """``[(lo, hi)]``: range(n) in chunks of ``chunk`` rows (the last may be shorter)."""
    return [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]


def gather_chunks(fn, n: int, chunk: int, comm=None) -> tuple:
    """The outputs of ``fn`` over every chunk of range(n), concatenated: a tuple of (n, ...) host
    arrays, equal on every rank to one process's (module docstring). ``comm`` None: one process."""
    ranges = chunk_ranges(n, chunk)
    size = 1 if comm is None else comm.size
    if size == 1 or len(ranges) < size:
        return _concatenate([fn(lo, hi) for lo, hi in ranges])
    shares = numpy.array_split(numpy.arange(len(ranges)), size)
    rows = [sum(ranges[i][1] - ranges[i][0] for i in share) for share in shares]
    mine = _concatenate([fn(*ranges[i]) for i in shares[comm.rank]])
    out = []
    for part in mine:
        padded = numpy.zeros((max(rows),) + part.shape[1:], dtype=part.dtype)
        padded[:len(part)] = part
        blocks = to_numpy(comm.allgather(comm.to_buffer(padded))).reshape((size,) + padded.shape)
        out.append(numpy.concatenate([blocks[k, :rows[k]] for k in range(size)]))
    return tuple(out)


def _concatenate(parts) -> tuple:
    """The per-chunk tuples of arrays -> one tuple of concatenated host arrays."""
    return tuple(numpy.concatenate([to_numpy(a) for a in arrays]) for arrays in zip(*parts))
