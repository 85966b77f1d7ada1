"""Inpainting on the demo's world: repaint a shape as another colour or another shape, and measure it.

Shapes: N test images of side S = 32 (seed 12345, not the training seed), uint8 (N, S, S, 3).

For each test image, the mask is the square of half-side ceil(r) + 3 pixels around the shape's centre
(r its radius), clipped to the image: the whole shape and a margin of background. The prompt asks for
the same position and either another colour (even images) or another shape (odd images), e.g.
"a red circle in the top left" -> "a blue circle in the top left". Each method repaints the masked
square under that prompt (DDPM, --steps steps, guidance --guidance, the same torch seed per image):

* ``inpainting U-Net``: the 9-channel model of ``[unet] inpainting = true`` (--inpaint-model);
* ``masked sampling``: the ordinary demo model (--model), the known region put back at every step;
* ``masked sampling + RePaint``: the same with jump_length --jump-length, jump_n_sample --jump-n-sample.

Reported per method: how often the shape checker (npdiffusion.evaluation.shape_attributes) reads the
prompt's changed attribute and all three attributes in the result; the PSNR of the unmasked pixels
against the original (10 log10(1 / MSE), pixels in [0, 1]); and the wall seconds taken. The VAE's own
reconstruction (decode of the posterior mean) on the same pixels is given for reference: what a
method that decodes the original's latents unchanged would keep.
``--strip FILE`` writes the first examples as a labelled picture strip (docs/images/inpainting.png).

    python tools/bench_inpaint.py --model /tmp/demo/model --inpaint-model /tmp/unet9/model \\
        --num 200 --strip docs/images/inpainting.png
"""
from __future__ import annotations

import argparse
import time

import numpy

from npdiffusion.data.shapes import COLOR_NAMES, POSITION_NAMES, SHAPES, caption, draw_params, render
from npdiffusion.evaluation.shape_attributes import score
from npdiffusion.pipelines.image_utils import image_grid, numpy_to_pil
from npdiffusion.pipelines.inpaint import StableDiffusionInpaintPipeline
from npdiffusion.training.demo.evaluation import eval_scheduler

SEED = 12345
MARGIN = 3


def test_set(num: int, size: int = 32):
    """(images uint8 (N, S, S, 3), masks float32 (N, S, S) of 0/1, target prompts, changed attribute)."""
    params = draw_params(num, seed=SEED, size=size)
    images = render(params, size)
    half = numpy.ceil(params.radius)[:, None, None] + MARGIN                    # (N, 1, 1)
    coords = numpy.arange(size) + 0.5
    dy = numpy.abs(coords[None, :, None] - params.center[:, 0, None, None])      # (N, S, 1)
    dx = numpy.abs(coords[None, None, :] - params.center[:, 1, None, None])      # (N, 1, S)
    masks = ((dy <= half) & (dx <= half)).astype(numpy.float32)
    prompts, changed = [], []
    shift = numpy.random.default_rng(SEED + 1).integers(1, 100, num)
    for i in range(num):
        color, shape = params.color[i], params.shape[i]
        if i % 2 == 0:
            color = (color + 1 + shift[i] % (len(COLOR_NAMES) - 1)) % len(COLOR_NAMES)
        else:
            shape = (shape + 1 + shift[i] % (len(SHAPES) - 1)) % len(SHAPES)
        prompts.append(caption(COLOR_NAMES[color], SHAPES[shape], POSITION_NAMES[params.position[i]]))
        changed.append("color" if i % 2 == 0 else "shape")
    return images, masks, prompts, numpy.asarray(changed)


def psnr_outside(results, images, masks) -> float:
    """Mean over images of 10 log10(1 / MSE) on the unmasked pixels, values in [0, 1]."""
    a = results.astype(numpy.float64) / 255
    b = images.astype(numpy.float64) / 255
    keep = (masks == 0)[..., None]
    mse = (((a - b) ** 2) * keep).sum(axis=(1, 2, 3)) / (keep.sum(axis=(1, 2, 3)) * 3)
    return float(numpy.mean(10 * numpy.log10(1.0 / numpy.maximum(mse, 1e-12))))


