"""Host synchronizations of npdiffusion on CuPy, counted on the stand-in: the audit table of docs/gpu.md.

Measured (each on the stand-in, ``count_syncs``):

* one forward and one backward of the U-Net (the benchmark's layout of tools/bench_unet.py at toy
  widths: the counts depend on the layout, not the widths), the VAE and CLIP's text model;
* training steps of the CLIP, VAE and U-Net stages (``Trainer._one_step``: batch, forward, loss,
  backward, gradient norm and clipping, AdamW, EMA), on the quick demo's settings;
* sampling with every scheduler: the syncs per denoising iteration (one U-Net evaluation and one
  scheduler step; Heun and the PNDM warm-up take two or more iterations per inference step) and
  per call (the text encoding, the initial latents, the decoding).

``tools/gpu_audit.py`` writes ``markdown(audit(...))`` between the markers in docs/gpu.md;
``tests/test_cupy_standin_syncs.py`` asserts the budgets with these functions. Call sites are shown
as ``path (function)``, without line numbers, so the table changes only when the syncs do.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import re
import tempfile

import numpy

from npdiffusion import cupy_standin

#: the U-Net of tools/bench_unet.py's benchmark at toy widths
BENCH_LAYOUT = dict(
    block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=8, attention_head_dim=2, in_channels=4, out_channels=4, sample_size=8)

SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
              "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler")
STAGES = ("unet", "vae", "clip")


@contextlib.contextmanager
def on_standin():
    """The "cupy" backend on the stand-in for the block; the previous backend and modules after."""
    from npdiffusion.backend import get_backend, set_backend  # noqa: PLC0415

    previous = get_backend()
    with cupy_standin.installed():
        set_backend("cupy")
        try:
            yield
        finally:
            set_backend(previous)


def sites(log) -> str:
    """``log``'s call sites as ``path (function) xN``, line numbers dropped, most frequent first."""
    counts: dict[str, int] = {}
    for _, site in log.events:
        key = re.sub(r":\d+ ", " ", site)
        counts[key] = counts.get(key, 0) + 1
    return "; ".join(f"`{k}`" + (f" x{n}" if n > 1 else "") for k, n in
                     sorted(counts.items(), key=lambda item: (-item[1], item[0])))


# ------------------------------------------------------------------ models: one forward, one backward
def _unet(rng):
    from npdiffusion.backend import asarray  # noqa: PLC0415
    from npdiffusion.models.unet import UNet2DConditionModel  # noqa: PLC0415

    model = UNet2DConditionModel(**BENCH_LAYOUT)
    x = asarray(rng.standard_normal((2, 4, 8, 8)).astype(numpy.float32))
    ctx = asarray(rng.standard_normal((2, 5, 8)).astype(numpy.float32))
    return (lambda: model(x, numpy.array([10, 500]), ctx),
            lambda y: model.backward(asarray(numpy.ones(y.shape, numpy.float32))))


def _vae(rng):
    from npdiffusion.backend import asarray  # noqa: PLC0415
    from npdiffusion.models.vae import AutoencoderKL  # noqa: PLC0415

    model = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4,
                          down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                          up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], norm_num_groups=2)
    img = asarray(rng.standard_normal((2, 3, 16, 16)).astype(numpy.float32))
    return (lambda: model(img, sample_posterior=True, generator=numpy.random.default_rng(1)),
            lambda y: model.backward(asarray(numpy.ones(y.shape, numpy.float32))))


def _clip_text(rng):
    from npdiffusion.backend import asarray  # noqa: PLC0415
    from npdiffusion.models.clip.text_model import CLIPTextModel  # noqa: PLC0415

    model = CLIPTextModel(bos_token_id=0, eos_token_id=49407, hidden_size=8, intermediate_size=16,
                          num_attention_heads=2, num_hidden_layers=2, pad_token_id=1, vocab_size=49408)
    ids = rng.integers(3, 49406, (2, 7))                           # host ids, as the tokenizer gives
    ids[:, -1] = 49407
    return (lambda: model(ids),
            lambda y: model.backward(asarray(numpy.ones(y[0].shape, numpy.float32)),
                                     asarray(numpy.ones(y[1].shape, numpy.float32))))


MODELS = {"U-Net (benchmark layout)": _unet, "VAE (AutoencoderKL)": _vae, "CLIP text model": _clip_text}


def forward_backward_syncs(build):
    """``(forward log, backward log)`` of one forward and one backward of ``build(rng)`` (on the stand-in)."""
    forward, backward = build(numpy.random.default_rng(0))
    with cupy_standin.count_syncs() as fwd:
        y = forward()
    with cupy_standin.count_syncs() as bwd:
        backward(y)
    return fwd, bwd


# ------------------------------------------------------------------ training steps
def quick_demo(out: str) -> str:
    """Train ``npdiffusion demo --quick`` into ``out`` (on the active backend, seconds); returns ``out``."""
    from npdiffusion.training.demo import run_demo  # noqa: PLC0415

    run_demo(out, quick=True, progress=False, log=lambda *a: None)
    return out


