"""Data-parallel training: communicators, flat gradient buffers, the shard of a global batch.

* ``communicator.Communicator``: the interface (rank, size, in-place sum all-reduce, broadcast,
  all-gather, barrier) and what the trainer builds on it (``broadcast_parameters``, ``average_gradients``).
* ``single.SingleProcess``: one process; every operation is a no-op.
* ``mpi.MPICommunicator``: MPI through mpi4py (imported lazily), host arrays through the buffer interface.
* ``nccl.NCCLCommunicator``: NCCL through ``cupy.cuda.nccl``, device arrays, one GPU per rank.
* ``global_contrastive``: CLIP's contrastive loss over the global batch (all-gathered embeddings).
* ``flat``: a module's gradients (or parameters) packed into one flat buffer per dtype and back.
* ``sharding``: a rank's rows of the global batch, and random draws tied to the sample, not the rank.
* ``world.get_communicator()``: the communicator of this process (MPI or NCCL when started by ``mpiexec -n N``).

Docs: docs/distributed.md.
"""
from npdiffusion.distributed.communicator import Communicator
from npdiffusion.distributed.sharding import BatchDraws, Shard, batch_draws
from npdiffusion.distributed.single import SingleProcess
from npdiffusion.distributed.world import get_communicator, launched_by_mpi

__all__ = ["Communicator", "SingleProcess", "Shard", "BatchDraws", "batch_draws", "get_communicator",
           "launched_by_mpi"]
