"""``NCCLCommunicator``: the collectives between GPUs through NCCL (``cupy.cuda.nccl``), one rank per GPU.

Shape legend: N ranks, b rows of one rank's buffer.

Built on an ``MPICommunicator`` (the processes are started by ``mpiexec``): each rank takes the GPU
numbered by its rank among the ranks of its host (``MPI.COMM_TYPE_SHARED``), rank 0 draws NCCL's
unique id and MPI broadcasts it (128 bytes, a buffer, no pickling), and every rank joins
``cupy.cuda.nccl.NcclCommunicator(N, id, rank)``. The collectives take C-contiguous device
(CuPy) arrays and are enqueued on the current stream with ``arr.data.ptr``: nothing waits for the
device or copies to the host (the trainer's one read per step comes later). ``barrier()`` waits for
the stream, then for the other ranks (MPI).

Chosen by ``world.get_communicator()`` when the backend is CuPy and N > 1. On a machine without a
GPU, the CuPy stand-in (``npdiffusion/cupy_standin/nccl.py``) carries the same calls over MPI, which
is how the tests run it. Docs: docs/distributed.md ("Several GPUs: NCCL").
"""
from __future__ import annotations

import socket

import numpy

from npdiffusion.distributed.communicator import Communicator

#: NCCL's data-type codes (cupy.cuda.nccl.NCCL_*), by NumPy dtype name
_DATATYPES = ("int8", "uint8", "int32", "uint32", "int64", "uint64", "float16", "float32", "float64")


class NCCLCommunicator(Communicator):
    """NCCL over the ranks of ``mpi`` (an ``MPICommunicator``); see the module docstring."""

    name = "NCCL"
    device_buffers = True

    def __init__(self, mpi):
        import cupy  # noqa: PLC0415 - the GPU backend is active when this is built
        from cupy.cuda import nccl  # noqa: PLC0415

        self.cupy, self.nccl, self.mpi = cupy, nccl, mpi
        self.rank, self.size = mpi.rank, mpi.size
        self.datatypes = {numpy.dtype(n): getattr(nccl, "NCCL_" + n.upper()) for n in _DATATYPES}
        local = mpi.comm.Split_type(mpi.MPI.COMM_TYPE_SHARED)
        local_rank, local_size = local.Get_rank(), local.Get_size()
        local.Free()
        gpus = cupy.cuda.runtime.getDeviceCount()
        if local_size > gpus:
            raise ValueError(f"NCCL: {local_size} ranks on host {socket.gethostname()} but {gpus} GPU(s); "
                             "run one rank per GPU (mpiexec -n <GPUs per host> per host)")
        cupy.cuda.Device(local_rank).use()
        uid = numpy.zeros(128, dtype=numpy.int8)
        if self.rank == 0:
            uid[:] = nccl.get_unique_id()
        mpi.broadcast_(uid, 0)
        self.comm = nccl.NcclCommunicator(self.size, tuple(uid.tolist()), self.rank)

    def _check(self, buf, what):
        if not isinstance(buf, self.cupy.ndarray) or not buf.flags.c_contiguous:
            raise TypeError(f"NCCLCommunicator.{what}: buf must be a C-contiguous CuPy array, got "
                            f"{type(buf).__name__}")
        if buf.dtype not in self.datatypes:
            raise TypeError(f"NCCLCommunicator.{what}: dtype must be one of {_DATATYPES}, got {buf.dtype}")
        return self.datatypes[buf.dtype], self.cupy.cuda.get_current_stream().ptr

    def allreduce_sum_(self, buf) -> None:
        datatype, stream = self._check(buf, "allreduce_sum_")
        self.comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, datatype, self.nccl.NCCL_SUM, stream)

    def broadcast_(self, buf, root: int = 0) -> None:
        datatype, stream = self._check(buf, "broadcast_")
        self.comm.bcast(buf.data.ptr, buf.size, datatype, root, stream)

    def allgather(self, x):
        datatype, stream = self._check(x, "allgather")
        out = self.cupy.empty((self.size,) + tuple(x.shape), dtype=x.dtype)
        self.comm.allGather(x.data.ptr, out.data.ptr, x.size, datatype, stream)
        return out.reshape((self.size * x.shape[0],) + tuple(x.shape[1:]))

    def barrier(self) -> None:
        self.cupy.cuda.get_current_stream().synchronize()
        self.mpi.barrier()
