"""Resampling ops of the U-Net and VAE: nearest-neighbour upsampling and the VAE's asymmetric pad.

Shapes: B batch, C channels, H x W input, Ho x Wo output (NCHW, like torch).

* ``upsample_nearest2x``: y[b, c, h, w] = x[b, c, h // 2, w // 2] (diffusers ``Upsample2D``,
  ``F.interpolate(scale_factor=2.0, mode="nearest")``); backward sums each 2x2 block of dy.
* ``upsample_nearest`` to an explicit (Ho, Wo) (``Upsample2D`` when ``output_size`` is given,
  ``F.interpolate(size=..., mode="nearest")``): y[b, c, h, w] = x[b, c, ih[h], iw[w]] with torch's
  index rule ih[h] = min(floor(h * (H / Ho)), H - 1), the scale and product in float32 as in
  torch's kernel. Backward: dx = P_h^T dy P_w with the 0/1 selection matrices P.
* ``pad_right_bottom``: one zero row below and one zero column right of x (diffusers
  ``Downsample2D`` with padding=0, ``F.pad(x, (0, 1, 0, 1))``); backward crops dy.

Derivations: docs/ops/convolution.md.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy

from npdiffusion.backend import asarray, xp


def _check_nchw(op: str, x):
    if not hasattr(x, "dtype") or getattr(x, "ndim", None) != 4:
        got = f"shape {tuple(x.shape)}" if hasattr(x, "shape") else type(x).__name__
        raise ValueError(f"{op}: x must be an array of shape (B, C, H, W), got {got}")


def _check_size(op: str, output_size):
    if (not isinstance(output_size, (tuple, list)) or len(output_size) != 2
            or any(isinstance(s, bool) or not isinstance(s, (int, numpy.integer)) or s <= 0 for s in output_size)):
        raise ValueError(f"{op}: output_size must be a pair of positive ints (Ho, Wo), got {output_size!r}")
    return int(output_size[0]), int(output_size[1])


def nearest_indices(in_size: int, out_size: int) -> numpy.ndarray:
    """Source index of each output position, torch's rule (host NumPy, int64, shape (out_size,)).

    torch (aten/src/ATen/native/UpSample.h, ``nearest_idx``): the identity when the sizes agree,
    ``i >> 1`` when out = 2 * in, else min(floor(i * scale), in - 1) with
    ``scale = float(in) / float(out)`` and the product rounded to float32.
    """
    i = numpy.arange(out_size, dtype=numpy.int64)
    if out_size == in_size:
        return i
    if out_size == 2 * in_size:
        return i >> 1
    scale = numpy.float32(in_size) / numpy.float32(out_size)
    src = numpy.floor(i.astype(numpy.float32) * scale).astype(numpy.int64)
    return numpy.minimum(src, in_size - 1)


class UpsampleNearestCache(NamedTuple):
    """What ``upsample_nearest_backward`` needs from the forward."""
    in_shape: tuple       # x's shape (B, C, H, W)
    ih: object            # source row of each output row (Ho,)
    iw: object            # source column of each output column (Wo,)


def upsample_nearest2x_forward(x, output_size=None):
    """Nearest-neighbour upsampling of x (B, C, H, W) to (B, C, 2H, 2W), or to ``output_size``
    (Ho, Wo) when given (then ``upsample_nearest_forward``). Returns ``(y, cache)``; the cache is
    x's shape (or an ``UpsampleNearestCache``)."""
    if output_size is not None:
        return upsample_nearest_forward(x, output_size)
    _check_nchw("upsample_nearest2x", x)
    B, C, H, W = x.shape
    y = xp.empty((B, C, H, 2, W, 2), dtype=x.dtype)
    y[...] = x[:, :, :, None, :, None]                       # one broadcast copy
    return y.reshape(B, C, 2 * H, 2 * W), x.shape


def upsample_nearest2x_backward(dy, cache):
    """dx (B, C, H, W): the sum of each 2x2 block of dy (B, C, 2H, 2W) (or the general backward)."""
    if isinstance(cache, UpsampleNearestCache):
        return upsample_nearest_backward(dy, cache)
    B, C, H, W = cache
    d = dy.reshape(B, C, H, 2, W, 2)
    dx = d[:, :, :, 0, :, 0] + d[:, :, :, 0, :, 1]
    dx += d[:, :, :, 1, :, 0]
    dx += d[:, :, :, 1, :, 1]
    return dx


def upsample_nearest_forward(x, output_size):
    """Nearest-neighbour resize of x (B, C, H, W) to (B, C, Ho, Wo), torch's index rule.

    Returns ``(y, cache)``; cache an ``UpsampleNearestCache``.
    """
    _check_nchw("upsample_nearest", x)
    Ho, Wo = _check_size("upsample_nearest", output_size)
    H, W = x.shape[2], x.shape[3]
    ih = asarray(nearest_indices(H, Ho))
    iw = asarray(nearest_indices(W, Wo))
    y = x[:, :, ih[:, None], iw[None, :]]                    # (B, C, Ho, Wo) gather
    return y, UpsampleNearestCache(x.shape, ih, iw)


def upsample_nearest_backward(dy, cache):
    """dx = P_h^T dy P_w, where P_h (Ho, H) and P_w (Wo, W) have P[i, ih[i]] = 1: every dx entry is
    the sum of the dy entries that copied it."""
    _, _, H, W = cache.in_shape
    ih, iw = cache.ih, cache.iw
    ph = (ih[:, None] == xp.arange(H)[None, :]).astype(dy.dtype)       # (Ho, H)
    pw = (iw[:, None] == xp.arange(W)[None, :]).astype(dy.dtype)       # (Wo, W)
    return xp.matmul(ph.T, xp.matmul(dy, pw))                           # (B, C, H, W)


def pad_right_bottom_forward(x):
    """x (B, C, H, W) -> y (B, C, H + 1, W + 1) with a zero last row and last column, as
    ``F.pad(x, (0, 1, 0, 1))``. Returns ``(y, cache)``; the cache is x's shape."""
    _check_nchw("pad_right_bottom", x)
    B, C, H, W = x.shape
    y = xp.empty((B, C, H + 1, W + 1), dtype=x.dtype)
    y[:, :, :H, :W] = x
    y[:, :, H, :] = 0
    y[:, :, :H, W] = 0
    return y, x.shape


def pad_right_bottom_backward(dy, cache):
    """dx = dy[:, :, :H, :W] (a fresh array): the padded entries are constants."""
    _, _, H, W = cache
    return dy[:, :, :H, :W].copy()
