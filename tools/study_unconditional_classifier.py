"""Study: classifier guidance turns the demo U-Net, prompted with nothing, into a class-conditional sampler.

    python tools/study_unconditional_classifier.py --model demo-out/model \
        --save-classifier demo-out/classifiers     # docs/images/study_unconditional_classifier.{png,md}

Shapes: N training images (32 x 32 x 3) -> latents z0 (N, C, 8, 8) = scaling_factor * VAE mean;
K classes of one attribute (colour: 7, shape: 3); M = K x --seeds samples; labels y (M,).

1. **Classifier.** For each attribute in --attributes (default colour and shape) a noise-aware
   classifier p(y | z_t, t) (npdiffusion/guidance/classifier.py, the encoder half of a U-Net) is
   trained on the demo VAE's latents of --train-images shapes images (seed 0, the demo's data) with
   ``train_classifier``: z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, t uniform, cross entropy.
   Its accuracy on held-out latents (seed 1) noised to t = 0, 250, 500, 750, 999 goes into the table
   (a classifier that is right at moderate t is what guidance needs).
2. **Sampling.** The demo U-Net with the empty prompt's embedding (the model's unconditional branch,
   trained by caption dropout) and no classifier-free guidance, the model's scheduler (DPM-Solver++)
   for --steps steps, plus eps_hat = eps - s sqrt(1 - abar_t) grad_z log p(y | z_t, t), s in --scales
   (default 0, 1, 2, 4, 8; s = 0 is the unconditional model). Targets: each class --seeds times;
   image m starts from numpy.random.default_rng(m) (the same noise at every s).
3. **Judging.** The attribute checker reads the attribute off the decoded images; accuracy = the
   fraction that match their target (chance is 1/K for a model that ignores the target).

Figure: accuracy against scale per attribute (with the chance level), and a sample grid (one row per
scale, the first few targets). Table: one row per (attribute, scale), plus the classifier's noisy
accuracy. ``--save-classifier DIR`` keeps the classifiers (DIR/color, DIR/shape) for
tools/study_guidance.py --classifier; ``--classifier-dir DIR`` reuses them instead of training.
"""
from __future__ import annotations

import os
import sys

import numpy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import study_common as sc  # noqa: E402

SCALES = [0.0, 1.0, 2.0, 4.0, 8.0]
NOISY_T = [0, 250, 500, 750, 999]
ATTRIBUTES = ("color", "shape")
HEADERS = ["attribute", "classifier scale", "accuracy", "chance", "images"]


def parse(argv):
    p = sc.add_common_args(__doc__.splitlines()[0], "docs/images/study_unconditional_classifier.png")
    for action in p._actions:                 # --seeds means samples per target class here
        if action.dest == "seeds":
            action.help = "samples per target class (default 20; --quick 2)"
    p.add_argument("--attributes", default=",".join(ATTRIBUTES),
                   help="comma-separated attributes to guide: color, shape (default both)")
    p.add_argument("--scales", type=sc.number_list, default=None,
                   help=f"classifier guidance scales (default {','.join(f'{v:g}' for v in SCALES)}; --quick 0,4)")
    p.add_argument("--steps", type=sc.positive_int, default=None,
                   help=f"denoising steps (default {sc.EVAL_STEPS}, the demo's; --quick 3)")
    p.add_argument("--train-images", type=sc.positive_int, default=None,
                   help="shapes images whose latents train the classifier (default 4000; --quick 64)")
    p.add_argument("--train-steps", type=sc.positive_int, default=None,
                   help="classifier training steps, batch 64 (default 1500; --quick 3)")
    p.add_argument("--save-classifier", metavar="DIR", default=None,
                   help="write the trained classifiers to DIR/<attribute> (for study_guidance.py --classifier)")
    p.add_argument("--classifier-dir", metavar="DIR", default=None,
                   help="load the classifiers from DIR/<attribute> instead of training them")
    args = p.parse_args(argv)
    if args.prompts is not None:
        p.error("--prompts does not apply here (the model gets the empty prompt); --seeds sets samples per class")
    args.attributes = [a.strip() for a in args.attributes.split(",") if a.strip()]
    for a in args.attributes:
        if a not in ATTRIBUTES:
            p.error(f"--attributes: expected a comma-separated subset of {','.join(ATTRIBUTES)}, got {a!r}")
    return args


