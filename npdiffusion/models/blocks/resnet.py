"""``ResnetBlock2D``: diffusers' residual block (non_linearity "swish", time_embedding_norm "default").

Shapes: B batch, Ci in_channels, Co out_channels, H x W the spatial size (unchanged), Ct
temb_channels. x (B, Ci, H, W), temb (B, Ct) -> y (B, Co, H, W).

    h  = conv1(silu(norm1(x)))                                 (B, Co, H, W)
    h += time_emb_proj(silu(temb))[:, :, None, None]           only with a time projection
    h  = conv2(dropout(silu(norm2(h))))
    y  = (shortcut(x) + h) / output_scale_factor               shortcut: 1x1 conv_shortcut or x

Backward, in reverse (docs/unet.md, "ResnetBlock2D"): with g = dy / output_scale_factor,
dx = d_shortcut(g) + norm1'(silu'(conv1'(dh))), dh = norm2'(silu'(conv2'(g))), and the timestep
path receives d temb = silu'(time_emb_proj'(sum over H, W of dh)).

State-dict keys as in diffusers: norm1, conv1, time_emb_proj (absent when temb_channels is None),
norm2, conv2, conv_shortcut (when in_channels != out_channels or use_in_shortcut).
Source mirrored: diffusers/models/resnet.py (ResnetBlock2D).
"""
from __future__ import annotations

import numbers

from npdiffusion.checks import check_input, check_positive_int
from npdiffusion.nn.conv import Conv2d
from npdiffusion.nn.dropout import Dropout
from npdiffusion.nn.linear import Linear
from npdiffusion.nn.module import Module
from npdiffusion.nn.norm import GroupNorm
from npdiffusion.ops.activations import silu_backward, silu_forward


class ResnetBlock2D(Module):
    """Residual block of the U-Net and the VAE: x (B, in_channels, H, W), temb (B, temb_channels)
    or None -> (B, out_channels, H, W).

    ``temb_channels=None`` builds no time projection (the VAE); the forward then takes no temb.
    ``groups`` is the GroupNorm group count of both norms and ``eps`` their epsilon (diffusers'
    class default 1e-6; the U-Net passes its ``norm_eps``, 1e-5 for Stable Diffusion).
    ``dropout`` > 0 uses ``npdiffusion.nn.dropout.Dropout`` in training mode (its mask cannot equal
    torch's draw). ``use_in_shortcut`` forces (True) or forbids (False) the 1x1 ``conv_shortcut``;
    None adds it exactly when in_channels != out_channels. ``conv_shortcut_bias`` is that conv's bias.
    Derivation of the backward: docs/unet.md ("ResnetBlock2D").
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, temb_channels: int | None = 512,
                 groups: int = 32, eps: float = 1e-6, dropout: float = 0.0, output_scale_factor: float = 1.0,
                 use_in_shortcut: bool | None = None, conv_shortcut_bias: bool = True):
        super().__init__()
        check_positive_int("in_channels", in_channels)
        out_channels = in_channels if out_channels is None else check_positive_int("out_channels", out_channels)
        if temb_channels is not None:
            check_positive_int("temb_channels", temb_channels)
        if (isinstance(output_scale_factor, bool) or not isinstance(output_scale_factor, numbers.Real)
                or output_scale_factor == 0):
            raise ValueError(f"ResnetBlock2D: output_scale_factor must be a nonzero number, got {output_scale_factor!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"ResnetBlock2D: dropout must be a float in [0, 1), got {dropout!r}")
        if use_in_shortcut is not None and not isinstance(use_in_shortcut, bool):
            raise TypeError(f"ResnetBlock2D: use_in_shortcut must be a bool or None, got {use_in_shortcut!r}")
        self.in_channels, self.out_channels, self.temb_channels = in_channels, out_channels, temb_channels
        self.output_scale_factor = float(output_scale_factor)
        self.norm1 = GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels is not None:
            self.time_emb_proj = Linear(temb_channels, out_channels)
        self.norm2 = GroupNorm(groups, out_channels, eps=eps)
        self.p_dropout = float(dropout)
        if self.p_dropout > 0.0:
            self.dropout = Dropout(self.p_dropout)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.use_in_shortcut = in_channels != out_channels if use_in_shortcut is None else use_in_shortcut
        if self.use_in_shortcut:
            self.conv_shortcut = Conv2d(in_channels, out_channels, 1, bias=conv_shortcut_bias)

    @property
    def has_time_proj(self) -> bool:
        return self.temb_channels is not None

    def forward(self, x, temb=None):
        """x (B, in_channels, H, W), temb (B, temb_channels) (None without a time projection)
        -> (B, out_channels, H, W). Caches the three SiLU inputs (the children cache the rest)."""
        check_input("ResnetBlock2D", "x", x, ndim=4, axis=1, size=self.in_channels)
        if self.has_time_proj:
            if temb is None:
                raise ValueError(f"ResnetBlock2D: temb (B, {self.temb_channels}) is required: this block has a "
                                 "time projection (temb_channels is not None), got None")
            check_input("ResnetBlock2D", "temb", temb, ndim=2, axis=1, size=self.temb_channels)
            if temb.shape[0] != x.shape[0]:
                raise ValueError(f"ResnetBlock2D: temb must have batch size {x.shape[0]} like x, "
                                 f"got shape {tuple(temb.shape)}")
        elif temb is not None:
            raise ValueError("ResnetBlock2D: this block has no time projection (temb_channels=None), so temb "
                             f"must be None, got an array of shape {tuple(getattr(temb, 'shape', ()))}")

        a1, act1_cache = silu_forward(self.norm1(x))
        h = self.conv1(a1)                                               # (B, Co, H, W), fresh
        temb_act_cache = None
        if self.has_time_proj:
            t, temb_act_cache = silu_forward(temb)
            h += self.time_emb_proj(t)[:, :, None, None]                 # conv1 keeps its input, not h
        a2, act2_cache = silu_forward(self.norm2(h))
        if self.p_dropout > 0.0:
            a2 = self.dropout(a2)
        y = self.conv2(a2)                                               # fresh
        y += self.conv_shortcut(x) if self.use_in_shortcut else x
        if self.output_scale_factor != 1.0:
            y /= self.output_scale_factor
        self.save_for_backward(act1_cache, temb_act_cache, act2_cache)
        return y

    def backward(self, grad):
        """grad (B, out_channels, H, W) -> (dx, d temb), d temb None without a time projection.
        Accumulates every parameter gradient. Derivation: docs/unet.md ("ResnetBlock2D")."""
        act1_cache, temb_act_cache, act2_cache = self.saved()
        g = grad / self.output_scale_factor if self.output_scale_factor != 1.0 else grad
        da2 = self.conv2.backward(g)
        if self.p_dropout > 0.0:
            da2 = self.dropout.backward(da2)
        dh = self.norm2.backward(silu_backward(da2, act2_cache))         # (B, Co, H, W)
        dtemb = None
        if self.has_time_proj:
            dproj = dh.sum(axis=(2, 3))                                  # (B, Co): the broadcast's adjoint
            dtemb = silu_backward(self.time_emb_proj.backward(dproj), temb_act_cache)
        dx = self.norm1.backward(silu_backward(self.conv1.backward(dh), act1_cache))
        dx += self.conv_shortcut.backward(g) if self.use_in_shortcut else g
        return dx, dtemb

    def extra_repr(self):
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
                f"temb_channels={self.temb_channels}, output_scale_factor={self.output_scale_factor}")
