"""U-Net stage steps per second at the demo's size, N MPI ranks against one process.

    python tools/bench_distributed.py                        # 1 and 2 ranks, 40 timed steps each
    python tools/bench_distributed.py --processes 1 2 4 --steps 60

For each N it starts ``mpiexec -n N python tools/bench_distributed.py --worker`` (N = 1 runs without
mpiexec, so it is the plain single-process path). A worker builds the real ``UNetStage.train_step``
and ``Trainer`` on the demo's U-Net (block_out_channels (32, 64), 8 latent channels of 8x8, batch 32,
16 tokens of width 64, snr_gamma 5, caption dropout 0.1, EMA) with random latents and captions in
place of the frozen VAE and text encoder (their outputs are cached before training anyway), runs
``--warmup`` steps, then times ``--steps`` steps of the global batch of 32. Printed per N: steps per
second, the speed-up over N = 1, and the share of a step spent in the gradient all-reduce
(``Communicator.average_gradients``, which includes waiting for the slower rank).

Each rank runs one BLAS / npdiffusion thread (NPDIFFUSION_NUM_THREADS=1, OMP/OPENBLAS_NUM_THREADS=1)
so that N ranks on N cores do not oversubscribe them; N = 1 also runs with one thread, i.e. this
measures what a second *process* buys over one single-threaded process. Timings only, nothing is
checked; on a shared machine they drift by tens of percent. Docs: docs/distributed.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

THREAD_ENV = {"NPDIFFUSION_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "MKL_NUM_THREADS": "1"}


class _Captions:
    """A dataset stub: captions only (the U-Net stage's collate needs no pixels)."""

    def __init__(self, n, k):
        self.captions = [f"caption {i % k}" for i in range(n)]

    def __len__(self):
        return len(self.captions)

    def get_images(self, idx):
        return None


def build_trainer(out, batch_size=32, num_images=2048, dtype="float32"):
    from npdiffusion.models.unet.unet_2d_condition import UNet2DConditionModel
    from npdiffusion.random import manual_seed
    from npdiffusion.training.config import TrainConfig
    from npdiffusion.training.loop import Trainer
    from npdiffusion.training.unet_stage import UNetOptions, UNetStage, training_alphas_cumprod

    opts = UNetOptions(block_out_channels=(32, 64), snr_gamma=5.0, caption_dropout=0.1)
    manual_seed(0)
    stage = UNetStage.__new__(UNetStage)                 # the real train_step, without the frozen models' folders
    stage.dtype = np.dtype(dtype)
    stage.opts = opts
    stage.unet = UNet2DConditionModel(
        sample_size=8, in_channels=8, out_channels=8, block_out_channels=opts.block_out_channels,
        layers_per_block=opts.layers_per_block, down_block_types=opts.down_block_types,
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
        attention_head_dim=opts.attention_head_dim, norm_num_groups=opts.norm_num_groups)
    stage.unet.to(dtype).train()
    stage.module = stage.unet
    stage.alphas_cumprod = training_alphas_cumprod(opts)
    stage.scaling_factor = 1.0
    rng = np.random.default_rng(0)
    stage.latent_mean = rng.standard_normal((num_images, 8, 8, 8)).astype(dtype)
    stage.latent_std = np.full((num_images, 8, 8, 8), 0.1, dtype=dtype)
    dataset = _Captions(num_images, 100)
    stage.caption_index = {c: i + 1 for i, c in enumerate(sorted(set(dataset.captions)))}
    stage.context = rng.standard_normal((101, 16, 64)).astype(dtype)
    config = TrainConfig(steps=10 ** 6, batch_size=batch_size, learning_rate=2e-3, use_ema=True, ema_decay=0.999,
                         checkpointing_steps=10 ** 6, dtype=dtype, seed=0)
    return Trainer(stage, dataset, config, out, progress=False, log=lambda *a: None)


def worker(warmup: int, steps: int) -> None:
    trainer = build_trainer(tempfile.mkdtemp(prefix="bench-distributed-"))
    comm = trainer.comm
    spent = [0.0]
    average = comm.average_gradients

    def timed(module, metrics):
        t0 = time.perf_counter()
        out = average(module, metrics)
        spent[0] += time.perf_counter() - t0
        return out

    comm.average_gradients = timed
    for _ in range(warmup):
        trainer._one_step()
    comm.barrier()
    spent[0] = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer._one_step()
    seconds = time.perf_counter() - t0
    trainer.loader.close()
    if comm.is_root:
        print(json.dumps({"processes": comm.size, "steps_per_second": steps / seconds,
                          "allreduce_share": spent[0] / seconds}))


def run_ranks(n: int, cmd: list) -> dict:
    """``cmd`` under ``mpiexec -n n`` (n = 1: as it is) with one thread per rank; the JSON of its last line."""
    if n > 1:
        mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
        cmd = [mpiexec if os.path.isfile(mpiexec) else "mpiexec", "-n", str(n)] + cmd
    done = subprocess.run(cmd, env={**os.environ, **THREAD_ENV}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(n: int, warmup: int, steps: int) -> dict:
    script = os.path.abspath(__file__)
    return run_ranks(n, [sys.executable, script, "--worker", "--warmup", str(warmup), "--steps", str(steps)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.warmup, args.steps)
        return 0
    print(f"U-Net stage at the demo's size (batch 32, 8x8x8 latents), {args.steps} timed steps, one thread per rank")
    base = None
    for n in args.processes:
        r = run(n, args.warmup, args.steps)
        base = base or r["steps_per_second"]
        print(f"  {n} rank(s): {r['steps_per_second']:.2f} steps/s, x{r['steps_per_second'] / base:.2f} over "
              f"{args.processes[0]}, all-reduce {100 * r['allreduce_share']:.1f}% of a step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
