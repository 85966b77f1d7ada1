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

The CLIP, VAE and U-Net stages train as N MPI ranks (``processes``: ``--processes N``, default every core;
one process, said in one line, without mpi4py or mpiexec); ``--seed S`` is every model stage's
training seed.

Modules: ``settings`` (SETTINGS, QUICK, DIGITS, the evaluation constants, each stage's config),
``processes`` (how many ranks train each stage, and launching them), ``evaluation`` (sampling and
scoring), ``pictures`` (the PNGs), ``report`` (report.md, report.json and the summary), ``measured``
(the spread over training seeds, written by tools/demo_seeds.py), ``run`` (``run_demo``, the whole run
in order).
"""
from npdiffusion.training.demo.evaluation import (
    digit_prompts,
    eval_scheduler,
    evaluate,
    evaluate_digits,
    generate,
    random_prompts,
    vae_round_trip_digits,
)
from npdiffusion.training.demo.pictures import diffusion_png, losses_png, samples_png
from npdiffusion.training.demo.run import limit_blas_threads, run_demo
from npdiffusion.training.demo.settings import (
    DEMO_DATASETS,
    DIGIT_SEEDS,
    DIGITS,
    EVAL_PROMPTS,
    EVAL_SCHEDULER,
    EVAL_SEEDS,
    EVAL_STEPS,
    GUIDANCE_SCALE,
    QUICK,
    SETTINGS,
    demo_settings,
    stage_configs,
)

__all__ = ["run_demo", "stage_configs", "demo_settings", "limit_blas_threads", "SETTINGS", "QUICK", "DIGITS",
           "DEMO_DATASETS", "GUIDANCE_SCALE", "EVAL_PROMPTS", "EVAL_SEEDS", "EVAL_STEPS", "EVAL_SCHEDULER",
           "DIGIT_SEEDS", "random_prompts", "eval_scheduler", "generate", "evaluate", "digit_prompts",
           "evaluate_digits", "vae_round_trip_digits", "samples_png", "diffusion_png", "losses_png"]
