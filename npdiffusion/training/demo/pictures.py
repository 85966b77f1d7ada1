"""The demo's pictures: ``samples.png`` (prompts x seeds), ``diffusion.png`` (a training image noised over
t; one sample's denoising trajectory) and ``losses.png`` (every stage's loss curve).

Shapes: images uint8 (N, S, S, 3); latents (B, C, h, w).
"""
from __future__ import annotations

import numpy

from npdiffusion.training.demo.evaluation import digit_prompts, generate
from npdiffusion.training.demo.settings import EVAL_STEPS, check_dataset


def _pil(images):
    from PIL import Image  # noqa: PLC0415

    return [Image.fromarray(im) for im in images]


def samples_png(pipe, path: str, guidance_scale: float, steps: int = EVAL_STEPS, dataset: str = "shapes") -> None:
    """A grid: rows are prompts (shapes: every colour, shape and position appears; digits: zero to
    nine), columns are seeds 0..3."""
    from npdiffusion.data.shapes import COLOR_NAMES, POSITION_NAMES, SHAPES, caption  # noqa: PLC0415
    from npdiffusion.pipelines.image_utils import image_grid  # noqa: PLC0415
    from npdiffusion.plotting import save_png  # noqa: PLC0415

    if check_dataset(dataset) == "digits":
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

    from npdiffusion.plotting import save_png  # noqa: PLC0415
    from npdiffusion.training.loop import loss_plot  # noqa: PLC0415

    panels = [loss_plot(rows, title=f"{name} stage", size=(800, 320)) for name, rows in histories.items()]
    panels = [p for p in panels if p is not None]
    canvas = Image.new("RGB", (800, 320 * len(panels)), "white")
    for i, p in enumerate(panels):
        canvas.paste(p, (0, 320 * i))
    save_png(canvas, path)
