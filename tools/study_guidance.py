"""Study: attribute accuracy and sample diversity versus guidance scale (classifier-free, classifier, CLIP).

    python tools/study_guidance.py --model demo-out/model                         # classifier-free only
    python tools/study_guidance.py --model demo-out/model --classifier CLF_DIR    # + classifier guidance

Shapes: P prompts x S seeds = N images (32 x 32 x 3), prompt-major; latents (N, C, 8, 8); text
embeddings (N, T, D); classifier labels y (N,).

* **Classifier-free**: the pipeline with guidance scale w in --cfg-scales (default 1, 1.5, 2, 3, 4,
  6, 8, 12): eps = eps_u + w (eps_c - eps_u); w = 1 is the conditional model alone.
* **Classifier** (``--classifier DIR``, a folder written by ``save_classifier``, e.g. by
  tools/study_unconditional_classifier.py ``--save-classifier``): the conditional model (classifier-free
  scale --classifier-cfg, default 1) plus eps_hat = eps - s sqrt(1 - abar_t) grad_x log p(y | x_t, t)
  for s in --classifier-scales (default 0, 1, 2, 4, 8), y = the prompt's value of the classifier's
  attribute (npdiffusion/guidance/classifier_guidance.py ``guided_sample``).
* **CLIP** (``--clip DIR``, a full CLIPModel folder such as the demo's ``runs/clip/clip``): the same
  conditional model plus s times the gradient of the CLIP similarity of the prompt and the decoded x0
  prediction (npdiffusion/guidance/clip_guidance.py, through ``clip_terms``), s in --clip-scales.

Every method samples the same initial latents (image i from numpy.random.default_rng(seed_i)) with
the model's scheduler in its deterministic form (the demo: DPM-Solver++ 2M) for --steps steps (default 20).
Diversity = mean pairwise RMS pixel distance (pixels in [0, 1]) between the seeds of one prompt
(``study_common.diversity``): guidance that collapses every seed to one image drives it to 0.

Figure: accuracy (colour, shape, position, all three) and diversity against scale, one panel pair per
method. Table: one row per (method, scale).
"""
from __future__ import annotations

import os
import sys

import numpy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import study_common as sc  # noqa: E402

CFG_SCALES = [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]
CLASSIFIER_SCALES = [0.0, 1.0, 2.0, 4.0, 8.0]
HEADERS = ["method", "scale", "colour", "shape", "position", "all three", "diversity", "s / image"]


def parse(argv):
    p = sc.add_common_args(__doc__.splitlines()[0], "docs/images/study_guidance.png")
    p.add_argument("--steps", type=sc.positive_int, default=None,
                   help=f"denoising steps (default {sc.EVAL_STEPS}, the demo's; --quick 3)")
    p.add_argument("--cfg-scales", type=lambda s: sc.number_list(s, 1.0), default=None,
                   help="comma-separated classifier-free guidance scales >= 1 (default "
                        f"{','.join(f'{v:g}' for v in CFG_SCALES)}; --quick 1,4)")
    p.add_argument("--classifier", metavar="DIR", default=None,
                   help="a noise-aware classifier folder (save_classifier) on the model's latents: adds classifier guidance")
    p.add_argument("--classifier-scales", type=sc.number_list, default=None,
                   help=f"classifier guidance scales (default {','.join(f'{v:g}' for v in CLASSIFIER_SCALES)}; --quick 0,4)")
    p.add_argument("--classifier-cfg", type=lambda s: sc.number_list(s, 1.0)[0], default=1.0,
                   help="classifier-free scale used together with classifier guidance (default 1: the conditional "
                        "model alone, so the classifier's effect is measured by itself)")
    p.add_argument("--clip", metavar="DIR", default=None,
                   help="a full CLIPModel folder (text and vision towers, e.g. demo-out/runs/clip/clip): adds CLIP guidance")
    p.add_argument("--clip-scales", type=sc.number_list, default=None,
                   help=f"CLIP guidance scales (default {','.join(f'{v:g}' for v in CLASSIFIER_SCALES)})")
    args = p.parse_args(argv)
    if args.seeds is not None and args.seeds < 2:
        p.error("--seeds must be at least 2 (diversity compares seeds of one prompt)")
    return args