def encode_latents(pipe, images, chunk: int = 500) -> numpy.ndarray:
    """uint8 (N, 32, 32, 3) -> float32 latents (N, C, h, w) = scaling_factor * the VAE posterior mean."""
    from npdiffusion.backend import asarray, to_numpy  # noqa: PLC0415
    from npdiffusion.data.dataset import to_model_input  # noqa: PLC0415
    from npdiffusion.nn.module import no_cache  # noqa: PLC0415

    sf = float(pipe.vae.config["scaling_factor"])
    out = []
    with no_cache():
        for i in range(0, len(images), chunk):
            out.append(to_numpy(pipe.vae.encode(asarray(to_model_input(images[i:i + chunk]))).mean) * sf)
    return numpy.concatenate(out).astype(numpy.float32)


def held_images(args) -> int:
    """How many held-out images (seed 1) measure the classifier's noisy accuracy."""
    return 64 if args.quick else 1000


def class_names(attribute: str) -> tuple:
    from npdiffusion.data.shapes import COLOR_NAMES, SHAPES  # noqa: PLC0415

    return {"color": COLOR_NAMES, "shape": SHAPES}[attribute]


def train_or_load(pipe, attribute: str, args, log=print):
    """(classifier, {t: held-out accuracy}) for ``attribute``: trained on the demo latents, or loaded."""
    from npdiffusion.data.shapes import make_shapes  # noqa: PLC0415
    from npdiffusion.guidance.classifier import NoiseAwareClassifier  # noqa: PLC0415
    from npdiffusion.training.classifier_stage import (  # noqa: PLC0415
        load_classifier, noisy_accuracy, save_classifier, train_classifier)

    ac = numpy.asarray(pipe.scheduler.alphas_cumprod, dtype=numpy.float64)
    held = make_shapes(held_images(args), seed=1)
    z_held = encode_latents(pipe, held.images)
    y_held = getattr(held.params, attribute)
    if args.classifier_dir:
        folder = os.path.join(args.classifier_dir, attribute)
        clf, saved_attr = load_classifier(folder)
        if saved_attr != attribute:
            raise sc.StudyError(f"--classifier-dir: {folder!r} holds a {saved_attr!r} classifier, expected {attribute!r}")
    else:
        n = args.train_images or (64 if args.quick else 4000)
        data = make_shapes(n, seed=0)
        z0 = encode_latents(pipe, data.images)
        names = class_names(attribute)
        boc, groups = ((8, 16), 4) if args.quick else ((32, 64), 8)
        clf = NoiseAwareClassifier(in_channels=z0.shape[1], num_classes=len(names), block_out_channels=boc,
                                   norm_num_groups=groups, labels=names)
        steps = args.train_steps or (3 if args.quick else 1500)
        with sc.Timer() as t:
            losses = train_classifier(clf, z0, getattr(data.params, attribute), ac, steps, batch_size=64, lr=1e-3,
                                      seed=0, log=log, log_every=max(1, steps // 5))
        log(f"{attribute} classifier: {steps} steps in {t.seconds:.1f} s, loss {losses[0]:.3f} -> "
            f"{numpy.mean(losses[-max(1, steps // 10):]):.3f}")
        if args.save_classifier:
            log(f"wrote {save_classifier(clf, os.path.join(args.save_classifier, attribute), attribute=attribute)}")
    acc = noisy_accuracy(clf, z_held, y_held, ac, NOISY_T, seed=0)
    return clf.eval(), acc


def sample(pipe, clf, targets, steps: int, scale: float) -> numpy.ndarray:
    """uint8 images (M, 32, 32, 3): the empty-prompt U-Net guided towards ``targets`` (M,) at ``scale``."""
    from npdiffusion.guidance.classifier_guidance import classifier_gradient_fn, guided_sample, unet_model_fn  # noqa: PLC0415

    empty = sc.text_embeddings(pipe, [""] * len(targets))
    latents = sc.initial_latents(pipe, list(range(len(targets))))
    # No ``no_cache`` here: the classifier's input gradient needs its forward cache (log_prob_grad runs
    # it in training mode); the U-Net is in eval mode and keeps nothing.
    x = guided_sample(unet_model_fn(pipe.unet, empty), pipe.scheduler, latents.shape, steps,
                      numpy.random.default_rng(0), guidance=[(scale, classifier_gradient_fn(clf, targets))],
                      latents=latents)
    return sc.decode(pipe, x)


def run(argv=None) -> dict:
    """Run the study; returns {(attribute, scale): accuracy} and {"noisy/<attribute>": {t: accuracy}}."""
    from npdiffusion.evaluation.shape_attributes import read_attributes  # noqa: PLC0415

    args = parse(argv)
    png, md = sc.out_paths(args.out)
    pipe = sc.load_pipeline(args.model)
    steps = args.steps or (3 if args.quick else sc.EVAL_STEPS)
    n_seeds = args.seeds or (2 if args.quick else 20)
    scales = args.scales or ([0.0, 4.0] if args.quick else SCALES)
    results, grids, noisy = {}, {}, {}
    for attribute in args.attributes:
        clf, noisy[attribute] = train_or_load(pipe, attribute, args)
        names = class_names(attribute)
        targets = numpy.tile(numpy.arange(len(names)), n_seeds)                # (M,) every class n_seeds times
        for s in scales:
            images = sample(pipe, clf, targets, steps, s)
            read = getattr(read_attributes(images), attribute)
            acc = float(numpy.mean([r == names[y] for r, y in zip(read, targets)]))
            results[(attribute, s)] = acc
            grids[(attribute, s)] = images[:len(names)]
            print(f"{attribute} scale {s:g}: {sc.pct(acc)} of {len(targets)} match their target", flush=True)
    rows = [[a, f"{s:g}", sc.pct(v), sc.pct(1.0 / len(class_names(a))), n_seeds * len(class_names(a))]
            for (a, s), v in results.items()]
    noisy_rows = [[a] + [sc.pct(acc[t]) for t in NOISY_T] for a, acc in noisy.items()]
    table = sc.markdown_table(HEADERS, rows) + f"\nClassifier accuracy on held-out latents ({held_images(args)} " \
        "shapes images, seed 1) noised to t:\n\n" + sc.markdown_table(["attribute"] + [f"t={t}" for t in NOISY_T], noisy_rows)
    notes = (f"The demo U-Net with the empty prompt (no classifier-free guidance), {steps} steps of "
             f"{type(pipe.scheduler).__name__}, plus classifier guidance at each scale; every class as the target "
             f"{n_seeds} times (image m from seed m, the same at every scale); model {args.model}. Accuracy: the "
             "attribute checker's reading equals the target.")
    sc.write_table(md, "Classifier guidance on the unconditional model", table, notes)
    sc.save_figure(figure(results, grids, scales, args.attributes), png)
    return {**results, **{f"noisy/{a}": v for a, v in noisy.items()}}


def figure(results, grids, scales, attributes):
    """Accuracy vs scale (and chance) above a sample grid: one row per (attribute, scale), one column
    per target class."""
    from PIL import Image  # noqa: PLC0415

    from npdiffusion.pipelines.image_utils import image_grid  # noqa: PLC0415
    from npdiffusion.plotting import line_plot  # noqa: PLC0415

    series = {}
    for a in attributes:
        series[a] = (scales, [100.0 * results[(a, s)] for s in scales])
        series[f"{a} chance"] = (scales, [100.0 / len(class_names(a))] * len(scales))
    plot = line_plot(series, title="unconditional model + classifier guidance: target attribute right",
                     xlabel="classifier scale", ylabel="accuracy %", size=(800, 380))
    tiles = []
    for a in attributes:
        names = class_names(a)
        cols = len(class_names("color"))
        for s in scales:
            ims = [Image.fromarray(im) for im in grids[(a, s)]]
            ims += [Image.new("RGB", ims[0].size, "white")] * (cols - len(ims))
            labels = [f"{names[k]}, s={s:g}" if k < len(names) else "" for k in range(cols)]
            tiles.append(image_grid(ims, labels, cols=cols, min_tile=64, font_size=10, max_label_lines=1))
    width = max(plot.size[0], *(t.size[0] for t in tiles))
    canvas = Image.new("RGB", (width, plot.size[1] + sum(t.size[1] for t in tiles)), "white")
    canvas.paste(plot, (0, 0))
    y = plot.size[1]
    for t in tiles:
        canvas.paste(t, (0, y))
        y += t.size[1]
    return canvas


def main(argv=None) -> int:
    return sc.run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
