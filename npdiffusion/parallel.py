"""Element-wise work split over the CPU's cores, in cache-sized blocks.

Shape legend: N the length of the leading axis that is split (batch, or rows of a 2-D view),
R the number of entries per index of that axis (everything after it), [lo, hi) one block.

NumPy runs each ufunc on one core, while torch spreads its element-wise kernels over all of them,
and an op that makes several passes over a multi-megabyte array (normalization, activations and
their backwards, AdamW) runs each pass at memory speed. ``parallel_for(fn, n, row_entries)`` fixes
both: it cuts ``range(n)`` into contiguous blocks of about ``BLOCK_ENTRIES`` entries and calls
``fn(lo, hi)`` for each, on a small pool of threads. NumPy releases the GIL inside its loops, so
the blocks run at the same time, and an op that does all its passes on one block before the next
finds the block in the cache after the first pass.

``fn`` must only read its inputs and write its own rows ``[lo, hi)`` of preallocated outputs
(or return a per-block result: ``parallel_for`` returns them in block order). The result is the
same as one call ``fn(0, n)`` for every thread count and block size (each block's arithmetic does
not depend on the others), which the tests check.

On the CuPy backend (one GPU stream), for small arrays and with one thread, ``fn(0, n)`` is called
once in the calling thread. A call from inside a block also runs inline (no nested pools).

Threads: ``set_num_threads(k)``; default ``NPDIFFUSION_NUM_THREADS``, else the number of CPUs this
process may run on.
"""
from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from npdiffusion import backend

__all__ = ["BLOCK_ENTRIES", "get_num_threads", "set_num_threads", "parallel_for"]

# Entries per block: 64 K float32 entries = 256 KB, so the two or three arrays an op touches per
# block stay in a core's L2 cache (measured: the same passes over 64 KB..1 MB blocks run 2-3x
# faster than over multi-megabyte arrays).
BLOCK_ENTRIES = 1 << 20
# Below this many entries the whole array is one block in the calling thread: a thread hand-off
# costs ~20 us, the time of a pass over ~100 K entries.
MIN_PARALLEL_ENTRIES = 1 << 17

_state = {"threads": None, "pool": None, "pool_size": 0}
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


def _pool(size: int) -> ThreadPoolExecutor:
    with _lock:
        if _state["pool"] is None or _state["pool_size"] != size:
            if _state["pool"] is not None:
                _state["pool"].shutdown(wait=False)
            _state["pool"] = ThreadPoolExecutor(size, thread_name_prefix="npdiffusion")
            _state["pool_size"] = size
        return _state["pool"]


def blocks(n: int, row_entries: int, threads: int, block_entries: int | None = None):
    """The ``[lo, hi)`` ranges ``parallel_for`` uses: about ``block_entries`` entries each (at least
    one row), at least ``threads`` of them when there are that many rows, sizes differing by <= 1."""
    if n <= 0:
        return []
    block_entries = BLOCK_ENTRIES if block_entries is None else block_entries
    rows = max(1, block_entries // max(int(row_entries), 1))
    count = min(n, max(-(-n // rows), threads))
    base, extra = divmod(n, count)
    out, lo = [], 0
    for i in range(count):
        hi = lo + base + (i < extra)
        out.append((lo, hi))
        lo = hi
    return out


def parallel_for(fn, n: int, row_entries: int):
    """Call ``fn(lo, hi)`` over contiguous blocks covering ``range(n)``; return their results in order.

    ``row_entries`` is the number of array entries one index of the split axis touches (it sizes the
    blocks). The calling thread and ``threads - 1`` pool threads take blocks in turn until none is
    left. See the module docstring for what ``fn`` may do.
    """
    threads = get_num_threads()
    total = n * max(int(row_entries), 1)
    if (threads == 1 or n < 2 or total < MIN_PARALLEL_ENTRIES or getattr(_inside, "active", False)
            or backend.get_backend() != "numpy"):
        return [fn(0, n)] if n > 0 else []
    spans = blocks(n, row_entries, threads)
    results = [None] * len(spans)
    ticket = itertools.count()                                      # next() is atomic under the GIL

    def work():
        _inside.active = True
        try:
            for i in iter(lambda: next(ticket), None):
                if i >= len(spans):
                    return
                results[i] = fn(*spans[i])
        finally:
            _inside.active = False

    futures = [_pool(threads - 1).submit(work) for _ in range(min(threads, len(spans)) - 1)]
    try:
        work()
    finally:
        for future in futures:
            future.result()                                         # waits; re-raises a block's error
    return results
