"""Classifier guidance (Dhariwal & Nichol 2021, Algorithm 2 / eq. 14) for any scheduler, on pixels or
latents, alone or after classifier-free guidance. Derivation: docs/guidance.md.

Shapes: B batch, x_t and every prediction (B, C, H, W) (pixels, or latents for a latent model, in
which case the classifier was trained on latents); t a scheduler timestep (int or float); y (B,)
class indices; abar_t = alphas_cumprod at t (linearly interpolated between integer timesteps).

The score of the guided density p(x_t) p(y | x_t)^s is grad log p(x_t) + s grad log p(y | x_t), and
eps = -sqrt(1 - abar_t) grad log p(x_t), so the guided noise prediction is

    eps_hat = eps - s sqrt(1 - abar_t) grad_x log p(y | x_t, t)              (``apply_classifier_guidance``)

A v- or x0-predicting model is converted to eps at (x_t, t), guided, and converted back
(``guide_model_output``). With classifier-free guidance the model output is first
eps_u + w (eps_c - eps_u) (``npdiffusion.diffusion.guidance``), then the classifier term is added.

x_t here is always the variance-preserving sample the model sees: ``scheduler.scale_model_input(x, t)``
(for the sigma-parameterised Euler/Heun samplers that is x / sqrt(sigma^2 + 1); for DDPM/DDIM/PNDM/
DPM-Solver it is x itself). Sampling is inference: nothing here keeps a cache.
"""
from __future__ import annotations

import inspect
import numbers

import numpy

from npdiffusion.backend import asarray, to_numpy, xp
from npdiffusion.diffusion.guidance import guided_prediction
from npdiffusion.guidance.classifier import NoiseAwareClassifier, log_prob_grad
from npdiffusion.pipelines.nonfinite import check_step

__all__ = ["abar_at", "apply_classifier_guidance", "guide_model_output", "classifier_gradient_fn",
           "unet_model_fn", "guided_sample"]


