"""``get_communicator()``: the communicator of this process.

Started by an MPI launcher (``mpiexec -n N``; recognised by the environment variables MPICH's Hydra,
Open MPI and PMIx set) with N > 1: on the NumPy backend an ``MPICommunicator`` over
``MPI.COMM_WORLD`` (one clear ImportError when mpi4py is missing, rather than N independent runs
writing the same folder); on the CuPy backend an ``NCCLCommunicator`` (one GPU per rank, device
arrays, built over that MPI communicator). Otherwise, or with N = 1: ``SingleProcess``, and mpi4py
is never imported. The policy is read once per process (choose the backend before the first call).
"""
from __future__ import annotations

import os
import socket
import sys

SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")


def launched_by_mpi() -> int:
    """The number of processes an MPI launcher says it started (1 when none did)."""
    for name in SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


_WORLD = []


def get_communicator():
    """See the module docstring (built once per process)."""
    from npdiffusion.distributed.single import SingleProcess  # noqa: PLC0415

    if launched_by_mpi() <= 1:
        return SingleProcess()
    if not _WORLD:
        from npdiffusion.distributed.mpi import MPICommunicator  # noqa: PLC0415

        comm = MPICommunicator()
        if comm.size > 1:
            from npdiffusion.backend import get_backend  # noqa: PLC0415

            if get_backend() == "cupy":
                from npdiffusion.distributed.nccl import NCCLCommunicator  # noqa: PLC0415

                comm = NCCLCommunicator(comm)
            # One line per rank, so that the launcher's report of a dead process ("PID 1234 ... Killed",
            # MPICH) can be read as a rank: a rank killed outright cannot say anything itself.
            # (one write of the whole line: the ranks share the terminal, and print's two writes interleave)
            sys.stderr.write(f"npdiffusion: MPI rank {comm.rank} of {comm.size} is pid {os.getpid()} on "
                             f"{socket.gethostname()}; collectives over {comm.name}\n")
            sys.stderr.flush()
        _WORLD.append(comm if comm.size > 1 else SingleProcess())
    return _WORLD[0]
