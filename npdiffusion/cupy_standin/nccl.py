"""The stand-in's ``cupy.cuda.nccl``: ``NcclCommunicator`` with the calls npdiffusion makes, its
collectives carried out over MPI between stand-in ranks (processes started by ``mpiexec``).

Shape legend: count the elements of one rank's buffer, N the ranks.

As in CuPy (``cupy_backends/cuda/libs/nccl.pyx``): ``get_unique_id()`` gives a tuple of 128 signed
chars, rank 0 draws it and sends it to the others (over MPI: that is the caller's job);
``NcclCommunicator(ndev, commId, rank)`` joins rank ``rank`` of ``ndev``; the collectives take raw
device pointers (``arr.data.ptr``), an element count, a data type (``NCCL_FLOAT32`` ...), a reduction
(``NCCL_SUM`` ...) and a stream pointer:

    allReduce(sendbuf, recvbuf, count, datatype, op, stream)     recv = op over ranks of send   (count)
    bcast(buff, count, datatype, root, stream)                   buff = root's buff             (count)
    broadcast(sendbuff, recvbuff, count, datatype, root, stream) recv = root's send             (count)
    allGather(sendbuf, recvbuf, count, datatype, stream)         recv = ranks' send in order    (N count)

Here the pointers must name living stand-in device memory (``memory.view``; a host pointer is
refused), every rank must pass the same id, ``ndev`` must be the MPI world's size and the ranks a
permutation of 0..ndev-1 (the stand-in has no other way to find its peers). The reduction is NumPy's
on the gathered buffers, in rank order. There are no streams: a collective is complete when it
returns, and ``stream`` is only checked to be an int. ``NCCL_AVG``, ``NCCL_BFLOAT16``, ``reduce``,
``reduceScatter``, ``send``/``recv``, ``initAll`` and groups are not implemented (AttributeError or
ValueError saying so).
"""
from __future__ import annotations

import os

import numpy

from npdiffusion.cupy_standin.memory import view

NCCL_INT8 = NCCL_CHAR = 0
NCCL_UINT8 = 1
NCCL_INT32 = NCCL_INT = 2
NCCL_UINT32 = 3
NCCL_INT64 = 4
NCCL_UINT64 = 5
NCCL_FLOAT16 = NCCL_HALF = 6
NCCL_FLOAT32 = NCCL_FLOAT = 7
NCCL_FLOAT64 = NCCL_DOUBLE = 8
NCCL_BFLOAT16 = 9
NCCL_SUM, NCCL_PROD, NCCL_MAX, NCCL_MIN, NCCL_AVG = 0, 1, 2, 3, 4

_ID_BYTES = 128
_DTYPES = {NCCL_INT8: numpy.int8, NCCL_UINT8: numpy.uint8, NCCL_INT32: numpy.int32, NCCL_UINT32: numpy.uint32,
           NCCL_INT64: numpy.int64, NCCL_UINT64: numpy.uint64, NCCL_FLOAT16: numpy.float16,
           NCCL_FLOAT32: numpy.float32, NCCL_FLOAT64: numpy.float64}
_OPS = {NCCL_SUM: numpy.add, NCCL_PROD: numpy.multiply, NCCL_MAX: numpy.maximum, NCCL_MIN: numpy.minimum}

available = True


class NcclError(RuntimeError):
    """CuPy's NCCL error type (here raised for invalid arguments, as ``NCCL_ERROR_INVALID_ARGUMENT``)."""


def get_version() -> int:
    return 22000


def get_build_version() -> int:
    return 22000


def get_unique_id() -> tuple:
    """128 random signed chars, as CuPy returns ``ncclUniqueId``."""
    return tuple(numpy.frombuffer(os.urandom(_ID_BYTES), dtype=numpy.int8).tolist())


def _dtype(datatype):
    if datatype not in _DTYPES:
        raise NcclError(f"NCCL_ERROR_INVALID_ARGUMENT: data type {datatype!r} (the CuPy stand-in knows "
                        f"{sorted(_DTYPES)})")
    return numpy.dtype(_DTYPES[datatype])


