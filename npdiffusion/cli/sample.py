"""``npdiffusion sample --model DIR --prompt TEXT [--prompt TEXT ...] --out FOLDER``: text to image.

Loads a diffusers Stable Diffusion folder with ``StableDiffusionPipeline.from_pretrained``, generates
``--num-images`` images per prompt in one batch, and writes one PNG per image plus ``grid.png`` (the
images in rows, one row per prompt, each labelled), every file atomically. With the default
``--noise torch``, ``--seed K`` gives the images diffusers gives for
``pipe(prompts, negative_prompt=[NEG] * P, num_images_per_prompt=N,
generator=torch.Generator().manual_seed(K))``.

Every expected failure is one line on stderr and exit code 2 (docs/cli.md): a missing or malformed
model folder, an unknown scheduler, a size the VAE cannot take, a corrupt safetensors file, an
output file that already exists (unless ``--overwrite``). All of them are found before the first
denoising step (the output folder is created only then), and nothing in it is touched by a failure;
a folder a failed run created is removed again while empty (``npdiffusion.cli.main``). Temporary files
that killed runs left in the output folder are removed (``io.atomic.remove_stale_temps``).

Gradient guidance (docs/guidance.md): ``--classifier DIR --classifier-scale S`` adds a noise-aware
classifier's grad_x log p(y | x_t, t) (``--classifier-class`` names y; by default each prompt's class
is the one label of the classifier that the prompt contains as a word), ``--clip-guidance S`` the
gradient of the CLIP similarity of prompt and decoded x0 prediction (a CLIP model with a vision tower:
``--clip-model DIR``, else ``clip/`` in the model folder). This module finds and loads those models;
``pipelines.guided`` runs the denoising loop (same initial noise and step noise as the plain pipeline
for a seed), with each term added as eps - S sqrt(1 - abar_t) grad after classifier-free guidance.

The helpers here (options, checks, output planning and writing) are shared with ``npdiffusion
img2img``. Docs: docs/cli.md ("npdiffusion sample"), docs/pipeline.md.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import time

import numpy

#: --scheduler names -> diffusers / npdiffusion class names
SCHEDULER_NAMES = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm++2m": "DPMSolverMultistepScheduler",
}
GRID_NAME = "grid.png"
SIZE_MULTIPLE = 8


# ------------------------------------------------------------------------------------- options
def add_common_options(p) -> None:
    """The options ``sample`` and ``img2img`` share."""
    p.add_argument("--model", metavar="DIR", required=True,
                   help="a diffusers Stable Diffusion folder (model_index.json, unet/, vae/, text_encoder/, "
                        "tokenizer/, scheduler/; safetensors weights)")
    p.add_argument("--prompt", metavar="TEXT", action="append", required=True,
                   help="what to draw; repeat the option for several prompts (one grid row each)")
    p.add_argument("--negative-prompt", metavar="TEXT", default=None,
                   help="what to steer away from, used for every prompt (default: the empty prompt)")
    p.add_argument("--num-images", metavar="N", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--steps", metavar="S", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--guidance", metavar="G", type=float, default=7.5,
                   help="classifier-free guidance scale w; guidance is off for w <= 1 (default 7.5)")
    p.add_argument("--scheduler", metavar="NAME", default=None,
                   help=f"sampler: {'|'.join(SCHEDULER_NAMES)} (default: the one the model folder names)")
    p.add_argument("--seed", metavar="K", type=int, default=None,
                   help="seed of the noise (default: a random seed, printed)")
    p.add_argument("--noise", choices=("torch", "numpy"), default="torch",
                   help="torch: torch's CPU generator reproduced bit for bit, so a seed gives diffusers' "
                        "image (default); numpy: numpy.random.default_rng(seed)")
    p.add_argument("--height", metavar="H", type=int, default=None,
                   help="image height in pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--width", metavar="W", type=int, default=None,
                   help="image width in pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--out", metavar="FOLDER", required=True, help="output folder (created if missing)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files of the same names already in the output folder (default: refuse)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_parser(subparsers):
    p = subparsers.add_parser(
        "sample", help="text to image with a Stable Diffusion model folder: PNGs and a labelled grid",
        description="Generate images from text prompts with a diffusers Stable Diffusion folder: one PNG per "
                    "image and a labelled grid.png, written atomically. With --noise torch (the default) a "
                    "seed gives the same images as diffusers with torch.Generator().manual_seed(seed). "
                    "Docs: docs/cli.md, docs/pipeline.md.")
    add_common_options(p)
    p.add_argument("--guidance-rescale", metavar="PHI", type=float, default=0.0,
                   help="guidance rescale phi in [0, 1] (Lin et al. 2023; default 0, off)")
    p.add_argument("--lora", metavar="FILE", default=None,
                   help="a LoRA file to apply: ours or diffusers' pytorch_lora_weights.safetensors (PEFT layout), "
                        "or a kohya/A1111 file (lora_unet_..., lora_te_...) (docs/lora.md)")
    p.add_argument("--lora-scale", metavar="S", type=float, default=None,
                   help="scale of the LoRA's change (default 1: as trained; 0: off)")
    g = p.add_argument_group("gradient guidance (docs/guidance.md)")
    g.add_argument("--classifier", metavar="DIR", default=None,
                   help="a noise-aware classifier folder (saved by the classifier training stage) on the model's "
                        "latents: classifier guidance")
    g.add_argument("--classifier-scale", metavar="S", type=float, default=None,
                   help="classifier guidance scale S (needs --classifier; default 1)")
    g.add_argument("--classifier-class", metavar="NAME_OR_INDEX", default=None,
                   help="the class to steer towards, a label of the classifier or an index (default: for each "
                        "prompt, the one label that occurs in it as a word)")
    g.add_argument("--clip-guidance", metavar="S", type=float, default=0.0,
                   help="CLIP guidance scale S: follow the gradient of the CLIP similarity of the prompt and the "
                        "decoded x0 prediction (default 0, off)")
    g.add_argument("--clip-model", metavar="DIR", default=None,
                   help="the CLIP model (transformers CLIPModel folder, with a vision tower) for --clip-guidance "
                        "(default: clip/ in the model folder)")
    return p


def check_guidance(args) -> None:
    """Cheap checks of the gradient-guidance options (ValueError naming the option)."""
    for name in ("classifier_scale", "clip_guidance"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if args.classifier is None and (args.classifier_scale is not None or args.classifier_class is not None):
        raise ValueError("--classifier-scale and --classifier-class need --classifier DIR")
    if args.clip_model is not None and not args.clip_guidance:
        raise ValueError("--clip-model needs --clip-guidance S (a nonzero scale)")
    if args.classifier is not None and not os.path.isdir(args.classifier):
        raise FileNotFoundError(f"--classifier {args.classifier!r} is not a folder")
    if args.lora_scale is not None and (args.lora is None or not math.isfinite(args.lora_scale)):
        raise ValueError(f"--lora-scale needs --lora FILE and a finite number, got {args.lora_scale}")
    if args.lora is not None and not os.path.isfile(args.lora):
        raise FileNotFoundError(f"--lora {args.lora!r} is not a file")


def _classifier_targets(args, classifier, attribute, batch_prompts) -> list[int]:
    """The class index of each prompt (see --classifier-class)."""
    labels = list(classifier.labels or [])
    k = classifier.num_classes
    what = f"the classifier ({attribute or 'unnamed attribute'}: {', '.join(labels) if labels else f'{k} classes'})"
    choice = args.classifier_class
    if choice is not None:
        if choice in labels:
            return [labels.index(choice)] * len(batch_prompts)
        if re.fullmatch(r"\d+", choice.strip()) and int(choice) < k:
            return [int(choice)] * len(batch_prompts)
        raise ValueError(f"--classifier-class must be a label or an index in [0, {k}) of {what}, got {choice!r}")
    if not labels:
        raise ValueError(f"--classifier-class is needed: {what} has no labels to find in the prompts")
    out = []
    for text in batch_prompts:
        words = set(re.findall(r"[a-z0-9]+", text.lower()))
        found = [i for i, name in enumerate(labels) if name.lower() in words]
        if len(found) != 1:
            got = "none" if not found else ", ".join(labels[i] for i in found)
            raise ValueError(f"--classifier-class not given and prompt {text!r} names {got} of the labels of {what}; "
                             f"give --classifier-class NAME_OR_INDEX")
        out.append(found[0])
    return out


def _find_clip(args):
    """(folder of a CLIPModel with a vision tower, folder of its tokenizer or None); one-line errors."""
    from npdiffusion.io.pretrained import read_config  # noqa: PLC0415

    candidates = [args.clip_model] if args.clip_model is not None else [
        os.path.join(args.model, "clip"), os.path.join(args.model, "text_encoder")]
    for folder in candidates:
        if not os.path.isfile(os.path.join(folder, "config.json")):
            if args.clip_model is not None:
                raise FileNotFoundError(f"--clip-model {folder!r} has no config.json (not a transformers CLIPModel "
                                        "folder)")
            continue
        if "vision_config" in read_config(folder, "config.json"):
            tok = next((t for t in (os.path.join(folder, "tokenizer"), folder)
                        if os.path.isfile(os.path.join(t, "vocab.json"))), None)
            return folder, tok
        if args.clip_model is not None:
            raise ValueError(f"--clip-model {folder!r} is a CLIP model without a vision tower (no vision_config); "
                             "CLIP guidance needs a full CLIPModel")
    raise ValueError(f"--clip-guidance needs a CLIP model with a vision tower, and the model folder {args.model!r} "
                     "has none (no clip/ folder, and text_encoder/ is a text tower only); pass --clip-model DIR "
                     "(e.g. runs/clip/clip from `npdiffusion train clip`)")


def prepare_guidance(args, pipe, batch_prompts):
    """The ``(scale, grad_fn)`` terms of ``pipelines.guided`` for the gradient-guidance options (empty when
    off), and a dict describing them for the PNG parameters. Finds and loads the models the options name
    (one-line errors naming the option); ``pipelines.guided`` builds the terms from them."""
    from npdiffusion.pipelines.guided import classifier_term, clip_term  # noqa: PLC0415

    terms, info = [], {}
    if args.classifier is not None:
        from npdiffusion.training.classifier_stage import load_classifier  # noqa: PLC0415

        classifier, attribute = load_classifier(args.classifier)
        want = pipe.unet.config["in_channels"]
        if classifier.in_channels != want:
            raise ValueError(f"--classifier {args.classifier!r} takes {classifier.in_channels}-channel inputs, but the "
                             f"model's latents have {want} channels (train the classifier on the VAE's scaled latents)")
        y = _classifier_targets(args, classifier, attribute, batch_prompts)
        scale = 1.0 if args.classifier_scale is None else args.classifier_scale
        terms.append(classifier_term(classifier, y, scale))
        info.update(classifier=os.path.abspath(args.classifier), classifier_scale=scale,
                    classifier_class=[classifier.labels[i] if classifier.labels else i for i in y])
    if args.clip_guidance:
        from npdiffusion.guidance.clip_guidance import CLIPImageInput, read_image_processor_config  # noqa: PLC0415
        from npdiffusion.models.clip.clip_model import CLIPModel  # noqa: PLC0415
        from npdiffusion.models.clip.tokenizer import CLIPTokenizer  # noqa: PLC0415

        folder, tok_folder = _find_clip(args)
        clip = CLIPModel.from_pretrained(folder)
        tokenizer = CLIPTokenizer.from_pretrained(tok_folder) if tok_folder is not None else pipe.tokenizer
        tc = clip.config.text_config
        ids = numpy.asarray(tokenizer(list(batch_prompts), max_length=tc.max_position_embeddings,
                                      padding="max_length", truncation=True))
        if ids.max() >= tc.vocab_size:
            raise ValueError(f"--clip-model {folder!r}: its text tower has {tc.vocab_size} tokens but the tokenizer "
                             f"gives id {int(ids.max())}; put the CLIP model's tokenizer in {folder}/tokenizer")
        stats = {}
        for where in (folder, os.path.join(args.model, "feature_extractor")):
            stats = read_image_processor_config(where)
            if stats:
                break
        image_input = CLIPImageInput(clip.config.vision_config.image_size, **stats)
        terms.append(clip_term(pipe, clip, ids, args.clip_guidance, image_input))
        info.update(clip_model=os.path.abspath(folder), clip_guidance=args.clip_guidance,
                    clip_image_mean=list(image_input.mean), clip_image_std=list(image_input.std))
    return terms, info


# -------------------------------------------------------------------------------------- checks
def check_common(args) -> None:
    """Cheap checks of the shared options, before anything is loaded (ValueError naming the option)."""
    for name in ("num_images", "steps"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive int, got {value}")
    for name in ("guidance", "guidance_rescale"):
        value = getattr(args, name, 0.0)
        if not math.isfinite(value):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if getattr(args, "guidance_rescale", 0.0) < 0:
        raise ValueError(f"--guidance-rescale must be >= 0, got {args.guidance_rescale}")
    if args.scheduler is not None and args.scheduler.lower() not in SCHEDULER_NAMES:
        raise ValueError(f"unknown scheduler {args.scheduler!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
    if (args.height is None) != (args.width is None):
        raise ValueError("give --height and --width together (or neither, for the model's default size)")
    if args.height is not None:
        for name in ("height", "width"):
            value = getattr(args, name)
            if value < SIZE_MULTIPLE or value % SIZE_MULTIPLE:
                raise ValueError(f"--{name} must be a positive multiple of {SIZE_MULTIPLE} (the VAE downsamples by "
                                 f"8), got {value}")
    for i, prompt in enumerate(args.prompt):
        if not prompt.strip():
            raise ValueError(f"--prompt number {i + 1} is empty; give some text")


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe, lower-case version of ``text`` (letters, digits and dashes), at most ``limit`` long."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return (s[:limit].rstrip("-") or "prompt")


def image_names(prompts, num_images: int) -> list[str]:
    """File names ``PP-II-slug.png`` (prompt index, image index) in generation order."""
    return [f"{p:02d}-{i:02d}-{slug(text)}.png" for p, text in enumerate(prompts) for i in range(num_images)]


def check_out(out: str, names, overwrite: bool) -> list[str]:
    """The full paths of ``names`` in ``out``; raises FileExistsError when one exists (unless
    ``overwrite``) and NotADirectoryError when ``out`` is a file. Creates nothing."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"--out {out!r} exists and is not a folder")
    paths = [os.path.join(out, n) for n in names]
    if not overwrite:
        taken = [p for p in paths if os.path.exists(p)]
        if taken:
            more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
            raise FileExistsError(f"{taken[0]!r}{more} already exists; nothing was written (pass --overwrite to "
                                  "replace, or choose another --out)")
    return paths


