"""Study: training objectives and noise schedules at equal compute: accuracy and the variational bound.

    python tools/study_training.py --model demo-out/model --work demo-out/study_training
                                                        # docs/images/study_training.{png,md}

Shapes: P prompts x S seeds = N images (32 x 32 x 3), prompt-major; latents (N, C, h, w) (C = 8,
h = w = 8 for the demo); held-out latents z0 (M, C, h, w); text embeddings (M, T, D).

Only the U-Net stage of the demo is retrained; the tokenizer, text encoder and VAE are the demo's
(the ``tokenizer``, ``text_encoder`` and ``vae`` folders of --model) and stay frozen. Every variant
is ``npdiffusion/training/unet_stage.py`` as it is, with the demo's U-Net settings
(``npdiffusion.training.demo.stage_configs``: data, batch, learning rate and its schedule, EMA,
seed) and the U-Net architecture of --model (its ``unet/config.json``), changing only the
``[unet]`` keys that define the variant (``VARIANTS``):

* objectives, on the demo's schedule (scaled_linear 0.00085 .. 0.012): the target is epsilon or
  v = sqrt(abar_t) eps - sqrt(1 - abar_t) z0, with the plain MSE or the Min-SNR-gamma weight
  (gamma = the demo's, 5): w_t = min(SNR_t, gamma) / SNR_t for epsilon, min(SNR_t, gamma) / (SNR_t + 1)
  for v (docs/diffusion.md), SNR_t = abar_t / (1 - abar_t);
* schedules, with the objective the demo used until 2026-12-07 (epsilon, Min-SNR 5): linear (DDPM's 1e-4 .. 0.02),
  scaled_linear (the demo's: the row "epsilon-minsnr") and cosine (``squaredcos_cap_v2``).

Equal compute: every variant takes the same --steps optimizer steps with the same batch, learning
rate, data order, initial weights (``manual_seed(train.seed)`` before the U-Net is built) and the
same stream of timesteps, noise and caption dropout (the trainer's generator draws them in the same
order whatever the target), so the variants differ only in what the loss asks of the network.

x0 prediction ("x0", "x0-minsnr") and zero terminal SNR ("zero-snr", with v prediction) need the
U-Net stage's ``prediction_type = "sample"`` and ``rescale_betas_zero_snr``; ``supported`` reads the
stage's own config schema, and a variant the stage cannot train is a one-line error.

After training, per variant (the exported EMA weights, the stage's ``model/`` folder: DPM-Solver++ on
the variant's schedule and prediction type):

* attribute accuracy, as every study (tools/study_common.py): the demo's evaluation prompts and
  seeds, classifier-free guidance --guidance, --sample-steps steps, read by the attribute checker;
* the variational bound -log p(z0 | c) <= L_T + sum_{t>=1} L_{t-1} + L_0 in bits per latent dimension
  on M = --heldout held-out images (shapes drawn from another data seed than training's, skipping
  those pixel-identical to a training image: about 4 in 10 are, the shapes have no anti-aliasing),
  encoded to z0 = the VAE posterior mean times the scaling factor, conditioned on their captions):
  ``npdiffusion.diffusion.vlb.bits_per_dim`` with every one of the T timesteps, fixed_small variances,
  no clipping (latents are not in [-1, 1]) and the continuous Gaussian decoder for L_0 (latents are
  not 8-bit data, so this is a bound on a density: lower is better, and it may be negative). The
  same noise draws for every variant (one generator, seed VLB_SEED), so differences are not noise of
  the Monte-Carlo estimate. "x0 MSE" is the mean over t of the x0 prediction's squared error on the
  same held-out latents: the median over t of the x0 prediction's mean squared error, a number in
  the same units for every objective (the training loss is not).

``--quick`` (the smoke test): 3 steps, 3 variants, 2 x 2 images, 2 held-out images and a diffusion of
QUICK_TIMESTEPS = 50 steps instead of 1000 (the bound loops over every t).

Figure: grouped bars of accuracy (colour, shape, position, all three) per variant, and bars of
bits per dimension per variant. Table: one row per variant.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import tempfile

import numpy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import study_common as sc  # noqa: E402

#: name -> (the [unet] keys that define it, one line saying what it is). Objectives first, then schedules.
VARIANTS = {
    "epsilon": ({"prediction_type": "epsilon", "snr_gamma": 0.0}, "predict the noise, plain MSE"),
    "epsilon-minsnr": ({"prediction_type": "epsilon", "snr_gamma": 5.0}, "predict the noise, Min-SNR-5 (the demo until 2026-12-07)"),
    "v": ({"prediction_type": "v_prediction", "snr_gamma": 0.0}, "predict v, plain MSE"),
    "v-minsnr": ({"prediction_type": "v_prediction", "snr_gamma": 5.0}, "predict v, Min-SNR-5"),
    "x0": ({"prediction_type": "sample", "snr_gamma": 0.0}, "predict z0, plain MSE"),
    "x0-minsnr": ({"prediction_type": "sample", "snr_gamma": 5.0}, "predict z0, Min-SNR-5"),
    "linear": ({"prediction_type": "epsilon", "snr_gamma": 5.0, "beta_schedule": "linear", "beta_start": 0.0001,
                "beta_end": 0.02}, "DDPM's linear betas 1e-4 .. 0.02, demo objective"),
    "cosine": ({"prediction_type": "epsilon", "snr_gamma": 5.0, "beta_schedule": "squaredcos_cap_v2"},
               "cosine abar (Nichol & Dhariwal), demo objective"),
    "zero-snr": ({"prediction_type": "v_prediction", "snr_gamma": 5.0, "rescale_betas_zero_snr": True},
                 "scaled_linear rescaled to zero terminal SNR (Lin et al.; needs v), Min-SNR-5"),
}
#: the schedule keys every variant sets (the demo's values unless the variant says otherwise)
SCHEDULE_DEFAULTS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
#: U-Net architecture keys copied from --model's unet/config.json
ARCH_KEYS = ("block_out_channels", "down_block_types", "layers_per_block", "attention_head_dim", "norm_num_groups")
QUICK_VARIANTS = ["epsilon", "v-minsnr", "cosine"]
QUICK_STEPS = 3
QUICK_TIMESTEPS = 50             # --quick: a 50-step diffusion, so that the bound's loop over t is short
HELDOUT = 32
HELDOUT_SEED_OFFSET = 1          # held-out shapes: the training data seed + 1
VLB_SEED = 0
CHECKPOINT_EVERY = 500
HEADERS = ["variant", "prediction", "min-SNR γ", "schedule", "SNR(T)", "colour", "shape", "position",
           "all three", "bits/dim", "prior bits/dim", "x0 MSE", "final loss", "train s/step"]


def supported(name: str) -> str | None:
    """None when the U-Net stage can train variant ``name``, else one line saying what it lacks."""
    from npdiffusion.training.unet_stage import UNetOptions  # noqa: PLC0415

    fields = {f.name: f for f in dataclasses.fields(UNetOptions)}
    for key, value in VARIANTS[name][0].items():
        if key not in fields:
            return f"needs unet.{key} = {json.dumps(value)}, and the U-Net stage has no such key"
        choices = fields[key].metadata.get("choices")
        if choices is not None and value not in choices:
            return (f"needs unet.{key} = {value!r}, and the U-Net stage allows only "
                    f"{', '.join(map(str, choices))}")
    return None


def default_variants() -> list:
    return [n for n in VARIANTS if supported(n) is None]


def parse(argv):
    p = sc.add_common_args(__doc__.splitlines()[0], "docs/images/study_training.png")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated subset of {','.join(VARIANTS)} (default: those the U-Net stage "
                        f"supports, {','.join(default_variants())}; --quick {','.join(QUICK_VARIANTS)})")
    p.add_argument("--steps", type=sc.positive_int, default=None,
                   help=f"U-Net optimizer steps per variant (default the demo's; --quick {QUICK_STEPS})")
    p.add_argument("--heldout", type=sc.positive_int, default=None,
                   help=f"held-out images for the bound (default {HELDOUT}; --quick 2)")
    p.add_argument("--sample-steps", type=sc.positive_int, default=None,
                   help=f"denoising steps for the accuracy (default {sc.EVAL_STEPS}, the demo's; --quick 2)")
    p.add_argument("--guidance", type=float, default=sc.GUIDANCE_SCALE,
                   help=f"classifier-free guidance scale for the accuracy (default {sc.GUIDANCE_SCALE}, the demo's)")
    p.add_argument("--work", metavar="DIR", default=None,
                   help="folder for the variants' training runs (DIR/<variant>), kept; a run stopped midway is "
                        "resumed from its last checkpoint (default: a temporary folder, removed at the end)")
    return p.parse_args(argv)


def chosen_variants(args) -> list:
    if args.variants is None:
        return list(QUICK_VARIANTS) if args.quick else default_variants()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not names:
        raise sc.StudyError(f"--variants: expected comma-separated names from {','.join(VARIANTS)}, "
                            f"got {args.variants!r}")
    for n in names:
        if n not in VARIANTS:
            raise sc.StudyError(f"--variants: {n!r} is not one of {', '.join(VARIANTS)}")
        why = supported(n)
        if why is not None:
            raise sc.StudyError(f"--variants: {n!r} ({VARIANTS[n][1]}) {why} (npdiffusion/training/unet_stage.py)")
    if len(set(names)) != len(names):
        raise sc.StudyError(f"--variants: a name appears twice in {args.variants!r}")
    return names


# ------------------------------------------------------------------------------------ training
def variant_config(name: str, model_dir: str, run_dir: str, steps: int | None, quick: bool):
    """The U-Net stage config (``UNetStageConfig``) of variant ``name``, training into ``run_dir``."""
    from npdiffusion.training.config import build_config, config_to_dict  # noqa: PLC0415
    from npdiffusion.training.demo import stage_configs  # noqa: PLC0415
    from npdiffusion.training.unet_stage import CONFIG  # noqa: PLC0415

    raw = config_to_dict(stage_configs(run_dir, quick=quick)["unet"])
    with open(os.path.join(model_dir, "unet", "config.json"), encoding="utf-8") as f:
        unet_cfg = json.load(f)
    missing = [k for k in ARCH_KEYS if k not in unet_cfg]
    if missing:
        raise sc.StudyError(f"--model {model_dir!r}: unet/config.json lacks {', '.join(missing)}")
    raw["output_dir"] = run_dir
    raw["unet"].update({k: unet_cfg[k] for k in ARCH_KEYS})
    raw["unet"].update(vae=os.path.join(model_dir, "vae"), text_encoder=os.path.join(model_dir, "text_encoder"),
                       tokenizer=os.path.join(model_dir, "tokenizer"))
    raw["unet"].update(SCHEDULE_DEFAULTS)
    raw["unet"].update(VARIANTS[name][0])
    if quick:
        raw["unet"]["num_train_timesteps"] = QUICK_TIMESTEPS
    if steps is not None:
        raw["train"]["steps"] = steps
    raw["train"]["checkpointing_steps"] = min(raw["train"]["steps"], CHECKPOINT_EVERY)
    raw["train"]["checkpoints_total_limit"] = 1
    return build_config(CONFIG, raw, source=f"study_training variant {name}")


def train_variant(config, dataset, log=print) -> dict:
    """Train (or resume, or find finished) the run in ``config.output_dir``; write its ``model/`` folder.

    Returns {"seconds", "steps", "final_loss"} (final loss: mean of the last 5% of the steps, in the
    variant's own target units).
    """
    from npdiffusion.random import manual_seed  # noqa: PLC0415
    from npdiffusion.training import unet_stage  # noqa: PLC0415
    from npdiffusion.training.checkpoint import CheckpointManager, prepare_output_dir  # noqa: PLC0415
    from npdiffusion.training.config import config_to_dict  # noqa: PLC0415
    from npdiffusion.training.loop import Trainer  # noqa: PLC0415

    out = prepare_output_dir(config.output_dir)
    snapshot = config_to_dict(config)
    latest = CheckpointManager(out).latest()
    if latest is not None:
        saved = CheckpointManager.read_state(latest).get("config")
        if json.loads(json.dumps(saved)) != json.loads(json.dumps(snapshot)):
            raise sc.StudyError(f"--work: {out!r} holds a run with other settings; remove it or choose another --work")
    manual_seed(config.train.seed)
    stage = unet_stage.build_stage(config, dataset)
    trainer = Trainer(stage, dataset, config.train, out, resume=latest is not None, progress=None, log=log,
                      config_snapshot=snapshot)
    result = trainer.fit()
    unet_stage.write_pipeline(config, os.path.join(out, "model"))
    return {"seconds": result.seconds, "steps": result.steps, "final_loss": result.last_loss}


# ------------------------------------------------------------------------------------ held-out bound
def heldout_latents(pipe, data_config, n: int) -> tuple:
    """(z0 (n, C, h, w) float32 = VAE posterior mean x scaling factor, captions (n), draws skipped).

    The images are the first n shapes drawn from the training data's seed + HELDOUT_SEED_OFFSET that
    are not pixel-identical to any training image. The shapes are drawn without anti-aliasing, so many
    fresh draws repeat a training image exactly (about 4 in 10 against the demo's 10,000): those are
    skipped, and their number is returned. (Image i of a seed depends only on (seed, i), so a longer
    draw extends the same sequence.)
    """
    from npdiffusion.backend import asarray, to_numpy  # noqa: PLC0415
    from npdiffusion.data import load_dataset  # noqa: PLC0415
    from npdiffusion.data.dataset import to_model_input  # noqa: PLC0415
    from npdiffusion.nn.module import no_cache  # noqa: PLC0415

    d = data_config
    if d.dataset != "shapes":
        raise sc.StudyError(f"the held-out set is drawn from the shapes with another seed; the data is {d.dataset!r}")
    train = load_dataset("shapes", num_images=d.num_images, resolution=d.resolution, seed=d.seed)
    seen = {im.tobytes() for im in train.get_images(numpy.arange(len(train)))}
    count = 4 * n + 16
    while True:
        held = load_dataset("shapes", num_images=count, resolution=d.resolution, seed=d.seed + HELDOUT_SEED_OFFSET)
        all_images = held.get_images(numpy.arange(count))
        novel = [i for i in range(count) if all_images[i].tobytes() not in seen]
        if len(novel) >= n:
            break
        if count > 64 * n + 1024:
            raise sc.StudyError(f"--heldout {n}: fewer than {n} of {count} fresh shapes differ from every "
                                "training image")
        count *= 2
    keep = novel[:n]
    with no_cache():
        post = pipe.vae.encode(asarray(to_model_input(all_images[keep]), dtype=numpy.float32))
    z0 = to_numpy(post.mean).astype(numpy.float32) * numpy.float32(pipe.vae.config["scaling_factor"])
    return z0, [held.captions[i] for i in keep], keep[-1] + 1 - n


def bound(pipe, z0, captions) -> dict:
    """The variational bound of the pipeline's U-Net on z0 (M, C, h, w) given captions (M):
    {"bpd", "prior_bpd", "x0_mse"}: bits per latent dimension, means over the M latents; x0_mse the
    median over t of the mean squared error of the x0 prediction (the median: with epsilon prediction,
    x0 = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) magnifies the error by 1 / sqrt(abar_t), up to 2e4
    at the cosine schedule's last step, and a mean over t would be that step alone)."""
    from npdiffusion.backend import asarray  # noqa: PLC0415
    from npdiffusion.diffusion.vlb import bits_per_dim  # noqa: PLC0415
    from npdiffusion.guidance.classifier_guidance import unet_model_fn  # noqa: PLC0415
    from npdiffusion.nn.module import no_cache  # noqa: PLC0415

    sched = pipe.scheduler
    ac = numpy.asarray(sched.alphas_cumprod, dtype=numpy.float64)
    ctx = sc.text_embeddings(pipe, captions)
    fn = unet_model_fn(pipe.unet, ctx)
    with no_cache():
        r = bits_per_dim(fn, asarray(z0), ac, numpy.random.default_rng(VLB_SEED),
                         prediction_type=sched.config["prediction_type"], variance_type="fixed_small",
                         clip_denoised=False, decoder="gaussian")
    return {"bpd": float(r["total_bpd"].mean()), "prior_bpd": float(r["prior_bpd"].mean()),
            "x0_mse": float(numpy.median(r["xstart_mse"].mean(axis=0)))}


# ------------------------------------------------------------------------------------ the study
def run(argv=None) -> dict:
    """Run the study; returns {variant: {"colour", "shape", "position", "joint", "bpd", "prior_bpd",
    "x0_mse", "final_loss", "seconds_per_step", "snr_T", "diverged", ...}}; a variant whose training
    diverged (the trainer's TrainingError) has "diverged": True and only its settings."""
    args = parse(argv)
    png, md = sc.out_paths(args.out)
    names = chosen_variants(args)
    base_pipe = sc.load_pipeline(args.model)                          # a missing folder: its one-line error
    for sub, file in (("vae", "config.json"), ("text_encoder", "config.json"), ("tokenizer", "vocab.json"),
                      ("unet", "config.json")):
        if not os.path.isfile(os.path.join(args.model, sub, file)):
            raise sc.StudyError(f"--model {args.model!r} has no {sub}/{file}: give the demo's model folder")
    steps = args.steps or (QUICK_STEPS if args.quick else None)
    n_held = args.heldout or (2 if args.quick else HELDOUT)
    sample_steps = args.sample_steps or (2 if args.quick else sc.EVAL_STEPS)
    prompts, seeds, flat = sc.prompts_and_seeds(args)
    from npdiffusion.training.loop import TrainingError  # noqa: PLC0415
    from npdiffusion.training.stages import dataset_from_config  # noqa: PLC0415
    from npdiffusion.training.unet_stage import training_alphas_cumprod  # noqa: PLC0415

    results = {}
    with contextlib.ExitStack() as stack:
        work = args.work or stack.enter_context(tempfile.TemporaryDirectory(prefix="study_training-"))
        dataset = z0 = None
        for name in names:
            config = variant_config(name, args.model, os.path.join(work, name), steps, args.quick)
            if dataset is None:
                dataset = dataset_from_config(config.data)
                z0, captions, skipped = heldout_latents(base_pipe, config.data, n_held)
            o = config.unet
            ac = training_alphas_cumprod(o)                 # the schedule the stage trains on
            r = dict(prediction=o.prediction_type, gamma=o.snr_gamma, schedule=o.beta_schedule,
                     snr_T=float(ac[-1] / (1.0 - ac[-1])), steps=config.train.steps,
                     batch=config.train.batch_size, lr=config.train.learning_rate, diverged=False)
            results[name] = r
            print(f"{name}: training {config.train.steps} steps ({VARIANTS[name][1]})", flush=True)
            try:
                trained = train_variant(config, dataset, log=lambda m: print(m, flush=True))
            except TrainingError as exc:                              # one variant diverged: the others go on
                print(f"{name}: {exc}", flush=True)
                r["diverged"] = True
                continue
            pipe = sc.load_pipeline(os.path.join(work, name, "model"))
            images = sc.generate(pipe, prompts, seeds, args.guidance, sample_steps)
            r.update(sc.score_images(images, flat))
            r.update(bound(pipe, z0, captions))
            r.update(final_loss=trained["final_loss"], seconds_per_step=trained["seconds"] / max(1, trained["steps"]))
            print(f"{name:>15}: joint {sc.pct(r['joint'])}, {r['bpd']:.4f} bits/dim, "
                  f"{r['seconds_per_step']:.3f} s/step", flush=True)
    rows = [[n, r["prediction"], f"{r['gamma']:g}" if r["gamma"] else "off", r["schedule"], f"{r['snr_T']:.2e}"]
            + (["diverged"] * 9 if r["diverged"] else
               [sc.pct(r["colour"]), sc.pct(r["shape"]), sc.pct(r["position"]), sc.pct(r["joint"]),
                f"{r['bpd']:.4f}", f"{r['prior_bpd']:.4f}", f"{r['x0_mse']:.4f}", f"{r['final_loss']:.4g}",
                f"{r['seconds_per_step']:.3f}"]) for n, r in results.items()]
    first = next(iter(results.values()))
    from npdiffusion.training.demo import SETTINGS  # noqa: PLC0415

    demo_steps = SETTINGS["unet"]["train"]["steps"]
    notes = (f"Each variant: the U-Net stage retrained from the same initial weights for {first['steps']} steps "
             f"(the demo's: {demo_steps}), batch {first['batch']}, learning rate {first['lr']:g} (the demo's "
             "schedule, warm-up, EMA and data), on the frozen VAE and "
             f"text encoder of {args.model}. Accuracy: {len(prompts)} prompts x {len(seeds)} seeds = {len(flat)} "
             f"images, DPM-Solver++ {sample_steps} steps, classifier-free guidance {args.guidance:g}. Bits/dim: the "
             f"variational bound (all T timesteps, fixed_small variances, Gaussian decoder) per latent dimension on "
             f"{len(captions)} held-out images (the first draws of data seed + {HELDOUT_SEED_OFFSET} that differ from "
             f"every training image; {skipped} draws were pixel-identical to one and skipped), conditioned on their "
             "captions; lower is better, it may be negative (a density). "
             "SNR(T) = abar_T / (1 - abar_T). x0 MSE: the x0 prediction's mean squared error on the held-out "
             "latents, median over t. Final loss: mean of the last 5% of training steps, in each variant's own target "
             "units (not comparable across objectives).")
    sc.write_table(md, "Training objectives and noise schedules at equal compute", sc.markdown_table(HEADERS, rows),
                   notes)
    sc.save_figure(figure(results), png)
    return results


# ------------------------------------------------------------------------------------ figure
def bar_chart(labels: list, series: dict, title: str, ylabel: str, size=(640, 360)):
    """Grouped bars: one group per label, one bar per series (name -> values, one per label). PIL RGB."""
    from PIL import Image, ImageDraw, ImageFont  # noqa: PLC0415

    from npdiffusion.plotting import COLORS, nice_ticks  # noqa: PLC0415

    def font(s):
        try:
            return ImageFont.load_default(size=s)
        except TypeError:
            return ImageFont.load_default()

    w, h = size
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    f, fs = font(13), font(11)
    left, right, top, bottom = 60, 10, 28, 70
    vals = numpy.asarray([v for vs in series.values() for v in vs], dtype=numpy.float64)
    vals = vals[numpy.isfinite(vals)]
    lo = min(0.0, float(vals.min()) if vals.size else 0.0)
    hi = max(0.0, float(vals.max()) if vals.size else 1.0)
    if hi == lo:
        hi = lo + 1.0
    ticks = nice_ticks(lo, hi)
    lo, hi = min(lo, ticks[0]), max(hi, ticks[-1])

    def y_of(v):
        return top + (hi - v) / (hi - lo) * (h - top - bottom)

    d.text((w // 2, 4), title, fill="black", font=f, anchor="ma")
    for t in ticks:
        y = y_of(t)
        d.line([(left, y), (w - right, y)], fill="#dddddd")
        d.text((left - 4, y), f"{t:g}", fill="black", font=fs, anchor="rm")
    d.text((6, top - 16), ylabel, fill="black", font=fs)
    group = (w - left - right) / max(1, len(labels))
    k = len(series)
    bar = group * 0.8 / max(1, k)
    for i, lab in enumerate(labels):
        x0 = left + i * group + group * 0.1
        for j, (name, vs) in enumerate(series.items()):
            v = float(vs[i])
            if numpy.isfinite(v):
                ya, yb = sorted((y_of(0.0), y_of(v)))
                d.rectangle([x0 + j * bar, ya, x0 + (j + 1) * bar - 1, max(yb, ya + 1)], fill=COLORS[j % len(COLORS)])
                if k == 1:                                            # one series: print the value on its bar
                    d.text((x0 + (j + 0.5) * bar, y_of(v) - 2 if v >= 0 else y_of(v) + 2), f"{v:.4g}",
                           fill="black", font=fs, anchor="md" if v >= 0 else "ma")
        d.text((left + (i + 0.5) * group, h - bottom + 6), lab, fill="black", font=fs, anchor="ma")
    d.line([(left, y_of(0.0)), (w - right, y_of(0.0))], fill="black")
    if k > 1:
        x = left
        for j, name in enumerate(series):
            d.rectangle([x, h - 22, x + 10, h - 12], fill=COLORS[j % len(COLORS)])
            d.text((x + 14, h - 17), name, fill="black", font=fs, anchor="lm")
            x += 20 + int(d.textlength(name, font=fs))
    return im


def figure(results: dict):
    """Accuracy bars (colour, shape, position, all three) and bits/dim bars, one group per variant."""
    names = list(results)
    nan = float("nan")
    acc = {label: [nan if results[n]["diverged"] else 100.0 * results[n][key] for n in names]
           for key, label in (("colour", "colour"), ("shape", "shape"), ("position", "position"),
                              ("joint", "all three"))}
    width = max(640, 90 * len(names) + 80)
    bpd = [nan if results[n]["diverged"] else results[n]["bpd"] for n in names]
    return sc.paste_grid([bar_chart(names, acc, "attribute accuracy per variant", "accuracy %", (width, 360)),
                          bar_chart(names, {"bits/dim": bpd},
                                    "variational bound on held-out latents (lower is better)", "bits / dim",
                                    (width, 360))], cols=1)


def main(argv=None) -> int:
    return sc.run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