def run_method(pipe, images, masks, prompts, args, batch: int = 50, **extra):
    out = []
    for s in range(0, len(prompts), batch):
        sl = slice(s, s + batch)
        res = pipe(prompts[sl], image=numpy_to_pil(images[sl].astype(numpy.float32) / 255),
                   mask_image=masks[sl], num_inference_steps=args.steps, guidance_scale=args.guidance,
                   seed=list(range(s, s + len(prompts[sl]))), noise="torch", output_type="np", progress=False,
                   **extra).images
        out.append((res * 255).round().astype(numpy.uint8))
    return numpy.concatenate(out)


def vae_reference(pipe, images, masks) -> float:
    """PSNR (unmasked pixels) of decode(mean of encode(image)): the VAE's own loss, for reference."""
    from npdiffusion.backend import asarray, to_numpy
    from npdiffusion.nn.module import no_cache

    x = asarray(images.astype(numpy.float32).transpose(0, 3, 1, 2) / 127.5 - 1)
    with no_cache():
        rec = to_numpy(pipe.vae.decode(pipe.vae.encode(x).mean))
    rec = ((rec.transpose(0, 2, 3, 1) / 2 + 0.5).clip(0, 1) * 255).round().astype(numpy.uint8)
    return psnr_outside(rec, images, masks)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the ordinary demo pipeline folder (4-channel U-Net)")
    p.add_argument("--inpaint-model", default=None, help="the 9-channel pipeline folder ([unet] inpainting = true)")
    p.add_argument("--num", type=int, default=200)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--jump-length", type=int, default=5)
    p.add_argument("--jump-n-sample", type=int, default=3)
    p.add_argument("--methods", default="inpaint,masked,repaint",
                   help="which to run, of inpaint (needs --inpaint-model), masked, repaint")
    p.add_argument("--strip", default=None, help="write the first examples as a labelled PNG strip here")
    p.add_argument("--strip-count", type=int, default=6)
    args = p.parse_args()

    images, masks, prompts, changed = test_set(args.num)
    methods = []
    if args.inpaint_model and "inpaint" in args.methods:
        methods.append(("inpainting U-Net", args.inpaint_model, {}))
    if "masked" in args.methods:
        methods.append(("masked sampling", args.model, {}))
    if "repaint" in args.methods:
        methods.append((f"masked sampling + RePaint (j={args.jump_length}, r={args.jump_n_sample})", args.model,
                        dict(jump_length=args.jump_length, jump_n_sample=args.jump_n_sample)))
    rows, results = [], {}
    for name, folder, extra in methods:
        pipe = StableDiffusionInpaintPipeline.from_pretrained(folder)
        pipe.scheduler = eval_scheduler(pipe.scheduler.config)          # the demo report's DDPM
        start = time.perf_counter()
        res = run_method(pipe, images, masks, prompts, args, **extra)
        seconds = time.perf_counter() - start
        sc = score(res, prompts)
        follows = numpy.where(changed == "color", sc.correct["color"], sc.correct["shape"]).mean()
        rows.append((name, follows, sc.joint, psnr_outside(res, images, masks), seconds))
        results[name] = res
    reference = vae_reference(pipe, images, masks)
    print(f"{args.num} test shapes (seed {SEED}), {args.steps} DDPM steps, guidance {args.guidance}, "
          f"torch seeds 0..{args.num - 1}\n")
    print("| method | changed attribute as prompted | all three attributes | PSNR outside the mask (dB) | seconds |")
    print("|---|---|---|---|---|")
    for name, follows, joint, psnr, seconds in rows:
        print(f"| {name} | {100 * follows:.1f}% | {100 * joint:.1f}% | {psnr:.1f} | {seconds:.0f} |")
    print(f"| (VAE reconstruction of the original, for reference) | | | {reference:.1f} | |")
    if args.strip:
        k = min(args.strip_count, args.num)
        tiles, labels = [], []
        for i in range(k):
            mask_rgb = numpy.repeat(masks[i][..., None], 3, axis=-1)
            tiles += numpy_to_pil(images[i] / 255) + numpy_to_pil(mask_rgb)
            labels += ["original", f"mask; prompt: {prompts[i]}"]
            for name in results:
                tiles += numpy_to_pil(results[name][i] / 255)
                labels.append(name)
        grid = image_grid(tiles, labels, cols=2 + len(results), min_tile=128, font_size=12)
        grid.save(args.strip)
        print(f"\nwrote {args.strip}")


if __name__ == "__main__":
    main()
