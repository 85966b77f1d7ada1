"""``UNet2DConditionModel``: Stable Diffusion's denoiser, diffusers' model with a hand-written backward.

Shapes: B batch, Cin / Cout in / out channels (4 latent channels in SD), H x W latent size,
C_i = block_out_channels[i], C0 the first, Te = time embedding width (4 * C0), Tc context tokens,
Cc cross_attention_dim (768 for SD 1.x, 1024 for SD 2.x).

    timestep (B,) ---- time_proj -> (B, C0) float32 -> time_embedding -> emb (B, Te) -----+
    sample (B, Cin, H, W) -> conv_in -> (B, C0, H, W) ------------------- skip 0           |
      down_blocks[i]: resnets (+ transformers) -> skips; downsampler -> H/2, W/2 -> skip    | emb to
      mid_block: resnet, transformer, resnet at (B, C_last, H/2^k, W/2^k)                    | every
      up_blocks[i]: per resnet concat(h, skips.pop()) -> resnet (+ transformer);            | resnet
                    upsampler (not in the last block) -> 2H, 2W                             |
      conv_norm_out (GroupNorm) -> SiLU -> conv_out -> (B, Cout, H, W)                      |
    encoder_hidden_states (B, Tc, Cc) -> key/value of every cross-attention ----------------+

``backward(grad)`` runs the same graph in reverse: conv_out, SiLU, GroupNorm; the up blocks (each
concatenation's gradient split into branch and skip); the mid block; the down blocks (each skip's
gradient added to its state's gradient); conv_in. d emb and d ctx are summed over every resnet and
every attention; d emb then runs through the time MLP (its parameters get their gradients; the
timesteps none). Diagram with shapes and where each backward lives: docs/unet.md.

State-dict keys equal diffusers' (``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight``
...), so ``from_pretrained`` reads a diffusers model folder and ``save_pretrained`` writes one.
Source mirrored: diffusers/models/unets/unet_2d_condition.py.
"""
from __future__ import annotations

import numbers
import os

import numpy

from npdiffusion.backend import asarray, is_array, xp
from npdiffusion.checks import check_batch, check_input, check_positive_int
from npdiffusion.io.atomic_folder import atomic_folder
from npdiffusion.io.pretrained import load_weights, read_config, save_weights, write_config
from npdiffusion.memory import check_model, unet_parameters
from npdiffusion.models.blocks.resnet import ResnetBlock2D
from npdiffusion.models.unet.embeddings import TimestepEmbedding, Timesteps, check_act_fn
from npdiffusion.models.unet.transformer_2d import BasicTransformerBlock
from npdiffusion.models.unet.unet_blocks import (
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    DownBlock2D,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
)
from npdiffusion.nn.attention import Attention
from npdiffusion.nn.conv import Conv2d
from npdiffusion.nn.module import Module, ModuleList, canonical_dtype
from npdiffusion.nn.norm import GroupNorm
from npdiffusion.ops.activations import silu_backward, silu_forward

CLASS_NAME = "UNet2DConditionModel"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)

#: Every config key of diffusers' UNet2DConditionModel with its default (diffusers 0.42).
DEFAULT_CONFIG = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}

#: Keys whose features npdiffusion does not implement: only their default value is accepted.
FIXED_KEYS = ("encoder_hid_dim", "encoder_hid_dim_type", "dual_cross_attention", "class_embed_type",
              "addition_embed_type", "addition_time_embed_dim", "num_class_embeds", "resnet_time_scale_shift",
              "time_embedding_type", "time_embedding_act_fn", "timestep_post_act", "time_cond_proj_dim",
              "projection_class_embeddings_input_dim", "attention_type", "class_embeddings_concat",
              "cross_attention_norm")

