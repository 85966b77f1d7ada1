"""``MPICommunicator``: MPI through mpi4py (``comm.Allreduce`` / ``Bcast`` / ``Allgather`` on host buffers).

Arrays go through Python's buffer interface (the upper-case mpi4py calls), never pickled. mpi4py is
imported only when this communicator is built, so npdiffusion runs without it. Install it with
``pip install -e ".[mpi]"`` (mpich + mpi4py from the package index, ``mpiexec`` included).
"""
from __future__ import annotations

import numpy

from npdiffusion.distributed.communicator import Communicator


def import_mpi():
    """``mpi4py.MPI``, or an ImportError whose one line says how to install it."""
    try:
        from mpi4py import MPI  # noqa: PLC0415
    except ImportError as exc:
        raise ImportError(f"MPI training needs mpi4py ({exc}); install it with pip install -e \".[mpi]\" "
                          "(mpich and mpi4py)") from None
    return MPI


class MPICommunicator(Communicator):
    """Wraps an mpi4py communicator (default ``MPI.COMM_WORLD``)."""

    name = "MPI"

    def __init__(self, comm=None):
        self.MPI = import_mpi()
        self.comm = comm if comm is not None else self.MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()

    @staticmethod
    def _check(buf, what):
        if not isinstance(buf, numpy.ndarray) or not buf.flags.c_contiguous:
            raise TypeError(f"MPICommunicator.{what}: buf must be a C-contiguous NumPy array, "
                            f"got {type(buf).__name__}")

    def allreduce_sum_(self, buf) -> None:
        self._check(buf, "allreduce_sum_")
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)

    def broadcast_(self, buf, root: int = 0) -> None:
        self._check(buf, "broadcast_")
        self.comm.Bcast(buf, root=root)

    def allgather(self, x):
        self._check(x, "allgather")
        out = numpy.empty((self.size,) + tuple(x.shape), dtype=x.dtype)
        self.comm.Allgather(x, out)
        return out.reshape((self.size * x.shape[0],) + tuple(x.shape[1:]))

    def barrier(self) -> None:
        self.comm.Barrier()
