"""Full-size Stable Diffusion 1.5 U-Net with random weights: our forward against diffusers'.

    python tools/check_sd15_unet.py                 # 64x64 latents, batch 2, float32
    python tools/check_sd15_unet.py --chunk 1024    # attention in query chunks of 1024 rows

The config is SD 1.5's (block_out_channels 320/640/1280/1280, layers_per_block 2,
attention_head_dim 8, cross_attention_dim 768, norm_num_groups 32; 860 M parameters). diffusers
builds the model with its own initialization (torch.manual_seed(0)), the weights are copied into
ours, both run one forward in inference mode on the same latents (64x64x4, batch 2), timestep
and context (77 tokens of 768), and the script prints each side's time, our peak memory (NumPy
allocations traced by tracemalloc, and the process's peak resident size) and the relative error
max|ours - theirs| / max|theirs|, which must be <= 1e-4 (float32). It takes minutes and about
10 GB of memory; it is not part of the test suite. Results: docs/benchmarks.md ("U-Net").
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
    use_linear_projection=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=64, help="latent side (64 = 512x512 images)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--timestep", type=int, default=500)
    p.add_argument("--chunk", type=int, default=None, help="our attention query-chunk size (default: none)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--rtol", type=float, default=1e-4)
    args = p.parse_args(argv)

    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    from npdiffusion.models.unet import UNet2DConditionModel
    from npdiffusion.testing import relative_error

    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((args.batch, 4, args.size, args.size)).astype(np.float32)
    ctx = rng.standard_normal((args.batch, 77, 768)).astype(np.float32)
    t = np.full(args.batch, args.timestep)

    torch.manual_seed(0)
    theirs = TorchUNet(**SD15_UNET).eval()
    n_params = sum(p.numel() for p in theirs.parameters())
    print(f"SD 1.5 U-Net: {n_params / 1e6:.0f} M parameters; latents {args.batch}x4x{args.size}x{args.size}, "
          f"context {args.batch}x77x768, timestep {args.timestep}, float32")
    with torch.no_grad():
        t0 = time.perf_counter()
        expected = theirs(torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
        torch_time = time.perf_counter() - t0
    print(f"  diffusers forward: {torch_time:7.1f} s ({torch.get_num_threads()} threads)")

    ours = UNet2DConditionModel(**SD15_UNET).eval()
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    del theirs
    gc.collect()
    if args.chunk:
        ours.set_attention_chunk_size(args.chunk)
    tracemalloc.start()
    t0 = time.perf_counter()
    y = ours(sample, t, ctx)
    our_time = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    err = relative_error(y, expected)
    print(f"  npdiffusion forward: {our_time:7.1f} s, peak of NumPy allocations during the forward "
          f"{peak / 2**30:.2f} GiB (parameters, {ours.num_parameters() * 4 / 2**30:.2f} GiB, excluded); "
          f"process peak RSS (both models included) {rss:.1f} GiB"
          + (f"; attention chunk {args.chunk}" if args.chunk else ""))
    ok = err <= args.rtol
    print(f"  relative error max|ours - diffusers| / max|diffusers| = {err:.2e} "
          f"({'OK' if ok else 'FAILED'}, tolerance {args.rtol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
