"""The VAE's ceiling on the shapes: reconstruct held-out images and read them with the attribute checker.

    python tools/vae_ceiling.py demo-out/model            # a model folder with vae/ (or a VAE folder)
    python tools/vae_ceiling.py demo-out/runs/vae --images 400 --seed 123

Shapes (32x32 RGB, drawn from ``--seed``, which the demo's training data (seed 0) does not use) are
encoded to the posterior mean, decoded, and scored against their captions by
npdiffusion.evaluation.shape_attributes: colour, shape, position and all three. No diffusion model
can do better than this on these latents. The real images score 100% (printed first, as a check).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from npdiffusion.backend import asarray, to_numpy  # noqa: E402
from npdiffusion.data.shapes import make_shapes  # noqa: E402
from npdiffusion.evaluation.shape_attributes import score  # noqa: E402
from npdiffusion.models.vae.autoencoder_kl import AutoencoderKL  # noqa: E402


def reconstruct(vae, images, batch: int = 50) -> np.ndarray:
    """uint8 (N, S, S, 3) -> their reconstructions through the posterior mean, uint8 (N, S, S, 3)."""
    x = images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
    # each batch to the backend's device and back (on CuPy the model runs on the GPU)
    out = [to_numpy(vae.decode(vae.encode(asarray(x[i:i + batch])).mean)) for i in range(0, len(x), batch)]
    rec = np.clip(np.concatenate(out), -1.0, 1.0)
    return ((rec + 1.0) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="a model folder with vae/, or a VAE folder")
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--seed", type=int, default=123, help="shapes seed (the demo trains on seed 0)")
    args = ap.parse_args(argv)
    sub = "vae" if os.path.isdir(os.path.join(args.folder, "vae")) else None
    if not os.path.isfile(os.path.join(args.folder, sub or "", "config.json")):
        print(f"vae_ceiling: no VAE in {args.folder} (expected config.json there or in vae/)", file=sys.stderr)
        return 2
    vae = AutoencoderKL.from_pretrained(args.folder, subfolder=sub).eval()
    data = make_shapes(args.images, seed=args.seed)
    print("real images:     ", score(data.images, data.captions).summary())
    print("reconstructions: ", score(reconstruct(vae, data.images), data.captions).summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
