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
from npdiffusion.schedulers.base import (
    SchedulerMixin,
    SchedulerOutput,
    StepIndexMixin,
    check_choice,
    check_int,
    check_num_inference_steps,
    check_same_shape,
    check_sample,
    make_betas,
    register_to_config,
    reject_integer_timestep,
    spaced_timesteps,
    standard_normal_like,
)

PREDICTION_TYPES = ("epsilon", "v_prediction")

_F32 = numpy.float32


class EulerAncestralDiscreteScheduler(StepIndexMixin, SchedulerMixin):
    """Euler ancestral sampler; constructor keywords are diffusers' config keys and defaults.

    diffusers accepts prediction_type "sample" here but raises NotImplementedError at the first step;
    this class refuses it in the constructor.
    """

    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 timestep_spacing: str = "linspace", steps_offset: int = 0, rescale_betas_zero_snr: bool = False):
        name = type(self).__name__
        self.betas = make_betas(name, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        if rescale_betas_zero_snr:
            self.betas = schedules.rescale_zero_terminal_snr(self.betas)
        check_choice(name, "prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice(name, "timestep_spacing", timestep_spacing, ("linspace", "leading", "trailing"))
        check_int(name, "steps_offset", steps_offset)
        self.alphas = (_F32(1.0) - self.betas).astype(_F32)
        self.alphas_cumprod = schedules.alphas_cumprod(self.betas)
        if rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = _F32(2.0 ** -24)
        sigmas = schedules.sigmas_from_alphas_cumprod(self.alphas_cumprod)
        self.sigmas = numpy.concatenate([sigmas[::-1], [0.0]]).astype(_F32)
        self.num_inference_steps = None
        self.timesteps = numpy.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=float)[::-1].copy()
        self.is_scale_input_called = False
        self._step_index = None
        self._begin_index = None

    @property
    def init_noise_sigma(self) -> float:
        """The std of the initial noise: max sigma (linspace/trailing) or sqrt(max sigma^2 + 1) (leading)."""
        return self._sigma_init_noise_sigma()

    def scale_model_input(self, sample, timestep):
        """x / sqrt(sigma^2 + 1) at this step's sigma."""
        out = self._scale_by_sigma(sample, timestep)
        self.is_scale_input_called = True
        return out

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Choose N timesteps by ``timestep_spacing`` and interpolate their sigmas (``device`` is ignored)."""
        cfg = self._config
        n = check_num_inference_steps(type(self).__name__, num_inference_steps)
        self.num_inference_steps = n
        timesteps = spaced_timesteps(cfg["timestep_spacing"], cfg["num_train_timesteps"], n, cfg["steps_offset"],
                                     as_float=True)
        train_sigmas = schedules.sigmas_from_alphas_cumprod(self.alphas_cumprod)
        sigmas = numpy.interp(timesteps, numpy.arange(0, len(train_sigmas)), train_sigmas)
        self.sigmas = numpy.concatenate([sigmas, [0.0]]).astype(_F32)
        self.timesteps = timesteps
        self._step_index = None
        self._begin_index = None

    def step(self, model_output, timestep, sample, noise=None, rng=None, return_dict: bool = True):
        """One ancestral Euler step (module docstring). Returns prev_sample, pred_original_sample.

        ``noise`` is z (shape of ``model_output``); without it z is drawn from ``rng``.
        """
        name = type(self).__name__
        reject_integer_timestep(name, timestep)
        check_sample(name, "model_output", model_output)
        check_sample(name, "sample", sample)
        check_same_shape(name, "model_output", model_output, "sample", sample)
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._step_index + 1 >= len(self.sigmas):
            raise ValueError(f"{name}.step: all {len(self.sigmas) - 1} steps are done; call set_timesteps again")
        sigma = self.sigmas[self._step_index]
        sample = sample.astype(_F32, copy=False)
        if self._config["prediction_type"] == "epsilon":
            pred_original_sample = sample - float(sigma) * model_output
        else:
            s2 = sigma * sigma + _F32(1.0)
            pred_original_sample = model_output * float(-sigma / numpy.sqrt(s2)) + sample / float(s2)

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
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def add_noise(self, original_samples, noise, timesteps):
        """x = x_0 + sigma noise at each item's timestep (sigma-space forward process). (B, ...)."""
        return self._sigma_add_noise(original_samples, noise, timesteps)
