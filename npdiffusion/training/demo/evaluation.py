"""The demo's scores: sample with the trained pipeline and read the samples (shapes: colour, shape and
position; digits: the digit), with and without classifier-free guidance.

Shapes: images uint8 (N, S, S, 3), prompt-major (N = prompts x seeds).
"""
from __future__ import annotations

import numpy

from npdiffusion.training.demo.settings import DIGIT_SEEDS, EVAL_PROMPTS, EVAL_SCHEDULER, EVAL_SEEDS, EVAL_STEPS, GUIDANCE_SCALE


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
