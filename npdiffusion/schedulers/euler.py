"""EulerDiscreteScheduler: Euler steps of the probability-flow ODE in sigma space (Karras et al. 2022, Alg. 2).

Shapes: sample, model_output, noise (B, C, H, W) (any shape with batch first); ``timesteps`` (N,)
float32 on the host; ``sigmas`` (N+1,) float32 on the host (the last is 0, or sigma_min).
Mirrors diffusers' ``scheduling_euler_discrete.py`` (0.42); derivation in docs/schedulers.md, "Euler".

In the variance-exploding variable x = x_t / sqrt(abar_t) the ODE is dx/dsigma = (x - x0_hat(x, sigma)) / sigma:

    scale_model_input:  x / sqrt(sigma^2 + 1)   (what the network was trained on)
    sigma_hat = sigma (1 + gamma), gamma = min(s_churn/N, sqrt(2) - 1) inside [s_tmin, s_tmax], else 0
    (gamma > 0 first adds noise:  x <- x + sqrt(sigma_hat^2 - sigma^2) s_noise z)
    x0_hat = x - sigma_hat eps  (epsilon) | v (-sigma/sqrt(sigma^2+1)) + x/(sigma^2+1)  (v) | the output (sample)
    x_next = x + (x - x0_hat)/sigma_hat (sigma_next - sigma_hat)

The step runs in float32 (the sample is upcast) and returns the model output's dtype, as diffusers.
"""
from __future__ import annotations

import numpy

from npdiffusion.diffusion import schedules
from npdiffusion.schedulers.base import SchedulerMixin, register_to_config
from npdiffusion.schedulers.float32 import f32_exp, f32_log
from npdiffusion.schedulers.noise import standard_normal_like
from npdiffusion.schedulers.output import step_output
from npdiffusion.schedulers.predictions import ve_x0
from npdiffusion.schedulers.sigmas import (
    SigmaScalingMixin,
    convert_sigmas,
    reject_integer_timestep,
    sigma_kind,
)
from npdiffusion.schedulers.timesteps import spaced_timesteps
from npdiffusion.schedulers.training_schedule import training_schedule
from npdiffusion.schedulers.validation import (
    check_array_pair,
    check_choice,
    check_custom_sigmas,
    check_custom_timesteps,
    check_exactly_one,
    check_num_inference_steps,
    check_real,
    check_schedule_options,
)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "original_sample")

_F32 = numpy.float32


