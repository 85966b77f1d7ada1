"""``SingleProcess``: the communicator of one process (N = 1); every collective is a no-op (the
all-gather of x is x itself)."""
from __future__ import annotations

from npdiffusion.distributed.communicator import Communicator


class SingleProcess(Communicator):
    """rank 0 of 1: sums and broadcasts leave the buffers as they are."""

    name = "single process"
    rank = 0
    size = 1

    def allreduce_sum_(self, buf) -> None:
        pass

    def broadcast_(self, buf, root: int = 0) -> None:
        if root != 0:
            raise ValueError(f"SingleProcess.broadcast_: root must be 0 (one process), got {root}")

    def allgather(self, x):
        return x

    def barrier(self) -> None:
        pass