def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _per_block(name: str, value, n: int, kind=int) -> list:
    """A value for every block (``kind``) or one per block, as a list of n entries."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{CLASS_NAME}: {name} must have one entry per down block ({n}), got {value!r}")
        return list(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{CLASS_NAME}: {name} must be a bool or one bool per block, got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{CLASS_NAME}: {name} must be an int or one int per block, got {value!r}")
    return [value] * n


class UNet2DConditionModel(Module):
    """diffusers' conditional U-Net (see the module docstring), built from diffusers config keys.

    Supported: down blocks CrossAttnDownBlock2D / DownBlock2D, up blocks UpBlock2D /
    CrossAttnUpBlock2D, mid block UNetMidBlock2DCrossAttn or None, SiLU activations, positional
    (sinusoidal) time embeddings, conv or linear transformer projections, per-block heads,
    cross-attention widths, layer counts and transformer depths. ``attention_head_dim`` is, as in
    diffusers, the number of heads (unless ``num_attention_heads`` is given, which then wins).
    Keys starting with "_" are ignored; unknown keys and unsupported values raise ValueError.
    ``config`` holds every key (defaults filled in), as diffusers' ``model.config``.
    """

    def __init__(self, **config):
        super().__init__()
        cfg = self._resolve_config(config)
        object.__setattr__(self, "config", cfg)

        channels = [check_positive_int("block_out_channels entry", c, CLASS_NAME) for c in cfg["block_out_channels"]]
        down_types, up_types = list(cfg["down_block_types"]), list(cfg["up_block_types"])
        n = len(down_types)
        if n == 0:
            raise ValueError(f"{CLASS_NAME}: down_block_types must name at least one block, got []")
        if len(up_types) != n:
            raise ValueError(f"{CLASS_NAME}: down_block_types ({n}) and up_block_types ({len(up_types)}) must "
                             f"have the same length, got {down_types} and {up_types}")
        if len(channels) != n:
            raise ValueError(f"{CLASS_NAME}: block_out_channels must have one entry per down block ({n}), "
                             f"got {cfg['block_out_channels']}")
        for t in down_types:
            if t not in DOWN_BLOCK_TYPES:
                raise ValueError(f"{CLASS_NAME}: down block type {t!r} is not supported; supported: {DOWN_BLOCK_TYPES}")
        for t in up_types:
            if t not in UP_BLOCK_TYPES:
                raise ValueError(f"{CLASS_NAME}: up block type {t!r} is not supported; supported: {UP_BLOCK_TYPES}")
        if cfg["mid_block_type"] not in MID_BLOCK_TYPES:
            raise ValueError(f"{CLASS_NAME}: mid_block_type {cfg['mid_block_type']!r} is not supported; "
                             f"supported: {MID_BLOCK_TYPES}")
        act_fn = check_act_fn(CLASS_NAME, cfg["act_fn"])
        groups = check_positive_int("norm_num_groups", cfg["norm_num_groups"], CLASS_NAME) if cfg["norm_num_groups"] is not None else None
        if groups is None:
            raise ValueError(f"{CLASS_NAME}: norm_num_groups=None is not supported (the resnets need GroupNorm "
                             "groups), got None")
        eps = float(cfg["norm_eps"])
        heads = cfg["num_attention_heads"] if cfg["num_attention_heads"] is not None else cfg["attention_head_dim"]
        heads = _per_block("attention_head_dim" if cfg["num_attention_heads"] is None else "num_attention_heads",
                           heads, n)
        cross_dims = _per_block("cross_attention_dim", cfg["cross_attention_dim"], n)
        layers = [check_positive_int("layers_per_block", v, CLASS_NAME) for v in _per_block("layers_per_block", cfg["layers_per_block"], n)]
        only_cross = _per_block("only_cross_attention", cfg["only_cross_attention"], n, kind=bool)
        depths = cfg["transformer_layers_per_block"]            # transformer blocks per attention, per down block
        if not isinstance(depths, (list, tuple)):
            depths = _per_block("transformer_layers_per_block", depths, n)
        depths = list(depths)
        if len(depths) != n:
            raise ValueError(f"{CLASS_NAME}: transformer_layers_per_block must have one entry per down block ({n}), "
                             f"got {cfg['transformer_layers_per_block']}")
        up_depths = cfg["reverse_transformer_layers_per_block"]    # the same for the up blocks
        if up_depths is None:
            if any(isinstance(v, (list, tuple)) for v in depths):
                raise ValueError(f"{CLASS_NAME}: per-layer transformer_layers_per_block (an asymmetrical U-Net) needs "
                                 "reverse_transformer_layers_per_block, got None")
            up_depths = list(reversed(depths))
        elif len(up_depths) != n:
            raise ValueError(f"{CLASS_NAME}: reverse_transformer_layers_per_block must have one entry per up block "
                             f"({n}), got {up_depths}")
        dropout = cfg["dropout"]
        use_linear, upcast = bool(cfg["use_linear_projection"]), bool(cfg["upcast_attention"])
        # the options of down block i's attentions, and of the up block at the same resolution
        attention = [dict(num_attention_heads=heads[i], cross_attention_dim=cross_dims[i], only_cross_attention=only,
                          use_linear_projection=use_linear, upcast_attention=upcast)
                     for i, only in enumerate(only_cross)]
        k_in = check_positive_int("conv_in_kernel", cfg["conv_in_kernel"], CLASS_NAME)
        k_out = check_positive_int("conv_out_kernel", cfg["conv_out_kernel"], CLASS_NAME)
        for name, k in (("conv_in_kernel", k_in), ("conv_out_kernel", k_out)):
            if k % 2 == 0:
                raise ValueError(f"{CLASS_NAME}: {name} must be odd (the convolution keeps the size), got {k}")

        check_model(CLASS_NAME, unet_parameters(cfg), "lower layers_per_block, transformer_layers_per_block or "
                    "block_out_channels")                         # before any parameter is allocated

        # input and time embedding
        self.conv_in = Conv2d(check_positive_int("in_channels", cfg["in_channels"], CLASS_NAME), channels[0], k_in, padding=(k_in - 1) // 2)
        self.time_proj = Timesteps(channels[0], bool(cfg["flip_sin_to_cos"]), float(cfg["freq_shift"]))
        temb_dim = channels[0] * 4 if cfg["time_embedding_dim"] is None else check_positive_int(
            "time_embedding_dim", cfg["time_embedding_dim"], CLASS_NAME)
        self.time_embedding = TimestepEmbedding(channels[0], temb_dim, act_fn=act_fn)

        # down
        down = []
        out_ch = channels[0]
        for i, t in enumerate(down_types):
            in_ch, out_ch = out_ch, channels[i]
            common = dict(in_channels=in_ch, out_channels=out_ch, temb_channels=temb_dim, dropout=dropout,
                          num_layers=layers[i], resnet_eps=eps, resnet_act_fn=act_fn, resnet_groups=groups,
                          add_downsample=i != n - 1, downsample_padding=cfg["downsample_padding"])
            down.append(DownBlock2D(**common) if t == "DownBlock2D" else
                        CrossAttnDownBlock2D(**common, transformer_layers_per_block=depths[i], **attention[i]))
        self.down_blocks = ModuleList(down)

        # mid
        if cfg["mid_block_type"] == "UNetMidBlock2DCrossAttn":
            self.mid_block = UNetMidBlock2DCrossAttn(
                channels[-1], temb_dim, dropout=dropout, num_layers=1, transformer_layers_per_block=depths[-1],
                resnet_eps=eps, resnet_act_fn=act_fn, resnet_groups=groups, num_attention_heads=heads[-1],
                output_scale_factor=float(cfg["mid_block_scale_factor"]), cross_attention_dim=cross_dims[-1],
                use_linear_projection=use_linear, upcast_attention=upcast)
        self.has_mid_block = cfg["mid_block_type"] is not None

        # up
        up = []
        out_ch = channels[-1]
        self.num_upsamplers = 0
        for i, t in enumerate(up_types):
            level = n - 1 - i                                          # the down block at this resolution
            final = i == n - 1
            prev_ch, out_ch = out_ch, channels[level]
            in_ch = channels[max(level - 1, 0)]
            self.num_upsamplers += 0 if final else 1
            common = dict(in_channels=in_ch, prev_output_channel=prev_ch, out_channels=out_ch,
                          temb_channels=temb_dim, dropout=dropout, num_layers=layers[level] + 1, resnet_eps=eps,
                          resnet_act_fn=act_fn, resnet_groups=groups, add_upsample=not final)
            up.append(UpBlock2D(**common) if t == "UpBlock2D" else
                      CrossAttnUpBlock2D(**common, transformer_layers_per_block=up_depths[i], **attention[level]))
        self.up_blocks = ModuleList(up)

        # out
        self.conv_norm_out = GroupNorm(groups, channels[0], eps=eps)
        self.conv_out = Conv2d(channels[0], check_positive_int("out_channels", cfg["out_channels"], CLASS_NAME), k_out,
                               padding=(k_out - 1) // 2)

    # ----------------------------------------------------------------- config
    @staticmethod
    def _resolve_config(config) -> dict:
        """Every key with its default filled in; "_" keys dropped; unknown keys / unsupported values
        raise ValueError naming the key, what is supported and what came."""
        unknown = sorted(k for k in config if not k.startswith("_") and k not in DEFAULT_CONFIG)
        if unknown:
            raise ValueError(f"{CLASS_NAME}: unknown config keys {unknown}; the keys are those of diffusers' "
                             f"UNet2DConditionModel: {sorted(DEFAULT_CONFIG)}")
        cfg = {k: _as_list(v) for k, v in DEFAULT_CONFIG.items()}
        cfg.update({k: _as_list(v) for k, v in config.items() if not k.startswith("_")})
        for key in FIXED_KEYS:
            if cfg[key] != DEFAULT_CONFIG[key]:
                raise ValueError(f"{CLASS_NAME}: config {key}={cfg[key]!r} is not supported by npdiffusion "
                                 f"(only the default {DEFAULT_CONFIG[key]!r}, as in Stable Diffusion 1.x/2.x)")
        return cfg

    @property
    def in_channels(self) -> int:
        return self.config["in_channels"]

    # ----------------------------------------------------------------- options
    def enable_gradient_checkpointing(self, enable: bool = True) -> "UNet2DConditionModel":
        """Recompute every resnet and transformer block's activations during backward instead of
        keeping them (exact; costs about one more forward). Returns self."""
        for m in self.modules():
            if isinstance(m, (ResnetBlock2D, BasicTransformerBlock)):
                m.gradient_checkpointing = bool(enable)
        return self

    def disable_gradient_checkpointing(self) -> "UNet2DConditionModel":
        return self.enable_gradient_checkpointing(False)

    def set_attention_chunk_size(self, chunk_size: int | None) -> "UNet2DConditionModel":
        """Compute every attention ``chunk_size`` query rows at a time (None: all at once), so no
        (tokens x tokens) score matrix is held whole. Exact to rounding. Returns self."""
        if chunk_size is not None:
            check_positive_int("chunk_size", chunk_size)
        for m in self.modules():
            if isinstance(m, Attention):
                m.chunk_size = chunk_size
        return self

    # ----------------------------------------------------------------- forward / backward
    def _timesteps(self, timestep, batch: int):
        """timestep (scalar, (), (1,) or (B,), ints or floats) -> (B,) array."""
        if isinstance(timestep, bool) or isinstance(timestep, numpy.bool_):
            raise TypeError(f"{CLASS_NAME}: timestep must be a number or an array of numbers, got {timestep!r}")
        if isinstance(timestep, numpy.generic):
            t = numpy.asarray([timestep])                       # keep the NumPy scalar's dtype
        elif isinstance(timestep, numbers.Number):
            t = numpy.asarray([timestep], dtype=numpy.float64 if isinstance(timestep, float) else numpy.int64)
        elif is_array(timestep):
            t = timestep
        else:
            raise TypeError(f"{CLASS_NAME}: timestep must be a number or an array of numbers, "
                            f"got {type(timestep).__name__}")
        if t.dtype.kind not in "iuf":
            raise TypeError(f"{CLASS_NAME}: timestep must hold integers or floats, got dtype {t.dtype}")
        t = t.reshape(-1) if t.ndim == 0 else t
        if t.ndim != 1 or t.shape[0] not in (1, batch):
            raise ValueError(f"{CLASS_NAME}: timestep must be a scalar or have shape (1,) or (B,) = ({batch},), "
                             f"got shape {tuple(t.shape)}")
        t = asarray(t)
        return xp.broadcast_to(t, (batch,)) if t.shape[0] != batch else t

    def forward(self, sample, timestep, encoder_hidden_states):
        """sample (B, in_channels, H, W), timestep (scalar or (B,)), encoder_hidden_states (B, Tc, Cc)
        -> (B, out_channels, H, W). In training mode the blocks keep what ``backward`` needs."""
        check_input(CLASS_NAME, "sample", sample, ndim=4, axis=1, size=self.config["in_channels"])
        check_batch(CLASS_NAME, "sample", sample)
        check_input(CLASS_NAME, "encoder_hidden_states", encoder_hidden_states, ndim=3)
        b = sample.shape[0]
        if encoder_hidden_states.shape[0] != b:
            raise ValueError(f"{CLASS_NAME}: encoder_hidden_states must have batch size {b} like sample, "
                             f"got shape {tuple(encoder_hidden_states.shape)}")
        ctx = encoder_hidden_states
        widths = set(_per_block("cross_attention_dim", self.config["cross_attention_dim"], len(self.down_blocks)))
        if len(widths) == 1:
            check_input(CLASS_NAME, "encoder_hidden_states", ctx, axis=-1, size=widths.pop())
        t_emb = self.time_proj(self._timesteps(timestep, b)).astype(sample.dtype, copy=False)  # (B, C0)
        emb = self.time_embedding(t_emb)                                                     # (B, Te)

        factor = 2 ** self.num_upsamplers
        forward_upsample_size = any(s % factor for s in sample.shape[2:])
        if self.config["center_input_sample"]:
            sample = 2.0 * sample - 1.0
        h = self.conv_in(sample)                                                             # (B, C0, H, W)
        skips = [h]
        spans = []                                          # [start, end) of each down block's states
        for block in self.down_blocks:
            if block.has_cross_attention:
                h, states = block(h, emb, ctx)
            else:
                h, states = block(h, emb)
            spans.append((len(skips), len(skips) + len(states)))
            skips.extend(states)
        if self.has_mid_block:
            h = self.mid_block(h, emb, ctx)
        up_spans = []
        end = len(skips)
        for i, block in enumerate(self.up_blocks):
            k = len(block.resnets)
            start = end - k
            size = None
            if i < len(self.up_blocks) - 1 and forward_upsample_size:
                size = tuple(skips[start - 1].shape[2:])
            res = tuple(skips[start:end])
            if block.has_cross_attention:
                h = block(h, res, emb, ctx, upsample_size=size)
            else:
                h = block(h, res, emb, upsample_size=size)
            up_spans.append((start, end))
            end = start
        a, act_cache = silu_forward(self.conv_norm_out(h))
        out = self.conv_out(a)
        self.save_for_backward(act_cache, spans, up_spans, len(skips), ctx.shape, ctx.dtype)
        return out

    def backward(self, grad):
        """grad (B, out_channels, H, W) -> (grad_sample, grad_encoder_hidden_states); accumulates every
        parameter gradient (the time MLP's included). Derivation: docs/unet.md."""
        act_cache, spans, up_spans, n_skips, ctx_shape, ctx_dtype = self.saved()
        g = self.conv_norm_out.backward(silu_backward(self.conv_out.backward(grad), act_cache))
        dskips = [None] * n_skips
        dtemb = dctx = None

        def acc(total, part):                              # a sum this method owns (never a child's array)
            if part is None:
                return total
            if total is None:
                return part.copy()
            total += part
            return total

        for block, (start, end) in zip(reversed(list(self.up_blocks)), reversed(up_spans)):
            g, dstates, dt, dc = block.backward(g)                           # an UpBlockGrads
            dtemb, dctx = acc(dtemb, dt), acc(dctx, dc)
            dskips[start:end] = dstates
        if self.has_mid_block:
            g, dt, dc = self.mid_block.backward(g)                           # a BlockGrads
            dtemb, dctx = acc(dtemb, dt), acc(dctx, dc)
        for block, (start, end) in zip(reversed(list(self.down_blocks)), reversed(spans)):
            g, dt, dc = block.backward(g, dskips[start:end])
            dtemb, dctx = acc(dtemb, dt), acc(dctx, dc)
        g = g + dskips[0]                                   # conv_in's output fed block 0 and skip 0
        dsample = self.conv_in.backward(g)
        if self.config["center_input_sample"]:
            dsample *= 2.0
        self.time_embedding.backward(dtemb)                 # parameter gradients; timesteps get none
        if dctx is None:
            dctx = xp.zeros(ctx_shape, dtype=ctx_dtype)
        return dsample, dctx

    # ----------------------------------------------------------------- folders
    @classmethod
    def from_pretrained(cls, folder, subfolder: str | None = None, dtype=None, variant: str | None = None):
        """Load a diffusers model folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, float32
        or float16 weights; sharded folders too). ``subfolder`` (e.g. "unet" in a pipeline folder);
        ``dtype``: the parameters' dtype (default float32); ``variant`` e.g. "fp16"."""
        path = os.path.join(os.fspath(folder), subfolder) if subfolder else os.fspath(folder)
        config = read_config(path)
        cls_name = config.get("_class_name")
        if cls_name is not None and cls_name != CLASS_NAME:
            raise ValueError(f"{CLASS_NAME}.from_pretrained: {path!r} holds a {cls_name!r}, not a {CLASS_NAME}")
        model = cls(**config)
        if dtype is not None:
            model.to(canonical_dtype(dtype))
        model.load_state_dict(load_weights(path, (WEIGHTS_NAME,), variant=variant))
        return model

    @classmethod
    def from_single_file(cls, path, config=None, original_config=None, extract_ema: bool = False, dtype=None):
        """The U-Net of an original single-file checkpoint (``model.diffusion_model.*``); ``config`` a diffusers
        (pipeline or unet) folder, else ``original_config`` or the shapes give the config. Docs:
        docs/checkpoints.md ("Original single-file checkpoints")."""
        from npdiffusion.pipelines.single_file import load_component  # noqa: PLC0415

        return load_component("unet", path, config, original_config, dtype, extract_ema=extract_ema)

    def save_pretrained(self, folder) -> str:
        """Write ``config.json`` and ``diffusion_pytorch_model.safetensors`` (in the parameters' dtype) to
        ``folder``, a model folder diffusers' ``UNet2DConditionModel.from_pretrained`` loads. The folder
        is replaced as a whole, atomically (``io.atomic_folder``). Returns the folder."""
        folder = os.fspath(folder)
        with atomic_folder(folder) as tmp:
            write_config(tmp, self.config, CLASS_NAME)
            save_weights(tmp, self.state_dict(), WEIGHTS_NAME)
        return folder

    def extra_repr(self):
        return f"block_out_channels={self.config['block_out_channels']}"
