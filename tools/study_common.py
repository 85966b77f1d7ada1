"""Shared pieces of the tools/study_*.py scripts: load the demo pipeline, the fixed prompts and seeds,
sampling, scoring with the attribute checker, diversity, timing, figures and markdown tables.

Shapes: P prompts, S seeds per prompt, N = P S images (prompt-major: image i is prompt i // S with
seed i % S), side 32; images uint8 (N, 32, 32, 3); latents (N, C, h, w) (C = the VAE's latent
channels, h = w = 8 for the demo); text embeddings (N, T, D) (T = the tokenizer's model_max_length).

Every study is judged the way the demo's report is (npdiffusion/training/demo/evaluation.py ``evaluate``):
``random_prompts(P)`` (seed 1234: uniform colour, shape and position), seeds 0..S-1, one NumPy
generator per image (``seed=[...]``), images read back by
``npdiffusion.evaluation.shape_attributes.score``. ``--quick`` shrinks everything to a smoke test.

Each script writes ``OUT.png`` and ``OUT.md`` (the same stem): the markdown table is printed and
saved so that docs/studies.md can include it. Bad input (a missing model folder, a bad number)
prints one line on stderr and exits with status 2 (``run_main``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:                      # `python tools/study_x.py` from anywhere
    sys.path.insert(0, REPO)

from npdiffusion.training.demo import (  # noqa: E402
    EVAL_PROMPTS,
    EVAL_SEEDS,
    EVAL_STEPS,
    GUIDANCE_SCALE,
    generate,
    limit_blas_threads,
    random_prompts,
)

__all__ = ["StudyError", "EVAL_PROMPTS", "EVAL_SEEDS", "EVAL_STEPS", "GUIDANCE_SCALE", "SCHEDULERS",
           "takes_prediction_type", "add_common_args", "run_main", "load_pipeline", "prompts_and_seeds", "generate", "score_images",
           "diversity", "Timer", "markdown_table", "write_table", "save_figure", "paste_grid", "pct",
           "initial_latents", "decode", "text_embeddings"]


class StudyError(Exception):
    """A problem with the user's input: ``run_main`` prints its message on one line and exits 2."""


#: The samplers compared (the classes of npdiffusion.schedulers) and the config overrides each needs.
SCHEDULERS = {
    "DDPM": ("DDPMScheduler", {"clip_sample": False}),
    "DDIM": ("DDIMScheduler", {"clip_sample": False}),
    "PNDM": ("PNDMScheduler", {"skip_prk_steps": True}),        # PLMS, as Stable Diffusion configures it
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler-A": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM-Solver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),   # 2M, also from an SDE folder
}


def takes_prediction_type(name: str, base_config: dict) -> bool:
    """Whether scheduler ``name`` can sample a model with ``base_config``'s prediction type (a scheduler
    refuses the types it cannot step, as diffusers' does at its first step)."""
    try:
        make_scheduler(name, base_config)
    except ValueError:
        return False
    return True


def make_scheduler(name: str, base_config: dict):
    """The scheduler ``name`` (a key of SCHEDULERS) built from the model's scheduler config."""
    import npdiffusion.schedulers as schedulers  # noqa: PLC0415

    if name not in SCHEDULERS:
        raise StudyError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {name!r}")
    cls_name, over = SCHEDULERS[name]
    # None-valued keys of another sampler's config (DPM-Solver's variance_type=None) mean "this
    # sampler's default" in diffusers; pass them as absent.
    config = {k: v for k, v in dict(base_config).items() if v is not None}
    return getattr(schedulers, cls_name).from_config(config, **over)


