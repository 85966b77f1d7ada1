"""The U-Net stage's one-off encoding of its training images (frozen VAE), one process against N MPI ranks.

    python tools/bench_encode_ranks.py --images 10000
    python tools/bench_encode_ranks.py --images 2000 --processes 1 2

Before its first step the U-Net stage runs every training image through the frozen VAE
(``UNetStage.encode_images``, in batches of ``ENCODE_BATCH``); under ``mpiexec -n N`` the batches are
dealt out over the ranks and the posteriors all-gathered (npdiffusion/distributed/chunks.py). For
each N this starts ``mpiexec -n N python tools/bench_encode_ranks.py --worker`` (N = 1 without
mpiexec), which draws the demo's shapes dataset (32x32 images, seed 0) and times the encoding of
``--images`` images by a VAE of the demo's architecture (block_out_channels (16, 32, 32), 8 latent
channels, 8 groups, no mid-block attention; random weights: the cost does not depend on them), one
thread per rank. Prints wall seconds per N and the speed-up over the first N. Timings only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_distributed import run_ranks  # noqa: E402 - the same launcher and thread settings


def worker(images: int) -> None:
    import numpy as np  # noqa: PLC0415

    from npdiffusion.distributed import get_communicator  # noqa: PLC0415
    from npdiffusion.models.vae.autoencoder_kl import AutoencoderKL  # noqa: PLC0415
    from npdiffusion.training.config import DataConfig  # noqa: PLC0415
    from npdiffusion.training.stages import dataset_from_config  # noqa: PLC0415
    from npdiffusion.training.unet_stage import UNetStage  # noqa: PLC0415

    comm = get_communicator()
    dataset = dataset_from_config(DataConfig(num_images=images, resolution=32, seed=0))
    stage = UNetStage.__new__(UNetStage)                 # encode_images alone, without the model folders
    stage.dtype = np.dtype("float32")
    stage.vae = AutoencoderKL(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                              up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=8, norm_num_groups=8,
                              mid_block_add_attention=False).eval()
    comm.barrier()
    t0 = time.perf_counter()
    mean, _ = stage.encode_images(dataset)
    seconds = time.perf_counter() - t0
    if comm.is_root:
        print(json.dumps({"processes": comm.size, "seconds": seconds, "rows": int(mean.shape[0])}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.images)
        return 0
    print(f"U-Net stage: encoding {args.images} 32x32 images through the demo's VAE, one thread per rank")
    base = None
    for n in args.processes:
        r = run_ranks(n, [sys.executable, os.path.abspath(__file__), "--worker", "--images", str(args.images)])
        base = base or r["seconds"]
        print(f"  {n} rank(s): {r['seconds']:.1f} s, x{base / r['seconds']:.2f} over {args.processes[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