def _number(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def abar_at(alphas_cumprod, t) -> float:
    """abar at timestep t (a host float), linear interpolation between integer timesteps."""
    a = numpy.asarray(to_numpy(alphas_cumprod), dtype=numpy.float64)
    t = float(numpy.asarray(to_numpy(t)).reshape(-1)[0])
    if not 0.0 <= t <= a.size - 1:
        raise ValueError(f"t must lie in [0, {a.size - 1}], got {t}")
    return float(numpy.interp(t, numpy.arange(a.size), a))


def apply_classifier_guidance(eps, grad_log_prob, sqrt_one_minus_abar, scale):
    """eps_hat = eps - scale * sqrt(1 - abar_t) * grad_log_prob, all (B, ...) (fresh array).

    ``sqrt_one_minus_abar`` is a float or broadcasts against eps (e.g. (B, 1, 1, 1)).
    """
    if getattr(eps, "shape", None) != getattr(grad_log_prob, "shape", None):
        raise ValueError(f"grad_log_prob must have eps's shape {getattr(eps, 'shape', None)}, "
                         f"got {getattr(grad_log_prob, 'shape', None)}")
    s = _number("scale", scale)
    return eps - (s * sqrt_one_minus_abar) * grad_log_prob


def _to_eps(model_output, x_t, a, s, prediction_type):
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":                 # eps = a v + s x_t
        return a * model_output + s * x_t
    if prediction_type == "sample":                       # eps = (x_t - a x0) / s
        return (x_t - a * model_output) / s
    raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")


def _from_eps(eps, x_t, a, s, prediction_type):
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":                 # v = (eps - s x_t) / a
        return (eps - s * x_t) / a
    return (x_t - s * eps) / a                            # sample: x0 = (x_t - s eps) / a


def guide_model_output(model_output, x_t, t, alphas_cumprod, grad_log_prob, scale,
                       prediction_type: str = "epsilon"):
    """The model output (of ``prediction_type``) with the classifier term added in eps space.

    model_output, x_t, grad_log_prob (B, ...) -> (B, ...) of the same prediction type.
    """
    abar = abar_at(alphas_cumprod, t)
    a, s = abar ** 0.5, (1.0 - abar) ** 0.5
    eps = _to_eps(model_output, x_t, a, s, prediction_type)
    eps_hat = apply_classifier_guidance(eps, grad_log_prob, s, scale)
    return _from_eps(eps_hat, x_t, a, s, prediction_type).astype(model_output.dtype, copy=False)


def classifier_gradient_fn(classifier: NoiseAwareClassifier, y):
    """A guidance term for ``guided_sample``: (x_t, t, model_output) -> grad_x log p(y | x_t, t)."""
    if not isinstance(classifier, NoiseAwareClassifier):
        raise TypeError(f"classifier must be a NoiseAwareClassifier, got {type(classifier).__name__}")

    def fn(x_t, t, model_output):
        x = x_t.astype(classifier.dtype, copy=False)
        return log_prob_grad(classifier, x, t, y)[1].astype(x_t.dtype, copy=False)

    return fn


def unet_model_fn(unet, encoder_hidden_states, uncond_hidden_states=None, guidance_scale: float = 1.0):
    """(x_t, t) -> model output of a ``UNet2DConditionModel``, with classifier-free guidance.

    encoder_hidden_states (B, T, D) is the prompt's (for an unconditional model: the empty prompt's);
    with ``uncond_hidden_states`` (B, T, D) and ``guidance_scale`` != 1 the batch [uncond | cond] is
    run at once and combined as eps_u + w (eps_c - eps_u).
    """
    w = _number("guidance_scale", guidance_scale)
    cfg = uncond_hidden_states is not None and w != 1.0

    def fn(x_t, t):
        b = x_t.shape[0]
        if cfg:
            out = unet(xp.concatenate([x_t, x_t]), numpy.full((2 * b,), t),
                       xp.concatenate([uncond_hidden_states, encoder_hidden_states]))
            out = getattr(out, "sample", out)
            return guided_prediction(out, w)                       # [uncond | cond] -> (B, ...)
        out = unet(x_t, numpy.full((b,), t), encoder_hidden_states)
        return getattr(out, "sample", out)

    return fn


@numpy.errstate(over="ignore", invalid="ignore", divide="ignore")     # check_step reports NaN/inf instead
def guided_sample(model_fn, scheduler, shape, num_inference_steps: int, rng, guidance=(),
                  prediction_type: str | None = None, dtype=numpy.float32, latents=None):
    """Sample (B, C, H, W) with gradient guidance added to ``model_fn``'s prediction at every step.

    ``model_fn(x_t, t)`` returns the model output at the scaled input x_t (classifier-free guidance
    goes inside it, see ``unet_model_fn``); ``guidance`` is a sequence of ``(scale, grad_fn)`` with
    ``grad_fn(x_t, t, model_output)`` -> grad_x log p(... | x_t) (B, C, H, W) (e.g.
    ``classifier_gradient_fn`` or ``clip_guidance.clip_gradient_fn``); every term is added as
    eps_hat = eps - s sqrt(1 - abar_t) grad. ``rng`` (a NumPy Generator) draws the initial noise
    (unless ``latents`` is given) and the noise of stochastic samplers.
    Returns the final sample x_0 (B, C, H, W).

    Build DDPM/DDIM schedulers with ``clip_sample=False`` for guidance: with clipping, x0_hat is
    clipped to [-1, 1] while DDIM keeps the guided eps_hat, so a large guidance term enters x_t' only
    through eps_hat and pushes the sample *away* from the class (measured: tests/test_guidance_step.py).
    """
    n = int(num_inference_steps)
    terms = [(_number("guidance scale", s), f) for s, f in guidance]
    if not all(callable(f) for _, f in terms):
        raise TypeError("guidance must be a sequence of (scale, grad_fn) pairs with callable grad_fn")
    ptype = prediction_type or scheduler.config.get("prediction_type", "epsilon")
    scheduler.set_timesteps(n)
    if latents is None:
        latents = rng.standard_normal(tuple(shape))
    x = asarray(latents, dtype=dtype) * float(scheduler.init_noise_sigma)  # host or device latents
    step_kwargs = {"rng": rng} if "rng" in inspect.signature(scheduler.step).parameters else {}
    timesteps = to_numpy(scheduler.timesteps).tolist()
    for i, t in enumerate(timesteps):
        x_in = scheduler.scale_model_input(x, t)
        out = model_fn(x_in, t)
        for s, grad_fn in terms:
            if s != 0.0:
                out = guide_model_output(out, x_in, t, scheduler.alphas_cumprod, grad_fn(x_in, t, out), s, ptype)
        before, x = x, scheduler.step(out, t, x, return_dict=False, **step_kwargs)[0]
        check_step(x, i, len(timesteps), t, before, guided=out)     # NaN/inf: a NonFiniteError naming the step
    return x
