"""The "simple" denoising loss for epsilon, x0 and v targets, with optional Min-SNR-gamma weighting.

Shapes: model_output, target, x0, noise (B, ...) with M = prod(...) entries per sample; t an int or
an integer array (B,); alphas_cumprod (T,) on the host. Derivation: docs/diffusion.md, "From the
bound to the simple loss" and "Min-SNR weighting".

    L = 1/(B M) sum_{b,i} (out_bi - target_bi)^2                       (no weighting)
    L = 1/B sum_b w_b * 1/M sum_i (out_bi - target_bi)^2                (snr_gamma = gamma)

with SNR_t = abar_t / (1 - abar_t) and the weights of diffusers' examples/text_to_image/
train_text_to_image.py (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting"):

    epsilon:       w = min(SNR, gamma) / SNR     (1 where SNR = 0: the limit, diffusers gives NaN)
    v_prediction:  w = min(SNR, gamma) / (SNR + 1)
    sample (x0):   w = min(SNR, gamma)

Gradient: dL/d out_bi = 2 w_b (out_bi - target_bi) / (B M) (w_b = 1 without weighting).

float16 inputs are computed in float32 (diffusers calls ``.float()`` on both before the MSE); the
loss comes back as a 0-d array in that compute dtype, the gradient in the model output's dtype.
``grad_scale`` (mixed precision's loss scale S) multiplies the gradient in the compute dtype, before
its one cast to a float16 output's dtype: the unscaled 2 (out - target) / N is ~3e-5 per unit error
at N = 65536, below float16's normal range, so casting first would lose it (docs/gpu.md).
"""
from __future__ import annotations

import numbers

import numpy

from npdiffusion.backend import asarray, xp
from npdiffusion.checks import check_same_shape, check_sample
from npdiffusion.diffusion.forward import check_schedule, check_timesteps
from npdiffusion.diffusion.parameterization import check_prediction_type, velocity

__all__ = ["training_target", "snr_at", "min_snr_weights", "simple_loss"]


def training_target(x0, noise, t, alphas_cumprod, prediction_type: str = "epsilon"):
    """What the model should output for x_t = q_sample(x0, t, noise): noise, x0 or v (B, ...)."""
    check_prediction_type("prediction_type", prediction_type)
    check_sample("x0", x0)
    check_sample("noise", noise)
    check_same_shape("x0", x0, "noise", noise)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    return velocity(x0, noise, t, alphas_cumprod)


def snr_at(t, alphas_cumprod):
    """SNR_t = abar_t / (1 - abar_t) at the timesteps t, float64 on the host (float or (B,))."""
    a = check_schedule("alphas_cumprod", alphas_cumprod)
    t = check_timesteps(t, a.size)
    with numpy.errstate(divide="ignore"):
        snr = a / (1.0 - a)
    return float(snr[t]) if isinstance(t, int) else snr[t]


def min_snr_weights(t, alphas_cumprod, snr_gamma: float, prediction_type: str = "epsilon"):
    """Per-sample Min-SNR-gamma weights (float64 host array (B,)) as in train_text_to_image.py."""
    check_prediction_type("prediction_type", prediction_type)
    if isinstance(snr_gamma, bool) or not isinstance(snr_gamma, (int, float)) or not snr_gamma > 0:
        raise ValueError(f"snr_gamma must be a positive number, got {snr_gamma!r}")
    snr = numpy.atleast_1d(numpy.asarray(snr_at(t, alphas_cumprod), dtype=numpy.float64))
    clipped = numpy.minimum(snr, float(snr_gamma))
    if prediction_type == "epsilon":
        with numpy.errstate(divide="ignore", invalid="ignore"):
            w = numpy.where(snr > 0, clipped / snr, 1.0)
        return numpy.where(numpy.isinf(snr), 0.0, w)
    if prediction_type == "v_prediction":
        with numpy.errstate(invalid="ignore"):
            return numpy.where(numpy.isinf(snr), 0.0, clipped / (snr + 1.0))
    return clipped


def simple_loss(model_output, target, t=None, alphas_cumprod=None, prediction_type: str = "epsilon",
                snr_gamma=None, grad_scale: float = 1.0):
    """Mean squared error of ``model_output`` against ``target`` (B, ...), optionally Min-SNR weighted.

    ``t`` and ``alphas_cumprod`` are needed only with ``snr_gamma``. Returns ``(loss, grad)``: loss a
    0-d array (unscaled), grad = grad_scale * dL/d model_output (B, ...), scaled in the compute dtype
    (float32 for float16 outputs) and then cast to ``model_output``'s dtype.
    """
    if isinstance(grad_scale, bool) or not isinstance(grad_scale, numbers.Real) or not 0 < grad_scale < float("inf"):
        raise ValueError(f"simple_loss: grad_scale must be a positive finite number, got {grad_scale!r}")
    check_sample("model_output", model_output)
    check_sample("target", target)
    check_same_shape("model_output", model_output, "target", target)
    check_prediction_type("prediction_type", prediction_type)
    dtype = xp.float32 if model_output.dtype.itemsize < 4 else model_output.dtype
    diff = model_output.astype(dtype) - target.astype(dtype)
    batch = model_output.shape[0]
    if snr_gamma is None:
        if diff.size == 0:
            raise ValueError(f"model_output must not be empty, got shape {tuple(model_output.shape)}")
        loss = xp.mean(diff * diff)
        grad = diff * (2.0 * grad_scale / diff.size)
        return loss, _cast(grad, model_output.dtype)
    if alphas_cumprod is None or t is None:
        raise ValueError("simple_loss: snr_gamma needs t and alphas_cumprod, got None")
    a = check_schedule("alphas_cumprod", alphas_cumprod)
    t = check_timesteps(t, a.size, batch)
    w = min_snr_weights(t, a, snr_gamma, prediction_type)
    w = numpy.broadcast_to(w, (batch,))
    per_sample = (diff * diff).reshape(batch, -1).mean(axis=1)      # (B,)
    w_dev = asarray(w, dtype=dtype)
    loss = xp.mean(per_sample * w_dev)
    m = diff.size // batch
    scale = asarray((2.0 * grad_scale * w / (batch * m)).reshape((batch,) + (1,) * (diff.ndim - 1)), dtype=dtype)
    return loss, _cast(diff * scale, model_output.dtype)


def _cast(grad, dtype):
    """``grad`` in ``dtype`` (no copy when it is already); a scaled gradient past float16's range
    becomes inf without a warning: the loss scaler sees it and skips the step."""
    with numpy.errstate(over="ignore"):
        return grad.astype(dtype, copy=False)
