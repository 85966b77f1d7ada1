"""``Decoder``: the VAE decoder, latents (B, L, h, w) -> image (B, Cout, h*f, w*f), f = 2^(n - 1).

Shapes: B batch, L in_channels (latent channels), C_i = block_out_channels[i], n blocks,
R = reversed(block_out_channels), Cout = out_channels.

    conv_in        3x3, pad 1            (B, L, h, w)       -> (B, R_0, h, w)
    mid_block      UNetMidBlock2D        resnet, one-head attention over the hw tokens, resnet
    up_blocks.i    UpDecoderBlock2D      (B, R_{i-1}, s, s) -> (B, R_i, 2s, 2s)
                   (layers_per_block + 1 resnets, nearest x2 + 3x3 conv except in the last)
    conv_norm_out  GroupNorm (eps 1e-6), SiLU (the op), conv_out 3x3 -> (B, Cout, h*f, w*f)

``post_quant_conv`` belongs to ``AutoencoderKL``, as in diffusers. Architecture and derivations:
docs/vae.md. Source mirrored: diffusers/models/autoencoders/vae.py (Decoder, norm_type "group").
"""
from __future__ import annotations

from npdiffusion.checks import check_batch, check_input, check_positive_int
from npdiffusion.models.vae.encoder import check_block_config
from npdiffusion.models.vae.vae_blocks import UNetMidBlock2D, UpDecoderBlock2D
from npdiffusion.nn.conv import Conv2d
from npdiffusion.nn.module import Module, ModuleList
from npdiffusion.nn.norm import GroupNorm
from npdiffusion.ops.activations import silu_backward, silu_forward


class Decoder(Module):
    """The VAE decoder (diffusers' ``Decoder``): z (B, in_channels, h, w) -> (B, out_channels, h*f, w*f),
    f = 2^(len(block_out_channels) - 1). See docs/vae.md."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3, up_block_types=("UpDecoderBlock2D",),
                 block_out_channels=(64,), layers_per_block: int = 2, norm_num_groups: int = 32,
                 act_fn: str = "silu", norm_type: str = "group", mid_block_add_attention: bool = True):
        super().__init__()
        _, channels = check_block_config("Decoder", up_block_types, "UpDecoderBlock2D", block_out_channels,
                                         layers_per_block, act_fn)
        if norm_type != "group":
            raise ValueError(f"Decoder: only norm_type 'group' is supported, got {norm_type!r}")
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.out_channels = check_positive_int("out_channels", out_channels)
        self.block_out_channels = channels
        rev = list(reversed(channels))
        self.conv_in = Conv2d(in_channels, rev[0], 3, stride=1, padding=1)
        self.up_blocks = ModuleList()                    # registered before mid_block, as in diffusers
        self.mid_block = UNetMidBlock2D(rev[0], temb_channels=None, resnet_eps=1e-6, output_scale_factor=1.0,
                                        attention_head_dim=rev[0], resnet_groups=norm_num_groups,
                                        add_attention=mid_block_add_attention)
        prev = rev[0]
        for i, c in enumerate(rev):
            self.up_blocks.append(UpDecoderBlock2D(
                prev, c, num_layers=layers_per_block + 1, resnet_eps=1e-6, resnet_groups=norm_num_groups,
                add_upsample=i != len(rev) - 1))
            prev = c
        self.conv_norm_out = GroupNorm(norm_num_groups, channels[0], eps=1e-6)
        self.conv_out = Conv2d(channels[0], out_channels, 3, padding=1)

    def forward(self, z):
        """z (B, in_channels, h, w) -> (B, out_channels, h*f, w*f); keeps the SiLU cache, the children the rest."""
        check_input("Decoder", "z", z, ndim=4, axis=1, size=self.in_channels)
        check_batch("Decoder", "z", z)
        h = self.conv_in(z)
        h = self.mid_block(h)
        for block in self.up_blocks:
            h = block(h)
        a, act_cache = silu_forward(self.conv_norm_out(h))       # the SiLU op, as in the U-Net
        self.save_for_backward(act_cache)
        return self.conv_out(a)

    def backward(self, grad):
        """grad (B, out_channels, H, W) -> dz (B, in_channels, h, w); accumulates parameter gradients."""
        g = self.conv_norm_out.backward(silu_backward(self.conv_out.backward(grad), self.saved()))
        for block in reversed(list(self.up_blocks)):
            g = block.backward(g)
        g, _ = self.mid_block.backward(g)                 # no temb: d temb is None
        return self.conv_in.backward(g)
