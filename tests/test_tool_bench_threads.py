"""tools/bench_threads.py at tiny sizes: both measurements run through parallel_for (the pool
really starts the second block), each size gets a row, and the process's thread settings are
put back."""
import os
import sys

from npdiffusion import parallel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import bench_threads  # noqa: E402


def test_bench_threads_small_run(capsys):
    threads, min_entries = parallel.get_num_threads(), parallel.MIN_PARALLEL_ENTRIES
    assert bench_threads.main(["--sizes", "1024,4096", "--calls", "3", "--repeats", "1", "--trials", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in out if line.split() and line.split()[0] in ("1024", "4096")]
    assert [r[0] for r in rows] == ["1024", "4096"]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)     # us per call: a NumPy call takes > 0.05 us
    assert all(float(r[3]) >= 0 for r in rows)    # the speed-up prints as 0.00 when a loaded machine delays the pool
    waits = [line for line in out if "ms idle" in line]
    assert len(waits) == 3 and all(line.split()[-1] != "nan" for line in waits)
    assert (parallel.get_num_threads(), parallel.MIN_PARALLEL_ENTRIES) == (threads, min_entries)
