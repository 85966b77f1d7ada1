"""The LoRA lesson: teach the demo's model a shape it never saw (a bar), rank 4 on the U-Net's attention.

    python tools/lora_lesson.py --model DEMO_OUT/model --out /tmp/lora-lesson
    python tools/lora_lesson.py --model DEMO_OUT/model --out DIR --steps 700 --shapes bar circle square triangle
    python tools/lora_lesson.py --model DEMO_OUT/model --out DIR --new-shape cross --shapes cross circle square triangle

Shapes: images uint8 (N, 32, 32, 3); prompts "a {color} {shape} in the {position}".

Results and what they taught: docs/benchmarks.md ("LoRA"; why the new shape is the bar, not the cross).

0. The VAE's ceiling on the new shape: ``--ceiling-images`` rendered ones (seed 77) through the model's
   frozen VAE (posterior mean) and read: no U-Net can draw the shape more often than this.
1. Train (``npdiffusion train lora``'s stage): adapters of rank ``--rank`` on to_q, to_k, to_v, to_out.0
   of the demo's U-Net (everything else frozen) on ``--num-images`` shapes drawn from ``--shapes``
   (default: the new shape alone), ``--steps`` steps of batch ``--batch``. Wall and CPU time are printed.
2. Evaluate as the demo's report does (guidance 2, 25 DDPM steps, one NumPy seed per image), reading
   every sample with the shape reader over the demo's three shapes and the new one
   (``score(..., shapes=SHAPES + (new,))``):
   * new prompts: ``--new-prompts`` random "a {color} {new} in the {position}" x ``--seeds`` seeds:
     how often the sample is the new shape (shape accuracy), and all three attributes right;
   * old prompts: the demo report's 50 random prompts x 4 seeds, with the base model and with the
     LoRA: each attribute's accuracy and all three, and the change in points.
The numbers go to docs/benchmarks.md ("LoRA"). The machine is shared: read CPU time.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def new_prompts(n: int, new_shape: str, seed: int = 4321) -> list[str]:
    from npdiffusion.data.shapes import COLOR_NAMES, POSITION_NAMES, caption

    rng = np.random.default_rng(seed)
    return [caption(COLOR_NAMES[rng.integers(len(COLOR_NAMES))], new_shape,
                    POSITION_NAMES[rng.integers(len(POSITION_NAMES))]) for _ in range(n)]


def scores(pipe, prompts, seeds, shapes):
    from npdiffusion.evaluation.shape_attributes import score
    from npdiffusion.training.demo import EVAL_STEPS, GUIDANCE_SCALE, generate

    flat = [p for p in prompts for _ in seeds]
    return score(generate(pipe, prompts, seeds, GUIDANCE_SCALE, EVAL_STEPS), flat, shapes=shapes)


def vae_ceiling(model: str, new_shape: str, shapes, n: int):
    """The new shape's ``n`` rendered images (seed 77) through the model's VAE and back, scored with the reader
    over ``shapes``: a ShapeScore (its ``shape`` = how often the round trip still reads as the new shape)."""
    from npdiffusion.data.shapes import make_shapes
    from npdiffusion.evaluation.shape_attributes import score
    from npdiffusion.models.vae.autoencoder_kl import AutoencoderKL
    from tools.vae_ceiling import reconstruct

    data = make_shapes(n, seed=77, shapes=(new_shape,))
    vae = AutoencoderKL.from_pretrained(os.path.join(model, "vae")).eval()
    return score(reconstruct(vae, data.images), data.captions, shapes=shapes)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True,
                        help="the demo's model folder (npdiffusion demo --out DIR: DIR/model)")
    parser.add_argument("--out", required=True, help="output folder of the LoRA run (must not hold checkpoints)")
    parser.add_argument("--new-shape", default="bar", choices=("bar", "cross"), help="the shape to teach (default: bar)")
    parser.add_argument("--shapes", nargs="+", default=None, help="shapes of the training data (default: the new "
                        "shape alone; a name given twice is drawn twice as often)")
    parser.add_argument("--ceiling-images", type=int, default=300, help="rendered new shapes for the VAE's ceiling")
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--targets", nargs="+", default=None, help="U-Net layers to adapt (default: to_q to_k "
                        "to_v to_out.0)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-scheduler", default="constant", help="constant or cosine (diffusers' names)")
    parser.add_argument("--snr-gamma", type=float, default=0.0, help="Min-SNR-gamma weighting (the demo's U-Net: 5)")
    parser.add_argument("--ema-decay", type=float, default=0.0, help="export an EMA of the adapters (0: off)")
    parser.add_argument("--caption-dropout", type=float, default=0.0,
                        help="share of steps on the empty caption (the demo's U-Net: 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (adapters' init, batches, noise)")
    parser.add_argument("--new-prompts", type=int, default=25)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--old-prompts", type=int, default=None, help="old prompts (default: the demo report's 50)")
    args = parser.parse_args(argv)

    from npdiffusion import parallel
    from npdiffusion.lora import load_lora
    from npdiffusion.pipelines.stable_diffusion import StableDiffusionPipeline
    from npdiffusion.training import lora_stage
    from npdiffusion.training.config import DataConfig, TrainConfig
    from npdiffusion.data.shapes import SHAPES
    from npdiffusion.training.demo import EVAL_PROMPTS, EVAL_SEEDS, eval_scheduler, random_prompts
    from npdiffusion.training.demo.run import limit_blas_threads

    limit_blas_threads(1)
    parallel.set_num_threads(1)
    shapes = SHAPES + (args.new_shape,)                  # what the reader may answer
    train_shapes = tuple(args.shapes or (args.new_shape,))
    ceiling = vae_ceiling(args.model, args.new_shape, shapes, args.ceiling_images)
    print(f"VAE ceiling ({args.ceiling_images} rendered {args.new_shape}s through the model's VAE, read over {shapes}): "
          f"{args.new_shape} {100 * ceiling.shape:.1f}%, all three {100 * ceiling.joint:.1f}%")
    config = lora_stage.CONFIG(
        output_dir=args.out,
        data=DataConfig(num_images=args.num_images, resolution=32, seed=7, shapes=train_shapes),
        train=TrainConfig(steps=args.steps, batch_size=args.batch, learning_rate=args.lr,
                          lr_scheduler=args.lr_scheduler, use_ema=args.ema_decay > 0,
                          ema_decay=args.ema_decay or 0.9999,
                          checkpointing_steps=args.steps, checkpoints_total_limit=1, seed=args.seed),
        lora=lora_stage.LoraOptions(model=args.model, rank=args.rank, snr_gamma=args.snr_gamma,
                                    caption_dropout=args.caption_dropout,
                                    **({"unet_targets": tuple(args.targets)} if args.targets else {})))
    wall, cpu = time.perf_counter(), time.process_time()
    print(lora_stage.train(config, progress=False, log=print))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"training: {wall:.1f} s wall, {cpu:.1f} s CPU (data {args.num_images} images of {train_shapes}, "
          f"{args.steps} steps x {args.batch}, rank {args.rank}, lr {args.lr:g})")

    def pipeline(with_lora: bool):
        pipe = StableDiffusionPipeline.from_pretrained(args.model)
        pipe.scheduler = eval_scheduler(pipe.scheduler.config)
        if with_lora:
            load_lora(os.path.join(args.out, "pytorch_lora_weights.safetensors"),
                      {"unet": pipe.unet, "text_encoder": pipe.text_encoder})
        return pipe

    old, seeds = random_prompts(args.old_prompts or EVAL_PROMPTS), list(range(EVAL_SEEDS))
    new = new_prompts(args.new_prompts, args.new_shape)
    results = {}
    for name, with_lora in (("base", False), ("lora", True)):
        pipe = pipeline(with_lora)
        results[name] = {"new": scores(pipe, new, list(range(args.seeds)), shapes),
                         "old": scores(pipe, old, seeds, shapes)}
    print(f"\nnew prompts ({len(new)} x {args.seeds} seeds; shape = drew a {args.new_shape}):")
    for name in results:
        print(f"  {name}: {results[name]['new'].summary()}")
    print(f"old prompts (the demo report's {len(old)} x {len(seeds)}):")
    for name in results:
        print(f"  {name}: {results[name]['old'].summary()}")
    for attr in ("color", "shape", "position", "joint"):
        delta = 100 * (getattr(results["lora"]["old"], attr) - getattr(results["base"]["old"], attr))
        print(f"  change of old {attr}: {delta:+.1f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
