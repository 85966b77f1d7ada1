"""``Communicator``: what data-parallel training needs from a group of N processes ("ranks").

An implementation provides ``rank``, ``size`` and four collectives on contiguous buffers of its
kind (host NumPy arrays, or device arrays when ``device_buffers``, as NCCL's): ``allreduce_sum_(buf)``
(in place: every rank ends with the element-wise sum over ranks), ``broadcast_(buf, root)`` (in
place: every rank ends with root's buffer), ``allgather(x)`` (x (b, ...) on every rank -> (N b, ...),
the ranks' x in rank order) and ``barrier()``. ``to_buffer(x)`` turns any array into a buffer of
that kind. On them this class builds what the trainer calls:

* ``broadcast_parameters(module)``: every rank starts from rank 0's weights;
* ``average_gradients(module, metrics)``: the gradients, packed into one flat buffer per dtype
  (``flat.pack``), summed over the ranks and divided by N, written back in place; the step's float
  metrics (the loss first) averaged the same way in one float64 buffer. With equal shards the mean
  of the N per-rank batch means is the global batch mean, so the gradient is the one-process
  gradient up to summation order (docs/distributed.md). A module in flat training storage
  (``nn/flat_parameters.py``) has its gradient buffers reduced in place, no copies (when they are
  buffers of this communicator's kind). A non-finite loss on any rank makes the
  averaged loss non-finite on every rank, so every rank skips that step or none does.
* ``shard(batch_size)``: this rank's rows of a global batch (``sharding.Shard``).
"""
from __future__ import annotations

import numpy

from npdiffusion.backend import to_numpy, xp
from npdiffusion.distributed import flat
from npdiffusion.distributed.sharding import Shard
from npdiffusion.nn import flat_parameters


class Communicator:
    """Base class; see the module docstring. ``name`` says which implementation it is."""

    name = "communicator"
    rank = 0
    size = 1
    #: True when the collectives take device (CuPy) arrays (NCCL), False for host NumPy arrays
    device_buffers = False

    # ------------------------------------------------------------------ the collectives (implemented below)
    def allreduce_sum_(self, buf: numpy.ndarray) -> None:
        raise NotImplementedError

    def broadcast_(self, buf: numpy.ndarray, root: int = 0) -> None:
        raise NotImplementedError

    def allgather(self, x):
        """x (b, ...), the same shape on every rank -> a new (N b, ...) array: rank 0's rows first."""
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def to_buffer(self, x):
        """``x`` as a C-contiguous buffer the collectives take (a copy only where one is needed)."""
        if self.device_buffers:
            return xp.ascontiguousarray(x)
        return numpy.ascontiguousarray(to_numpy(x))

    # ------------------------------------------------------------------ built on them
    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def shard(self, batch_size: int) -> Shard:
        """This rank's rows of a global batch of ``batch_size`` (which N must divide)."""
        return Shard.of(batch_size, self.rank, self.size)

    def broadcast_parameters(self, module, root: int = 0) -> None:
        """Overwrite every parameter of ``module`` with rank ``root``'s, in place."""
        if self.size == 1:
            return
        params = [p for _, p in module.named_parameters()]
        buckets = flat.pack(params, device=self.device_buffers)
        for _, buf, _ in buckets:
            self.broadcast_(buf, root)
        flat.unpack(buckets, params)

    def average_gradients(self, module, metrics: dict) -> dict:
        """Average ``module``'s gradients and the float ``metrics`` over the ranks (module docstring);
        returns the averaged metrics (same keys)."""
        if self.size == 1:
            return metrics
        keys = sorted(metrics)
        if self.device_buffers:                     # no host read: the metrics may be device scalars
            values = xp.stack([xp.asarray(metrics[k], dtype=xp.float64).reshape(()) for k in keys])
        else:
            values = numpy.asarray([float(metrics[k]) for k in keys], dtype=numpy.float64)
        self.allreduce_sum_(values)
        values /= self.size
        storage = flat_parameters.current(module)
        if storage is not None and all(self.device_buffers != isinstance(g.grads, numpy.ndarray)
                                       for g in storage.groups):
            buffers, grads = [group.grads for group in storage.groups], None
        else:
            grads = [g for _, g in module.named_grads()]
            buckets = flat.pack(grads, device=self.device_buffers)
            buffers = [buf for _, buf, _ in buckets]
        for buf in buffers:
            self.allreduce_sum_(buf)
            buf *= buf.dtype.type(1.0 / self.size)
        if grads is not None:
            flat.unpack(buckets, grads)
        if self.device_buffers:
            return {k: values[i] for i, k in enumerate(keys)}
        return {k: float(v) for k, v in zip(keys, values)}
