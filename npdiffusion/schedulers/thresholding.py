"""Limiting the x0 estimate x0_hat inside a step: dynamic thresholding (Imagen) or clipping.

Shapes: sample, pred_original_sample (B, C, H, W) (any shape with a batch axis first).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy


def threshold_sample(sample, ratio: float, max_value: float):
    """Dynamic thresholding (Imagen, Saharia et al. 2022) of an x0 estimate (B, ...), per sample.

    s = clamp(quantile(|x0|, ratio), 1, max_value) over each sample's entries; x0 <- clamp(x0, -s, s) / s.
    Half precision is upcast to float32 for the quantile and cast back, as diffusers does.
    """
    from npdiffusion.backend import xp  # noqa: PLC0415

    dtype = sample.dtype
    b = sample.shape[0]
    flat = sample.reshape(b, -1)
    if numpy.dtype(dtype) not in (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64)):
        flat = flat.astype(numpy.float32)
    s = xp.quantile(xp.abs(flat), ratio, axis=1)
    s = xp.clip(s, 1, max_value).astype(flat.dtype)[:, None]
    out = xp.minimum(xp.maximum(flat, -s), s) / s
    return out.reshape(sample.shape).astype(dtype, copy=False)


def clip_or_threshold(pred_original_sample, config: Mapping, thresholding: bool = False,
                      clip_sample: bool = False):
    """x0_hat (B, ...) limited as a scheduler's step does it: dynamic thresholding when ``thresholding``
    (with the config's ``dynamic_thresholding_ratio`` and ``sample_max_value``), else clipped to
    [-clip_sample_range, clip_sample_range] when ``clip_sample``, else unchanged.

    The caller passes the flags its class has (Heun only clips, DPM-Solver only thresholds): a config
    loaded with ``from_config`` may hold other classes' keys, which must not switch anything on.
    """
    from npdiffusion.backend import xp  # noqa: PLC0415

    if thresholding:
        return threshold_sample(pred_original_sample, config["dynamic_thresholding_ratio"],
                                config["sample_max_value"])
    if clip_sample:
        r = float(config["clip_sample_range"])
        return xp.clip(pred_original_sample, -r, r)
    return pred_original_sample
