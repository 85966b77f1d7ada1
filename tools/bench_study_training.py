"""Time the pieces of tools/study_training.py at the demo's size, for its estimate in docs/studies.md.

    OPENBLAS_NUM_THREADS=1 NPDIFFUSION_NUM_THREADS=1 python tools/bench_study_training.py --out-dir demo-out

Shapes: latents (B, 8, 8, 8) (B = the demo's U-Net batch, 32); held-out latents (M, 8, 8, 8), M = 32;
images (N, 32, 32, 3).

Needs only the demo's trained VAE and CLIP (``--out-dir``/runs/vae/vae, runs/clip/text_encoder and
runs/clip/tokenizer: they exist once the demo's U-Net stage has started) and builds the demo's U-Net
stage (``stage_configs``: the demo's architecture, batch, optimizer, EMA) on --images training images
(the encoding cost per image is timed and scaled to the demo's data size). It times, after one
warm-up each, with one BLAS thread (as the study runs):

* a U-Net training step (the Trainer's: zero_grad, ``train_step``, gradient clipping, AdamW, EMA);
* the stage's one-off VAE encoding of the training images, per image;
* a U-Net forward at batch M (the bound makes T = 1000 of them per variant);
* a guided DPM-Solver++ sample of --sample-steps steps, per image (the accuracy makes P S of them).

It prints each piece and the study's estimated minutes per variant. The weights are untrained: time
does not depend on them.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import study_common as sc  # noqa: E402


def best_of(fn, repeats: int) -> float:
    fn()                                                    # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(numpy.median(times))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default="demo-out", help="the demo's --out folder (default demo-out)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps (median; default 5)")
    p.add_argument("--images", type=int, default=128, help="training images encoded for the timing (default 128)")
    p.add_argument("--sample-steps", type=int, default=sc.EVAL_STEPS)
    args = p.parse_args(argv)

    from npdiffusion.nn.module import no_cache
    from npdiffusion.optim.adamw import AdamW
    from npdiffusion.optim.clip_grad import clip_grad_norm_
    from npdiffusion.optim.ema import EMA
    from npdiffusion.random import manual_seed
    from npdiffusion.training.demo import SETTINGS, limit_blas_threads, stage_configs
    from npdiffusion.training.loop import trainer_rng
    from npdiffusion.training.stages import dataset_from_config
    from npdiffusion.training.unet_stage import build_stage

    limit_blas_threads(1)
    cfg = stage_configs(args.out_dir)["unet"]
    full_images = cfg.data.num_images
    cfg.data.num_images = args.images
    dataset = dataset_from_config(cfg.data)
    manual_seed(0)
    t0 = time.perf_counter()
    stage = build_stage(cfg, dataset)
    encode = (time.perf_counter() - t0) / args.images
    tc = cfg.train
    opt = AdamW(stage.unet, lr=tc.learning_rate, betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_epsilon,
                weight_decay=tc.adam_weight_decay)
    ema = EMA(stage.unet, decay=tc.ema_decay)
    rng = trainer_rng(0)
    from npdiffusion.data.loader import DataLoader

    loader = DataLoader(dataset, tc.batch_size, seed=0, prefetch=0, collate=stage.collate)

    def step():
        batch = next(loader)
        stage.unet.zero_grad()
        stage.train_step(batch, rng)
        clip_grad_norm_(stage.unet, tc.max_grad_norm)
        opt.step()
        ema.update()

    train = best_of(step, args.steps)
    loader.close()
    stage.unet.eval()
    m = 32
    x = numpy.random.default_rng(0).standard_normal((m, 8, 8, 8)).astype(numpy.float32)
    ctx = stage.context[numpy.arange(m) % len(stage.context)]
    with no_cache():
        fwd = best_of(lambda: stage.unet(x, numpy.full((m,), 500), ctx), 3)
    pipe = stage.pipeline()
    prompts = sc.random_prompts(4)
    n = len(prompts) * 2
    sample = best_of(lambda: sc.generate(pipe, prompts, [0, 1], sc.GUIDANCE_SCALE, args.sample_steps), 1) / n
    steps = SETTINGS["unet"]["train"]["steps"]
    per_variant = (steps * train + full_images * encode + 1000 * fwd + sc.EVAL_PROMPTS * sc.EVAL_SEEDS * sample)
    print(f"U-Net training step (batch {tc.batch_size}): {train * 1000:.0f} ms -> {steps} steps "
          f"{steps * train / 60:.1f} min")
    print(f"VAE encoding of the training images: {encode * 1000:.2f} ms/image -> {full_images} images "
          f"{full_images * encode:.0f} s")
    print(f"U-Net forward, batch {m}: {fwd * 1000:.0f} ms -> the bound (T = 1000) {1000 * fwd / 60:.1f} min")
    print(f"guided sample, {args.sample_steps} steps: {sample:.3f} s/image -> {sc.EVAL_PROMPTS * sc.EVAL_SEEDS} "
          f"images {sc.EVAL_PROMPTS * sc.EVAL_SEEDS * sample / 60:.1f} min")
    print(f"per variant: {per_variant / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
