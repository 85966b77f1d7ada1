"""The per-step work that every data-parallel rank repeats in full, timed piece by piece (one process).

    python tools/bench_replicated_work.py --steps 30

Builds ``tools/bench_distributed.py``'s trainer (the demo's U-Net stage: batch 32, 8x8x8 latents,
EMA, one thread), runs ``--warmup`` steps, then times ``--steps`` calls of ``Trainer._one_step`` with
``time.perf_counter`` around each piece: ``zero_grad``, the stage's ``train_step`` (forward and
backward: the part N ranks share out), ``average_gradients`` (a no-op on one rank), the gradient
norm, the clipping, ``AdamW.step`` and ``EMA.update``. Prints the median of each, in ms, and the sum
of the pieces other than ``train_step``: what caps the N-rank speed-up (docs/distributed.md,
"Measured"). Timings only, nothing is checked.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_distributed  # noqa: E402
import npdiffusion.training.loop as loop  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args(argv)
    if any(os.environ.get(k) != v for k, v in bench_distributed.THREAD_ENV.items()):
        # one BLAS thread, as each rank of bench_distributed.py: set before NumPy loads OpenBLAS
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]],
                  {**os.environ, **bench_distributed.THREAD_ENV})
    trainer = bench_distributed.build_trainer(tempfile.mkdtemp(prefix="bench-replicated-"))
    times: dict = {}

    def timed(owner, attr, label):
        fn = getattr(owner, attr)

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            times.setdefault(label, []).append(time.perf_counter() - t0)
            return out
        setattr(owner, attr, wrapper)

    timed(trainer.target, "zero_grad", "zero_grad")
    timed(trainer.stage, "train_step", "train_step")
    timed(trainer.comm, "average_gradients", "average_gradients")
    timed(loop, "grad_norm_array", "gradient norm")
    timed(loop, "clip_grads_with_norm_", "clipping")
    timed(trainer.optimizer, "step", "AdamW.step")
    timed(trainer.ema, "update", "EMA.update")
    for _ in range(args.warmup):
        trainer._one_step()
    times.clear()
    steps = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        trainer._one_step()
        steps.append(time.perf_counter() - t0)
    trainer.loader.close()
    print(f"U-Net stage at the demo's size, one process, median of {args.steps} steps: "
          f"{1e3 * statistics.median(steps):.1f} ms a step")
    replicated = 0.0
    for label, values in times.items():
        ms = 1e3 * statistics.median(values)
        replicated += 0.0 if label == "train_step" else ms
        print(f"  {label:18s} {ms:8.2f} ms")
    print(f"  every rank repeats {replicated:.2f} ms a step (all but train_step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
