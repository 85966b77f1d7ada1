"""``npdiffusion train vae``: train an ``AutoencoderKL`` from scratch (reconstruction + KL).

Shape legend: B batch, S image side, L latent channels, f = 2^(len(block_out_channels) - 1) the
downsampling factor, h = S / f the latent side.

Per step, on a batch x (B, 3, S, S) in [-1, 1] (docs/vae.md, "The objective")::

    q(z | x) = N(mean, diag(exp(logvar)))          encoder + quant_conv          (B, 2L, h, w)
    z        = mean + exp(logvar / 2) * noise      noise ~ N(0, I) from the trainer's generator
    x_hat    = decoder(post_quant_conv(z))                                         (B, 3, S, S)
    loss     = rec(x_hat, x) + kl_weight * KL(q(z | x) || N(0, I))   (``KLAutoencoderLoss``)

rec is the L1 (default) or squared error summed per image and averaged over the batch, KL the
closed-form Gaussian KL summed the same way. A small ``kl_weight`` (1e-6, Stable Diffusion's) keeps
the latents close to a standard normal in scale without blurring the reconstructions.

At the end the latents' scale is measured: ``scaling_factor`` = 1 / std of z over up to 512
training images (latent diffusion's recipe: the U-Net then sees latents of unit variance) unless the
config fixes it. The model (EMA weights with ``use_ema``) is written to ``output_dir/vae/`` in the
diffusers layout (``config.json`` + ``diffusion_pytorch_model.safetensors``); diffusers'
``AutoencoderKL.from_pretrained`` loads it. Checkpoints and resume: docs/training.md.
Docs: docs/training.md ("The VAE stage").
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy

from npdiffusion.training.config import StageConfig, option, section
from npdiffusion.training.loop import Stage

NAME = "vae"
MAX_SCALE_IMAGES = 512


@dataclass
class VAEOptions:
    """``[vae]``: the autoencoder and its loss."""

    block_out_channels: tuple[int, ...] = option((32, 64), "channels of each resolution level; each level after "
                                                 "the first halves the image side (32x32 -> 16x16 with two)", min=1)
    layers_per_block: int = option(1, "ResNet blocks per level (the decoder has one more)", min=1)
    latent_channels: int = option(4, "channels of the latent image", min=1)
    norm_num_groups: int = option(8, "GroupNorm groups (must divide every channel count)", min=1)
    mid_block_add_attention: bool = option(True, "self-attention in the middle block")
    kl_weight: float = option(1e-6, "weight of the KL term", min=0.0)
    reconstruction: str = option("l1", "reconstruction error", choices=("l1", "l2"))
    scaling_factor: float = option(0.0, "latent scaling factor written to config.json; 0 measures 1 / std of "
                                   "the latents after training", min=0.0)


@dataclass
class VAEStageConfig(StageConfig):
    """The config file of ``npdiffusion train vae``."""

    output_dir: str = option("runs/vae", "folder for checkpoints, losses and the trained vae/ (created if missing)")
    vae: VAEOptions = section(VAEOptions, "the autoencoder and its loss")


CONFIG = VAEStageConfig


class VAEStage(Stage):
    """``module`` is the AutoencoderKL; the loss is ``KLAutoencoderLoss`` (see the module docstring)."""

    name = NAME
    supports_mixed_precision = True

    def __init__(self, config: VAEStageConfig, dataset):
        from npdiffusion.models.vae.autoencoder_kl import AutoencoderKL  # noqa: PLC0415
        from npdiffusion.models.vae.loss import KLAutoencoderLoss  # noqa: PLC0415

        opts = config.vae
        levels = len(opts.block_out_channels)
        if config.data.resolution % (2 ** (levels - 1)):
            raise ValueError(f"vae: data.resolution {config.data.resolution} must be a multiple of the "
                             f"downsampling factor {2 ** (levels - 1)} of {levels} levels in vae.block_out_channels")
        bad = [c for c in opts.block_out_channels if c % opts.norm_num_groups]
        if bad:
            raise ValueError(f"vae: norm_num_groups {opts.norm_num_groups} must divide every entry of "
                             f"block_out_channels, got {list(opts.block_out_channels)}")
        self.vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=opts.block_out_channels, layers_per_block=opts.layers_per_block,
            latent_channels=opts.latent_channels, norm_num_groups=opts.norm_num_groups,
            sample_size=config.data.resolution, mid_block_add_attention=opts.mid_block_add_attention,
            scaling_factor=opts.scaling_factor or 1.0)
        self.vae.to(config.train.dtype).train()
        self.module = self.vae
        self.objective = KLAutoencoderLoss(self.vae, beta=opts.kl_weight, reconstruction=opts.reconstruction)
        self.dtype = numpy.dtype(config.train.dtype)
        self.fixed_scale = opts.scaling_factor
        self.dataset = dataset
        self.seed = config.train.seed

    def train_step(self, batch, rng):
        from npdiffusion.backend import asarray  # noqa: PLC0415

        from npdiffusion.distributed.sharding import batch_draws  # noqa: PLC0415

        x = asarray(batch.images, dtype=self.vae.dtype)                  # (B, 3, S, S) in [-1, 1]
        f = self.vae.downsample_factor
        latent = (self.vae.config["latent_channels"], x.shape[2] // f, x.shape[3] // f)
        # Drawn for the global batch, this rank's rows kept (distributed/sharding.py): the same
        # numbers posterior.draw_noise(rng) draws in one process.
        noise = asarray(batch_draws(rng, batch).standard_normal(latent), dtype=self.vae.dtype)
        loss = self.objective(x, noise=noise)                            # float32 also for a float16 VAE
        self.objective.backward(self.loss_scale)                         # S * dL/dx_hat, cast once to float16
        terms = self.objective.terms
        return {"loss": loss, "reconstruction": terms["reconstruction"], "kl": terms["kl"]}

    def save_models(self, folder):
        self.vae.save_pretrained(os.path.join(folder, "vae"))

    def load_models(self, folder):
        from npdiffusion.io.pretrained import load_weights  # noqa: PLC0415

        self.vae.load_state_dict(load_weights(os.path.join(folder, "vae")))

    def export_models(self, folder):
        """The final vae/ folder, with the scaling factor measured on these weights (unless fixed)."""
        scale = self.fixed_scale or self.measure_scaling_factor()
        self.vae.scaling_factor = float(scale)
        self.vae.config["scaling_factor"] = float(scale)
        self.save_models(folder)

    def measure_scaling_factor(self) -> float:
        """1 / std of z = mean + std * noise over up to 512 training images (eval mode, fixed draws)."""
        from npdiffusion.backend import asarray, to_numpy  # noqa: PLC0415
        from npdiffusion.data.dataset import to_model_input  # noqa: PLC0415

        n = min(len(self.dataset), MAX_SCALE_IMAGES)
        rng = numpy.random.default_rng(numpy.random.SeedSequence(self.seed, spawn_key=(2,)))
        self.vae.eval()
        try:
            zs = []
            for start in range(0, n, 64):
                idx = numpy.arange(start, min(n, start + 64))
                x = asarray(to_model_input(self.dataset.get_images(idx)), dtype=self.dtype)
                posterior = self.vae.encode(x)
                zs.append(to_numpy(posterior.sample(posterior.draw_noise(rng))).astype(numpy.float64).ravel())
        finally:
            self.vae.train()
        std = float(numpy.concatenate(zs).std())
        if not numpy.isfinite(std) or std <= 0:
            raise ValueError(f"vae: cannot measure the scaling factor: the latents' std is {std}")
        return 1.0 / std


def build_stage(config: VAEStageConfig, dataset) -> VAEStage:
    return VAEStage(config, dataset)


def train(config: VAEStageConfig, resume: bool = False, progress=None, log=print) -> str:
    """Train the VAE (see the module docstring); returns a one-line summary."""
    from npdiffusion.training.stages import run_model_stage  # noqa: PLC0415

    return run_model_stage(config, build_stage, resume=resume, progress=progress, log=log)