def make_out(out: str) -> None:
    """Create ``out`` (and parents), check that a file can be written there (OSError if not) and remove the
    temporary files that killed writers left there (``io.atomic.remove_stale_temps``)."""
    from npdiffusion.io.atomic import check_writable, remove_stale_temps  # noqa: PLC0415

    os.makedirs(out, exist_ok=True)
    check_writable(out)
    remove_stale_temps(out)


def check_memory_early(args, image_size=None) -> None:
    """Before any weights are read: refuse (MemoryLimitError, one line) a request whose models or arrays
    would not fit, estimated from the model folder's configs (npdiffusion.memory). ``image_size``: img2img's
    input (width, height), the size used when --height/--width are not given. A config that cannot be read
    or understood is left to the loader, which names what is wrong."""
    from npdiffusion.io.pretrained import read_config  # noqa: PLC0415
    from npdiffusion.memory import (  # noqa: PLC0415
        ITEMSIZE,
        check_memory,
        check_model,
        clip_text_parameters,
        sampling_bytes,
        unet_parameters,
        vae_parameters,
    )

    try:
        unet, vae, text = (read_config(os.path.join(args.model, name)) for name in ("unet", "vae", "text_encoder"))
        models = [("unet", unet_parameters(unet)), ("vae", vae_parameters(vae)),
                  ("text_encoder", clip_text_parameters(text.get("text_config", text)))]
        f = 2 ** (len(vae.get("block_out_channels", [64])) - 1)
        if args.height is not None:
            height, width = args.height, args.width
        elif image_size is not None:
            m = math.lcm(SIZE_MULTIPLE, f)
            width, height = (s - s % m for s in image_size)
        else:
            size = unet.get("sample_size") or 64
            height, width = (size, size) if isinstance(size, int) else size[:2]
            height, width = height * f, width * f
        batch = len(args.prompt) * args.num_images
        need = sampling_bytes(unet, vae, batch, height, width, args.guidance > 1, 1 if image_size else 0)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError):
        return
    for name, n in models:
        check_model(f"--model {os.path.join(args.model, name)!r}", n, "the model is too large for this machine")
    check_memory(f"generating {batch} image(s) of {width}x{height} ({len(args.prompt)} prompt(s) x --num-images "
                 f"{args.num_images}, the models' weights included)", need + ITEMSIZE * sum(n for _, n in models),
                 "lower --height/--width or --num-images")