# ------------------------------------------------------------------------- gradient guidance terms
def classifier_terms(pipe, folder: str, flat_prompts: list):
    """grad_fn(x_t, t, out) -> grad_x log p(y | x_t, t) (N, C, h, w) of the classifier in ``folder``,
    y = each prompt's value of the classifier's attribute; and the attribute's name."""
    from npdiffusion.data.shapes import COLOR_NAMES, POSITION_NAMES, SHAPES  # noqa: PLC0415
    from npdiffusion.evaluation.shape_attributes import parse_prompt  # noqa: PLC0415
    from npdiffusion.guidance.classifier_guidance import classifier_gradient_fn  # noqa: PLC0415
    from npdiffusion.training.classifier_stage import load_classifier  # noqa: PLC0415

    clf, attribute = load_classifier(folder)
    names = {"color": COLOR_NAMES, "shape": SHAPES, "position": POSITION_NAMES}
    if attribute not in names:
        raise sc.StudyError(f"--classifier {folder!r}: its attribute must be one of {sorted(names)}, got {attribute!r}")
    labels = list(clf.labels or names[attribute])
    if clf.in_channels != pipe.unet.config["in_channels"]:
        raise sc.StudyError(f"--classifier {folder!r} takes {clf.in_channels} channels but the model's latents "
                            f"have {pipe.unet.config['in_channels']}: train it on this model's VAE latents")
    k = ("color", "shape", "position").index(attribute)
    y = numpy.asarray([labels.index(parse_prompt(p)[k]) for p in flat_prompts])
    return classifier_gradient_fn(clf.eval(), y), attribute


