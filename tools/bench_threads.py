"""What a second thread buys for NumPy work cut into calls of a given size, on this machine.

    python tools/bench_threads.py                 # sizes 4 K-256 K float32 entries, 400 calls each
    python tools/bench_threads.py --sizes 65536 --calls 2000

The figures behind npdiffusion/parallel.py's block sizes and ops/norm.py's sub-blocks:

* **Per call.** One thread makes ``calls`` in-place adds on its own array of ``size`` float32
  entries; then ``parallel_for`` runs two such sequences at once, one per thread. NumPy releases
  the GIL inside each add, but every call takes it to start and to return, so when the two threads
  are in step a thread that finishes its loop may wait for the other and then for the OS to wake
  it. Printed: us per call alone and per pair of calls on two threads, and the speed-up (2.0 is
  ideal; 1.0 means the second thread bought nothing).
* **Wake-up.** How long a sleeping pool thread takes to start a block after the calling thread
  hands it one, after the pool has idled 0, 1 and 10 ms (the time between two ops of a model).

Timings only: nothing here is checked, and on a shared VM they drift by tens of percent.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def per_call(size: int, calls: int, repeats: int):
    """(us per call on one thread, us per pair of calls on two threads) for in-place adds."""
    from npdiffusion import parallel

    arrays = np.ones((2, size), dtype=np.float32)

    def adds(lo, hi):                                  # block i: `calls` adds on row i
        for i in range(lo, hi):
            for _ in range(calls):
                np.add(arrays[i], 1.0, out=arrays[i])

    one, two = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        adds(0, 1)
        one.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        parallel.parallel_for(adds, 2, size, size)      # one block per thread
        two.append(time.perf_counter() - t0)
    return statistics.median(one) / calls * 1e6, statistics.median(two) / calls * 1e6


def wake_latency(idle_s: float, trials: int) -> float:
    """Median us from handing a block to the pool until a pool thread starts it."""
    from npdiffusion import parallel

    caller = threading.get_ident()
    busy = np.ones(1 << 20, dtype=np.float32)
    started = []

    def block(lo, hi):
        if threading.get_ident() != caller:
            started.append(time.perf_counter())
            return
        give_up = time.perf_counter() + 1.0            # the caller's own block: GIL-free work (a loaded
                                                       # machine may take long to schedule the pool thread)
        while not started and time.perf_counter() < give_up:   # until the pool thread is in
            np.multiply(busy, 1.0, out=busy)

    delays = []
    for _ in range(trials):
        if idle_s:
            time.sleep(idle_s)
        started.clear()
        t0 = time.perf_counter()
        parallel.parallel_for(block, 2, 1 << 20, 1 << 20)
        if started:                                    # the caller may have claimed both blocks
            delays.append(started[0] - t0)
    return statistics.median(delays) * 1e6 if delays else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="4096,16384,65536,262144", help="float32 entries per call")
    p.add_argument("--calls", type=int, default=400)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--trials", type=int, default=100, help="wake-up measurements per idle time")
    args = p.parse_args(argv)
    from npdiffusion import parallel

    saved = parallel.get_num_threads(), parallel.MIN_PARALLEL_ENTRIES
    parallel.set_num_threads(2)
    parallel.MIN_PARALLEL_ENTRIES = 0                  # split even the small sizes
    try:
        print(f"{'entries per call':>16}  {'1 thread us/call':>16}  {'2 threads us/pair':>17}  speed-up")
        for size in (int(v) for v in args.sizes.split(",")):
            one, two = per_call(size, args.calls, args.repeats)
            print(f"{size:>16}  {one:>16.1f}  {two:>17.1f}  {2 * one / two:8.2f}")
        print("pool thread start after handing it a block (median us):")
        for idle in (0.0, 0.001, 0.01):
            print(f"  after {idle * 1e3:4.0f} ms idle: {wake_latency(idle, args.trials):7.1f}")
    finally:
        parallel.set_num_threads(saved[0])
        parallel.MIN_PARALLEL_ENTRIES = saved[1]
    return 0


if __name__ == "__main__":
    sys.exit(main())