def load_pipeline(args, cls=None):
    """The pipeline (``cls``, default StableDiffusionPipeline) of ``--model`` with ``--scheduler`` swapped in
    (diffusers' ``from_config`` rule)."""
    from npdiffusion.pipelines.loading import SCHEDULERS  # noqa: PLC0415 - keep `--help` fast
    from npdiffusion.pipelines.stable_diffusion import StableDiffusionPipeline  # noqa: PLC0415

    pipe = (cls or StableDiffusionPipeline).from_pretrained(args.model)
    if getattr(args, "lora", None) is not None:
        from npdiffusion.lora.files import load_lora  # noqa: PLC0415

        scale = 1.0 if args.lora_scale is None else args.lora_scale
        load_lora(args.lora, {"unet": pipe.unet, "text_encoder": pipe.text_encoder}, scale)
    if args.scheduler is not None:
        scheduler_cls = SCHEDULERS[SCHEDULER_NAMES[args.scheduler.lower()]]
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    return pipe


def resolve_seed(args) -> int:
    from npdiffusion.pipelines.noise import random_seed  # noqa: PLC0415

    return random_seed() if args.seed is None else args.seed


# -------------------------------------------------------------------------------------- writing
def png_bytes(image, text: dict | None = None) -> bytes:
    """A PIL image as PNG bytes, with ``text`` stored in tEXt chunks (key -> str)."""
    from PIL.PngImagePlugin import PngInfo  # noqa: PLC0415

    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def write_images(paths, images, params: list[dict]) -> None:
    """Write each image to its path atomically, with its parameters as JSON in the "parameters" text chunk."""
    from npdiffusion.io.atomic import atomic_write_bytes  # noqa: PLC0415

    for path, image, p in zip(paths, images, params):
        atomic_write_bytes(path, png_bytes(image, {"parameters": json.dumps(p, sort_keys=True)}))