def training_step_syncs(stage_name: str, demo_dir: str, steps: int = 3, **train_overrides) -> list:
    """One log per training step of stage ``stage_name`` ("unet", "vae" or "clip") on the quick demo's
    settings; ``demo_dir`` holds a quick demo run (its tokenizer, VAE and text encoder feed the stages).
    ``train_overrides``: [train] keys to change (e.g. ``mixed_precision="fp16"``)."""
    from npdiffusion.random import manual_seed  # noqa: PLC0415
    from npdiffusion.training import clip_stage, unet_stage, vae_stage  # noqa: PLC0415
    from npdiffusion.training.demo.settings import stage_configs  # noqa: PLC0415
    from npdiffusion.training.loop import Trainer  # noqa: PLC0415
    from npdiffusion.training.stages import dataset_from_config  # noqa: PLC0415

    module = {"unet": unet_stage, "vae": vae_stage, "clip": clip_stage}[stage_name]
    with tempfile.TemporaryDirectory() as out:
        config = dataclasses.replace(stage_configs(demo_dir, quick=True)[stage_name], output_dir=out)
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, **train_overrides))
        dataset = dataset_from_config(config.data)
        manual_seed(config.train.seed)
        stage = module.build_stage(config, dataset)
        trainer = Trainer(stage, dataset, config.train, out, progress=False, log=lambda *a: None)
        logs = []
        try:
            for _ in range(steps):
                with cupy_standin.count_syncs() as log:
                    trainer._one_step()
                logs.append(log)
        finally:
            trainer.loader.close()
    return logs


# ------------------------------------------------------------------ sampling
def sampling_syncs(pipe, scheduler_name: str, steps: int, guidance_scale: float = 2.0):
    """``(log, denoising iterations)`` of one text-to-image call of ``pipe`` with ``scheduler_name``."""
    import npdiffusion.schedulers as schedulers  # noqa: PLC0415

    base = {k: v for k, v in dict(pipe.scheduler.config).items() if v is not None}
    cls = getattr(schedulers, scheduler_name)
    if base.get("prediction_type") not in importlib.import_module(cls.__module__).PREDICTION_TYPES:
        base["prediction_type"] = "epsilon"      # (PNDM, Euler-A and an x0 model): syncs do not depend on it
    pipe.scheduler = cls.from_config(base)
    with cupy_standin.count_syncs() as log:
        pipe(["a red circle"], num_inference_steps=steps, guidance_scale=guidance_scale, seed=0,
             output_type="np", progress=False, eta=0.5)
    return log, len(pipe.scheduler.timesteps)


def sampling_per_iteration(pipe, scheduler_name: str, steps=(4, 6)):
    """``(syncs per denoising iteration, syncs per call outside the loop, log of the longer run)``,
    from two runs of different lengths."""
    (short, n_short), (long, n_long) = (sampling_syncs(pipe, scheduler_name, s) for s in steps)
    per = (long.total - short.total) / (n_long - n_short)
    return per, long.total - per * n_long, long


# ------------------------------------------------------------------ the table
def audit(demo_dir: str | None = None) -> list[dict]:
    """Rows ``{part, what, count, sites}`` of every measurement above (on the stand-in). ``demo_dir``: a
    quick demo run to use (one is trained on the stand-in in a temporary folder when None)."""
    from npdiffusion.random import manual_seed  # noqa: PLC0415

    rows = []
    manual_seed(0)
    with on_standin(), tempfile.TemporaryDirectory() as tmp:
        for name, build in MODELS.items():
            fwd, bwd = forward_backward_syncs(build)
            rows.append({"part": name, "what": "one forward", "count": fwd.total, "sites": sites(fwd)})
            rows.append({"part": name, "what": "one backward", "count": bwd.total, "sites": sites(bwd)})
        demo_dir = demo_dir or quick_demo(tmp)
        for name in STAGES:
            logs = training_step_syncs(name, demo_dir)
            merged = cupy_standin.SyncLog()
            for log in logs:
                merged.events += log.events
            count = max(log.total for log in logs)
            rows.append({"part": f"training, {name} stage", "what": f"per step (max of {len(logs)})",
                         "count": count, "sites": sites(merged)})
        from npdiffusion.pipelines.stable_diffusion import StableDiffusionPipeline  # noqa: PLC0415

        pipe = StableDiffusionPipeline.from_pretrained(f"{demo_dir}/model")
        for name in SCHEDULERS:
            per, once, log = sampling_per_iteration(pipe, name)
            rows.append({"part": f"sampling, {name}", "what": "per denoising iteration; per call (6 steps)",
                         "count": f"{per:g}; {once:g}", "sites": sites(log)})
    return rows


def markdown(rows: list[dict]) -> str:
    """The audit table (markdown) of ``rows``."""
    lines = ["| part | what | host syncs | call sites (all of the measured run) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['part']} | {r['what']} | {r['count']} | {r['sites'] or 'none'} |")
    return "\n".join(lines) + "\n"
