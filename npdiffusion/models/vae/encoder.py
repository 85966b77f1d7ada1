"""``Encoder``: the VAE encoder, image (B, Cin, H, W) -> moments (B, 2L, H/f, W/f), f = 2^(n - 1).

Shapes: B batch, Cin in_channels, C_i = block_out_channels[i], n = len(block_out_channels),
L = out_channels (the latent channels; the encoder emits 2L with ``double_z``), f = 2^(n-1).

    conv_in        3x3, pad 1            (B, Cin, H, W)         -> (B, C_0, H, W)
    down_blocks.i  DownEncoderBlock2D    (B, C_{i-1}, H_i, W_i) -> (B, C_i, H_{i+1}, W_{i+1})
                   (layers_per_block resnets, a pad-0 stride-2 downsampler except in the last;
                    H_{i+1} = floor(H_i / 2))
    mid_block      UNetMidBlock2D        resnet, one-head attention over the H'W' tokens, resnet
    conv_norm_out  GroupNorm (eps 1e-6), SiLU (the op), conv_out 3x3 -> (B, 2L, H', W')

Every GroupNorm has eps 1e-6; no time embedding. The backward runs the children's backwards in
reverse. Architecture and derivations: docs/vae.md. Source mirrored: diffusers/models/autoencoders/vae.py
(Encoder). ``quant_conv`` belongs to ``AutoencoderKL``, as in diffusers.
"""
from __future__ import annotations

from npdiffusion.checks import check_batch, check_input, check_positive_int
from npdiffusion.models.vae.vae_blocks import DownEncoderBlock2D, UNetMidBlock2D
from npdiffusion.nn.conv import Conv2d
from npdiffusion.nn.module import Module, ModuleList
from npdiffusion.nn.norm import GroupNorm
from npdiffusion.ops.activations import silu_backward, silu_forward

ACTIVATIONS = ("silu", "swish")


def check_block_config(cls: str, block_types, expected_type: str, block_out_channels, layers_per_block, act_fn):
    """Validate the shared VAE config keys; returns (block_types, block_out_channels) as tuples."""
    if isinstance(block_out_channels, (str, bytes)) or not hasattr(block_out_channels, "__len__") \
            or len(block_out_channels) == 0:
        raise ValueError(f"{cls}: block_out_channels must be a non-empty list of positive ints, "
                         f"got {block_out_channels!r}")
    channels = tuple(check_positive_int("block_out_channels[i]", c) for c in block_out_channels)
    if isinstance(block_types, str) or not hasattr(block_types, "__len__"):
        raise ValueError(f"{cls}: block types must be a list of strings, got {block_types!r}")
    types = tuple(block_types)
    if len(types) != len(channels):
        raise ValueError(f"{cls}: need one block type per entry of block_out_channels ({len(channels)}), "
                         f"got {len(types)}: {list(types)}")
    bad = [t for t in types if t != expected_type]
    if bad:
        raise ValueError(f"{cls}: only {expected_type!r} blocks are supported, got {bad}")
    check_positive_int("layers_per_block", layers_per_block)
    if act_fn not in ACTIVATIONS:
        raise ValueError(f"{cls}: act_fn must be one of {ACTIVATIONS}, got {act_fn!r}")
    return types, channels


class Encoder(Module):
    """The VAE encoder (diffusers' ``Encoder``): x (B, in_channels, H, W) -> (B, 2*out_channels, H/f, W/f)
    (``double_z``; out_channels otherwise), f = 2^(len(block_out_channels) - 1) rounded down per level.

    An image side smaller than f cannot be taken (a downsampler would see a 1-pixel side); sides
    that f does not divide are floored at each level, as in diffusers. See docs/vae.md.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, down_block_types=("DownEncoderBlock2D",),
                 block_out_channels=(64,), layers_per_block: int = 2, norm_num_groups: int = 32,
                 act_fn: str = "silu", double_z: bool = True, mid_block_add_attention: bool = True):
        super().__init__()
        _, channels = check_block_config("Encoder", down_block_types, "DownEncoderBlock2D", block_out_channels,
                                         layers_per_block, act_fn)
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.out_channels = check_positive_int("out_channels", out_channels)
        self.block_out_channels = channels
        self.conv_in = Conv2d(in_channels, channels[0], 3, stride=1, padding=1)
        self.down_blocks = ModuleList()
        out = channels[0]
        for i, c in enumerate(channels):
            self.down_blocks.append(DownEncoderBlock2D(
                out, c, num_layers=layers_per_block, resnet_eps=1e-6, resnet_groups=norm_num_groups,
                add_downsample=i != len(channels) - 1, downsample_padding=0))
            out = c
        self.mid_block = UNetMidBlock2D(channels[-1], temb_channels=None, resnet_eps=1e-6, output_scale_factor=1.0,
                                        attention_head_dim=channels[-1], resnet_groups=norm_num_groups,
                                        add_attention=mid_block_add_attention)
        self.conv_norm_out = GroupNorm(norm_num_groups, channels[-1], eps=1e-6)
        self.conv_out = Conv2d(channels[-1], 2 * out_channels if double_z else out_channels, 3, padding=1)

    @property
    def downsample_factor(self) -> int:
        """f = 2^(number of downsamplers): the smallest image side the encoder takes."""
        return 2 ** (len(self.block_out_channels) - 1)

    def check_image(self, x, who: str = "Encoder", name: str = "x") -> None:
        """A clear ValueError/TypeError for an image this encoder cannot take."""
        check_input(who, name, x, ndim=4)
        check_batch(who, name, x)
        if x.dtype.kind != "f":
            raise TypeError(f"{who}: {name} must be a floating array, got dtype {x.dtype}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{who}: {name} must have {self.in_channels} channels on axis 1 (in_channels), "
                             f"got shape {tuple(x.shape)}")
        f = self.downsample_factor
        if x.shape[2] < f or x.shape[3] < f:
            raise ValueError(f"{who}: {name} is too small: the encoder halves the image "
                             f"{len(self.block_out_channels) - 1} times, so height and width must be at "
                             f"least {f}, got shape {tuple(x.shape)}")

    def forward(self, x):
        """x (B, in_channels, H, W) -> moments (B, 2L, H', W'); keeps the SiLU cache, the children the rest."""
        self.check_image(x)
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        a, act_cache = silu_forward(self.conv_norm_out(h))       # the SiLU op, as in the U-Net
        self.save_for_backward(act_cache)
        return self.conv_out(a)

    def backward(self, grad):
        """grad (B, 2L, H', W') -> dx (B, in_channels, H, W); accumulates every parameter gradient."""
        g = self.conv_norm_out.backward(silu_backward(self.conv_out.backward(grad), self.saved()))
        g, _ = self.mid_block.backward(g)                 # no temb: d temb is None
        for block in reversed(list(self.down_blocks)):
            g = block.backward(g)
        return self.conv_in.backward(g)
