"""``npdiffusion demo``: train a whole text-to-image model from nothing on the synthetic shapes (or the
handwritten digits), then show it.

Stages, in order (each the same code as ``npdiffusion train STAGE``; the settings are ``SETTINGS``,
written to ``DIR/configs/*.toml`` so any stage can be rerun or resumed by hand)::

    tokenizer + CLIP   BPE on the captions; text and vision towers trained contrastively
    VAE                32x32x3 images <-> 8x8x8 latents (reconstruction + KL)
    U-Net              latent diffusion conditioned on the frozen text tower (caption dropout for
                       classifier-free guidance, EMA weights)

Outputs in DIR (default ``npdiffusion-demo``): ``model/`` (a diffusers pipeline folder: our
``StableDiffusionPipeline.from_pretrained`` and diffusers' load it), ``samples.png`` (prompts x
seeds), ``diffusion.png`` (a training image noised over t; one sample's denoising trajectory),
``losses.png`` (every stage's loss curve), ``report.md`` (settings, time per stage, attribute
accuracy over ``EVAL_PROMPTS`` random prompts x ``EVAL_SEEDS`` seeds with and without guidance,
read by ``npdiffusion.evaluation.shape_attributes``), and ``runs/`` (each stage's checkpoints).

``dataset="digits"`` (``npdiffusion demo --dataset digits``) trains the same stages on scikit-learn's
1,797 handwritten digits upscaled to 32x32 (``DIGITS``: the shapes settings with the data swapped),
and scores ``DIGIT_SEEDS`` samples of each digit's prompt with the classifier of
``npdiffusion.evaluation.digits`` (per-digit and overall accuracy, with and without guidance).

Small models on a 2-core CPU run fastest with one BLAS thread (OpenBLAS threads spin-wait between
the many small matrix products; measured in docs/benchmarks.md, "Training"), so the demo limits
BLAS to one thread while it runs (``limit_blas_threads``). Docs: docs/training.md ("The demo").
"""
from __future__ import annotations

import copy
import ctypes
import json
import os
import time

import numpy

# Classifier-free guidance for the report and pictures: on the demo's model, scales 1.5-3 follow the
# prompts best (all three attributes right: 84.0 / 83.5 / 83.0 % at 1.5 / 2 / 3, 80.5 % at 4, 67 %
# at 8; docs/studies.md, tools/study_guidance.py): past 3 the colour gets sharper but shapes break.
GUIDANCE_SCALE = 2.0
EVAL_PROMPTS = 50
EVAL_SEEDS = 4
# The report's sampler: DDPM's ancestral steps (fresh noise at every step), 25 of them. On the
# demo's model the stochastic samplers follow the prompts better than the deterministic ones, which
# keep a wrong early shape: all three right 86.5-91 % for DDPM and Euler-A at 10-25 steps against
# 81.5-84 % for DPM-Solver++ 2M (the model folder's own sampler) at the same steps
# (docs/studies.md, "Steps and samplers").
EVAL_STEPS = 25
EVAL_SCHEDULER = "DDPMScheduler"
DIGIT_SEEDS = 20                       # digits demo: 10 prompts x 20 seeds, as many samples as 50 x 4
DEMO_DATASETS = ("shapes", "digits")