def write_grid(path, images, labels, cols: int) -> None:
    from npdiffusion.io.atomic import atomic_write_bytes  # noqa: PLC0415
    from npdiffusion.pipelines.image_utils import image_grid  # noqa: PLC0415

    atomic_write_bytes(path, png_bytes(image_grid(images, labels, cols=cols)))


def base_params(args, pipe, seed: int) -> dict:
    params = {"model": os.path.abspath(args.model), "negative_prompt": args.negative_prompt, "steps": args.steps,
              "guidance": args.guidance, "scheduler": type(pipe.scheduler).__name__, "seed": seed, "noise": args.noise}
    if getattr(args, "lora", None) is not None:
        params.update(lora=os.path.abspath(args.lora), lora_scale=1.0 if args.lora_scale is None else args.lora_scale)
    return params


def run(args) -> int:
    check_common(args)
    check_guidance(args)
    seed = resolve_seed(args)
    check_memory_early(args)                                 # before anything grows with --num-images
    names = image_names(args.prompt, args.num_images)
    paths = check_out(args.out, names + [GRID_NAME], args.overwrite)
    start = time.perf_counter()
    pipe = load_pipeline(args)
    height, width = (args.height, args.width) if args.height is not None else pipe.default_height_width()
    pipe.check_inputs(args.prompt, height, width)                      # the VAE's size rule, before any work
    batch_prompts = [text for text in args.prompt for _ in range(args.num_images)]
    terms, guidance_info = prepare_guidance(args, pipe, batch_prompts)   # loads and checks, before any work
    make_out(args.out)
    negative = None if args.negative_prompt is None else [args.negative_prompt] * len(args.prompt)
    if terms:
        from npdiffusion.pipelines.guided import guided_text_to_image  # noqa: PLC0415

        images = guided_text_to_image(pipe, args.prompt, terms, num_images_per_prompt=args.num_images,
                                      num_inference_steps=args.steps, guidance_scale=args.guidance,
                                      guidance_rescale=args.guidance_rescale, negative_prompt=negative,
                                      height=height, width=width, seed=seed, noise=args.noise)
    else:
        images = pipe(list(args.prompt), negative_prompt=negative, num_inference_steps=args.steps,
                      guidance_scale=args.guidance, guidance_rescale=args.guidance_rescale, height=height,
                      width=width, num_images_per_prompt=args.num_images, seed=seed, noise=args.noise,
                      output_type="pil", progress=not args.no_progress).images
    common = dict(base_params(args, pipe, seed), **guidance_info)
    params = [dict(common, prompt=text, image=i, num_images=args.num_images, height=height, width=width,
                   guidance_rescale=args.guidance_rescale)
              for text in args.prompt for i in range(args.num_images)]
    write_images(paths[:-1], images, params)
    labels = [f"{text} | #{i + 1}, seed {seed}" for text in args.prompt for i in range(args.num_images)]
    write_grid(paths[-1], images, labels, cols=args.num_images)
    seconds = time.perf_counter() - start
    print(f"sample: {len(images)} image(s) of {width}x{height}, {args.steps} steps of "
          f"{type(pipe.scheduler).__name__}, seed {seed} ({args.noise} noise), in {seconds:.1f} s; "
          f"wrote {len(images)} PNG(s) and {GRID_NAME} to {args.out}")
    return 0
