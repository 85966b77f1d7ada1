"""Element-wise work split over the CPU's cores, in cache-sized blocks.

Shape legend: N the length of the leading axis that is split (batch, or rows of a 2-D view),
R the number of entries per index of that axis (everything after it), [lo, hi) one block.

NumPy runs each ufunc on one core, while torch spreads its element-wise kernels over all of them,
and an op that makes many passes over a multi-megabyte array (activations and their backwards)
runs each pass at memory speed. ``parallel_for(fn, n, row_entries, block_entries)`` fixes both: it
cuts ``range(n)`` into one contiguous part per thread and calls ``fn(lo, hi)`` on each part, the
calling thread taking the first and a small pool the others (NumPy releases the GIL inside its
loops, so the parts run at the same time); with ``block_entries`` each thread walks its part in
cache-sized blocks, so an ``fn`` that makes all its passes over one block before the next finds
the block in cache after the first pass.

``fn`` must only read its inputs and write its own rows ``[lo, hi)`` of preallocated outputs
(or return a per-call result: ``parallel_for`` returns them in order). The result is the same as
one call ``fn(0, n)`` for every thread count and block size (each range's arithmetic does not
depend on the others), which the tests check.

On the CuPy backend (one GPU stream), for small arrays and with one thread, ``fn(0, n)`` is called
once in the calling thread. A call from inside a block also runs inline (no nested pools).

Threads: ``set_num_threads(k)``; default ``NPDIFFUSION_NUM_THREADS``, else the number of CPUs this
process may run on.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

from npdiffusion import backend

__all__ = ["BLOCK_ENTRIES", "get_num_threads", "set_num_threads", "split", "parallel_for"]

# Entries per cache block for ops that make many passes (activations): 16 K float32 entries =
# 64 KB, so the few arrays a pass touches stay in a core's L2 cache.
BLOCK_ENTRIES = 1 << 14
# Below this many entries the whole array is one call in the calling thread. A hand-off to the
# pool and back costs tens of microseconds plus GIL contention, the time of several passes over
# ~100 K entries: at the demo's sizes (64 K-1 M entries) two threads made a U-Net training step
# slower, 276-287 ms against 199-243 ms with one (docs/benchmarks.md, "Training").
MIN_PARALLEL_ENTRIES = 1 << 19

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


def split(n: int, parts: int):
    """``range(n)`` cut into ``min(parts, n)`` contiguous ``(lo, hi)`` ranges whose sizes differ by <= 1."""
    count = min(max(int(parts), 1), n)
    if count <= 0:
        return []
    base, extra = divmod(n, count)
    out, lo = [], 0
    for i in range(count):
        hi = lo + base + (i < extra)
        out.append((lo, hi))
        lo = hi
    return out


def parallel_for(fn, n: int, row_entries: int, block_entries: int | None = None):
    """Call ``fn(lo, hi)`` over contiguous ranges covering ``range(n)``; return the results in order.

    ``range(n)`` is cut into one part per thread; the calling thread runs the first part and the
    pool the others. With ``block_entries``, each thread cuts its part further into blocks of about
    that many entries (at least one row) and calls ``fn`` once per block, so that an ``fn`` making
    several passes finds its block in cache. ``row_entries`` is the number of array entries one
    index of the split axis touches. See the module docstring for what ``fn`` may do.
    """
    row_entries = max(int(row_entries), 1)
    threads = get_num_threads()
    if (threads == 1 or n < 2 or n * row_entries < MIN_PARALLEL_ENTRIES
            or getattr(_inside, "active", False) or backend.get_backend() != "numpy"):
        parts = [(0, n)] if n > 0 else []
    else:
        parts = split(n, threads)
    rows = None if block_entries is None else max(1, int(block_entries) // row_entries)

    def run(lo, hi):
        if rows is None or hi - lo <= rows:
            return [fn(lo, hi)]
        return [fn(a, b) for a, b in ((a, min(a + rows, hi)) for a in range(lo, hi, rows))]

    if len(parts) <= 1:
        return run(*parts[0]) if parts else []

    def run_marked(lo, hi):
        _inside.active = True
        try:
            return run(lo, hi)
        finally:
            _inside.active = False

    futures = [_pool(threads - 1).submit(run_marked, lo, hi) for lo, hi in parts[1:]]
    try:
        first = run_marked(*parts[0])
    finally:
        rest = [f.result() for f in futures]                         # waits; re-raises a part's error
    return [r for part in [first] + rest for r in part]
