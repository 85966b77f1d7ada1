"""Classifier-free guidance and diffusers' ``rescale_noise_cfg``.

Shapes: eps_uncond, eps_cond, noise_cfg, noise_pred_text (B, ...); a batched model output
(2B, ...) holds [unconditional | conditional] along axis 0, the order of diffusers' Stable
Diffusion pipeline. Derivation: docs/diffusion.md, "Classifier-free guidance".

    eps_cfg = eps_u + w (eps_c - eps_u)                          (Ho & Salimans 2022)
    rescaled = eps_cfg * std(eps_c) / std(eps_cfg)                (Lin et al. 2023, sec. 3.4)
    out = phi * rescaled + (1 - phi) * eps_cfg

std is taken per sample over every non-batch axis with Bessel's correction (ddof = 1), as
torch.Tensor.std does by default in diffusers. Guidance is inference-only: nothing here keeps a
cache or has a backward.
"""
from __future__ import annotations

from npdiffusion.backend import xp
from npdiffusion.checks import check_real, check_same_shape, check_sample

__all__ = ["classifier_free_guidance", "rescale_noise_cfg", "guided_prediction"]


def classifier_free_guidance(eps_uncond, eps_cond, guidance_scale: float):
    """eps_u + w (eps_c - eps_u) (B, ...); w = 1 gives eps_c, w = 0 gives eps_u."""
    check_sample("eps_uncond", eps_uncond)
    check_sample("eps_cond", eps_cond)
    check_same_shape("eps_uncond", eps_uncond, "eps_cond", eps_cond)
    w = check_real("guidance_scale", guidance_scale, finite=False)
    return eps_uncond + w * (eps_cond - eps_uncond)


def rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale: float = 0.0):
    """diffusers' ``rescale_noise_cfg``: blend eps_cfg with eps_cfg rescaled to the std of eps_c.

    noise_cfg, noise_pred_text (B, ...) with at least two entries per sample (ddof = 1).
    """
    check_sample("noise_cfg", noise_cfg)
    check_sample("noise_pred_text", noise_pred_text)
    check_same_shape("noise_cfg", noise_cfg, "noise_pred_text", noise_pred_text)
    phi = check_real("guidance_rescale", guidance_rescale, finite=False)
    if noise_cfg.ndim < 2 or noise_cfg.size // max(noise_cfg.shape[0], 1) < 2:
        raise ValueError(f"noise_cfg must have at least 2 entries per sample for an unbiased std, "
                         f"got shape {tuple(noise_cfg.shape)}")
    axes = tuple(range(1, noise_cfg.ndim))
    std_text = xp.std(noise_pred_text, axis=axes, keepdims=True, ddof=1)
    std_cfg = xp.std(noise_cfg, axis=axes, keepdims=True, ddof=1)
    rescaled = noise_cfg * (std_text / std_cfg)
    return phi * rescaled + (1.0 - phi) * noise_cfg


def guided_prediction(model_output, guidance_scale: float, guidance_rescale: float = 0.0):
    """Split a batched output (2B, ...) = [uncond | cond], guide, and optionally rescale: (B, ...).

    Mirrors StableDiffusionPipeline: ``chunk(2)``, CFG, then ``rescale_noise_cfg`` when
    ``guidance_rescale > 0``.
    """
    check_sample("model_output", model_output)
    if model_output.shape[0] % 2:
        raise ValueError(f"model_output must stack [uncond, cond] on axis 0 (an even batch), "
                         f"got shape {tuple(model_output.shape)}")
    half = model_output.shape[0] // 2
    eps_u, eps_c = model_output[:half], model_output[half:]
    out = classifier_free_guidance(eps_u, eps_c, guidance_scale)
    if check_real("guidance_rescale", guidance_rescale, finite=False) > 0.0:
        out = rescale_noise_cfg(out, eps_c, guidance_rescale)
    return out
