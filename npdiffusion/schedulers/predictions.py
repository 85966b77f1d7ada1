"""x0_hat and eps_hat from a model output by ``prediction_type``: the conversion every sampler makes.

Shapes: model_output, sample (B, C, H, W) (any shape with batch first); the coefficients are host
scalars (Python floats or float32 NumPy scalars), so the array math keeps the sample's dtype.
Derivation: docs/schedulers.md, "Notation" (and docs/diffusion.md, "Prediction types").

Variance-preserving form (DDPM, DDIM, DPM-Solver): x_t = a x0 + s eps with a = sqrt(abar_t),
s = sqrt(1 - abar_t), so a^2 + s^2 = 1, and the v target is v = a eps - s x0. Solving for x0 and eps:

    epsilon:       x0_hat = (x_t - s eps_hat) / a
    v_prediction:  x0_hat = a x_t - s v_hat       (a^2 x0 + a s eps - s a eps + s^2 x0 = x0)
                   eps_hat = a v_hat + s x_t
    sample:        x0_hat = the output,  eps_hat = (x_t - a x0_hat) / s

Variance-exploding form (Euler, Euler ancestral, Heun): x = x_t / a = x0 + sigma eps with
sigma = s / a, so a = 1 / sqrt(sigma^2 + 1) and the same formulas read

    epsilon:       x0_hat = x - sigma eps_hat
    v_prediction:  x0_hat = a^2 x - s v_hat = v_hat (-sigma / sqrt(sigma^2 + 1)) + x / (sigma^2 + 1)

Each function does the same float32 operations, in the same order, as the diffusers scheduler it
stands in for (the sampling loops are compared with diffusers bit for bit).
"""
from __future__ import annotations

import numpy


def vp_x0(prediction_type: str, model_output, sample, a: float, s: float):
    """x0_hat (B, ...) in the VP form; ``a`` = sqrt(abar_t), ``s`` = sqrt(1 - abar_t) as Python floats.

    ``prediction_type`` is "epsilon", "sample" or (any other value) "v_prediction"; the caller has
    checked it.
    """
    if prediction_type == "epsilon":
        return (sample - s * model_output) / a
    if prediction_type == "sample":
        return model_output
    return a * sample - s * model_output


def vp_epsilon(prediction_type: str, model_output, sample, a: float, s: float):
    """eps_hat (B, ...) in the VP form, with ``a``, ``s`` as in :func:`vp_x0`.

    For "sample" the model output is x0_hat; pass ``"sample"`` with an x0 estimate to get the noise
    it implies, (x_t - a x0_hat) / s.
    """
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return (sample - a * model_output) / s
    return a * model_output + s * sample


def ve_x0(prediction_type: str, model_output, sample, sigma, sigma_eps=None):
    """x0_hat (B, ...) in the VE form at noise level ``sigma`` (a float32 host scalar).

    ``sigma_eps`` (default ``sigma``) is the level the epsilon branch uses: Euler with churn raises
    the level to sigma_hat for it, while diffusers' v branch keeps sigma. "sample" and
    "original_sample" return the output itself.
    """
    if prediction_type in ("original_sample", "sample"):
        return model_output
    if prediction_type == "epsilon":
        return sample - float(sigma if sigma_eps is None else sigma_eps) * model_output
    s2 = sigma * sigma + numpy.float32(1.0)
    return model_output * float(-sigma / numpy.sqrt(s2)) + sample / float(s2)
