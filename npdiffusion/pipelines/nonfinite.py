"""NaN or inf in a sampling run: stop with an error naming the step and the likely cause.

A denoising run whose latents turn NaN or inf would otherwise go on to the end and give black
images (``clip(NaN) -> 0``) as if it had succeeded. The loops call ``check_step`` after every
step: one ``isfinite`` reduction over the latents (B, 4, h, w), read back to the host, which on
CuPy is one synchronization per step, small beside the U-Net's two forward passes. Only when the
latents are not finite are the step's intermediates inspected to say where NaN first appeared:

* the latents before the step (the initial latents: an image or given latents, a VAE scaling);
* latents that were finite but huge before the step (a blow-up over the previous steps, most often a
  guidance scale far too large) so that the U-Net overflowed;
* the U-Net's output on finite, moderate latents (its config, e.g. ``freq_shift``, or its weights);
* the guided prediction, e.g. eps_u + w (eps_c - eps_u) (a guidance scale too large);
* the scheduler's step (its config: betas, sigmas).

``check_image`` does the same for the decoded image before it becomes pixels. Both raise
``NonFiniteError``, a ValueError, so the CLI reports it on one line and exits with code 2.
"""
from __future__ import annotations

import numpy

from npdiffusion.backend import to_numpy, xp

#: latents larger than this (in absolute value) before a step are a blow-up, not a denoising state
#: (unit-variance noise times init_noise_sigma: ~70 for SD's Euler, ~2e4 for a zero-terminal-SNR one)
HUGE = 1e6


class NonFiniteError(ValueError):
    """Latents or a decoded image holding NaN or inf: names the step and the likely cause."""


def all_finite(x) -> bool:
    """True when every entry of the array ``x`` is finite (one reduction; a host sync on CuPy)."""
    mod = numpy if isinstance(x, (numpy.ndarray, numpy.generic)) else xp
    return bool(mod.isfinite(x).all())


def _max_abs(x) -> float:
    values = numpy.abs(to_numpy(x))
    finite = values[numpy.isfinite(values)]
    return float(finite.max()) if finite.size else float("nan")


def _guidance_hint(guidance_scale) -> str:
    if guidance_scale is not None and guidance_scale > 1.0:
        return f"the guidance scale {guidance_scale:g} is probably too large (usual values are 1-15)"
    return "a model or scheduler config or weights give huge values"


def likely_cause(before, model_output=None, guided=None, guidance_scale=None) -> str:
    """Where NaN/inf first appeared in a step that took ``before`` to non-finite latents (module docstring)."""
    if not all_finite(before):
        return ("the latents were not finite before the step (the initial latents: the input image or latents, "
                "or the VAE's scaling_factor)")
    grown = _max_abs(before)
    if grown > HUGE:
        return f"the latents had grown to max |x| = {grown:.3g} before this step: {_guidance_hint(guidance_scale)}"
    if model_output is not None and not all_finite(model_output):
        return ("the U-Net gave NaN or inf on finite latents: check the U-Net's config (e.g. freq_shift) and "
                "weights")
    if guided is not None and not all_finite(guided):
        return f"the guided prediction overflowed: {_guidance_hint(guidance_scale)}"
    return ("the scheduler's step gave NaN or inf from finite inputs: check the scheduler's config (beta_start, "
            "beta_end, trained_betas, sigmas)")


def check_step(latents, step: int, total: int, timestep, before=None, model_output=None, guided=None,
               guidance_scale=None, cause: str | None = None) -> None:
    """Raise NonFiniteError naming denoising step ``step`` (0-based) of ``total`` and the likely cause
    when ``latents`` (the step's result) hold NaN or inf. ``before``: the latents the step started from;
    ``model_output``: the U-Net's raw output; ``guided``: the prediction after guidance; ``cause``: the
    cause when the caller knows it (then the others are not needed)."""
    if all_finite(latents):
        return
    t = to_numpy(timestep).item() if hasattr(timestep, "shape") else timestep
    cause = cause or likely_cause(before, model_output, guided, guidance_scale)
    raise NonFiniteError(f"the latents hold NaN or inf after denoising step {step + 1} of {total} (timestep {t:g}): "
                         f"{cause}")


def check_image(image, latents, scaling_factor: float) -> None:
    """Raise NonFiniteError when the decoded ``image`` holds NaN or inf (before it is turned into pixels,
    where NaN would become black). ``latents``: what was decoded, before the division by ``scaling_factor``."""
    if all_finite(image):
        return
    if not all_finite(latents):
        cause = "the latents were not finite"
    else:
        size = _max_abs(latents) / scaling_factor
        cause = (f"the decoded latents reach max |x| = {size:.3g} (latents / scaling_factor {scaling_factor:g}): "
                 "the VAE overflowed (a guidance scale too large, or a model or scheduler config giving huge "
                 "values)" if size > HUGE else
                 "the VAE decoder gave NaN or inf on finite latents: check the VAE's config and weights")
    raise NonFiniteError(f"the decoded image holds NaN or inf: {cause}")
