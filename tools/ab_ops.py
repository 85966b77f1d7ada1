"""Time an op's code at an earlier git revision against the working tree's, in one process.

    python tools/ab_ops.py 125e374                       # every case, NumPy's BLAS threads
    python tools/ab_ops.py 125e374 --only groupnorm --threads 1
    python tools/ab_ops.py HEAD --only geglu --block-entries 16384,131072
    python tools/ab_ops.py 125e374 --new 35609ec --only conv   # two revisions
    python tools/ab_ops.py HEAD --parallel --only groupnorm      # npdiffusion/parallel.py instead

On a shared VM absolute times drift by tens of percent between runs, so a change is judged by
running old and new alternately (old, new, old, new, ...) on the same inputs; the table gives the
median of each and new / old. The old module is the file ``npdiffusion/ops/<name>.py`` as
``git show REV:...`` prints it, loaded under another name; it imports the rest of npdiffusion
from the working tree (backend, parallel), so the comparison isolates the op file itself.
With ``--parallel`` it is the other way round: both sides run the working tree's op file, the old
side with ``parallel_for`` from ``npdiffusion/parallel.py`` at REV (threads split the same way).

Cases (float32, forward + backward, shapes of the benchmarks in docs/benchmarks.md):
  groupnorm     ops/norm.py       32 groups on (16, 64, 32, 32) (bench_ops) and (32, 128, 8, 8) (U-Net)
  conv          ops/conv.py       3x3, padding 1: the U-Net benchmark's 8x8 and 4x4 shapes, batch 32,
                                  and bench_ops's (16, 64, 32, 32)
  attention     ops/attention.py  self-attention at (32, 8 heads, 64 tokens, 8) and (16, 8, 256, 64)
  geglu         ops/geglu.py      h (2048, 512); --block-entries sets the cache block size of both
``--threads`` sets BLAS and npdiffusion's element-wise threads (npdiffusion/parallel.py).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def load_old(module: str, rev: str | None, path: str = "npdiffusion/ops/{}.py"):
    """``npdiffusion/ops/<module>.py`` (or ``path``) at ``rev`` (None: the working tree's), imported
    as a separate module."""
    path = path.format(module)
    if rev is None:
        with open(os.path.join(ROOT, path)) as f:
            text = f.read()
    else:
        text = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT,
                              check=True, capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(text)
    spec = importlib.util.spec_from_file_location(f"old_{module}", f.name)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    os.unlink(f.name)
    return old


def _rng_arrays(*shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def groupnorm_cases():
    for shape in ((16, 64, 32, 32), (32, 128, 8, 8)):
        x, dy, w, b = _rng_arrays(shape, shape, (shape[1],), (shape[1],))

        def run(m, x=x, dy=dy, w=w, b=b):
            m.group_norm_backward(dy, m.group_norm_forward(x, 32, w, b)[1])
        yield f"group norm {shape}", "norm", run


def conv_cases():
    for b, c, o, side in ((32, 128, 128, 8), (32, 256, 128, 8), (32, 256, 128, 4), (32, 64, 64, 8),
                          (16, 64, 64, 32)):
        x, w, bias, dy = _rng_arrays((b, c, side, side), (o, c, 3, 3), (o,), (b, o, side, side))

        def run(m, x=x, w=w, bias=bias, dy=dy):
            m.conv2d_backward(dy, m.conv2d_forward(x, w, bias, 1, 1)[1])
        yield f"conv 3x3 {c}->{o} on {side}x{side}, batch {b}", "conv", run


def attention_cases():
    for b, h, t, d in ((32, 8, 64, 8), (16, 8, 256, 64)):
        q, k, v, do = _rng_arrays(*[(b, h, t, d)] * 4)

        def run(m, q=q, k=k, v=v, do=do):
            m.attention_backward(do, m.attention_forward(q, k, v)[1])
        yield f"self-attention ({b}, {h} heads, {t} tokens, {d})", "attention", run


def geglu_cases(block_entries):
    h, = _rng_arrays((2048, 512))
    for blocks in block_entries or [None]:
        def run(m, h=h, blocks=blocks):
            if blocks is not None:
                m.BLOCK_ENTRIES = blocks
            out, cache = m.geglu_forward(h)
            m.geglu_backward(out, cache)
        yield f"GEGLU h (2048, 512)" + ("" if blocks is None else f", blocks of {blocks}"), "geglu", run


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rev", help="the git revision to compare the working tree's op files with")
    p.add_argument("--new", default=None, help="a second revision instead of the working tree")
    p.add_argument("--only", default="groupnorm,conv,attention,geglu")
    p.add_argument("--threads", type=int, default=None, help="BLAS and element-wise threads (default: BLAS's)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--block-entries", default=None, help="comma-separated BLOCK_ENTRIES for the geglu case")
    p.add_argument("--parallel", action="store_true",
                   help="compare npdiffusion/parallel.py at REV instead of the op files")
    args = p.parse_args(argv)
    import importlib

    from npdiffusion import parallel
    if args.threads:
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads, user_api="blas")
        parallel.set_num_threads(args.threads)
    runners = {}                                     # side -> parallel.py module (--parallel)
    if args.parallel:
        for side, rev in (("old", args.rev), ("new", args.new)):
            if rev is not None:
                runners[side] = load_old("parallel", rev, "npdiffusion/{}.py")
                if args.threads:
                    runners[side].set_num_threads(args.threads)
    blocks = [int(v) for v in args.block_entries.split(",")] if args.block_entries else None
    makers = {"groupnorm": groupnorm_cases, "conv": conv_cases, "attention": attention_cases,
              "geglu": lambda: geglu_cases(blocks)}
    what = "parallel.py" if args.parallel else "op files"
    print(f"{what}: {args.rev} (old) against {args.new or 'the working tree'} (new), {args.repeats} alternating pairs, "
          f"{args.threads or 'BLAS default'} threads; ms, median")
    for name in args.only.split(","):
        for label, module, run in makers[name]():
            if args.parallel:
                old, new = load_old(module, None), load_old(module, None)
                for side, m in (("old", old), ("new", new)):
                    m.parallel_for = runners.get(side, parallel).parallel_for
            else:
                old = load_old(module, args.rev)
                new = load_old(module, args.new) if args.new else importlib.import_module(f"npdiffusion.ops.{module}")
            run(old)
            run(new)
            times = ([], [])
            for _ in range(args.repeats):
                for i, m in enumerate((old, new)):
                    t0 = time.perf_counter()
                    run(m)
                    times[i].append(time.perf_counter() - t0)
            a, b = (statistics.median(t) * 1e3 for t in times)
            print(f"  {label:<48} old {a:8.2f}  new {b:8.2f}  new/old {b / a:5.2f}")


if __name__ == "__main__":
    main()
