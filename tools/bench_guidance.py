"""Time the gradient of one guided sampling step: CLIP guidance through a VAE, and classifier guidance.

    python tools/bench_guidance.py                 # median CPU seconds of each gradient call
    python tools/bench_guidance.py --repeats 15

A guided step adds to the U-Net's prediction the gradient of a guidance score with respect to the
latents: ``clip_similarity_grad`` (VAE decode -> CLIP image tower -> cosine with a text embedding,
then the backward of all of it) or ``log_prob_grad`` (a noise-aware classifier's log p(y | x_t)).
Only the input gradient is used, so this is what the frozen-parameter mode of the module protocol
(``requires_grad_(False)``: no weight-gradient products) speeds up. Models: a VAE with
block_out_channels (64, 128), 64x64 images (32x32 latents, 4 channels), a CLIP vision tower of
4 layers, width 256, 64x64 input in 8x8 patches, a classifier with block_out_channels (64, 128) at
32x32; batch 4, float32, random weights. Reports the median of process CPU time (robust on a shared
machine; one BLAS thread recommended: OMP_NUM_THREADS=1). Results: docs/benchmarks.md ("Guidance").
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from npdiffusion.backend import asarray  # noqa: E402
from npdiffusion.guidance.classifier import NoiseAwareClassifier, log_prob_grad  # noqa: E402
from npdiffusion.guidance.clip_guidance import clip_similarity_grad  # noqa: E402
from npdiffusion.models.clip.clip_model import CLIPModel  # noqa: E402
from npdiffusion.models.clip.config import CLIPConfig  # noqa: E402
from npdiffusion.models.vae.autoencoder_kl import AutoencoderKL  # noqa: E402

BATCH = 4


def _models():
    vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        block_out_channels=[64, 128], norm_num_groups=32, latent_channels=4, sample_size=64).eval()
    clip = CLIPModel(CLIPConfig.from_dict(dict(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=64, max_position_embeddings=8),
        vision_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                           image_size=64, patch_size=8),
        projection_dim=64))).eval()
    classifier = NoiseAwareClassifier(4, 10, (64, 128), 1, 32).eval()
    return vae, clip, classifier


def _median_cpu_seconds(fn, repeats: int) -> float:
    fn()                                                   # warm-up (workspaces, BLAS)
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    vae, clip, classifier = _models()
    latents = asarray(rng.standard_normal((BATCH, 4, 32, 32)).astype(np.float32))
    text = rng.standard_normal((1, 64)).astype(np.float32)
    text = asarray(text / np.linalg.norm(text))
    t = np.full((BATCH,), 500)
    y = np.arange(BATCH) % 10
    clip_s = _median_cpu_seconds(lambda: clip_similarity_grad(clip, text, latents, vae=vae), args.repeats)
    cls_s = _median_cpu_seconds(lambda: log_prob_grad(classifier, latents, t, y), args.repeats)
    print(f"clip_similarity_grad (VAE decode + CLIP vision, batch {BATCH}): {clip_s:.3f} s CPU")
    print(f"log_prob_grad (classifier, batch {BATCH}):                       {cls_s:.3f} s CPU")


if __name__ == "__main__":
    main()
