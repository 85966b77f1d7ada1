"""The demo's settings: the TOML keys of each training stage that differ from the stage's defaults,
and the evaluation constants (guidance scale, prompts, seeds, sampler, steps).

``SETTINGS`` (the shapes), ``DIGITS`` (what differs for the digits), ``QUICK`` (toy sizes for
``--quick``); ``demo_settings`` merges them and ``stage_configs`` builds each stage's config from them.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os

# Guidance and sampler of the report: the settings that followed the prompts best in the studies
# (docs/studies.md, "Guidance scale" and "Steps and samplers").
GUIDANCE_SCALE = 2.0
EVAL_PROMPTS = 50
EVAL_SEEDS = 4
EVAL_STEPS = 25
EVAL_SCHEDULER = "DDPMScheduler"
DEFAULT_SEED = 0                       # every model stage's train.seed (``--seed``)
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
    "unet": {"train": {"steps": 1500, "batch_size": 32, "learning_rate": 2e-3, "lr_scheduler": "cosine",
                       "lr_warmup_steps": 20, "use_ema": True, "ema_decay": 0.999},
             "unet": {"block_out_channels": [32, 64], "prediction_type": "sample", "snr_gamma": 1.0,
                      "sampler": "sde-dpmsolver++",
                      "caption_dropout": 0.1}},
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
#: shapes' steps (at 1,500 x 32 images, about 27 passes over the digits) rather than fewer: a digit's
#: identity is a shape, and shape was the slowest attribute the shapes demo learned (docs/benchmarks.md,
#: "Whole demo runs").
#: ``num_images`` is only a record here (the digits dataset always has all 1,797 images).
DIGITS = {"data": {"dataset": "digits", "num_images": 1797, "resolution": 32}}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def check_dataset(dataset) -> str:
    if dataset not in DEMO_DATASETS:
        raise ValueError(f"demo: dataset must be one of {', '.join(DEMO_DATASETS)}, got {dataset!r}")
    return dataset


def demo_settings(quick: bool = False, dataset: str = "shapes") -> dict:
    """The settings a run uses: ``SETTINGS``, then ``DIGITS`` for the digits, then ``QUICK`` for ``quick``
    (``QUICK``'s ``num_images`` only matters for the shapes)."""
    settings = SETTINGS if check_dataset(dataset) == "shapes" else _merge(SETTINGS, DIGITS)
    if quick:
        settings = _merge(settings, QUICK)
        if dataset != "shapes":
            settings["data"]["num_images"] = DIGITS["data"]["num_images"]
    return settings


def settings_fingerprint(dataset: str = "shapes") -> str:
    """12 hex digits naming the demo's settings and report sampling, so a measurement (measured.py) is quoted
    only for the settings it measured."""
    what = {"settings": demo_settings(False, dataset), "sampling": [EVAL_SCHEDULER, EVAL_STEPS, GUIDANCE_SCALE,
                                                                     EVAL_PROMPTS, EVAL_SEEDS]}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"demo: seed must be an int >= 0, got {seed!r}")
    return seed


def stage_configs(out: str, quick: bool = False, dataset: str = "shapes", seed: int = DEFAULT_SEED) -> dict:
    """``{stage: config dataclass}`` of the demo's four stages on ``dataset`` ("shapes" or "digits"),
    with outputs under ``out/runs``; ``seed`` is every model stage's ``train.seed`` (initial weights,
    data order, the steps' draws; the data themselves stay ``data.seed``'s)."""
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
                              "checkpoints_total_limit": 1, "seed": check_seed(seed)}
    schemas = {"tokenizer": tokenizer_stage.CONFIG, "clip": clip_stage.CONFIG, "vae": vae_stage.CONFIG, "unet": unet_stage.CONFIG}
    return {name: build_config(schemas[name], raw[name], source=f"demo {name} settings") for name in raw}
