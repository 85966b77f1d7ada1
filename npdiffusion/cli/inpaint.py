"""``npdiffusion inpaint --model DIR --image IMG --mask MASK --prompt TEXT --out FOLDER``: repaint a region.

Reads ``--image`` (RGB) and ``--mask`` (white = repaint; any mode, read as grayscale and binarised at
0.5 after an optional ``--mask-blur``), and runs ``StableDiffusionInpaintPipeline`` (diffusers'): an
inpainting model (9-channel U-Net) sees the mask and the masked image; an ordinary model gets the
known region put back at every step (``--jump-n-sample`` > 1 adds RePaint's resampling). The output
size is ``--height`` x ``--width`` or the image's size rounded down to multiples of 8;
``--padding-mask-crop P`` inpaints only the mask's box grown by P pixels and pastes it back.
Writes one PNG per image and ``grid.png`` (one row per prompt: the input, the mask, the results).
With ``--noise torch`` a seed gives diffusers' images for the same call with
``generator=torch.Generator().manual_seed(K)``.

Failures are one line and exit code 2, found before any denoising, with nothing overwritten unless
``--overwrite`` (see ``npdiffusion.cli.sample``). Docs: docs/cli.md ("npdiffusion inpaint"),
docs/inpainting.md.
"""
from __future__ import annotations

import math
import os
import time

from npdiffusion.cli import sample
from npdiffusion.cli.img2img import read_image


def add_parser(subparsers):
    p = subparsers.add_parser(
        "inpaint", help="inpainting with a Stable Diffusion model folder: PNGs and a labelled grid",
        description="Repaint the white part of --mask in --image under text prompts, with an inpainting model "
                    "(9-channel U-Net) or any model (masked sampling): one PNG per image and a labelled grid.png, "
                    "written atomically. Docs: docs/cli.md, docs/inpainting.md.")
    p.add_argument("--image", metavar="FILE", required=True, help="the input image (PNG, JPEG, ...)")
    p.add_argument("--mask", metavar="FILE", required=True,
                   help="the mask image: white (>= 50%% grey) = repaint, black = keep")
    p.add_argument("--strength", metavar="S", type=float, default=1.0,
                   help="1 starts from pure noise in the masked region (default); lower keeps more of the image")
    p.add_argument("--mask-blur", metavar="R", type=float, default=0.0,
                   help="Gaussian blur radius applied to the mask first (diffusers' mask_processor.blur; default 0)")
    p.add_argument("--padding-mask-crop", metavar="P", type=int, default=None,
                   help="inpaint only the mask's bounding box grown by P pixels, at full size, and paste it back")
    p.add_argument("--jump-length", metavar="J", type=int, default=10,
                   help="RePaint: steps walked back up per resampling (default 10; ordinary models, DDPM/DDIM)")
    p.add_argument("--jump-n-sample", metavar="R", type=int, default=1,
                   help="RePaint: passes over each stretch of --jump-length steps; 1 = no resampling (default)")
    sample.add_common_options(p)
    return p


def _check(args) -> None:
    sample.check_common(args)
    if not (math.isfinite(args.strength) and 0.0 <= args.strength <= 1.0):
        raise ValueError(f"--strength must lie in [0, 1], got {args.strength}")
    if int(args.steps * args.strength) < 1:
        raise ValueError(f"--steps x --strength must be at least 1 so that a step runs, got "
                         f"{args.steps} x {args.strength}")
    if not (math.isfinite(args.mask_blur) and args.mask_blur >= 0):
        raise ValueError(f"--mask-blur must be a number >= 0, got {args.mask_blur}")
    if args.padding_mask_crop is not None and args.padding_mask_crop < 0:
        raise ValueError(f"--padding-mask-crop must be >= 0, got {args.padding_mask_crop}")
    for name in ("jump_length", "jump_n_sample"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive int, got {getattr(args, name)}")


def run(args) -> int:
    from npdiffusion.pipelines.inpaint import StableDiffusionInpaintPipeline  # noqa: PLC0415
    from npdiffusion.pipelines.mask_processing import blur  # noqa: PLC0415

    _check(args)
    image = read_image(args.image)
    mask = read_image(args.mask, "--mask").convert("L")
    if args.mask_blur > 0:
        mask = blur(mask, args.mask_blur)
    if args.padding_mask_crop is not None and not any(mask.getextrema()):
        raise ValueError(f"--mask {args.mask!r} is black everywhere: there is nothing to repaint")
    seed = sample.resolve_seed(args)
    names = sample.image_names(args.prompt, args.num_images)
    paths = sample.check_out(args.out, names + [sample.GRID_NAME], args.overwrite)
    sample.check_memory_early(args, image.size)
    start = time.perf_counter()
    pipe = sample.load_pipeline(args, StableDiffusionInpaintPipeline)
    m = math.lcm(sample.SIZE_MULTIPLE, pipe.vae_scale_factor)
    height = args.height if args.height is not None else image.height - image.height % m
    width = args.width if args.width is not None else image.width - image.width % m
    if height < m or width < m:
        raise ValueError(f"--image {args.image!r} is {image.width}x{image.height} pixels, smaller than {m}x{m}")
    pipe.check_inputs(args.prompt, height, width)
    from npdiffusion.pipelines.masked_sampling import check_resampling  # noqa: PLC0415

    check_resampling(pipe.scheduler, pipe.inpainting_unet, args.jump_length, args.jump_n_sample)
    sample.make_out(args.out)
    negative = None if args.negative_prompt is None else [args.negative_prompt] * len(args.prompt)
    images = pipe(list(args.prompt), image=image, mask_image=mask, height=height, width=width,
                  padding_mask_crop=args.padding_mask_crop, strength=args.strength, negative_prompt=negative,
                  num_inference_steps=args.steps, guidance_scale=args.guidance, num_images_per_prompt=args.num_images,
                  seed=seed, noise=args.noise, output_type="pil", jump_length=args.jump_length,
                  jump_n_sample=args.jump_n_sample, progress=not args.no_progress).images
    shared = dict(sample.base_params(args, pipe, seed), image_file=os.path.abspath(args.image),
                  mask_file=os.path.abspath(args.mask), strength=args.strength, mask_blur=args.mask_blur,
                  padding_mask_crop=args.padding_mask_crop, jump_length=args.jump_length,
                  jump_n_sample=args.jump_n_sample, unet_in_channels=pipe.unet.config["in_channels"])
    params = [dict(shared, prompt=text, image=i, num_images=args.num_images, height=height, width=width)
              for text in args.prompt for i in range(args.num_images)]
    sample.write_images(paths[:-1], images, params)
    size = images[0].size
    tiles, labels = [], []
    for p, text in enumerate(args.prompt):
        tiles += [image.resize(size), mask.convert("RGB").resize(size)]
        labels += ["input", "mask (white: repaint)"]
        for i in range(args.num_images):
            tiles.append(images[p * args.num_images + i])
            labels.append(f"{text} | #{i + 1}, seed {seed}")
    sample.write_grid(paths[-1], tiles, labels, cols=args.num_images + 2)
    seconds = time.perf_counter() - start
    kind = "inpainting U-Net" if pipe.inpainting_unet else "masked sampling"
    print(f"inpaint: {len(images)} image(s) of {size[0]}x{size[1]} ({kind}) at strength {args.strength:g}, "
          f"{args.steps} steps of {type(pipe.scheduler).__name__}, seed {seed} ({args.noise} noise), in "
          f"{seconds:.1f} s; wrote {len(images)} PNG(s) and {sample.GRID_NAME} to {args.out}")
    return 0
