"""DDIMScheduler: denoising diffusion implicit models (Song et al. 2021, eq. 12).

Shapes: sample, model_output, noise (B, C, H, W) (any shape with batch first); ``timesteps`` (N,)
int64 on the host. Mirrors diffusers' ``scheduling_ddim.py`` (0.42); derivation in docs/schedulers.md, "DDIM".

With t' = t - T // N (diffusers uses this stride whatever the spacing), abar_t' = final_alpha_cumprod
when t' < 0 (1 if ``set_alpha_to_one`` else abar_0):

    x0_hat, eps_hat = from the model output by prediction_type (x0_hat clipped if clip_sample)
    sigma   = eta sqrt((1 - abar_t')/(1 - abar_t) (1 - abar_t/abar_t'))
    x_t'    = sqrt(abar_t') x0_hat + sqrt(1 - abar_t' - sigma^2) eps_hat + sigma z

eta = 0 is the deterministic DDIM sampler; eta = 1 has DDPM's posterior variance.
"""
from __future__ import annotations

import numpy

from npdiffusion.schedulers.alpha_bar import AlphaBarVelocityMixin, alpha_bar_pair
from npdiffusion.schedulers.base import SchedulerMixin, register_to_config
from npdiffusion.schedulers.noise import standard_normal_like
from npdiffusion.schedulers.output import step_output
from npdiffusion.schedulers.predictions import vp_epsilon, vp_x0
from npdiffusion.schedulers.thresholding import clip_or_threshold
from npdiffusion.schedulers.timesteps import spaced_timesteps
from npdiffusion.schedulers.training_schedule import training_schedule
from npdiffusion.schedulers.validation import (
    check_array_pair,
    check_num_inference_steps,
    check_real,
    check_reals,
    check_schedule_options,
    merge_noise_alias,
)

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")

_F32 = numpy.float32


class DDIMScheduler(AlphaBarVelocityMixin, SchedulerMixin):
    """The DDIM sampler; constructor keywords are diffusers' config keys with diffusers' defaults."""

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, prediction_type: str = "epsilon",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 clip_sample_range: float = 1.0, sample_max_value: float = 1.0,
                 timestep_spacing: str = "leading", rescale_betas_zero_snr: bool = False):
        name = type(self).__name__
        self.betas, self.alphas, self.alphas_cumprod = training_schedule(
            name, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr)
        check_schedule_options(name, prediction_type, PREDICTION_TYPES, timestep_spacing, steps_offset)
        check_reals(name, clip_sample_range=clip_sample_range, sample_max_value=sample_max_value,
                    dynamic_thresholding_ratio=dynamic_thresholding_ratio)
        self.final_alpha_cumprod = _F32(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = numpy.arange(0, num_train_timesteps)[::-1].copy().astype(numpy.int64)

    def scale_model_input(self, sample, timestep=None):
        """The identity (DDIM feeds x_t to the model unscaled); ``timestep``, if given, must lie in [0, T)."""
        return self._identity_scale(sample, timestep)

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Choose the N inference timesteps by ``timestep_spacing`` (``device`` is ignored: host timesteps)."""
        cfg = self._config
        n = check_num_inference_steps(type(self).__name__, num_inference_steps, cfg["num_train_timesteps"])
        self.num_inference_steps = n
        self.timesteps = spaced_timesteps(cfg["timestep_spacing"], cfg["num_train_timesteps"], n,
                                          cfg["steps_offset"])
        self._timesteps_set = True

    def _get_variance(self, timestep: int, prev_timestep: int):
        """(1 - abar_t')/(1 - abar_t) (1 - abar_t/abar_t'): DDPM's posterior variance for the stride t -> t'."""
        alpha_prod_t, alpha_prod_t_prev, beta_prod_t, beta_prod_t_prev = alpha_bar_pair(
            self.alphas_cumprod, timestep, prev_timestep, self.final_alpha_cumprod)
        return (beta_prod_t_prev / beta_prod_t) * (_F32(1.0) - alpha_prod_t / alpha_prod_t_prev)

    def step(self, model_output, timestep, sample, eta: float = 0.0, use_clipped_model_output: bool = False,
             noise=None, rng=None, return_dict: bool = True, variance_noise=None):
        """One DDIM step x_t -> x_t' (module docstring). Returns prev_sample, pred_original_sample.

        ``noise`` (alias ``variance_noise``, diffusers' name) is z; drawn from ``rng`` when eta > 0
        and not given. ``use_clipped_model_output`` recomputes eps_hat from the clipped x0_hat.
        """
        name = type(self).__name__
        self._require_timesteps()
        check_array_pair(name, "model_output", model_output, "sample", sample)
        eta = check_real(name, "eta", eta)
        noise = merge_noise_alias(name, noise, variance_noise)
        cfg = self._config
        t = self._check_timestep("step", timestep)
        prev_timestep = t - cfg["num_train_timesteps"] // self.num_inference_steps

        alpha_prod_t, alpha_prod_t_prev, beta_prod_t, _ = alpha_bar_pair(
            self.alphas_cumprod, t, prev_timestep, self.final_alpha_cumprod)
        sa, sb = float(numpy.sqrt(alpha_prod_t)), float(numpy.sqrt(beta_prod_t))

        pred_original_sample = vp_x0(cfg["prediction_type"], model_output, sample, sa, sb)
        pred_epsilon = vp_epsilon(cfg["prediction_type"], model_output, sample, sa, sb)
        pred_original_sample = clip_or_threshold(pred_original_sample, cfg, cfg["thresholding"], cfg["clip_sample"])

        variance = self._get_variance(t, prev_timestep)
        std_dev_t = _F32(eta) * numpy.sqrt(variance)
        if use_clipped_model_output:
            pred_epsilon = vp_epsilon("sample", pred_original_sample, sample, sa, sb)

        # 1 - abar_prev - sigma^2 >= 0 for eta <= 1, but it is 0 at a zero-SNR step with eta = 1, where
        # rounding can make it -1 ulp (diffusers then gives NaN): clamped at 0
        direction_coeff = numpy.sqrt(max(_F32(1.0) - alpha_prod_t_prev - std_dev_t * std_dev_t, _F32(0.0)))
        pred_sample_direction = float(direction_coeff) * pred_epsilon
        prev_sample = float(numpy.sqrt(alpha_prod_t_prev)) * pred_original_sample + pred_sample_direction

        if eta > 0:
            z = standard_normal_like(name, model_output, noise=noise, rng=rng)
            prev_sample = prev_sample + float(std_dev_t) * z

        return step_output(return_dict, prev_sample, pred_original_sample)
