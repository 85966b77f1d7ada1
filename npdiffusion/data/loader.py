"""Batches in a seeded, resumable order, prepared by a background thread while the step runs.

Shape legend: N images, B batch size, S image side; a default ``Batch`` holds images float32
(B, 3, S, S) in [-1, 1] on the host, B captions and the B dataset indices.

Order. Epoch e visits the images in the permutation drawn by
``default_rng(SeedSequence(seed, spawn_key=(0, e)))`` (a stream of its own per epoch; 0..N-1 with
``shuffle=False``) in full batches of B; the last N mod B images of an epoch are left
out (``drop_last``, as training wants a fixed batch shape), and the next epoch starts with a new
permutation. The loader's state is ``(epoch, position)``, where position counts the batches of the
epoch already *handed out*, plus the epoch's permutation itself, so a restored loader continues
with the very next batch even if NumPy's permutation algorithm changed in between.

Prefetch. With ``prefetch > 0`` a daemon thread prepares the next batches (gathering or decoding
images, converting them, running ``collate``) into a queue of that depth while the training step
runs; ``next()`` takes them in order. Prefetching never changes *which* batches come, only when they
are built: the state counts batches handed out, not batches prepared, so a checkpoint taken at any
moment resumes exactly. An exception in the thread is re-raised by the ``next()`` that would have
returned its batch.

Shards. With ``shard`` (a ``distributed.Shard``, one per rank of a data-parallel run) the loader
walks the same global batches of B but gathers and collates only rows ``[shard.start, shard.stop)``
of each, and sets ``batch.shard``; its state (epoch, position, order) is the global one, the same on
every rank and for any number of ranks (docs/distributed.md). Randomness of the step itself (noise, timesteps, caption dropout) does not
belong here: it is drawn in the main thread from the trainer's generator.
Docs: docs/training.md ("Datasets" and "Checkpoints and resume").
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable

import numpy

from npdiffusion.data.dataset import to_model_input


@dataclass
class Batch:
    """One batch: ``images`` float32 (B, 3, S, S) in [-1, 1] (host), ``captions``, dataset ``indices``."""

    images: numpy.ndarray
    captions: list
    indices: numpy.ndarray
    epoch: int
    position: int


def default_collate(images, captions, indices, epoch, position) -> Batch:
    """uint8 (B, S, S, 3) + captions -> ``Batch`` with images in [-1, 1], channels first."""
    return Batch(to_model_input(images), captions, indices, epoch, position)


class _Stop(Exception):
    pass


def _permutation(seed: int, shuffle: bool, n: int, epoch: int) -> numpy.ndarray:
    if not shuffle:
        return numpy.arange(n, dtype=numpy.int64)
    ss = numpy.random.SeedSequence(seed, spawn_key=(0, epoch))
    return numpy.random.default_rng(ss).permutation(n).astype(numpy.int64)


def _make(plan, epoch: int, position: int, order: numpy.ndarray):
    dataset, collate, batch_size = plan[:3]
    shard = plan[7]
    idx = order[position * batch_size:(position + 1) * batch_size]
    if shard is not None:
        idx = idx[shard.start:shard.stop]
    images = dataset.get_images(idx)
    captions = [dataset.captions[i] for i in idx.tolist()]
    batch = collate(images, captions, idx.copy(), epoch, position)
    if shard is not None:
        batch.shard = shard
    return batch


def _advance(plan, epoch: int, position: int, order):
    _, _, _, steps_per_epoch, seed, shuffle, n = plan[:7]
    position += 1
    if position >= steps_per_epoch:
        epoch, position = epoch + 1, 0
        order = _permutation(seed, shuffle, n, epoch)
    return epoch, position, order


def _put(q, stop, item):
    while True:
        if stop.is_set():
            raise _Stop
        try:
            q.put(item, timeout=0.05)
            return
        except queue.Full:
            continue


def _produce(plan, start, q, stop):
    """The prefetch thread: batches from ``start`` on, in order, into ``q`` until ``stop`` is set."""
    epoch, position, order = start
    try:
        while not stop.is_set():
            try:
                item = (epoch, position, _make(plan, epoch, position, order), None)
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, re-raised there
                _put(q, stop, (epoch, position, None, exc))
                return
            _put(q, stop, item)
            epoch, position, order = _advance(plan, epoch, position, order)
    except _Stop:
        return


class DataLoader:
    """Infinite iterator of batches over ``dataset`` (see the module docstring)."""

    def __init__(self, dataset, batch_size: int, seed: int = 0, shuffle: bool = True, prefetch: int = 2,
                 collate: Callable | None = None, shard=None):
        n = len(dataset)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"DataLoader: batch_size must be a positive int, got {batch_size!r}")
        if n < batch_size:
            raise ValueError(f"DataLoader: the dataset has {n} images, fewer than batch_size {batch_size}; "
                             "lower batch_size or add images")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"DataLoader: seed must be a non-negative int, got {seed!r}")
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"DataLoader: prefetch must be an int >= 0 (0 = no thread), got {prefetch!r}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = bool(shuffle)
        self.prefetch = prefetch
        self.collate = collate or default_collate
        self.shard = shard
        if shard is not None and (shard.total != batch_size or not 0 <= shard.start < shard.stop <= batch_size):
            raise ValueError(f"DataLoader: shard {shard} does not split a batch of {batch_size}")
        self.num_images = n
        self.steps_per_epoch = n // batch_size
        self.epoch = 0
        self.position = 0
        self.order = self.permutation(0)
        self._thread = None
        self._queue = None
        self._stop = None

    # ------------------------------------------------------------------ order
    def permutation(self, epoch: int) -> numpy.ndarray:
        """The visiting order (N,) int64 of ``epoch``."""
        return _permutation(self.seed, self.shuffle, self.num_images, epoch)

    def _plan(self):
        """What the producer needs, without a reference to the loader (so an abandoned loader is collected
        and its ``__del__`` stops the thread)."""
        return (self.dataset, self.collate, self.batch_size, self.steps_per_epoch, self.seed, self.shuffle,
                self.num_images, self.shard)

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        return self

    def __next__(self):
        if self.prefetch == 0:
            batch = _make(self._plan(), self.epoch, self.position, self.order)
        else:
            if self._thread is None:
                self._start()
            epoch, position, batch, error = self._queue.get()
            if error is not None:
                self._join()
                raise error
            if (epoch, position) != (self.epoch, self.position):  # a bug, never a user error
                raise RuntimeError(f"DataLoader: prefetched batch {(epoch, position)} out of order, "
                                   f"expected {(self.epoch, self.position)}")
        self.epoch, self.position, self.order = _advance(self._plan(), self.epoch, self.position, self.order)
        return batch

    def _start(self):
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._stop = threading.Event()
        start = (self.epoch, self.position, self.order)
        self._thread = threading.Thread(target=_produce, args=(self._plan(), start, self._queue, self._stop),
                                        name="npdiffusion-prefetch", daemon=True)
        self._thread.start()

    def _join(self):
        if self._thread is not None:
            self._stop.set()
            while True:  # unblock a producer waiting on a full queue
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._thread.join()
        self._thread = self._queue = self._stop = None

    def close(self) -> None:
        """Stop the prefetch thread (a later ``next()`` starts a new one at the current position)."""
        self._join()

    def __del__(self):
        try:
            self._join()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """``{"seed", "epoch", "position", "batch_size", "num_images", "shuffle", "order"}`` (order: (N,) int64)."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "batch_size": self.batch_size,
                "num_images": self.num_images, "shuffle": self.shuffle, "order": self.order.copy()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved state: the next batch is the one after the last batch handed out then."""
        for key in ("epoch", "position", "num_images", "batch_size", "order"):
            if key not in state:
                raise ValueError(f"DataLoader.load_state_dict: the state has no {key!r}")
        if state["num_images"] != self.num_images:
            raise ValueError(f"DataLoader.load_state_dict: the checkpoint was made on a dataset of "
                             f"{state['num_images']} images, this one has {self.num_images}")
        if state["batch_size"] != self.batch_size:
            raise ValueError(f"DataLoader.load_state_dict: the checkpoint used batch_size {state['batch_size']}, "
                             f"this run uses {self.batch_size}")
        order = numpy.asarray(state["order"], dtype=numpy.int64)
        if order.shape != (self.num_images,) or not numpy.array_equal(numpy.sort(order), numpy.arange(self.num_images)):
            raise ValueError("DataLoader.load_state_dict: 'order' is not a permutation of the dataset's indices")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.steps_per_epoch:
            raise ValueError(f"DataLoader.load_state_dict: position {position} of epoch {epoch} is out of range "
                             f"({self.steps_per_epoch} batches per epoch)")
        self._join()
        self.seed = int(state.get("seed", self.seed))
        self.shuffle = bool(state.get("shuffle", self.shuffle))
        self.epoch, self.position, self.order = epoch, position, order
