"""``AutoencoderKL``: the KL-regularized autoencoder of latent diffusion, with hand-written backwards.

Shapes: B batch, Cin / Cout image channels, H x W image size, L latent_channels,
f = 2^(len(block_out_channels) - 1) the downsampling factor, h = H/f, w = W/f.

    encode(x)   x (B, Cin, H, W) -> encoder -> quant_conv (1x1) -> moments (B, 2L, h, w)
                -> DiagonalGaussianDistribution (mean, logvar clamped to [-30, 20])
    decode(z)   z (B, L, h, w) -> post_quant_conv (1x1) -> decoder -> image (B, Cout, hf, wf)
    forward(x, noise)   decode(mean + std * noise) (decode(mean) without noise)

Backward entry points (each accumulates every parameter gradient it reaches):
``decode_backward(grad_image) -> grad_z``; ``encode_backward(grad_mean, grad_logvar) -> grad_x``
(grad_logvar is with respect to the clamped logvar; the clamp's gradient is exact: zero where the
raw log-variance was outside [-30, 20]); ``backward(grad_image) -> grad_x`` after ``forward``.
Each pair has its own cache slot (the module protocol's ``NAME`` / ``NAME_backward`` pairs), so
encode -> decode -> decode_backward -> encode_backward works, and each backward frees its slot.

``scaling_factor`` (0.18215 for SD 1.x) scales latents to roughly unit variance for the diffusion
model: ``scale_latents(z) = (z - shift_factor) * scaling_factor`` before the U-Net,
``unscale_latents`` before ``decode``. Config keys, state-dict keys and the model folder layout
equal diffusers'; ``from_pretrained`` renames legacy attention keys (query / key / value /
proj_attn) as diffusers does. Tiled encode / decode follow diffusers' ``enable_tiling``.

Docs: docs/vae.md (the ELBO, the KL and its gradient, the reparameterization, the architecture).
Source mirrored: diffusers/models/autoencoders/autoencoder_kl.py.
"""
from __future__ import annotations

import inspect
import math
import numbers
import os
import warnings

import numpy

from npdiffusion.backend import to_numpy, xp
from npdiffusion.checks import check_batch, check_input, check_positive_int
from npdiffusion.io.atomic_folder import atomic_folder
from npdiffusion.io.pretrained import load_weights, read_config, save_weights, write_config
from npdiffusion.memory import check_model, vae_parameters
from npdiffusion.models.vae.decoder import Decoder
from npdiffusion.models.vae.distribution import DiagonalGaussianDistribution
from npdiffusion.models.vae.encoder import Encoder
from npdiffusion.models.vae.vae_blocks import MidBlockAttention
from npdiffusion.nn.conv import Conv2d
from npdiffusion.nn.module import Module, canonical_dtype

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# 1/scaling_factor is the latents' std (5.5 in SD 1.x), which a KL VAE keeps near 1-10: std 1e4 is a broken config.
MIN_SCALING_FACTOR = 1e-4


def _blend_weights(extent: int, dtype):
    """(1 - y/e, y/e) for y = 0..e-1, each computed in double and then rounded to ``dtype`` (torch
    multiplies a float32 tile by the Python doubles 1 - y/e and y/e)."""
    t = numpy.arange(extent, dtype=numpy.float64) / extent
    return xp.asarray((1.0 - t).astype(dtype)), xp.asarray(t.astype(dtype))


def _as_list(v):
    return list(v) if isinstance(v, (list, tuple)) else v