class NcclCommunicator:
    """One rank of an NCCL communicator (module docstring)."""

    def __init__(self, ndev, commId, rank):
        from npdiffusion.distributed.mpi import import_mpi  # noqa: PLC0415

        if not isinstance(commId, tuple) or len(commId) != _ID_BYTES:
            raise AssertionError(f"commId must be a tuple of {_ID_BYTES} ints (get_unique_id())")
        self.MPI = MPI = import_mpi()
        world = MPI.COMM_WORLD
        if int(ndev) != world.Get_size():
            raise NcclError(f"NCCL_ERROR_INVALID_ARGUMENT: the CuPy stand-in joins the MPI world's "
                            f"{world.Get_size()} ranks, got ndev={ndev}")
        mine = numpy.asarray(commId, dtype=numpy.int8)
        ids = numpy.empty((world.Get_size(), _ID_BYTES), dtype=numpy.int8)
        world.Allgather(mine, ids)
        ranks = numpy.empty(world.Get_size(), dtype=numpy.int64)
        world.Allgather(numpy.asarray([rank], dtype=numpy.int64), ranks)
        if not (ids == mine).all():
            raise NcclError("NCCL_ERROR_INVALID_USAGE: the ranks passed different unique ids (rank 0's "
                            "get_unique_id() must reach every rank)")
        if sorted(ranks.tolist()) != list(range(int(ndev))):
            raise NcclError(f"NCCL_ERROR_INVALID_RANK: ranks {ranks.tolist()} are not 0..{int(ndev) - 1}")
        self._comm = world.Split(0, int(rank))          # ordered by NCCL rank
        self._rank, self._size = int(rank), int(ndev)

    # ------------------------------------------------------------------ queries
    def rank_id(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size

    def device_id(self) -> int:
        return 0

    def destroy(self) -> None:
        self._comm = None

    # ------------------------------------------------------------------ collectives
    def _views(self, where, stream, *buffers):
        if self._comm is None:
            raise NcclError(f"NCCL_ERROR_INVALID_ARGUMENT: {where} on a destroyed communicator")
        if not isinstance(stream, int):
            raise TypeError(f"{where}: stream must be an int pointer (stream.ptr), got {type(stream).__name__}")
        return [view(ptr, count * dtype.itemsize, dtype, where) for ptr, count, dtype in buffers]

    def _gather(self, send):
        out = numpy.empty((self._size,) + send.shape, dtype=send.dtype)
        self._comm.Allgather(send.view(numpy.uint8), out.view(numpy.uint8))
        return out

    def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):  # noqa: N802 - CuPy's name
        if op not in _OPS:
            raise NcclError(f"NCCL_ERROR_INVALID_ARGUMENT: reduction {op!r} (the CuPy stand-in implements "
                            "NCCL_SUM, NCCL_PROD, NCCL_MAX, NCCL_MIN)")
        dtype = _dtype(datatype)
        send, recv = self._views("allReduce", stream, (sendbuf, count, dtype), (recvbuf, count, dtype))
        recv[...] = _OPS[op].reduce(self._gather(send.copy()), axis=0)

    def allGather(self, sendbuf, recvbuf, count, datatype, stream):  # noqa: N802
        dtype = _dtype(datatype)
        send, recv = self._views("allGather", stream, (sendbuf, count, dtype),
                                 (recvbuf, count * self._size, dtype))
        recv[...] = self._gather(send.copy()).reshape(-1)

    def broadcast(self, sendbuff, recvbuff, count, datatype, root, stream):
        dtype = _dtype(datatype)
        if not 0 <= root < self._size:
            raise NcclError(f"NCCL_ERROR_INVALID_ARGUMENT: root {root} of {self._size} ranks")
        (recv,) = self._views("broadcast", stream, (recvbuff, count, dtype))
        data = self._views("broadcast", stream, (sendbuff, count, dtype))[0].copy() if self._rank == root else recv
        self._comm.Bcast(data.view(numpy.uint8), root=root)
        recv[...] = data

    def bcast(self, buff, count, datatype, root, stream):
        self.broadcast(buff, buff, count, datatype, root, stream)