# ---------------------------------------------------------------------------------------- CLI
def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def number_list(text: str, minimum: float = 0.0) -> list:
    """``"1,2,4"`` -> [1.0, 2.0, 4.0] (each >= minimum)."""
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or any(not numpy.isfinite(v) or v < minimum for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers >= {minimum:g}, got {text!r}")
    return vals


def int_list(text: str) -> list:
    """``"2,4,8"`` -> [2, 4, 8] (each a positive int)."""
    vals = number_list(text, 1.0)
    if any(v != int(v) for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return [int(v) for v in vals]


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):                  # one line, exit status 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_common_args(description: str, default_out: str) -> argparse.ArgumentParser:
    """A parser with --model, --out, --quick, --prompts, --seeds."""
    p = _OneLineParser(description=description, prog=os.path.basename(sys.argv[0]) or "study")
    p.add_argument("--model", required=True, metavar="DIR",
                   help="the demo's model folder (diffusers layout: npdiffusion demo --out D writes D/model)")
    p.add_argument("--out", default=default_out, metavar="PNG",
                   help=f"the figure to write; the table goes next to it as .md (default {default_out})")
    p.add_argument("--quick", action="store_true", help="tiny settings: a smoke test of the script")
    p.add_argument("--prompts", type=positive_int, default=None,
                   help=f"number of evaluation prompts (default {EVAL_PROMPTS}, the demo's; --quick 2)")
    p.add_argument("--seeds", type=positive_int, default=None,
                   help=f"seeds per prompt (default {EVAL_SEEDS}, the demo's; --quick 2)")
    return p


def run_main(fn, argv=None) -> int:
    """Run ``fn(argv)``; a StudyError, missing file or bad value prints one line and returns 2."""
    from npdiffusion.pipelines.loading import PipelineFolderError  # noqa: PLC0415

    try:
        fn(argv)
    except (StudyError, FileNotFoundError, PipelineFolderError) as exc:
        print(f"{os.path.basename(sys.argv[0]) or 'study'}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def out_paths(out: str) -> tuple[str, str]:
    """(figure .png, table .md) from --out (a path ending in .png)."""
    if not out.lower().endswith(".png"):
        raise StudyError(f"--out must name a .png file, got {out!r}")
    return out, out[:-4] + ".md"


# ------------------------------------------------------------------------------------ the model
def load_pipeline(model_dir: str, deterministic: bool = False):
    """The demo's ``StableDiffusionPipeline`` from its model folder; BLAS limited to one thread (faster
    for the demo's small matrices on a shared CPU, docs/benchmarks.md "Training"). ``deterministic``: a
    stochastic sampler of the folder (the demo's DPM-Solver++ 2M SDE) is replaced by its ODE form, so that
    two sampling paths from the same initial latents can be compared image for image."""
    from npdiffusion.pipelines.stable_diffusion import StableDiffusionPipeline  # noqa: PLC0415

    if not os.path.isfile(os.path.join(model_dir, "model_index.json")):
        raise StudyError(f"--model {model_dir!r} is not a model folder (no model_index.json); "
                         "give the model/ folder that `npdiffusion demo --out D` writes (D/model)")
    limit_blas_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    algorithm = pipe.scheduler.config.get("algorithm_type", "")
    if deterministic and algorithm.startswith("sde-"):
        pipe.scheduler = type(pipe.scheduler).from_config({**pipe.scheduler.config, "algorithm_type": algorithm[4:]})
    return pipe


def prompts_and_seeds(args) -> tuple[list, list, list]:
    """(prompts (P), seeds (S), flat prompts (N = P S, prompt-major)) from --prompts/--seeds/--quick."""
    n_p = args.prompts or (2 if args.quick else EVAL_PROMPTS)
    n_s = args.seeds or (2 if args.quick else EVAL_SEEDS)
    prompts = random_prompts(n_p)
    seeds = list(range(n_s))
    return prompts, seeds, [p for p in prompts for _ in seeds]


def text_embeddings(pipe, texts: list):
    """The text tower's last hidden state (len(texts), T, D) of ``texts``, padded like the pipeline's."""
    from npdiffusion.backend import asarray  # noqa: PLC0415
    from npdiffusion.nn.module import no_cache  # noqa: PLC0415

    ids = pipe.tokenizer(list(texts), max_length=pipe.tokenizer.model_max_length, padding="max_length",
                         truncation=True)
    with no_cache():
        return pipe.text_encoder(asarray(ids))[0]


def initial_latents(pipe, seeds: list) -> numpy.ndarray:
    """(len(seeds), C, h, w) float32: image i's initial noise from numpy.random.default_rng(seeds[i]),
    the same latents as the pipeline's ``seed=[...]`` (``NoiseSource``, kind "numpy")."""
    c = pipe.unet.config["in_channels"]
    size = pipe.unet.config["sample_size"]
    # drawn in float32 as the pipeline's NoiseSource draws them, so these are the pipeline's latents
    return numpy.concatenate([numpy.random.default_rng(int(s)).standard_normal((1, c, size, size), dtype=numpy.float32)
                              for s in seeds])


def decode(pipe, latents) -> numpy.ndarray:
    """Final latents (N, C, h, w) -> uint8 images (N, 32, 32, 3), as ``demo.generate`` rounds them."""
    from npdiffusion.nn.module import no_cache  # noqa: PLC0415

    with no_cache():
        images = pipe.decode_latents(latents, output_type="np")
    return (numpy.clip(numpy.asarray(images, dtype=numpy.float64), 0.0, 1.0) * 255.0).round().astype(numpy.uint8)


# ---------------------------------------------------------------------------------- measuring
def score_images(images, flat_prompts) -> dict:
    """{"colour", "shape", "position", "joint"} accuracies in [0, 1] of images (N, 32, 32, 3) vs their prompts."""
    from npdiffusion.evaluation.shape_attributes import score  # noqa: PLC0415

    s = score(images, flat_prompts)
    return {"colour": s.color, "shape": s.shape, "position": s.position, "joint": s.joint}


def diversity(images, n_seeds: int) -> float:
    """Mean pairwise RMS pixel distance (pixels in [0, 1]) between the seeds of the same prompt.

    images (P S, H, W, 3) prompt-major. For prompt p and seeds a < b: sqrt(mean((x_pa - x_pb)^2));
    averaged over all pairs and prompts. 0 when every seed gives the same image; two images that
    differ by 1 (full scale) at every pixel are 1 apart. Needs at least two seeds.
    """
    x = numpy.asarray(images, dtype=numpy.float64) / (255.0 if numpy.asarray(images).dtype == numpy.uint8 else 1.0)
    n_seeds = int(n_seeds)
    if n_seeds < 2 or x.shape[0] % n_seeds:
        raise ValueError(f"diversity: need >= 2 seeds dividing the {x.shape[0]} images, got n_seeds={n_seeds}")
    x = x.reshape(x.shape[0] // n_seeds, n_seeds, -1)                        # (P, S, H W 3)
    d2 = ((x[:, :, None, :] - x[:, None, :, :]) ** 2).mean(axis=-1)          # (P, S, S)
    iu = numpy.triu_indices(n_seeds, 1)
    return float(numpy.sqrt(d2[:, iu[0], iu[1]]).mean())


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds``: wall time of the block."""

    def __enter__(self):
        self.start = time.perf_counter()
        self.seconds = float("nan")
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        return False


# -------------------------------------------------------------------------------------- output
def pct(v: float) -> str:
    return f"{100.0 * v:.1f}%"


def markdown_table(headers: list, rows: list) -> str:
    """A GitHub markdown table (each cell str()-ed)."""
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        if len(r) != len(headers):
            raise ValueError(f"markdown_table: row {r!r} has {len(r)} cells, expected {len(headers)}")
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines) + "\n"


def write_table(path: str, title: str, table: str, notes: str = "") -> str:
    """Write ``# title``, the notes and the table to ``path``, print the table, return the text."""
    from npdiffusion.io.atomic import atomic_write_text  # noqa: PLC0415

    text = f"<!-- written by {os.path.basename(sys.argv[0]) or 'a study script'} -->\n**{title}**\n\n"
    text += (notes.strip() + "\n\n" if notes.strip() else "") + table
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, text)
    print(text)
    return text


def paste_grid(panels: list, cols: int):
    """PIL images of equal size pasted ``cols`` per row on white."""
    from PIL import Image  # noqa: PLC0415

    w, h = panels[0].size
    rows = -(-len(panels) // cols)
    canvas = Image.new("RGB", (w * min(cols, len(panels)), h * rows), "white")
    for k, p in enumerate(panels):
        canvas.paste(p, ((k % cols) * w, (k // cols) * h))
    return canvas


def save_figure(image, path: str) -> None:
    from npdiffusion.plotting import save_png  # noqa: PLC0415

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_png(image, path)
    print(f"wrote {path}")
