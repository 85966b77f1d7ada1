"""``npdiffusion train lora``: LoRA fine-tuning of a model folder's U-Net, everything else frozen.

Shape legend as in unet_stage.py: B batch, L latent channels, h latent side, T tokens, D text width;
r the adapters' rank.

The model folder (a diffusers pipeline folder: ours from ``npdiffusion demo`` / ``train unet``, or one
diffusers wrote) gives the VAE, text encoder, tokenizer, U-Net and the noise schedule (its scheduler's
betas, ``num_train_timesteps`` and ``prediction_type``). ``add_lora`` wraps the U-Net layers named by
``lora.unet_targets`` (default the attention projections to_q, to_k, to_v, to_out.0) in rank-r
adapters and freezes the rest, so the U-Net's backward computes input gradients and the adapters'
dA, dB only, never a base weight gradient (docs/lora.md). The step is the U-Net stage's (the same
latents, noise, timesteps and loss: ``UNetStage.train_step``); the trainer optimizes only the
adapters (``LoraAdapters``, whose parameter names are the file's keys).

Each checkpoint holds ``pytorch_lora_weights.safetensors`` (plus the loop's optimizer, schedule, data
order and generators), so ``--resume`` continues exactly; the run ends with
``output_dir/pytorch_lora_weights.safetensors`` in diffusers' layout (``load_lora_weights`` reads it;
``npdiffusion sample --lora`` too). Docs: docs/lora.md.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy

from npdiffusion.lora.attach import UNET_ATTENTION_TARGETS
from npdiffusion.training.config import StageConfig, option, section
from npdiffusion.training.unet_stage import UNetOptions, UNetStage, training_alphas_cumprod

NAME = "lora"


@dataclass
class LoraOptions:
    """``[lora]``: the model to adapt and the adapters."""

    model: str = option("runs/demo/model", "the model folder to fine-tune: a diffusers pipeline folder "
                        "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), ours or diffusers'")
    rank: int = option(4, "rank r of every adapter", min=1)
    alpha: float = option(0.0, "lora_alpha: the adapter output is scaled by alpha / r; 0 means alpha = r "
                          "(scale 1, diffusers' training scripts)", min=0.0)
    dropout: float = option(0.0, "dropout probability on each adapter's input (PEFT's lora_dropout)", min=0.0)
    unet_targets: tuple[str, ...] = option(UNET_ATTENTION_TARGETS, "U-Net layers to adapt: names matched as "
                                           "PEFT's target_modules (a layer whose path is or ends with .NAME), "
                                           "Linear or Conv2d layers")
    caption_dropout: float = option(0.0, "probability of training on the empty caption", min=0.0)
    snr_gamma: float = option(0.0, "Min-SNR-gamma loss weighting (5.0 is the paper's); 0 disables it", min=0.0)


@dataclass
class LoraStageConfig(StageConfig):
    """The config file of ``npdiffusion train lora``."""

    output_dir: str = option("runs/lora", "folder for checkpoints, losses and pytorch_lora_weights.safetensors")
    lora: LoraOptions = section(LoraOptions, "the model to adapt and the adapters")


CONFIG = LoraStageConfig


def schedule_options(scheduler_config: dict, opts: LoraOptions) -> UNetOptions:
    """The U-Net stage's objective options with the model folder's noise schedule."""
    get = scheduler_config.get
    return UNetOptions(prediction_type=get("prediction_type", "epsilon"), snr_gamma=opts.snr_gamma,
                       caption_dropout=opts.caption_dropout, num_train_timesteps=get("num_train_timesteps", 1000),
                       beta_schedule=get("beta_schedule", "linear"), beta_start=get("beta_start", 0.0001),
                       beta_end=get("beta_end", 0.02), rescale_betas_zero_snr=get("rescale_betas_zero_snr", False))


class LoraStage(UNetStage):
    """``module`` is the ``LoraAdapters`` of the frozen U-Net (module docstring)."""

    name = NAME
    supports_mixed_precision = False

    def __init__(self, config: LoraStageConfig, dataset, log=print):
        # UNetStage.__init__ is not called: it builds a new U-Net; this one comes from the model folder
        from npdiffusion.lora.attach import add_lora  # noqa: PLC0415
        from npdiffusion.pipelines.stable_diffusion import StableDiffusionPipeline  # noqa: PLC0415

        opts = config.lora
        if not os.path.isfile(os.path.join(opts.model, "model_index.json")):
            raise ValueError(f"lora.model {opts.model!r} is not a model folder (no model_index.json); point it at "
                             "a pipeline folder, e.g. the model/ of `npdiffusion demo` or a diffusers save_pretrained")
        if opts.dropout >= 1.0:
            raise ValueError(f"lora.dropout must be below 1, got {opts.dropout!r}")
        pipe = StableDiffusionPipeline.from_pretrained(opts.model)
        self.dtype = numpy.dtype(config.train.dtype)
        self.vae, self.text_encoder, self.tokenizer = pipe.vae, pipe.text_encoder, pipe.tokenizer
        factor = pipe.vae_scale_factor
        if config.data.resolution % factor:
            raise ValueError(f"lora: data.resolution {config.data.resolution} is not a multiple of the VAE's "
                             f"factor {factor}")
        levels = len(pipe.unet.config["block_out_channels"])
        if (config.data.resolution // factor) % (2 ** (levels - 1)):
            raise ValueError(f"lora: the latent side {config.data.resolution // factor} must be divisible by "
                             f"2^{levels - 1} for the U-Net's {levels} levels")
        self.unet = pipe.unet.to(config.train.dtype).train()
        self.adapters = add_lora(self.unet, tuple(opts.unet_targets), opts.rank, opts.alpha or None, opts.dropout)
        self.module = self.adapters
        self.scheduler = pipe.scheduler
        self.opts = schedule_options(dict(pipe.scheduler.config), opts)
        self.alphas_cumprod = training_alphas_cumprod(self.opts)
        self.scaling_factor = float(self.vae.config["scaling_factor"])
        self.log = log
        self._encode_dataset(dataset)
        self._encode_captions(dataset)

    def save_models(self, folder):
        from npdiffusion.lora.files import WEIGHT_NAME, save_lora  # noqa: PLC0415

        os.makedirs(folder, exist_ok=True)
        save_lora(self.adapters, os.path.join(folder, WEIGHT_NAME))

    def load_models(self, folder):
        from npdiffusion.io.safetensors import load_file  # noqa: PLC0415
        from npdiffusion.lora.files import WEIGHT_NAME  # noqa: PLC0415

        self.adapters.load_state_dict(load_file(os.path.join(folder, WEIGHT_NAME)))

    def pipeline(self, unet=None):
        from npdiffusion.pipelines.stable_diffusion import StableDiffusionPipeline  # noqa: PLC0415

        return StableDiffusionPipeline(self.vae, self.text_encoder, self.tokenizer, unet or self.unet, self.scheduler)


def build_stage(config: LoraStageConfig, dataset) -> LoraStage:
    from npdiffusion.training.stages import refuse_data_parallel  # noqa: PLC0415

    refuse_data_parallel(NAME, "its data-parallel run is not tested yet")
    return LoraStage(config, dataset)


def train(config: LoraStageConfig, resume: bool = False, progress=None, log=print) -> str:
    """Train the adapters (module docstring); returns a one-line summary naming the LoRA file."""
    from npdiffusion.lora.files import WEIGHT_NAME  # noqa: PLC0415
    from npdiffusion.training.stages import run_model_stage  # noqa: PLC0415

    summary = run_model_stage(config, build_stage, resume=resume, progress=progress, log=log)
    return summary + f"; LoRA file {os.path.join(config.output_dir, WEIGHT_NAME)}"