#: The demo's settings: for each stage, the TOML keys that differ from the stage's defaults.
SETTINGS = {
    "data": {"dataset": "shapes", "num_images": 10000, "resolution": 32, "seed": 0},
    "clip": {"train": {"steps": 600, "batch_size": 64, "learning_rate": 2e-3, "lr_scheduler": "cosine",
                       "lr_warmup_steps": 20},
             "clip": {"patch_size": 8, "text_heads": 4, "vision_heads": 4, "text_intermediate_size": 128,
                      "vision_intermediate_size": 128}},
    "tokenizer": {"tokenizer": {"vocab_size": 1000, "model_max_length": 16}},
    "vae": {"train": {"steps": 1200, "batch_size": 8, "learning_rate": 2e-3,
                      "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 20},
            "vae": {"block_out_channels": [16, 32, 32], "latent_channels": 8, "norm_num_groups": 8,
                    "mid_block_add_attention": False, "reconstruction": "l2"}},
    "unet": {"train": {"steps": 2500, "batch_size": 32, "learning_rate": 2e-3, "lr_scheduler": "cosine",
                       "lr_warmup_steps": 20, "use_ema": True, "ema_decay": 0.999},
             "unet": {"block_out_channels": [32, 64], "snr_gamma": 5.0, "caption_dropout": 0.1}},
}

#: ``--quick``: the same pipeline at toy sizes (a smoke test, about a minute; the images are noise).
QUICK = {
    "data": {"num_images": 256},
    "clip": {"train": {"steps": 4, "batch_size": 16}, "clip": {"text_hidden_size": 16, "text_layers": 1,
                                                               "text_heads": 2, "vision_hidden_size": 16,
                                                               "vision_layers": 1, "vision_heads": 2,
                                                               "text_intermediate_size": 32,
                                                               "vision_intermediate_size": 32,
                                                               "projection_dim": 16}},
    "vae": {"train": {"steps": 4, "batch_size": 8}, "vae": {"block_out_channels": [8, 8, 8],
                                                            "norm_num_groups": 4}},
    "unet": {"train": {"steps": 4, "batch_size": 8}, "unet": {"block_out_channels": [8, 16],
                                                              "norm_num_groups": 4, "attention_head_dim": 4}},
}


#: ``dataset="digits"``: what differs from ``SETTINGS``. Only the data: 1,797 digits at 32x32 keep the
#: shapes' VAE (8x8x8 latents hold the 8x8 source with room to spare) and U-Net. The U-Net keeps the
#: shapes' steps (at 2,500 x 32 images, about 45 passes over the digits) rather than fewer: a digit's
#: identity is a shape, and shape was the slowest attribute the shapes demo learned (docs/benchmarks.md,
#: "Whole demo runs").
#: ``num_images`` is only a record here (the digits dataset always has all 1,797 images).
DIGITS = {"data": {"dataset": "digits", "num_images": 1797, "resolution": 32}}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def limit_blas_threads(n: int = 1) -> bool:
    """Ask the OpenBLAS that NumPy loaded to use ``n`` threads (via its C API); False if none was found."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            libs = {line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line}
    except OSError:
        return False
    done = False
    for lib in libs:
        try:
            handle = ctypes.CDLL(lib)
        except OSError:
            continue
        for sym in ("openblas_set_num_threads64_", "scipy_openblas_set_num_threads64_",
                    "scipy_openblas_set_num_threads", "openblas_set_num_threads"):
            fn = getattr(handle, sym, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                done = True
                break
    return done


def _check_dataset(dataset) -> str:
    if dataset not in DEMO_DATASETS:
        raise ValueError(f"demo: dataset must be one of {', '.join(DEMO_DATASETS)}, got {dataset!r}")
    return dataset


def demo_settings(quick: bool = False, dataset: str = "shapes") -> dict:
    """The settings a run uses: ``SETTINGS``, then ``DIGITS`` for the digits, then ``QUICK`` for ``quick``
    (``QUICK``'s ``num_images`` only matters for the shapes)."""
    settings = SETTINGS if _check_dataset(dataset) == "shapes" else _merge(SETTINGS, DIGITS)
    if quick:
        settings = _merge(settings, QUICK)
        if dataset != "shapes":
            settings["data"]["num_images"] = DIGITS["data"]["num_images"]
    return settings


def stage_configs(out: str, quick: bool = False, dataset: str = "shapes") -> dict:
    """``{stage: config dataclass}`` of the demo's four stages on ``dataset`` ("shapes" or "digits"),
    with outputs under ``out/runs``."""
    from npdiffusion.training import clip_stage, tokenizer_stage, unet_stage, vae_stage  # noqa: PLC0415
    from npdiffusion.training.config import build_config  # noqa: PLC0415

    settings = demo_settings(quick, dataset)
    runs = os.path.join(out, "runs")
    data = settings["data"]
    raw = {
        "tokenizer": {"output_dir": os.path.join(runs, "tokenizer"), "data": data, **settings["tokenizer"]},
        "clip": {"output_dir": os.path.join(runs, "clip"), "data": data,
                 **_merge(settings["clip"], {"clip": {"tokenizer": os.path.join(runs, "tokenizer", "tokenizer")}})},
        "vae": {"output_dir": os.path.join(runs, "vae"), "data": data, **settings["vae"]},
        "unet": {"output_dir": os.path.join(runs, "unet"), "data": data, **_merge(settings["unet"], {"unet": {
            "vae": os.path.join(runs, "vae", "vae"), "text_encoder": os.path.join(runs, "clip", "text_encoder"),
            "tokenizer": os.path.join(runs, "clip", "tokenizer")}})},
    }
    for name in ("clip", "vae", "unet"):
        raw[name]["train"] = {**raw[name]["train"], "checkpointing_steps": raw[name]["train"]["steps"],
                              "checkpoints_total_limit": 1}
    schemas = {"tokenizer": tokenizer_stage.CONFIG, "clip": clip_stage.CONFIG, "vae": vae_stage.CONFIG, "unet": unet_stage.CONFIG}
    return {name: build_config(schemas[name], raw[name], source=f"demo {name} settings") for name in raw}


def _toml(d: dict, prefix: str = "") -> str:
    """A nested dict of plain values as TOML text (tables after the top-level keys)."""
    lines, tables = [], []
    for k, v in d.items():
        if isinstance(v, dict):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {json.dumps(list(v) if isinstance(v, tuple) else v)}")
    text = "\n".join(lines) + ("\n" if lines else "")
    for k, v in tables:
        text += f"\n[{prefix}{k}]\n" + _toml(v, prefix=f"{prefix}{k}.")
    return text


def random_prompts(n: int, seed: int = 1234) -> list[str]:
    """``n`` shapes captions with independently uniform colour, shape and position."""
    from npdiffusion.data.shapes import COLOR_NAMES, POSITION_NAMES, SHAPES, caption  # noqa: PLC0415

    rng = numpy.random.default_rng(seed)
    return [caption(COLOR_NAMES[rng.integers(len(COLOR_NAMES))], SHAPES[rng.integers(len(SHAPES))],
                    POSITION_NAMES[rng.integers(len(POSITION_NAMES))]) for _ in range(n)]


def eval_scheduler(config):
    """The report's sampler (``EVAL_SCHEDULER``) on the model's training schedule (its scheduler config)."""
    import npdiffusion.schedulers as schedulers  # noqa: PLC0415

    # None-valued keys of another sampler's config mean "this sampler's default" in diffusers.
    config = {k: v for k, v in dict(config).items() if v is not None}
    return getattr(schedulers, EVAL_SCHEDULER).from_config(config, clip_sample=False)


def generate(pipe, prompts, seeds, guidance_scale: float, steps: int = EVAL_STEPS, chunk: int = 100):
    """uint8 (P x len(seeds), S, S, 3): prompt-major, one NumPy seed per image."""
    flat_p = [p for p in prompts for _ in seeds]
    flat_s = [int(s) for _ in prompts for s in seeds]
    out = []
    for i in range(0, len(flat_p), chunk):
        images = pipe(flat_p[i:i + chunk], num_inference_steps=steps, guidance_scale=guidance_scale,
                      seed=flat_s[i:i + chunk], output_type="np", progress=False).images
        out.append((numpy.clip(numpy.asarray(images, dtype=numpy.float64), 0.0, 1.0) * 255.0).round().astype(numpy.uint8))
    return numpy.concatenate(out)


def evaluate(pipe, n_prompts: int = EVAL_PROMPTS, n_seeds: int = EVAL_SEEDS, guidance_scale: float = GUIDANCE_SCALE,
             steps: int = EVAL_STEPS) -> dict:
    """Attribute accuracy with and without guidance: ``{"guided": ShapeScore, "unguided": ShapeScore}``."""
    from npdiffusion.evaluation.shape_attributes import score  # noqa: PLC0415

    prompts = random_prompts(n_prompts)
    seeds = list(range(n_seeds))
    flat = [p for p in prompts for _ in seeds]
    out = {}
    for name, g in (("guided", guidance_scale), ("unguided", 1.0)):
        out[name] = score(generate(pipe, prompts, seeds, g, steps), flat)
    return out


def digit_prompts() -> list[str]:
    """The ten digits prompts ``"a handwritten digit zero"`` ... ``"... nine"``, in digit order."""
    from npdiffusion.data.digits import digit_caption  # noqa: PLC0415

    return [digit_caption(d) for d in range(10)]


def evaluate_digits(pipe, n_seeds: int = DIGIT_SEEDS, guidance_scale: float = GUIDANCE_SCALE,
                    steps: int = EVAL_STEPS, clf=None) -> dict:
    """Digit accuracy with and without guidance over the ten prompts x ``n_seeds`` seeds:
    ``{"guided": DigitScore, "unguided": DigitScore}`` (``npdiffusion.evaluation.digits``)."""
    from npdiffusion.evaluation.digits import score, train_classifier  # noqa: PLC0415

    if clf is None:
        clf, _ = train_classifier()
    prompts = digit_prompts()
    seeds = list(range(n_seeds))
    labels = [d for d in range(10) for _ in seeds]
    return {name: score(generate(pipe, prompts, seeds, g, steps), labels, clf)
            for name, g in (("guided", guidance_scale), ("unguided", 1.0))}


def vae_round_trip_digits(pipe, dataset, clf, n: int = 200) -> float:
    """Share of ``n`` real digits (a fixed random subset) that the classifier reads right after the
    VAE's encode (posterior mean) and decode: the ceiling of any diffusion model on these latents."""
    from npdiffusion.backend import asarray, to_numpy  # noqa: PLC0415
    from npdiffusion.data.dataset import to_model_input, to_uint8  # noqa: PLC0415
    from npdiffusion.evaluation.digits import score  # noqa: PLC0415
    from npdiffusion.nn.module import no_cache  # noqa: PLC0415

    idx = numpy.sort(numpy.random.default_rng(0).permutation(len(dataset))[:n])
    out = []
    with no_cache():
        for lo in range(0, len(idx), 50):
            x = asarray(to_model_input(dataset.get_images(idx[lo:lo + 50])), dtype=numpy.float32)
            out.append(to_uint8(to_numpy(pipe.vae.decode(pipe.vae.encode(x).mean))))
    return score(numpy.concatenate(out), dataset.labels[idx], clf).overall


def _pil(images):
    from PIL import Image  # noqa: PLC0415

    return [Image.fromarray(im) for im in images]


def samples_png(pipe, path: str, guidance_scale: float, steps: int = EVAL_STEPS, dataset: str = "shapes") -> None:
    """A grid: rows are prompts (shapes: every colour, shape and position appears; digits: zero to
    nine), columns are seeds 0..3."""
    from npdiffusion.data.shapes import COLOR_NAMES, POSITION_NAMES, SHAPES, caption  # noqa: PLC0415
    from npdiffusion.pipelines.image_utils import image_grid  # noqa: PLC0415
    from npdiffusion.plotting import save_png  # noqa: PLC0415

    if _check_dataset(dataset) == "digits":
        prompts = digit_prompts()
    else:
        prompts = [caption(COLOR_NAMES[i % 7], SHAPES[i % 3], POSITION_NAMES[i % 5]) for i in range(7)]
    seeds = [0, 1, 2, 3]
    images = generate(pipe, prompts, seeds, guidance_scale, steps)
    labels = [f"{p} (seed {s})" for p in prompts for s in seeds]
    save_png(image_grid(_pil(images), labels, cols=len(seeds), min_tile=128, font_size=11), path)


def diffusion_png(pipe, dataset, path: str, guidance_scale: float, steps: int = EVAL_STEPS) -> None:
    """Row 1: a training image's latents noised at growing t, decoded; row 2: one sample's latents
    during denoising, decoded (x_t / scaling_factor through the VAE decoder)."""
    from npdiffusion.backend import asarray, to_numpy  # noqa: PLC0415
    from npdiffusion.data.dataset import to_model_input, to_uint8  # noqa: PLC0415
    from npdiffusion.diffusion.forward import q_sample  # noqa: PLC0415
    from npdiffusion.nn.module import no_cache  # noqa: PLC0415
    from npdiffusion.pipelines.image_utils import image_grid  # noqa: PLC0415
    from npdiffusion.plotting import save_png  # noqa: PLC0415

    sched = pipe.scheduler
    sf = float(pipe.vae.config["scaling_factor"])
    ac = numpy.asarray(sched.alphas_cumprod, dtype=numpy.float64)
    ts = [0, 100, 200, 300, 400, 500, 600, 700, 800, 999]
    with no_cache():
        x = asarray(to_model_input(dataset.get_images(numpy.arange(1))), dtype=numpy.float32)
        z0 = pipe.vae.encode(x).mean * sf
        noise = asarray(numpy.random.default_rng(0).standard_normal((len(ts),) + tuple(z0.shape[1:])), dtype=numpy.float32)
        zt = q_sample(asarray(numpy.repeat(to_numpy(z0), len(ts), axis=0)), numpy.asarray(ts), ac, noise)
        row1 = to_uint8(to_numpy(pipe.vae.decode(asarray(zt, dtype=numpy.float32) / sf)))
    prompt = dataset.captions[0]
    kept = []

    def keep(p, i, t, tensors):
        kept.append((int(t), to_numpy(tensors["latents"]).copy()))
        return tensors

    pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, seed=0, output_type="np",
         progress=False, callback_on_step_end=keep)
    pick = numpy.linspace(0, len(kept) - 1, len(ts)).round().astype(int)
    lat = numpy.concatenate([kept[i][1] for i in pick])
    with no_cache():
        row2 = to_uint8(to_numpy(pipe.vae.decode(asarray(lat, dtype=numpy.float32) / sf)))
    labels = [f"noised t={t}" for t in ts] + [f"sampling, after t={kept[i][0]}" for i in pick]
    labels[0] = f"'{prompt}' (training image, t=0)"
    labels[len(ts)] = f"'{prompt}': after t={kept[pick[0]][0]}"
    grid = image_grid(_pil(numpy.concatenate([row1, row2])), labels, cols=len(ts), min_tile=96, font_size=10)
    save_png(grid, path)


def losses_png(histories: dict, path: str) -> None:
    """One panel per stage (log-scale loss and its running mean), stacked vertically."""
    from PIL import Image  # noqa: PLC0415

    from npdiffusion.plotting import line_plot, save_png  # noqa: PLC0415

    panels = []
    for name, rows in histories.items():
        rows = [r for r in rows if not r["skipped"]]
        if not rows:
            continue
        steps = numpy.asarray([r["step"] for r in rows], dtype=numpy.float64)
        loss = numpy.asarray([r["loss"] for r in rows], dtype=numpy.float64)
        w = max(1, len(loss) // 25)
        smooth = numpy.convolve(loss, numpy.ones(w) / w, mode="valid")
        panels.append(line_plot({"loss": (steps, loss), f"mean of {w}": (steps[w - 1:], smooth)},
                                title=f"{name} stage", xlabel="step", ylabel="loss",
                                logy=bool(numpy.all(loss > 0)), size=(800, 320)))
    canvas = Image.new("RGB", (800, 320 * len(panels)), "white")
    for i, p in enumerate(panels):
        canvas.paste(p, (0, 320 * i))
    save_png(canvas, path)


def _digit_rows(scores: dict) -> str:
    """Markdown: one row per prompted digit and one overall, one column per sampling (guided, unguided)."""
    from npdiffusion.data.digits import DIGIT_NAMES  # noqa: PLC0415

    names = list(scores)
    lines = ["| digit | " + " | ".join(names) + " | samples |", "|---|" + "---|" * len(names) + "---|"]
    first = scores[names[0]]
    for d, name in enumerate(DIGIT_NAMES):
        cells = " | ".join(f"{100 * scores[n].per_digit[d]:.1f}%" for n in names)
        lines.append(f"| {name} | {cells} | {int(first.counts[d])} |")
    lines.append("| **all** | " + " | ".join(f"**{100 * scores[n].overall:.1f}%**" for n in names)
                 + f" | {first.n} |")
    return "\n".join(lines)


def _confusion_rows(score) -> str:
    """Markdown confusion matrix of a ``DigitScore``: rows the prompted digit, columns the digit read."""
    lines = ["| prompted, read as: | " + " | ".join(str(d) for d in range(10)) + " |", "|---|" + "---|" * 10]
    lines += [f"| {d} | " + " | ".join(str(int(c)) for c in score.confusion[d]) + " |" for d in range(10)]
    return "\n".join(lines)


def _score_rows(scores: dict) -> str:
    lines = ["| sampling | colour | shape | position | all three |", "|---|---|---|---|---|"]
    for name, s in scores.items():
        d = s.as_dict()
        lines.append(f"| {name} | {100 * d['color']:.1f}% | {100 * d['shape']:.1f}% | {100 * d['position']:.1f}% "
                     f"| {100 * d['joint']:.1f}% |")
    return "\n".join(lines)


def run_demo(out: str = "npdiffusion-demo", quick: bool = False, progress=None, log=print,
             dataset: str = "shapes") -> str:
    """Train every stage on ``dataset`` ("shapes" or "digits") into ``out`` and write the pictures and
    report (module docstring); returns the one-line summary. The digits need scikit-learn (checked
    first: ``MissingDependencyError`` before anything is written)."""
    from npdiffusion.pipelines.stable_diffusion import StableDiffusionPipeline  # noqa: PLC0415
    from npdiffusion.training import clip_stage, tokenizer_stage, unet_stage, vae_stage  # noqa: PLC0415
    from npdiffusion.io.atomic import atomic_write_text  # noqa: PLC0415
    from npdiffusion.training.checkpoint import prepare_output_dir  # noqa: PLC0415
    from npdiffusion.training.config import config_to_dict  # noqa: PLC0415
    from npdiffusion.training.loop import read_history_csv  # noqa: PLC0415
    from npdiffusion.training.stages import dataset_from_config  # noqa: PLC0415

    digits = _check_dataset(dataset) == "digits"
    if digits:
        from npdiffusion.evaluation.digits import require_sklearn  # noqa: PLC0415

        require_sklearn()
    start = time.perf_counter()
    out = prepare_output_dir(out)
    if os.path.isdir(os.path.join(out, "runs")):
        from npdiffusion.training.loop import TrainingError  # noqa: PLC0415

        raise TrainingError(f"{out!r} already holds a demo run (its runs/ folder); choose another --out or "
                            "delete that folder first")
    blas_one = limit_blas_threads(1)
    from npdiffusion import parallel  # noqa: PLC0415

    # One thread for element-wise work too: at the demo's sizes (arrays of 64 K-1 M entries) handing
    # parts to a second thread cost more than it saved (U-Net step 199-243 ms with one, 276-287 ms
    # with two; docs/benchmarks.md, "Training").
    parallel.set_num_threads(1)
    configs = stage_configs(out, quick, dataset)
    os.makedirs(os.path.join(out, "configs"), exist_ok=True)
    for name, cfg in configs.items():
        atomic_write_text(os.path.join(out, "configs", f"{name}.toml"),
                          f"# npdiffusion train {name} --config {name}.toml  (written by npdiffusion demo)\n"
                          + _toml(config_to_dict(cfg)))
    times, summaries = {}, {}
    for name, module in (("tokenizer", tokenizer_stage), ("clip", clip_stage), ("vae", vae_stage), ("unet", unet_stage)):
        t0 = time.perf_counter()
        if name == "unet":
            from npdiffusion.training.stages import run_model_stage  # noqa: PLC0415

            summaries[name] = run_model_stage(configs[name], unet_stage.build_stage, progress=progress, log=log)
        else:
            summaries[name] = module.train(configs[name], progress=progress, log=log)
        times[name] = time.perf_counter() - t0
        log(summaries[name])
    model = os.path.join(out, "model")
    unet_stage.write_pipeline(configs["unet"], model)
    histories = {n: read_history_csv(os.path.join(configs[n].output_dir, "losses.csv")) for n in ("clip", "vae", "unet")}
    losses_png(histories, os.path.join(out, "losses.png"))

    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe.scheduler = eval_scheduler(pipe.scheduler.config)
    steps = 4 if quick else EVAL_STEPS
    if digits:
        from npdiffusion.evaluation.digits import train_classifier  # noqa: PLC0415

        clf, _ = train_classifier()
        n_prompts, n_seeds = 10, (1 if quick else DIGIT_SEEDS)
        scores = evaluate_digits(pipe, n_seeds, GUIDANCE_SCALE, steps, clf)
    else:
        n_prompts, n_seeds = (4, 2) if quick else (EVAL_PROMPTS, EVAL_SEEDS)
        scores = evaluate(pipe, n_prompts, n_seeds, GUIDANCE_SCALE, steps)
    times["evaluation"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    data = dataset_from_config(configs["unet"].data)
    if digits:
        from npdiffusion.evaluation.digits import score as digit_score  # noqa: PLC0415

        n_vae = 20 if quick else 200
        real = digit_score(data.get_images(numpy.arange(len(data))), data.labels, clf).overall
        vae = vae_round_trip_digits(pipe, data, clf, n_vae)
    samples_png(pipe, os.path.join(out, "samples.png"), GUIDANCE_SCALE, steps, dataset)
    diffusion_png(pipe, data, os.path.join(out, "diffusion.png"), GUIDANCE_SCALE, steps)
    times["pictures"] = time.perf_counter() - t0
    total = time.perf_counter() - start
    settings_json = json.dumps(demo_settings(quick, dataset), indent=1)
    timing = ["## Time per stage", "", "| stage | seconds | summary |", "|---|---|---|",
              *[f"| {n} | {t:.1f} | {summaries.get(n, '')} |" for n, t in times.items()], f"| total | {total:.1f} | |", ""]
    pictures = "Pictures: samples.png (prompts x seeds), diffusion.png (noising and denoising), losses.png."
    train_min = sum(times[n] for n in configs) / 60
    wrote = f"wrote {model}, samples.png, diffusion.png, losses.png, report.md in {out}"
    if digits:
        guided, unguided = scores["guided"], scores["unguided"]
        report = [
            "# npdiffusion demo report: handwritten digits", "",
            f"Trained from scratch on scikit-learn's {len(data)} handwritten digits (8x8, upscaled to "
            f"{configs['unet'].data.resolution}x{configs['unet'].data.resolution}) in {total / 60:.1f} min "
            f"({'quick settings' if quick else 'demo settings'}; BLAS limited to one thread: {blas_one}).", "",
            *timing,
            f"## Digit accuracy ({n_prompts} prompts x {n_seeds} seeds, {steps} steps of {EVAL_SCHEDULER})", "",
            f"Share of samples of \"a handwritten digit {{zero ... nine}}\" that the digits classifier "
            f"(npdiffusion.evaluation.digits: an SVC fitted to the real 8x8 digits; a sample is read after "
            f"block-averaging it back to 8x8) reads as the prompted digit. Guided: classifier-free guidance "
            f"scale {GUIDANCE_SCALE}; unguided: scale 1 (the conditional model alone). Chance is 10%.", "",
            _digit_rows(scores), "",
            f"Ceilings: the classifier reads {100 * real:.1f}% of the {len(data)} real digits at this size; after "
            f"the VAE's encode and decode, {100 * vae:.1f}% of {n_vae} of them (about the ceiling of "
            "any U-Net on these latents).", "",
            "Confusion with guidance (rows: the prompted digit; columns: the digit read):", "",
            _confusion_rows(guided), "",
            "## Settings (each stage's full config is in configs/)", "", "```json", settings_json, "```", "",
            pictures, "",
        ]
        summary = (f"demo: trained tokenizer+CLIP, VAE and U-Net on the digits in {train_min:.1f} min "
                   f"(total {total / 60:.1f} min); prompted digit recognized in {100 * guided.overall:.0f}% of "
                   f"samples with guidance {GUIDANCE_SCALE}, {100 * unguided.overall:.0f}% without; {wrote}")
    else:
        guided, unguided = scores["guided"].as_dict(), scores["unguided"].as_dict()
        report = [
            "# npdiffusion demo report", "",
            f"Trained from scratch on {configs['unet'].data.num_images} synthetic 32x32 shapes in {total / 60:.1f} min "
            f"({'quick settings' if quick else 'demo settings'}; BLAS limited to one thread: {blas_one}).", "",
            *timing,
            f"## Attribute accuracy ({n_prompts} random prompts x {n_seeds} seeds, {steps} steps of {EVAL_SCHEDULER})", "",
            f"Guided: classifier-free guidance scale {GUIDANCE_SCALE}; unguided: scale 1 (the conditional model "
            "alone). Read by npdiffusion.evaluation.shape_attributes (hue, centroid, bounding-box fill).", "",
            _score_rows(scores), "",
            "## Settings (each stage's full config is in configs/)", "", "```json", settings_json, "```", "",
            pictures, "",
        ]
        summary = (f"demo: trained tokenizer+CLIP, VAE and U-Net in {train_min:.1f} min "
                   f"(total {total / 60:.1f} min); prompts followed (colour, shape and position all right) "
                   f"{100 * guided['joint']:.0f}% with guidance {GUIDANCE_SCALE}, {100 * unguided['joint']:.0f}% without; "
                   f"{wrote}")
    atomic_write_text(os.path.join(out, "report.md"), "\n".join(report))
    return summary
