"""Conversions among the three things a denoiser may predict: epsilon, x0 ("sample") and v.

Shapes: model_output, x_t, x0, noise (B, ...); t an int or an integer array (B,); alphas_cumprod
(T,) on the host. Derivation: docs/diffusion.md, "Prediction types".

With a = sqrt(abar_t), s = sqrt(1 - abar_t) and x_t = a x0 + s eps, the velocity is
v = a eps - s x0 (Salimans & Ho 2022; diffusers' ``get_velocity``), and every conversion is linear
in the model output and in x_t:

    from \\ to   epsilon                  sample (x0)              v_prediction
    epsilon      eps                      (x_t - s eps) / a        (eps - s x_t) / a
    sample       (x_t - a x0) / s         x0                       (a x_t - x0) / s
    v            s x_t + a v              a x_t - s v              v

(using a^2 + s^2 = 1). ``convert_forward`` returns y = A model_output + Bx x_t and caches (A, Bx);
``convert_backward`` gives (A dy, Bx dy). The names of the prediction types are diffusers'
``prediction_type`` values. The x0 and v rows divide by a (or s): they blow up where abar_t -> 0
(a zero-terminal-SNR schedule's last step) or abar_t -> 1.
"""
from __future__ import annotations

import numpy

from npdiffusion.checks import check_same_shape, check_sample
from npdiffusion.diffusion.forward import (
    check_timesteps, checked_marginal, gather, marginal_coefficients,
)

__all__ = ["PREDICTION_TYPES", "check_prediction_type", "conversion_coefficients", "convert_forward",
           "convert_backward", "convert", "velocity"]

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def check_prediction_type(name: str, value) -> str:
    if value not in PREDICTION_TYPES:
        raise ValueError(f"{name} must be one of {PREDICTION_TYPES}, got {value!r}")
    return value


def conversion_coefficients(alphas_cumprod, from_type: str, to_type: str):
    """Host float64 arrays ``(A, Bx)`` (T,) with to = A * from + Bx * x_t (see the module table)."""
    check_prediction_type("from_type", from_type)
    check_prediction_type("to_type", to_type)
    a, s = marginal_coefficients(alphas_cumprod)
    one, zero = numpy.ones_like(a), numpy.zeros_like(a)
    with numpy.errstate(divide="ignore", invalid="ignore"):
        table = {
            ("epsilon", "epsilon"): (one, zero),
            ("epsilon", "sample"): (-s / a, 1.0 / a),
            ("epsilon", "v_prediction"): (1.0 / a, -s / a),
            ("sample", "sample"): (one, zero),
            ("sample", "epsilon"): (-a / s, 1.0 / s),
            ("sample", "v_prediction"): (-1.0 / s, a / s),
            ("v_prediction", "v_prediction"): (one, zero),
            ("v_prediction", "epsilon"): (a, s),
            ("v_prediction", "sample"): (-s, a),
        }
    return table[(from_type, to_type)]


def convert_forward(model_output, x_t, t, alphas_cumprod, from_type: str, to_type: str):
    """Convert a ``from_type`` prediction at (x_t, t) into a ``to_type`` one.

    model_output, x_t (B, ...) -> y (B, ...). Returns ``(y, cache)``; cache = (A, Bx) gathered at t.
    """
    check_sample("model_output", model_output)
    check_sample("x_t", x_t)
    check_same_shape("x_t", x_t, "model_output", model_output)
    coef_out, coef_x = conversion_coefficients(alphas_cumprod, from_type, to_type)
    t = check_timesteps(t, coef_out.size, x_t.shape[0])
    ca, cb = gather(coef_out, t, model_output), gather(coef_x, t, x_t)
    return ca * model_output + cb * x_t, (ca, cb)


def convert_backward(dy, cache):
    """Returns ``(d model_output, d x_t)`` = (A dy, Bx dy)."""
    ca, cb = cache
    return ca * dy, cb * dy


def convert(model_output, x_t, t, alphas_cumprod, from_type: str, to_type: str):
    """``convert_forward`` without the cache: the converted prediction (B, ...)."""
    return convert_forward(model_output, x_t, t, alphas_cumprod, from_type, to_type)[0]


def velocity(x0, noise, t, alphas_cumprod):
    """The v-prediction target v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (diffusers' get_velocity)."""
    sqrt_abar, sqrt_one_minus, t = checked_marginal(x0, noise, t, alphas_cumprod)
    return gather(sqrt_abar, t, noise) * noise - gather(sqrt_one_minus, t, x0) * x0