class AutoencoderKL(Module):
    """diffusers' ``AutoencoderKL`` (config keys and defaults as in diffusers 0.42).

    ``self.config`` holds every constructor argument (what ``save_pretrained`` writes).
    Built in training mode like every Module; ``from_pretrained`` returns it in ``eval()`` mode
    (as diffusers does): call ``.train()`` before a forward whose backward you need.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, down_block_types=("DownEncoderBlock2D",),
                 up_block_types=("UpDecoderBlock2D",), block_out_channels=(64,), layers_per_block: int = 1,
                 act_fn: str = "silu", latent_channels: int = 4, norm_num_groups: int = 32, sample_size=32,
                 scaling_factor: float = 0.18215, shift_factor: float | None = None, latents_mean=None,
                 latents_std=None, force_upcast: bool = True, use_quant_conv: bool = True,
                 use_post_quant_conv: bool = True, mid_block_add_attention: bool = True):
        super().__init__()
        check_positive_int("latent_channels", latent_channels)
        if isinstance(scaling_factor, bool) or not isinstance(scaling_factor, numbers.Real) \
                or not MIN_SCALING_FACTOR <= scaling_factor < math.inf:
            raise ValueError(f"AutoencoderKL: scaling_factor must be a finite number >= {MIN_SCALING_FACTOR:g} (it "
                             f"scales the latents to unit variance; decoding divides by it), got {scaling_factor!r}")
        if shift_factor is not None and (isinstance(shift_factor, bool) or not isinstance(shift_factor, numbers.Real)
                                         or not math.isfinite(shift_factor)):
            raise ValueError(f"AutoencoderKL: shift_factor must be a finite number or None, got {shift_factor!r}")
        sizes = sample_size if isinstance(sample_size, (list, tuple)) else [sample_size]
        if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
            raise ValueError(f"AutoencoderKL: sample_size must be a positive int or a list of them, got {sample_size!r}")
        self.config = {
            "in_channels": in_channels, "out_channels": out_channels,
            "down_block_types": _as_list(down_block_types), "up_block_types": _as_list(up_block_types),
            "block_out_channels": _as_list(block_out_channels), "layers_per_block": layers_per_block,
            "act_fn": act_fn, "latent_channels": latent_channels, "norm_num_groups": norm_num_groups,
            "sample_size": _as_list(sample_size), "scaling_factor": scaling_factor, "shift_factor": shift_factor,
            "latents_mean": _as_list(latents_mean), "latents_std": _as_list(latents_std),
            "force_upcast": force_upcast, "use_quant_conv": use_quant_conv,
            "use_post_quant_conv": use_post_quant_conv, "mid_block_add_attention": mid_block_add_attention,
        }
        check_model("AutoencoderKL", vae_parameters(self.config), "lower layers_per_block or block_out_channels")
        self.encoder = Encoder(in_channels=in_channels, out_channels=latent_channels,
                               down_block_types=down_block_types, block_out_channels=block_out_channels,
                               layers_per_block=layers_per_block, act_fn=act_fn, norm_num_groups=norm_num_groups,
                               double_z=True, mid_block_add_attention=mid_block_add_attention)
        self.decoder = Decoder(in_channels=latent_channels, out_channels=out_channels,
                               up_block_types=up_block_types, block_out_channels=block_out_channels,
                               layers_per_block=layers_per_block, norm_num_groups=norm_num_groups, act_fn=act_fn,
                               mid_block_add_attention=mid_block_add_attention)
        self.quant_conv = Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None
        self.in_channels, self.out_channels, self.latent_channels = in_channels, out_channels, latent_channels
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = None if shift_factor is None else float(shift_factor)
        # tiling (diffusers' enable_tiling): tile sizes in pixels and latents, overlap fraction
        self.use_tiling = False
        self.tile_sample_min_size = sizes[0]
        self.tile_latent_min_size = int(sizes[0] / (2 ** (len(self.config["block_out_channels"]) - 1)))
        self.tile_overlap_factor = 0.25

    # ------------------------------------------------------------------ properties
    @property
    def downsample_factor(self) -> int:
        """f = 2^(len(block_out_channels) - 1): image side / latent side."""
        return self.encoder.downsample_factor

    def scale_latents(self, z):
        """Latents for the diffusion model: (z - shift_factor) * scaling_factor."""
        return (z - self.shift_factor) * self.scaling_factor if self.shift_factor is not None \
            else z * self.scaling_factor

    def unscale_latents(self, z):
        """The inverse of ``scale_latents``: z / scaling_factor + shift_factor (what ``decode`` takes)."""
        out = z / self.scaling_factor
        return out + self.shift_factor if self.shift_factor is not None else out

    def enable_gradient_checkpointing(self, enable: bool = True) -> "AutoencoderKL":
        """Checkpoint every down/up block and both mid blocks (exact; recomputes forwards in backward)."""
        for part in (self.encoder, self.decoder):
            blocks = list(part.down_blocks if part is self.encoder else part.up_blocks) + [part.mid_block]
            for block in blocks:
                block.gradient_checkpointing = bool(enable)
        return self

    def enable_tiling(self, enable: bool = True) -> "AutoencoderKL":
        """Encode / decode large inputs in overlapping tiles, blended as diffusers does (forward only)."""
        self.use_tiling = bool(enable)
        return self

    def disable_tiling(self) -> "AutoencoderKL":
        return self.enable_tiling(False)

    # ------------------------------------------------------------------ encode
    def _moments(self, x):
        """x (B, Cin, H, W) -> (moments (B, 2L, h, w), whether they were computed in tiles)."""
        self.encoder.check_image(x, "AutoencoderKL.encode", "x")
        if self.use_tiling and (x.shape[-1] > self.tile_sample_min_size or x.shape[-2] > self.tile_sample_min_size):
            return self._tiled_encode(x), True
        h = self.encoder(x)
        return (self.quant_conv(h) if self.quant_conv is not None else h), False

    def encode(self, x) -> DiagonalGaussianDistribution:
        """x (B, in_channels, H, W) -> the posterior q(z | x), a DiagonalGaussianDistribution over
        (B, latent_channels, h, w). Raises a clear error for a wrong channel count or an image
        smaller than the downsampling factor (see ``Encoder.check_image``)."""
        moments, tiled = self._moments(x)
        posterior = DiagonalGaussianDistribution(moments)
        self.save_for_backward(posterior, tiled, slot="encode")
        return posterior

    def encode_backward(self, grad_mean=None, grad_logvar=None):
        """(grad_mean, grad_logvar), each (B, L, h, w) or None (zero) -> grad_x (B, in_channels, H, W).

        grad_logvar is with respect to the clamped log-variance: it flows where the raw value lay
        in [-30, 20] and stops elsewhere. Accumulates the encoder's and quant_conv's gradients.
        """
        if grad_mean is None and grad_logvar is None:
            raise ValueError("AutoencoderKL.encode_backward: give grad_mean, grad_logvar or both, got neither")
        posterior, tiled = self.saved("encode")
        if tiled:
            raise RuntimeError("AutoencoderKL.encode_backward: the last encode ran in tiles (enable_tiling), which "
                               "has no backward; disable tiling for training")
        g = posterior.parameters_backward(grad_mean, grad_logvar)       # (B, 2L, h, w)
        if self.quant_conv is not None:
            g = self.quant_conv.backward(g)
        return self.encoder.backward(g)

    # ------------------------------------------------------------------ decode
    def decode(self, z):
        """z (B, latent_channels, h, w) (unscaled latents) -> image (B, out_channels, h*f, w*f)."""
        check_input("AutoencoderKL.decode", "z", z, ndim=4)
        check_batch("AutoencoderKL.decode", "z", z)
        if z.shape[1] != self.latent_channels:
            raise ValueError(f"AutoencoderKL.decode: z must have {self.latent_channels} channels on axis 1 "
                             f"(latent_channels), got shape {tuple(z.shape)}")
        if self.use_tiling and (z.shape[-1] > self.tile_latent_min_size or z.shape[-2] > self.tile_latent_min_size):
            self.save_for_backward(None, True, slot="decode")
            return self._tiled_decode(z)
        h = self.post_quant_conv(z) if self.post_quant_conv is not None else z
        y = self.decoder(h)
        self.save_for_backward(tuple(y.shape), False, slot="decode")
        return y

    def decode_backward(self, grad_image):
        """grad_image (B, out_channels, H, W) -> grad_z (B, latent_channels, h, w); accumulates the
        decoder's and post_quant_conv's gradients."""
        check_input("AutoencoderKL.decode_backward", "grad_image", grad_image, ndim=4)
        shape, tiled = self.saved("decode")
        if tiled:
            raise RuntimeError("AutoencoderKL.decode_backward: the last decode ran in tiles (enable_tiling), which "
                               "has no backward; disable tiling for training")
        if tuple(grad_image.shape) != shape:
            raise ValueError(f"AutoencoderKL.decode_backward: grad_image must have the decoded image's shape "
                             f"{shape}, got shape {tuple(grad_image.shape)}")
        g = self.decoder.backward(grad_image)
        return self.post_quant_conv.backward(g) if self.post_quant_conv is not None else g

    # ------------------------------------------------------------------ the whole autoencoder
    def forward(self, x, noise=None, generator=None, sample_posterior: bool = False):
        """x (B, Cin, H, W) -> decode(z) with z = mean + std * noise (the reparameterization) when
        ``noise`` is given or ``sample_posterior`` (noise drawn from ``generator``), else z = mean."""
        posterior = self.encode(x)
        if noise is None and sample_posterior:
            noise = posterior.draw_noise(generator)
        z = posterior.sample(noise) if noise is not None else posterior.mode()
        image = self.decode(z)
        self.save_for_backward(posterior, noise)
        return image

    def backward(self, grad_image):
        """grad_image (B, Cout, H, W) -> grad_x (B, Cin, H, W) through decode, the sampling and encode."""
        posterior, noise = self.saved()
        dz = self.decode_backward(grad_image)
        if noise is None:
            return self.encode_backward(dz, None)
        return self.encode_backward(*posterior.sample_backward(dz, noise))

    # ------------------------------------------------------------------ tiling (forward only)
    @staticmethod
    def _blend_v(a, b, extent):
        """b's first ``extent`` rows become a linear cross-fade from a's last rows (diffusers' blend_v)."""
        extent = min(a.shape[2], b.shape[2], extent)
        if extent:
            wa, wb = _blend_weights(extent, b.dtype)
            b[:, :, :extent, :] = a[:, :, a.shape[2] - extent:, :] * wa[:, None] + b[:, :, :extent, :] * wb[:, None]
        return b

    @staticmethod
    def _blend_h(a, b, extent):
        """b's first ``extent`` columns cross-fade from a's last columns (diffusers' blend_h)."""
        extent = min(a.shape[3], b.shape[3], extent)
        if extent:
            wa, wb = _blend_weights(extent, b.dtype)
            b[:, :, :, :extent] = a[:, :, :, a.shape[3] - extent:] * wa + b[:, :, :, :extent] * wb
        return b

    def _tile_grid(self, tiles_fn, x, step, tile, blend, limit):
        rows = []
        for i in range(0, x.shape[2], step):
            rows.append([tiles_fn(x[:, :, i:i + tile, j:j + tile]) for j in range(0, x.shape[3], step)])
        out_rows = []
        for i, row in enumerate(rows):
            parts = []
            for j, t in enumerate(row):
                if i > 0:
                    t = self._blend_v(rows[i - 1][j], t, blend)
                if j > 0:
                    t = self._blend_h(row[j - 1], t, blend)
                parts.append(t[:, :, :limit, :limit])
            out_rows.append(xp.concatenate(parts, axis=3))
        return xp.concatenate(out_rows, axis=2)

    def _tiled_encode(self, x):
        """Moments of x by overlapping tiles of tile_sample_min_size pixels (diffusers' _tiled_encode)."""
        step = int(self.tile_sample_min_size * (1 - self.tile_overlap_factor))
        blend = int(self.tile_latent_min_size * self.tile_overlap_factor)

        def one(tile):
            h = self.encoder(tile)
            return self.quant_conv(h) if self.quant_conv is not None else h

        return self._tile_grid(one, x, step, self.tile_sample_min_size, blend, self.tile_latent_min_size - blend)

    def _tiled_decode(self, z):
        """decode(z) by overlapping latent tiles of tile_latent_min_size (diffusers' tiled_decode)."""
        step = int(self.tile_latent_min_size * (1 - self.tile_overlap_factor))
        blend = int(self.tile_sample_min_size * self.tile_overlap_factor)

        def one(tile):
            return self.decoder(self.post_quant_conv(tile) if self.post_quant_conv is not None else tile)

        return self._tile_grid(one, z, step, self.tile_latent_min_size, blend, self.tile_sample_min_size - blend)

    # ------------------------------------------------------------------ model folders
    @classmethod
    def config_keys(cls) -> list:
        """The constructor's config keys (diffusers' AutoencoderKL keys)."""
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    @classmethod
    def from_config(cls, config: dict) -> "AutoencoderKL":
        """A model built from a config dict (diffusers' config.json contents). Keys starting with
        ``_`` are metadata and skipped; other unknown keys are skipped with a warning, as diffusers does."""
        if not isinstance(config, dict):
            raise TypeError(f"AutoencoderKL.from_config: config must be a dict, got {type(config).__name__}")
        name = config.get("_class_name")
        if name is not None and name != "AutoencoderKL":
            raise ValueError(f"AutoencoderKL.from_config: the config is for {name!r}, not 'AutoencoderKL'")
        keys = cls.config_keys()
        unknown = sorted(k for k in config if not k.startswith("_") and k not in keys)
        if unknown:
            warnings.warn(f"AutoencoderKL: ignoring config keys it does not use: {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in config.items() if k in keys})

    @staticmethod
    def rename_legacy_keys(state: dict, attention_paths) -> dict:
        """diffusers' rename of attention blocks saved before its Attention refactor: under each path
        in ``attention_paths``, query/key/value/proj_attn become to_q/to_k/to_v/to_out.0. In place."""
        for path in attention_paths:
            for old, new in MidBlockAttention.LEGACY_NAMES.items():
                for suffix in ("weight", "bias"):
                    key = f"{path}.{old}.{suffix}"
                    if key in state:
                        state[f"{path}.{new}.{suffix}"] = state.pop(key)
        return state

    @classmethod
    def from_pretrained(cls, folder, subfolder: str | None = None, dtype=None) -> "AutoencoderKL":
        """Load a diffusers model folder (``config.json`` + ``diffusion_pytorch_model.safetensors``,
        possibly sharded), e.g. ``from_pretrained(sd_folder, subfolder="vae")``. ``dtype`` (default
        float32) is the parameters' dtype. Returns the model in eval() mode."""
        path = os.path.join(os.fspath(folder), subfolder) if subfolder else os.fspath(folder)
        model = cls.from_config(read_config(path, CONFIG_NAME))
        model.to(canonical_dtype("float32" if dtype is None else dtype))
        state = load_weights(path, (WEIGHTS_NAME, "model.safetensors"))
        paths = [name for name, m in model.named_modules() if isinstance(m, MidBlockAttention)]
        model.load_state_dict(cls.rename_legacy_keys(dict(state), paths))
        return model.eval()

    @classmethod
    def from_single_file(cls, path, config=None, original_config=None, dtype=None) -> "AutoencoderKL":
        """The VAE of an original single-file checkpoint (``first_stage_model.*``), or of a VAE file of its own
        (vae-ft-mse-840000-ema-pruned.safetensors: ``encoder.*``, ``decoder.*``); configs as the U-Net's
        ``from_single_file``. Docs: docs/checkpoints.md ("Original single-file checkpoints")."""
        from npdiffusion.pipelines.single_file import load_component  # noqa: PLC0415

        return load_component("vae", path, config, original_config, dtype)

    def save_pretrained(self, folder) -> str:
        """Write ``folder/config.json`` and ``folder/diffusion_pytorch_model.safetensors`` in diffusers'
        layout (diffusers' AutoencoderKL.from_pretrained reads it). The folder is replaced as a whole,
        atomically (``io.atomic_folder``): a kill leaves the complete old or new one. Returns the folder."""
        folder = os.fspath(folder)
        with atomic_folder(folder) as tmp:
            write_config(tmp, self.config, "AutoencoderKL", CONFIG_NAME)
            save_weights(tmp, {k: to_numpy(v) for k, v in self.state_dict().items()}, WEIGHTS_NAME)
        return folder

    def extra_repr(self):
        return (f"in_channels={self.in_channels}, latent_channels={self.latent_channels}, "
                f"block_out_channels={self.config['block_out_channels']}")
