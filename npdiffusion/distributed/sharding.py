"""A rank's rows of the global batch, and random draws tied to the sample, not to the rank.

Shape legend: B the global batch (``train.batch_size``), N ranks, b = B / N the rows of one rank.

Every rank runs the same loader (same seed, same order, same state) over global batches of B and
keeps rows ``[start, stop)`` = ``[rank b, (rank + 1) b)`` of each (``Shard``). Every rank also holds
the trainer's generator in the same state and, for each random quantity of a step, draws it for
the **whole** global batch, in the order one process draws it, then keeps its rows
(``BatchDraws``). So sample i of the global batch gets the same noise, timestep and caption-dropout
draw whatever N is, the generator's state after a step does not depend on N (checkpoints resume
under any N), and N = 1 draws exactly what the stages drew before sharding existed. The price is
drawing B values where b would do: a few kilobytes per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy


@dataclass(frozen=True)
class Shard:
    """Rows ``[start, stop)`` of a global batch of ``total``."""

    start: int
    stop: int
    total: int

    @classmethod
    def of(cls, batch_size: int, rank: int, size: int) -> "Shard":
        if batch_size % size:
            raise ValueError(f"train.batch_size {batch_size} must be divisible by the number of processes {size} "
                             "(each rank trains on an equal share of the global batch)")
        b = batch_size // size
        return cls(rank * b, (rank + 1) * b, batch_size)

    @classmethod
    def whole(cls, batch_size: int) -> "Shard":
        return cls(0, batch_size, batch_size)


class BatchDraws:
    """Draws for every sample of a global batch from ``rng``, of which this rank keeps ``shard``'s rows.

    Each method draws exactly what ``rng.<method>((shard.total,) + sample_shape)`` draws (so the
    generator advances the same on every rank) and returns rows ``[start, stop)``.
    """

    def __init__(self, rng: numpy.random.Generator, shard: Shard):
        self.rng = rng
        self.shard = shard

    def _rows(self, values):
        return values[self.shard.start:self.shard.stop]

    def standard_normal(self, sample_shape=()):
        return self._rows(self.rng.standard_normal((self.shard.total,) + tuple(sample_shape)))

    def random(self):
        return self._rows(self.rng.random(self.shard.total))

    def integers(self, low: int, high: int):
        return self._rows(self.rng.integers(low, high, self.shard.total))


def batch_draws(rng, batch) -> BatchDraws:
    """``BatchDraws`` for ``batch``: its ``shard`` (set by a sharded ``DataLoader``) or the whole batch."""
    shard = getattr(batch, "shard", None)
    if shard is None:
        shard = Shard.whole(len(batch.indices))
    return BatchDraws(rng, shard)
