"""``npdiffusion img2img --model DIR --image FILE --prompt TEXT [--strength S] --out FOLDER``: image to image.

Reads ``--image`` (any format Pillow opens, converted to RGB), resizes it (Lanczos, as diffusers'
preprocessing) to ``--height`` x ``--width`` when given, else to its size rounded down to multiples
of 8, and runs
``StableDiffusionPipeline.img2img`` (diffusers' StableDiffusionImg2ImgPipeline): encode, noise to the
strength's timestep, denoise under each prompt. Writes one PNG per image and ``grid.png``: one row
per prompt, the input image first, then the results, each labelled. With ``--noise torch`` a seed
gives diffusers' images for ``pipe(prompts, image=image, strength=S, num_images_per_prompt=N,
generator=torch.Generator().manual_seed(K))``.

Failures are one line and exit code 2, found before any denoising, with nothing overwritten unless
``--overwrite`` (see ``npdiffusion.cli.sample``). Docs: docs/cli.md ("npdiffusion img2img").
"""
from __future__ import annotations

import math
import os
import time
import warnings

from npdiffusion.cli.sample import (
    GRID_NAME,
    SIZE_MULTIPLE,
    add_common_options,
    base_params,
    check_common,
    check_memory_early,
    check_out,
    image_names,
    load_pipeline,
    make_out,
    resolve_seed,
    write_grid,
    write_images,
)


def add_parser(subparsers):
    p = subparsers.add_parser(
        "img2img", help="image to image with a Stable Diffusion model folder: PNGs and a labelled grid",
        description="Re-draw an image under text prompts (SDEdit: encode, add noise up to --strength, denoise) "
                    "with a diffusers Stable Diffusion folder: one PNG per image and a labelled grid.png, "
                    "written atomically. Docs: docs/cli.md, docs/pipeline.md.")
    p.add_argument("--image", metavar="FILE", required=True, help="the input image (PNG, JPEG, ...)")
    p.add_argument("--strength", metavar="S", type=float, default=0.8,
                   help="how much to change, in [0, 1]: int(steps * S) of the steps are run (default 0.8)")
    add_common_options(p)
    return p


def read_image(path, option: str = "--image"):
    """The image at ``path`` as an RGB PIL image; a one-line error (naming ``option``) if it is missing, not
    an image, or over Pillow's pixel limit ``PIL.Image.MAX_IMAGE_PIXELS`` (checked from the header)."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    from npdiffusion.memory import check_image_pixels  # noqa: PLC0415

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{option} {path!r} does not exist or is not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # refused below, in one line
            im = Image.open(path)
        with im:
            check_image_pixels(f"{option} {path!r}", im.width, im.height, Image.MAX_IMAGE_PIXELS)
            im.load()
            return im.convert("RGB")
    except Image.DecompressionBombError as exc:                 # over twice the limit: Image.open refuses it
        raise ValueError(f"{option} {path!r} is over the limit of {Image.MAX_IMAGE_PIXELS:,} pixels for an input "
                         f"image (Pillow: {exc}); shrink it first") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"{option} {path!r} is not an image Pillow can read: {exc}") from None


def run(args) -> int:
    check_common(args)
    if not (math.isfinite(args.strength) and 0.0 <= args.strength <= 1.0):
        raise ValueError(f"--strength must lie in [0, 1], got {args.strength}")
    if int(args.steps * args.strength) < 1:
        raise ValueError(f"--steps x --strength must be at least 1 so that a step runs, got "
                         f"{args.steps} x {args.strength}")
    image = read_image(args.image)
    seed = resolve_seed(args)
    names = image_names(args.prompt, args.num_images)
    paths = check_out(args.out, names + [GRID_NAME], args.overwrite)
    check_memory_early(args, image.size)
    start = time.perf_counter()
    pipe = load_pipeline(args)
    m = math.lcm(SIZE_MULTIPLE, pipe.vae_scale_factor)                 # round down, as diffusers' preprocess
    height = args.height if args.height is not None else image.height - image.height % m
    width = args.width if args.width is not None else image.width - image.width % m
    if height < m or width < m:
        raise ValueError(f"--image {args.image!r} is {image.width}x{image.height} pixels, smaller than {m}x{m}")
    pipe.check_inputs(args.prompt, height, width)                      # the VAE's size rule, before any work
    if (width, height) != image.size:
        from PIL import Image  # noqa: PLC0415

        image = image.resize((width, height), resample=Image.LANCZOS)
    make_out(args.out)
    negative = None if args.negative_prompt is None else [args.negative_prompt] * len(args.prompt)
    images = pipe.img2img(image, list(args.prompt), strength=args.strength, negative_prompt=negative,
                          num_inference_steps=args.steps, guidance_scale=args.guidance,
                          num_images_per_prompt=args.num_images, seed=seed, noise=args.noise,
                          output_type="pil", progress=not args.no_progress).images
    common = dict(base_params(args, pipe, seed), image_file=os.path.abspath(args.image), strength=args.strength)
    params = [dict(common, prompt=text, image=i, num_images=args.num_images, height=height, width=width)
              for text in args.prompt for i in range(args.num_images)]
    write_images(paths[:-1], images, params)
    tiles, labels = [], []
    for p, text in enumerate(args.prompt):
        tiles.append(image)
        labels.append(f"input, strength {args.strength:g}")
        for i in range(args.num_images):
            tiles.append(images[p * args.num_images + i])
            labels.append(f"{text} | #{i + 1}, seed {seed}")
    write_grid(paths[-1], tiles, labels, cols=args.num_images + 1)
    seconds = time.perf_counter() - start
    print(f"img2img: {len(images)} image(s) of {width}x{height} at strength {args.strength:g}, {args.steps} steps of "
          f"{type(pipe.scheduler).__name__}, seed {seed} ({args.noise} noise), in {seconds:.1f} s; "
          f"wrote {len(images)} PNG(s) and {GRID_NAME} to {args.out}")
    return 0
