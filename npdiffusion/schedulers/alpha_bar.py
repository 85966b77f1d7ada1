"""The variance-preserving forward process of DDPM, DDIM and PNDM, in abar_t = prod_{s <= t} alpha_s.

Shapes: original_samples, sample, noise (B, C, H, W) (any shape with a batch axis first); timesteps
(B,) or (1,); alphas_cumprod (T,) float32 on the host.
"""
from __future__ import annotations

import numpy

from npdiffusion.schedulers.noise import broadcast_per_sample
from npdiffusion.schedulers.validation import check_array_pair, noise_timesteps


def alpha_bar_pair(alphas_cumprod: numpy.ndarray, t: int, prev_t: int, final_alpha_cumprod):
    """``(abar_t, abar_t', 1 - abar_t, 1 - abar_t')``, float32 host scalars, for a sampling step t -> t'.

    abar_t' is ``final_alpha_cumprod`` past the end (t' < 0): 1, or abar_0 (DDIM's and PNDM's
    ``set_alpha_to_one=False``).
    """
    alpha_prod_t = alphas_cumprod[t]
    alpha_prod_t_prev = alphas_cumprod[prev_t] if prev_t >= 0 else final_alpha_cumprod
    return alpha_prod_t, alpha_prod_t_prev, numpy.float32(1.0) - alpha_prod_t, numpy.float32(1.0) - alpha_prod_t_prev


def alpha_bar_coefficients(where: str, alphas_cumprod: numpy.ndarray, timesteps, x):
    """sqrt(abar_t) and sqrt(1 - abar_t) at ``timesteps`` (B,) or (1,), as (B, 1, ..., 1) arrays in ``x``'s dtype.

    As diffusers' ``add_noise``: abar is first cast to the sample dtype, then square-rooted in it.
    ``where`` ("Class.add_noise") prefixes the errors.
    """
    t = noise_timesteps(where, timesteps, x.shape[0])
    if not numpy.all(numpy.isfinite(t)) or not numpy.all(t == numpy.round(t)):
        raise ValueError(f"{where}: timesteps must be whole numbers, got {t.tolist()}")
    t = t.astype(numpy.int64)
    T = alphas_cumprod.shape[0]
    if t.min() < 0 or t.max() >= T:
        raise ValueError(f"{where}: timesteps must lie in [0, {T - 1}], got min {t.min()} max {t.max()}")
    a = alphas_cumprod.astype(numpy.dtype(x.dtype))[t]
    one = a.dtype.type(1)
    return broadcast_per_sample(numpy.sqrt(a), x), broadcast_per_sample(numpy.sqrt(one - a), x)


def alpha_bar_add_noise(cls_name: str, alphas_cumprod, original_samples, noise, timesteps):
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, per sample (diffusers' ``add_noise``). (B, ...)."""
    check_array_pair(cls_name, "noise", noise, "original_samples", original_samples)
    sa, so = alpha_bar_coefficients(f"{cls_name}.add_noise", alphas_cumprod, timesteps, original_samples)
    return sa * original_samples + so * noise


def alpha_bar_velocity(cls_name: str, alphas_cumprod, sample, noise, timesteps):
    """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022; diffusers' ``get_velocity``). (B, ...)."""
    check_array_pair(cls_name, "noise", noise, "sample", sample)
    sa, so = alpha_bar_coefficients(f"{cls_name}.get_velocity", alphas_cumprod, timesteps, sample)
    return sa * noise - so * sample


class AlphaBarNoiseMixin:
    """``add_noise`` of the schedulers that work with abar_t directly (DDPM, DDIM, PNDM); needs ``alphas_cumprod``."""

    def add_noise(self, original_samples, noise, timesteps):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, one t per batch item. (B, ...)."""
        return alpha_bar_add_noise(type(self).__name__, self.alphas_cumprod, original_samples, noise, timesteps)


class AlphaBarVelocityMixin(AlphaBarNoiseMixin):
    """``add_noise`` and ``get_velocity`` (the v-prediction target) of DDPM and DDIM."""

    def get_velocity(self, sample, noise, timesteps):
        """The v-prediction target sqrt(abar_t) noise - sqrt(1 - abar_t) x_0. (B, ...)."""
        return alpha_bar_velocity(type(self).__name__, self.alphas_cumprod, sample, noise, timesteps)
