"""EulerAncestralDiscreteScheduler: Euler step down to sigma_down, then fresh noise of std sigma_up.

Shapes: sample, model_output, noise (B, C, H, W) (any shape with batch first); ``timesteps`` (N,)
float32 and ``sigmas`` (N+1,) float32 on the host. Mirrors diffusers'
``scheduling_euler_ancestral_discrete.py`` (0.42) (k-diffusion's ``sample_euler_ancestral``);
derivation in docs/schedulers.md, "Euler ancestral".

From sigma to sigma_next the ancestral step splits the target variance sigma_next^2 into a
deterministic part and fresh noise, as DDPM's posterior does (eta = 1):

    sigma_up   = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)
    sigma_down = sqrt(sigma_next^2 - sigma_up^2)
    x0_hat     = x - sigma eps (epsilon) | v (-sigma/sqrt(sigma^2+1)) + x/(sigma^2+1) (v)
    x_next     = x + (x - x0_hat)/sigma (sigma_down - sigma) + sigma_up z

A noise draw happens at every step (also the last, where sigma_up = 0), as in diffusers, so a
generator advances the same way. Float32 inside; the result has the model output's dtype.
"""
from __future__ import annotations

import numpy

from npdiffusion.diffusion import schedules
from npdiffusion.schedulers.base import SchedulerMixin, register_to_config
from npdiffusion.schedulers.noise import standard_normal_like
from npdiffusion.schedulers.output import step_output
from npdiffusion.schedulers.predictions import ve_x0
from npdiffusion.schedulers.sigmas import SigmaScalingMixin, reject_integer_timestep
from npdiffusion.schedulers.timesteps import spaced_timesteps
from npdiffusion.schedulers.training_schedule import training_schedule
from npdiffusion.schedulers.validation import (
    check_array_pair,
    check_num_inference_steps,
    check_schedule_options,
)

PREDICTION_TYPES = ("epsilon", "v_prediction")

_F32 = numpy.float32


class EulerAncestralDiscreteScheduler(SigmaScalingMixin, SchedulerMixin):
    """Euler ancestral sampler; constructor keywords are diffusers' config keys and defaults.

    diffusers accepts prediction_type "sample" here but raises NotImplementedError at the first step;
    this class refuses it in the constructor.
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 timestep_spacing: str = "linspace", steps_offset: int = 0, rescale_betas_zero_snr: bool = False):
        name = type(self).__name__
        self.betas, self.alphas, self.alphas_cumprod = training_schedule(
            name, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr,
            terminal_floor=True)
        check_schedule_options(name, prediction_type, PREDICTION_TYPES, timestep_spacing, steps_offset)
        sigmas = schedules.sigmas_from_alphas_cumprod(self.alphas_cumprod)
        self.sigmas = numpy.concatenate([sigmas[::-1], [0.0]]).astype(_F32)
        self.num_inference_steps = None
        self.timesteps = numpy.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=float)[::-1].copy()
        self.is_scale_input_called = False
        self._reset_step_index()

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Choose N timesteps by ``timestep_spacing`` and interpolate their sigmas (``device`` is ignored)."""
        cfg = self._config
        n = check_num_inference_steps(type(self).__name__, num_inference_steps, cfg["num_train_timesteps"])
        self.num_inference_steps = n
        timesteps = spaced_timesteps(cfg["timestep_spacing"], cfg["num_train_timesteps"], n, cfg["steps_offset"],
                                     as_float=True)
        train_sigmas = schedules.sigmas_from_alphas_cumprod(self.alphas_cumprod)
        sigmas = numpy.interp(timesteps, numpy.arange(0, len(train_sigmas)), train_sigmas)
        self.sigmas = numpy.concatenate([sigmas, [0.0]]).astype(_F32)
        self.timesteps = timesteps
        self._reset_step_index()
        self._timesteps_set = True

    def step(self, model_output, timestep, sample, noise=None, rng=None, return_dict: bool = True):
        """One ancestral Euler step (module docstring). Returns prev_sample, pred_original_sample.

        ``noise`` is z (shape of ``model_output``); without it z is drawn from ``rng``.
        """
        name = type(self).__name__
        reject_integer_timestep(name, timestep)
        check_array_pair(name, "model_output", model_output, "sample", sample)
        self._enter_step(timestep)
        sigma = self.sigmas[self._step_index]
        sample = sample.astype(_F32, copy=False)
        pred_original_sample = ve_x0(self._config["prediction_type"], model_output, sample, sigma)

        sigma_from = self.sigmas[self._step_index]
        sigma_to = self.sigmas[self._step_index + 1]
        from2, to2 = sigma_from * sigma_from, sigma_to * sigma_to
        sigma_up = numpy.sqrt(to2 * (from2 - to2) / from2)
        sigma_down = numpy.sqrt(to2 - sigma_up * sigma_up)
        derivative = (sample - pred_original_sample) / float(sigma)
        dt = sigma_down - sigma
        prev_sample = sample + derivative * float(dt)
        z = standard_normal_like(name, model_output, noise=noise, rng=rng)
        prev_sample = prev_sample + z * float(sigma_up)
        prev_sample = prev_sample.astype(model_output.dtype, copy=False)
        self._step_index += 1
        return step_output(return_dict, prev_sample, pred_original_sample)
