"""Parameter-free resampling modules for the U-Net and VAE samplers.

* ``UpsampleNearest2x``: x (B, C, H, W) -> (B, C, 2H, 2W), or to ``output_size`` (Ho, Wo) when the
  forward is given one (the interpolation step of diffusers' ``Upsample2D``).
* ``PadRightBottom``: x (B, C, H, W) -> (B, C, H + 1, W + 1), zero last row and column (the pad
  step of diffusers' ``Downsample2D`` with padding=0, the VAE encoder's downsampler).

Ops and derivations: npdiffusion/ops/resample.py, docs/ops/convolution.md.
"""
from __future__ import annotations

from npdiffusion.nn.module import Module
from npdiffusion.ops.resample import (
    pad_right_bottom_backward,
    pad_right_bottom_forward,
    upsample_nearest2x_backward,
    upsample_nearest2x_forward,
)


class UpsampleNearest2x(Module):
    """Nearest-neighbour upsampling by 2, or to ``output_size`` (torch's index rule)."""

    def forward(self, x, output_size=None):
        y, cache = upsample_nearest2x_forward(x, output_size)
        self.save_for_backward(cache)
        return y

    def backward(self, dy):
        return upsample_nearest2x_backward(dy, self.saved())


class PadRightBottom(Module):
    """Zero-pad one row at the bottom and one column at the right."""

    def forward(self, x):
        y, cache = pad_right_bottom_forward(x)
        self.save_for_backward(cache)
        return y

    def backward(self, dy):
        return pad_right_bottom_backward(dy, self.saved())
