"""``Downsample2D`` and ``Upsample2D``: diffusers' resampling layers of the U-Net and the VAE.

Shapes: B batch, C channels, Co out_channels, H x W input.

* ``Downsample2D``: x (B, C, H, W) -> (B, Co, Ho, Wo).
  - use_conv, padding p > 0 (U-Net): 3x3 conv, stride 2, padding p; Ho = floor((H + 2p - 3)/2) + 1.
  - use_conv, padding 0 (VAE encoder): zero-pad one row at the bottom and one column at the right,
    then 3x3 conv, stride 2, no padding; Ho = floor((H - 2)/2) + 1.
  - no conv: 2x2 average pooling, stride 2 (C == Co); Ho = floor(H/2), odd edges dropped.
* ``Upsample2D``: x (B, C, H, W) -> nearest-neighbour x2, or to an explicit ``output_size`` (the
  U-Net passes one when a side is not divisible by 2^num_upsamplers), then (use_conv) a 3x3 conv
  with padding 1: (B, Co, 2H, 2W).

Backward: the conv's own backward, then the adjoint of the resampling (crop for the pad, 2x2 block
sums for the nearest x2 upsampling, dy/4 spread back over each 2x2 window for the average pool).
Derivations: docs/unet.md ("Down- and upsampling") and docs/ops/convolution.md.

State-dict keys as in diffusers (built with name="op" by the U-Net and VAE blocks): ``conv.weight``,
``conv.bias``. Source mirrored: diffusers/models/downsampling.py, diffusers/models/upsampling.py.
"""
from __future__ import annotations

from npdiffusion.backend import xp
from npdiffusion.checks import check_input, check_positive_int
from npdiffusion.nn.conv import Conv2d
from npdiffusion.nn.module import Module
from npdiffusion.ops.resample import (
    pad_right_bottom_backward,
    pad_right_bottom_forward,
    upsample_nearest2x_backward,
    upsample_nearest2x_forward,
)


def _check_bool(cls, name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{cls}: {name} must be a bool, got {value!r}")
    return value


def avg_pool2x2_forward(x):
    """2x2 average pooling with stride 2 (torch's AvgPool2d(2, 2)): x (B, C, H, W) ->
    (B, C, H//2, W//2); an odd last row/column is dropped. Returns ``(y, cache)``; cache = x's shape."""
    B, C, H, W = x.shape
    h, w = H // 2, W // 2
    if h == 0 or w == 0:
        raise ValueError(f"Downsample2D: x must be at least 2x2 for 2x2 average pooling, got shape {tuple(x.shape)}")
    blocks = x[:, :, :2 * h, :2 * w].reshape(B, C, h, 2, w, 2)
    y = blocks[:, :, :, 0, :, 0] + blocks[:, :, :, 0, :, 1]
    y += blocks[:, :, :, 1, :, 0]
    y += blocks[:, :, :, 1, :, 1]
    y *= 0.25
    return y, x.shape


def avg_pool2x2_backward(dy, cache):
    """dx[b, c, 2i + a, 2j + e] = dy[b, c, i, j] / 4 (zero on a dropped odd edge)."""
    B, C, H, W = cache
    h, w = dy.shape[2], dy.shape[3]
    dx = xp.zeros((B, C, H, W), dtype=dy.dtype)
    quarter = dy * 0.25
    for a in (0, 1):
        for e in (0, 1):
            dx[:, :, a:2 * h:2, e:2 * w:2] = quarter              # the four corners of each window
    return dx


class Downsample2D(Module):
    """Halve the spatial size: a stride-2 3x3 ``conv`` (``use_conv``) or 2x2 average pooling.

    ``padding`` (use_conv only) is the conv's zero padding; 0 means diffusers' VAE variant, an
    asymmetric zero pad of one row (bottom) and one column (right) before an unpadded conv.
    x (B, channels, H, W) -> (B, out_channels, Ho, Wo), see the module docstring for Ho, Wo.
    """

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        self.channels = check_positive_int("channels", channels)
        self.out_channels = channels if out_channels is None else check_positive_int("out_channels", out_channels)
        self.use_conv = _check_bool("Downsample2D", "use_conv", use_conv)
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"Downsample2D: padding must be a non-negative int, got {padding!r}")
        self.padding = padding
        if use_conv:
            self.conv = Conv2d(self.channels, self.out_channels, 3, stride=2, padding=padding)
        elif self.out_channels != self.channels:
            raise ValueError(f"Downsample2D: average pooling (use_conv=False) keeps the channel count, so "
                             f"out_channels must equal channels ({channels}), got {out_channels}")

    def forward(self, x):
        """x (B, channels, H, W) -> (B, out_channels, Ho, Wo)."""
        check_input("Downsample2D", "x", x, ndim=4, axis=1, size=self.channels)
        if not self.use_conv:
            y, cache = avg_pool2x2_forward(x)
        elif self.padding == 0:
            padded, cache = pad_right_bottom_forward(x)                 # (B, C, H + 1, W + 1)
            y = self.conv(padded)
        else:
            y, cache = self.conv(x), None
        self.save_for_backward(cache)
        return y

    def backward(self, grad):
        """grad (B, out_channels, Ho, Wo) -> dx (B, channels, H, W); accumulates conv's gradients."""
        cache = self.saved()
        if not self.use_conv:
            return avg_pool2x2_backward(grad, cache)
        dx = self.conv.backward(grad)
        return pad_right_bottom_backward(dx, cache) if self.padding == 0 else dx

    def extra_repr(self):
        return f"channels={self.channels}, out_channels={self.out_channels}, use_conv={self.use_conv}, padding={self.padding}"


class Upsample2D(Module):
    """Nearest-neighbour upsampling x2 (or to ``output_size``), then (``use_conv``) a 3x3 ``conv``.

    x (B, channels, H, W), output_size (Ho, Wo) or None -> (B, out_channels, 2H, 2W) or
    (B, out_channels, Ho, Wo).
    """

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None):
        super().__init__()
        self.channels = check_positive_int("channels", channels)
        self.out_channels = channels if out_channels is None else check_positive_int("out_channels", out_channels)
        self.use_conv = _check_bool("Upsample2D", "use_conv", use_conv)
        if use_conv:
            self.conv = Conv2d(self.channels, self.out_channels, 3, padding=1)
        elif self.out_channels != self.channels:
            raise ValueError(f"Upsample2D: without a conv (use_conv=False) the channel count is kept, so "
                             f"out_channels must equal channels ({channels}), got {out_channels}")

    def forward(self, x, output_size=None):
        """x (B, channels, H, W) -> (B, out_channels, 2H, 2W), or (B, out_channels, *output_size)."""
        check_input("Upsample2D", "x", x, ndim=4, axis=1, size=self.channels)
        up, cache = upsample_nearest2x_forward(x, output_size)
        y = self.conv(up) if self.use_conv else up
        self.save_for_backward(cache)
        return y

    def backward(self, grad):
        """grad (B, out_channels, Ho, Wo) -> dx (B, channels, H, W); accumulates conv's gradients."""
        cache = self.saved()
        dup = self.conv.backward(grad) if self.use_conv else grad
        return upsample_nearest2x_backward(dup, cache)

    def extra_repr(self):
        return f"channels={self.channels}, out_channels={self.out_channels}, use_conv={self.use_conv}"
