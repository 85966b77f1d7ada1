"""Time per step and memory of a 50-step generation: npdiffusion's pipeline against diffusers' on the
same tiny random Stable Diffusion pipeline (tests/pipeline_dummy.py: diffusers' get_dummy_components).

    python tools/bench_pipeline.py                  # 50 steps, 3 timing rounds, table on stdout
    python tools/bench_pipeline.py --steps 50 --rounds 5 --threads 1 --scheduler EulerAncestralDiscreteScheduler

Settings: one prompt, guidance 7.5 (U-Net batch 2), 64 x 64 images (32 x 32 latents), the folder's
DDIM scheduler unless ``--scheduler`` names another, both libraries on ``--threads`` threads
(OpenBLAS / torch; default 1: the tiny model's GEMMs gain nothing from threads, and the development
machine has 2 shared cores).

* Time (one process, as docs/../shared/reference/performance.md asks): both pipelines loaded, one
  warm-up generation each, then ``--rounds`` rounds of ours, diffusers, ours, diffusers... Each
  generation records the time after every step (``callback_on_step_end``); a round's figure is the
  median step-to-step interval. Reported: the median over rounds of each, and the median of the
  per-round ratios (robust to the load of a shared machine drifting between rounds).
* Memory (a fresh subprocess per library, so its peak RSS is its own): RSS (/proc/self/status)
  after every step of a 50-step generation -- flat when nothing accumulates -- and VmHWM, the
  process's peak (imports and weights included). For npdiffusion also the traced heap after every
  step and its peak (tracemalloc sees NumPy's buffers; torch's allocator is not traced).

Results go into docs/benchmarks.md ("## Pipeline") by hand, with the machine and the date.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM), or -1 where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


def run_one(impl: str, steps: int, scheduler: str | None, folder: str) -> dict:
    """One measured generation in this process; returns the measurements as a dict."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    sys.path.insert(0, ROOT)
    import tracemalloc

    from pipeline_dummy import diffusers_pipeline, our_pipeline

    prompt = "a photo of an astronaut riding a horse"
    times, rss, traced = [], [], []

    def record(pipe, i, t, kwargs):
        times.append(time.perf_counter())
        rss.append(_status("VmRSS"))
        if impl == "ours":
            traced.append(tracemalloc.get_traced_memory()[0])
        return kwargs

    if impl == "ours":
        pipe = our_pipeline(scheduler)
        pipe(prompt, num_inference_steps=2, seed=0, output_type="np", progress=False)     # warm-up
        tracemalloc.start()
        start = time.perf_counter()
        pipe(prompt, num_inference_steps=steps, seed=0, noise="torch", output_type="np", progress=False,
             callback_on_step_end=record)
        total = time.perf_counter() - start
        peak_traced = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    else:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        pipe = diffusers_pipeline(scheduler)
        with torch.no_grad():
            pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
            start = time.perf_counter()
            pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np",
                 callback_on_step_end=record)
            total = time.perf_counter() - start
        peak_traced = None
    intervals = [b - a for a, b in zip(times, times[1:])]
    return {"impl": impl, "steps": len(times), "total_s": total,
            "step_ms_median": 1e3 * statistics.median(intervals), "step_ms_min": 1e3 * min(intervals),
            "rss_mb": [r / 2 ** 20 for r in rss], "traced_mb": [m / 2 ** 20 for m in traced],
            "peak_traced_mb": None if peak_traced is None else peak_traced / 2 ** 20,
            "hwm_mb": _status("VmHWM") / 2 ** 20}


def _child(impl, args, folder) -> dict:
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore",
               NPD_BENCH_FOLDER=folder)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, "--steps", str(args.steps)]
    if args.scheduler:
        cmd += ["--scheduler", args.scheduler]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{impl} run failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_alternating(args) -> dict:
    """Per-round median ms/step of each library, run alternately in this process."""
    import torch

    from pipeline_dummy import diffusers_pipeline, our_pipeline

    torch.set_num_threads(args.threads)
    prompt = "a photo of an astronaut riding a horse"
    ours, theirs = our_pipeline(args.scheduler), diffusers_pipeline(args.scheduler)

    def one(impl, steps):
        stamps = []

        def record(pipe, i, t, kwargs):
            stamps.append(time.perf_counter())
            return kwargs

        if impl == "ours":
            ours(prompt, num_inference_steps=steps, seed=0, noise="torch", output_type="np", progress=False,
                 callback_on_step_end=record)
        else:
            with torch.no_grad():
                theirs(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                       output_type="np", callback_on_step_end=record)
        return 1e3 * statistics.median(b - a for a, b in zip(stamps, stamps[1:]))

    one("ours", 3), one("diffusers", 3)                           # warm-up
    rounds = {"ours": [], "diffusers": []}
    for _ in range(args.rounds):
        for impl in ("ours", "diffusers"):
            rounds[impl].append(one(impl, args.steps))
    return rounds


def _flat(series) -> str:
    """first -> last (max - min over steps 2..N) of a per-step memory series, in MB."""
    if not series:
        return "n/a"
    steady = series[1:]
    return f"{series[0]:.2f} -> {series[-1]:.2f} (spread {max(steady) - min(steady):.3f})"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3, help="timing rounds (ours then diffusers, in one process)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--scheduler", default=None, help="a diffusers/npdiffusion scheduler class name (default DDIM)")
    p.add_argument("--child", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        import pipeline_dummy

        folder = os.environ["NPD_BENCH_FOLDER"]
        pipeline_dummy.dummy_folder = lambda: folder            # reuse the parent's folder
        print(json.dumps(run_one(args.child, args.steps, args.scheduler, folder)))
        return 0

    if args.threads != int(os.environ.get("OPENBLAS_NUM_THREADS", "0") or 0):
        # OpenBLAS reads its thread count at import: re-run this process with it set
        env = dict(os.environ, OPENBLAS_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
                   MKL_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
        return subprocess.call([sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])], env=env)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    sys.path.insert(0, ROOT)
    from pipeline_dummy import dummy_folder

    folder = dummy_folder()
    rounds = time_alternating(args)
    memory = {impl: _child(impl, args, folder) for impl in ("ours", "diffusers")}
    print(f"tiny SD pipeline (get_dummy_components), {args.steps} steps, guidance 7.5, 1 prompt, 64x64, "
          f"{args.threads} thread(s), scheduler {args.scheduler or 'DDIMScheduler'}, {args.rounds} rounds")
    print(f"{'':10s} {'ms/step (median of rounds)':>27s} {'rounds':>30s} {'peak RSS MB':>12s}  RSS after step 1 -> "
          f"{args.steps} (spread over steps 2..{args.steps}), MB")
    for impl in ("ours", "diffusers"):
        per_round = " ".join(f"{x:.1f}" for x in rounds[impl])
        print(f"{impl:10s} {statistics.median(rounds[impl]):27.1f} {per_round:>30s} {memory[impl]['hwm_mb']:12.1f}  "
              f"{_flat(memory[impl]['rss_mb'])}")
    ours = memory["ours"]
    print(f"npdiffusion traced heap after step 1 -> {args.steps} (MB): {_flat(ours['traced_mb'])}; peak during "
          f"the generation {ours['peak_traced_mb']:.2f}")
    ratios = [a / b for a, b in zip(rounds["ours"], rounds["diffusers"])]
    print(f"time per step, npdiffusion / diffusers: median {statistics.median(ratios):.2f} "
          f"(rounds: {' '.join(f'{r:.2f}' for r in ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
