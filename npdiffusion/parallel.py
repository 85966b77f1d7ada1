"""Element-wise work split over the CPU's cores, in cache-sized blocks.

Shape legend: N the length of the leading axis that is split (batch, or rows of a 2-D view),
R the number of entries per index of that axis (everything after it), [lo, hi) one block.

NumPy runs each ufunc on one core, while torch spreads its element-wise kernels over all of them,
and an op that makes many passes over a multi-megabyte array (activations and their backwards)
runs each pass at memory speed. ``parallel_for(fn, n, row_entries, block_entries)`` fixes both: it
cuts ``range(n)`` into contiguous blocks and calls ``fn(lo, hi)`` on each, the calling thread
and a small pool claiming blocks until none is left (NumPy releases the GIL inside its loops, so
the blocks run at the same time); with ``block_entries`` the blocks are cache-sized, so an ``fn``
that makes all its passes over one block before the next finds the block in cache after the
first pass.

``fn`` must only read its inputs and write its own rows ``[lo, hi)`` of preallocated outputs
(or return a per-call result: ``parallel_for`` returns them in order). The result is the same as
one call ``fn(0, n)`` for every thread count and block size (each range's arithmetic does not
depend on the others), which the tests check.

**The backend policy, in one place:** thread splits and cache blocks are CPU tuning, for NumPy
only. On the CuPy backend every element-wise op is one call: ``parallel_for`` calls ``fn(0, n)``
once in the calling thread whatever ``block_entries`` says, and ``cache_blocks`` (the sub-blocks
an ``fn`` cuts its range into, such as group norm's backward) gives the one range ``[0, n)``. One
GPU stream runs the kernels in order anyway, and a cut only turns one kernel launch into many
(an SD-sized activation would become ~20). ``cpu_tuned()`` says which case applies;
``tests/test_parallel_policy.py`` counts the calls on the CuPy stand-in. With one thread, for
small arrays and from inside a block (no nested pools) ``parallel_for`` also runs inline, but in
cache-sized blocks when ``block_entries`` is given.

Threads: ``set_num_threads(k)``; default ``NPDIFFUSION_NUM_THREADS``, else the number of CPUs this
process may run on.

Broadcasts over long rows: ``x * a[:, None]`` with x (R, S) runs about three times slower than
the same multiply by a scalar on NumPy 2.x when S is below the ufunc buffer size (8192 entries):
the iterator then gathers several rows into one inner loop and copies the broadcast operand into
its buffer, so the multiply becomes a same-shape one plus a copy. With a buffer no larger than a
row, each row is one inner loop with a stride-0 operand, NumPy's scalar kernel.
``parallel_for(..., row_length=S)`` runs ``fn`` with such a buffer for rows of at least
``LONG_ROW`` entries (shorter rows pay more per inner loop than the copy costs). The buffer size
is a thread-local NumPy setting, restored when ``fn`` returns; it changes speed, never results.
Measurements behind the constants below: docs/benchmarks.md, "Figures behind the code's constants".
"""
from __future__ import annotations

import itertools
import os
import queue
import threading

import numpy

from npdiffusion import backend

__all__ = ["BLOCK_ENTRIES", "LONG_ROW", "cache_blocks", "cpu_tuned", "get_num_threads", "set_num_threads",
           "parallel_for"]

# Entries per cache block for ops that make many passes (activations): 128 K float32 entries =
# 512 KB, so the few arrays a pass touches stay in a core's 2 MB L2 cache; smaller blocks lose more
# to the per-ufunc-call cost and GIL hand-offs than they gain in cache.
BLOCK_ENTRIES = 1 << 17
# Below this many entries the whole array is one call in the calling thread: a hand-off to the
# pool and back costs as much as several passes over ~100 K entries.
MIN_PARALLEL_ENTRIES = 1 << 19
# Rows at least this long are broadcast over with a ufunc buffer of one row (module docstring).
LONG_ROW = 1024
_NUMPY_BUFSIZE = 8192
# Without block_entries, each thread's share is cut into this many blocks to claim, so that the
# threads finish together even when one starts late.
CLAIMS_PER_THREAD = 2

_state = {"threads": None, "pool": None}
_inside = threading.local()
_lock = threading.Lock()


def _default_threads() -> int:
    env = os.environ.get("NPDIFFUSION_NUM_THREADS")
    if env:
        try:
            value = int(env)
        except ValueError:
            raise ValueError(f"NPDIFFUSION_NUM_THREADS must be a positive integer, got {env!r}") from None
        if value < 1:
            raise ValueError(f"NPDIFFUSION_NUM_THREADS must be a positive integer, got {env!r}")
        return value
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def get_num_threads() -> int:
    """How many threads element-wise work uses (``set_num_threads``, else the default)."""
    if _state["threads"] is None:
        _state["threads"] = _default_threads()
    return _state["threads"]