def clip_terms(pipe, folder: str, flat_prompts: list):
    """grad_fn(x_t, t, out) -> grad_x of the CLIP similarity of each image's prompt and its decoded x0
    prediction (npdiffusion/guidance/clip_guidance.py ``clip_gradient_fn``; docs/guidance.md).

    ``folder`` is a full CLIPModel (text and vision towers), e.g. the demo's ``runs/clip/clip``; its
    text tower reads the model's tokenizer's ids, the image processor's statistics come from the folder
    (CLIP's defaults when it has none), as ``npdiffusion sample --clip-guidance`` does.
    """
    from npdiffusion.backend import asarray, to_numpy  # noqa: PLC0415
    from npdiffusion.guidance.clip_guidance import (  # noqa: PLC0415
        CLIPImageInput, clip_gradient_fn, clip_text_embeds, read_image_processor_config)
    from npdiffusion.models.clip.clip_model import CLIPModel  # noqa: PLC0415

    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise sc.StudyError(f"--clip {folder!r} has no config.json (give a CLIPModel folder, e.g. demo-out/runs/clip/clip)")
    clip = CLIPModel.from_pretrained(folder)
    if getattr(clip.config, "vision_config", None) is None:
        raise sc.StudyError(f"--clip {folder!r} has no vision tower; CLIP guidance needs a full CLIPModel")
    tc = clip.config.text_config
    ids = numpy.asarray(pipe.tokenizer(list(flat_prompts), max_length=tc.max_position_embeddings,
                                       padding="max_length", truncation=True))
    image_input = CLIPImageInput(clip.config.vision_config.image_size, **read_image_processor_config(folder))
    te = clip_text_embeds(clip, asarray(ids))
    return clip_gradient_fn(clip, te, to_numpy(pipe.scheduler.alphas_cumprod), vae=pipe.vae, image_input=image_input,
                            prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"))


def sample_guided(pipe, flat_prompts, seeds_flat, steps: int, cfg: float, scale: float, grad_fn):
    """uint8 images (N, 32, 32, 3): ``guided_sample`` of the U-Net (classifier-free scale ``cfg``) plus
    ``scale`` times the gradient term, from the per-seed initial latents."""
    from npdiffusion.guidance.classifier_guidance import guided_sample, unet_model_fn  # noqa: PLC0415

    cond = sc.text_embeddings(pipe, flat_prompts)
    uncond = sc.text_embeddings(pipe, [""] * len(flat_prompts)) if cfg != 1.0 else None
    latents = sc.initial_latents(pipe, seeds_flat)
    model_fn = unet_model_fn(pipe.unet, cond, uncond, cfg)
    # No ``no_cache`` here: the classifier's input gradient needs its forward cache (log_prob_grad runs
    # it in training mode); the U-Net is in eval mode and keeps nothing.
    x = guided_sample(model_fn, pipe.scheduler, latents.shape, steps, numpy.random.default_rng(0),
                      guidance=[(scale, grad_fn)], latents=latents)
    return sc.decode(pipe, x)


def run(argv=None) -> dict:
    """Run the study; returns {(method, scale): {"colour", ..., "joint", "diversity", "seconds"}}."""
    args = parse(argv)
    png, md = sc.out_paths(args.out)
    pipe = sc.load_pipeline(args.model, deterministic=True)
    prompts, seeds, flat = sc.prompts_and_seeds(args)
    seeds_flat = [s for _ in prompts for s in seeds]
    steps = args.steps or (3 if args.quick else sc.EVAL_STEPS)
    results = {}

    def record(method, scale, images, seconds):
        r = sc.score_images(images, flat)
        r.update(diversity=sc.diversity(images, len(seeds)), seconds=seconds / len(flat))
        results[(method, scale)] = r
        print(f"{method} {scale:g}: joint {sc.pct(r['joint'])}, diversity {r['diversity']:.3f}", flush=True)

    for w in args.cfg_scales or ([1.0, 4.0] if args.quick else CFG_SCALES):
        with sc.Timer() as t:
            images = sc.generate(pipe, prompts, seeds, w, steps)
        record("classifier-free", w, images, t.seconds)
    gradient_methods = []
    if args.classifier:
        fn, attribute = classifier_terms(pipe, args.classifier, flat)
        gradient_methods.append((f"classifier ({attribute})", fn, args.classifier_scales
                                 or ([0.0, 4.0] if args.quick else CLASSIFIER_SCALES)))
    if args.clip:
        gradient_methods.append(("CLIP", clip_terms(pipe, args.clip, flat), args.clip_scales
                                 or ([0.0, 4.0] if args.quick else CLASSIFIER_SCALES)))
    for method, fn, scales in gradient_methods:
        for s in scales:
            with sc.Timer() as t:
                images = sample_guided(pipe, flat, seeds_flat, steps, args.classifier_cfg, s, fn)
            record(method, s, images, t.seconds)

    rows = [[m, f"{s:g}", sc.pct(r["colour"]), sc.pct(r["shape"]), sc.pct(r["position"]), sc.pct(r["joint"]),
             f"{r['diversity']:.3f}", f"{r['seconds']:.3f}"] for (m, s), r in results.items()]
    notes = (f"{len(prompts)} prompts x {len(seeds)} seeds = {len(flat)} images per row (the demo's evaluation prompts), "
             f"{steps} steps of {type(pipe.scheduler).__name__}, model {args.model}. Diversity: mean pairwise RMS "
             "pixel distance (0..1) between the seeds of one prompt.")
    if gradient_methods:
        notes += (f" Classifier/CLIP rows: the conditional model with classifier-free scale {args.classifier_cfg:g} "
                  "plus the gradient term at the given scale.")
    sc.write_table(md, "Accuracy and diversity versus guidance scale", sc.markdown_table(HEADERS, rows), notes)
    sc.save_figure(figure(results), png)
    return results


def figure(results: dict):
    """Per method: accuracy vs scale and diversity vs scale, side by side."""
    from npdiffusion.plotting import line_plot  # noqa: PLC0415

    size = (520, 340)
    panels = []
    for method in dict.fromkeys(m for m, _ in results):
        scales = [s for m, s in results if m == method]
        rs = [results[(method, s)] for s in scales]
        acc = {label: (scales, [100.0 * r[key] for r in rs]) for key, label in
               (("colour", "colour"), ("shape", "shape"), ("position", "position"), ("joint", "all three"))}
        panels.append(line_plot(acc, title=f"{method}: accuracy", xlabel="guidance scale", ylabel="accuracy %",
                                size=size))
        panels.append(line_plot({"diversity": (scales, [r["diversity"] for r in rs])},
                                title=f"{method}: diversity", xlabel="guidance scale",
                                ylabel="RMS distance between seeds", size=size))
    return sc.paste_grid(panels, cols=2)


def main(argv=None) -> int:
    return sc.run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