class EulerDiscreteScheduler(SigmaScalingMixin, SchedulerMixin):
    """Euler sampler in sigma space; constructor keywords are diffusers' config keys and defaults."""

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 interpolation_type: str = "linear", use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False, sigma_min: float | None = None,
                 sigma_max: float | None = None, timestep_spacing: str = "linspace",
                 timestep_type: str = "discrete", steps_offset: int = 0, rescale_betas_zero_snr: bool = False,
                 final_sigmas_type: str = "zero"):
        name = type(self).__name__
        self._sigma_kind = sigma_kind(name, use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)
        self.betas, self.alphas, self.alphas_cumprod = training_schedule(
            name, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr,
            terminal_floor=True)
        check_schedule_options(name, prediction_type, PREDICTION_TYPES, timestep_spacing, steps_offset)
        check_choice(name, "interpolation_type", interpolation_type, ("linear", "log_linear"))
        check_choice(name, "timestep_type", timestep_type, ("discrete", "continuous"))
        check_choice(name, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        check_real(name, "sigma_min", sigma_min, allow_none=True)
        check_real(name, "sigma_max", sigma_max, allow_none=True)
        sigmas = schedules.sigmas_from_alphas_cumprod(self.alphas_cumprod)[::-1]
        self.num_inference_steps = None
        if timestep_type == "continuous" and prediction_type == "v_prediction":
            self.timesteps = (_F32(0.25) * f32_log(sigmas)).astype(_F32)
        else:
            self.timesteps = numpy.linspace(0, num_train_timesteps - 1, num_train_timesteps)[::-1].astype(_F32)
        self.sigmas = numpy.concatenate([sigmas, numpy.zeros(1, dtype=_F32)]).astype(_F32)
        self.is_scale_input_called = False
        self.use_karras_sigmas = use_karras_sigmas
        self.use_exponential_sigmas = use_exponential_sigmas
        self.use_beta_sigmas = use_beta_sigmas
        self._reset_step_index()

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None,
                      sigmas=None) -> None:
        """Choose N timesteps and their sigmas (spacing, interpolation, Karras/exponential/beta respacing).

        Or custom ``timesteps`` (floats, descending) or custom ``sigmas`` (N+1 values, the last the
        final noise level). ``device`` is ignored (host arrays).
        """
        name = type(self).__name__
        cfg = self._config
        check_exactly_one(name, num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas)
        self._refuse_respaced_custom_timesteps(timesteps)
        continuous_v = cfg["timestep_type"] == "continuous" and cfg["prediction_type"] == "v_prediction"
        if timesteps is not None and continuous_v:
            raise ValueError(f"{name}.set_timesteps: custom timesteps cannot be used with timestep_type='continuous' "
                             "and prediction_type='v_prediction'")
        T = cfg["num_train_timesteps"]
        if timesteps is not None:
            timesteps = check_custom_timesteps(f"{name}.set_timesteps", timesteps, T)
            n = len(timesteps)
        elif sigmas is not None:
            sigmas = check_custom_sigmas(f"{name}.set_timesteps", sigmas)
            n = len(sigmas) - 1
        else:
            n = check_num_inference_steps(name, num_inference_steps, T)
        self.num_inference_steps = n
        train_sigmas = schedules.sigmas_from_alphas_cumprod(self.alphas_cumprod)
        log_sigmas = numpy.log(train_sigmas)

        if sigmas is not None:
            sigmas = numpy.array(sigmas).astype(_F32)
            timesteps = schedules.sigma_to_t(sigmas[:-1], log_sigmas)
        else:
            if timesteps is not None:
                timesteps = numpy.array(timesteps).astype(_F32)
            else:
                timesteps = spaced_timesteps(cfg["timestep_spacing"], T, n, cfg["steps_offset"], as_float=True)
            if cfg["interpolation_type"] == "linear":
                sigmas = numpy.interp(timesteps, numpy.arange(0, len(train_sigmas)), train_sigmas)
            else:  # log_linear: as diffusers, n + 1 levels evenly spaced in log sigma, ascending
                sigmas = f32_exp(schedules.linspace_float32(float(numpy.log(train_sigmas[-1])),
                                                              float(numpy.log(train_sigmas[0])), n + 1))
            if self._sigma_kind is not None:
                sigmas = convert_sigmas(name, self._sigma_kind, sigmas, n, cfg["sigma_min"], cfg["sigma_max"])
                timesteps = schedules.sigma_to_t(sigmas, log_sigmas)
            if cfg["final_sigmas_type"] == "sigma_min":
                sigma_last = train_sigmas[0]
            else:
                sigma_last = 0
            sigmas = numpy.concatenate([sigmas, [sigma_last]]).astype(_F32)

        self.sigmas = sigmas.astype(_F32)
        if continuous_v:
            self.timesteps = (_F32(0.25) * f32_log(self.sigmas[:-1])).astype(_F32)
        else:
            self.timesteps = numpy.asarray(timesteps).astype(_F32)
        self._reset_step_index()
        self._timesteps_set = True

    def step(self, model_output, timestep, sample, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, noise=None, rng=None, return_dict: bool = True):
        """One Euler step sigma -> sigma_next (module docstring). Returns prev_sample, pred_original_sample.

        ``noise``/``rng`` are used only when s_churn > 0 (the stochastic "churn" of Karras et al.).
        """
        name = type(self).__name__
        reject_integer_timestep(name, timestep)
        check_array_pair(name, "model_output", model_output, "sample", sample)
        self._enter_step(timestep)
        cfg = self._config
        sample = sample.astype(_F32, copy=False)
        sigma = self.sigmas[self._step_index]
        gamma = min(s_churn / (len(self.sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * _F32(gamma + 1)
        if gamma > 0:
            z = standard_normal_like(name, model_output, noise=noise, rng=rng)
            eps = z * s_noise
            sample = sample + eps * float(numpy.sqrt(sigma_hat * sigma_hat - sigma * sigma))

        pred_original_sample = ve_x0(cfg["prediction_type"], model_output, sample, sigma, sigma_eps=sigma_hat)

        derivative = (sample - pred_original_sample) / float(sigma_hat)
        dt = self.sigmas[self._step_index + 1] - sigma_hat
        prev_sample = sample + derivative * float(dt)
        prev_sample = prev_sample.astype(model_output.dtype, copy=False)
        self._step_index += 1
        return step_output(return_dict, prev_sample, pred_original_sample)