def set_num_threads(k: int) -> None:
    """Use ``k`` threads (1: everything in the calling thread) for element-wise work."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"num_threads must be a positive int, got {k!r}")
    _state["threads"] = k


class _Workers:
    """``size`` daemon threads that run the callables submitted, one after another (None stops one).

    Lighter than ``concurrent.futures.ThreadPoolExecutor``: a worker's whole loop between two
    jobs is one ``SimpleQueue.get`` (C code, GIL released while it waits), so a worker that has
    just finished holds the GIL for a few bytecodes only, not for a future's bookkeeping while
    the calling thread waits for the GIL to return from its own NumPy loop.
    """

    def __init__(self, size: int):
        self.size = size
        self.jobs = queue.SimpleQueue()
        for i in range(size):
            threading.Thread(target=self._run, name=f"npdiffusion-{i}", daemon=True).start()

    def submit(self, job):
        self.jobs.put(job)

    def _run(self):
        get = self.jobs.get
        while (job := get()) is not None:
            job()


def _pool(size: int) -> _Workers:
    with _lock:
        if _state["pool"] is None or _state["pool"].size != size:
            if _state["pool"] is not None:                 # idle workers of the old size stop
                for _ in range(_state["pool"].size):
                    _state["pool"].submit(None)
            _state["pool"] = _Workers(size)
        return _state["pool"]


def _with_row_buffer(fn, row_length):
    """``fn`` wrapped to run with a NumPy ufunc buffer of at most ``row_length`` entries."""
    if row_length is None or row_length < LONG_ROW or row_length >= _NUMPY_BUFSIZE:
        return fn

    def wrapped(lo, hi):
        with numpy.errstate():                       # restores the thread's buffer size on exit
            numpy.setbufsize(int(row_length) // 16 * 16)   # NumPy wants a multiple of 16
            return fn(lo, hi)
    return wrapped


def cpu_tuned() -> bool:
    """Whether element-wise work is cut into thread shares and cache blocks: on NumPy only (the
    module docstring's backend policy; on CuPy every element-wise op is one call)."""
    return backend.get_backend() == "numpy"


def cache_blocks(n: int, row_entries: int, block_entries: int):
    """``[lo, hi)`` ranges of about ``block_entries`` entries (whole rows of ``row_entries``)
    covering ``range(n)``, for an ``fn`` that walks its own range in cache-sized pieces; on CuPy
    the one range ``[0, n)`` (``cpu_tuned``)."""
    if not cpu_tuned():
        return [(0, n)] if n > 0 else []
    return _ranges(n, max(1, int(block_entries) // max(int(row_entries), 1)))


def _ranges(n: int, rows: int):
    """``range(n)`` cut into ranges of ``rows`` indices (the last may be shorter)."""
    return [(lo, min(lo + rows, n)) for lo in range(0, n, rows)]


def parallel_for(fn, n: int, row_entries: int, block_entries: int | None = None,
                 row_length: int | None = None):
    """Call ``fn(lo, hi)`` over contiguous ranges covering ``range(n)``; return the results in order.

    ``range(n)`` is cut into blocks: of about ``block_entries`` entries (at least one row) when
    given, so that an ``fn`` making several passes finds its block in cache; otherwise about
    ``CLAIMS_PER_THREAD`` blocks per thread. The calling thread and the pool's threads claim the
    blocks one at a time until none is left (dynamic scheduling), so a pool thread that wakes late
    only does less (an idle pool thread can take longer to wake than a pass over a megabyte:
    ``python tools/bench_threads.py``). ``row_entries`` is the number of array entries one index
    of the split axis touches. ``row_length``: the length of the contiguous rows that ``fn``
    broadcasts per-row values over, if any (module docstring, "Broadcasts over long rows"). See the
    module docstring for what ``fn`` may do.
    """
    row_entries = max(int(row_entries), 1)
    if not cpu_tuned():                              # CuPy: one call (module docstring)
        return [fn(0, n)] if n > 0 else []
    fn = _with_row_buffer(fn, row_length)
    threads = get_num_threads()
    inline = (threads == 1 or n < 2 or n * row_entries < MIN_PARALLEL_ENTRIES
              or getattr(_inside, "active", False))
    if block_entries is not None:
        rows = max(1, int(block_entries) // row_entries)
    else:
        rows = n if inline else max(1, -(-n // (threads * CLAIMS_PER_THREAD)))
    blocks = _ranges(n, max(rows, 1))
    if inline or len(blocks) <= 1:
        return [fn(lo, hi) for lo, hi in blocks]

    results = [None] * len(blocks)
    errors = []
    claims = itertools.count()                       # next() is atomic under the GIL
    settled = itertools.count(1)
    done = threading.Lock()                          # released when the last block settles
    done.acquire()
    float_errors = numpy.geterr()                    # the caller's numpy.errstate, for the pool threads too

    def work():
        _inside.active = True
        numpy.seterr(**float_errors)
        try:
            while True:
                i = next(claims)
                if i >= len(blocks):
                    return
                if not errors:                       # after an error the rest are only counted
                    try:
                        results[i] = fn(*blocks[i])
                    except BaseException as exc:     # re-raised in the calling thread
                        errors.append(exc)
                if next(settled) == len(blocks):
                    done.release()
        finally:
            _inside.active = False

    pool = _pool(threads - 1)
    for _ in range(min(threads - 1, len(blocks) - 1)):
        pool.submit(work)
    work()
    done.acquire()                                   # blocks claimed by the pool finish
    if errors:
        raise errors[0]
    return results
