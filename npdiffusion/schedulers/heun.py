"""HeunDiscreteScheduler: Heun's second-order method for the probability-flow ODE (Karras et al. 2022, Alg. 1).

Shapes: sample, model_output (B, C, H, W) (any shape with batch first); ``timesteps`` (2N-1,)
float32 and ``sigmas`` (2N,) float32 on the host: every interior level appears twice, because each
Heun step takes two model calls. Mirrors diffusers' ``scheduling_heun_discrete.py`` (0.42);
derivation in docs/schedulers.md, "Heun".

With d(x, sigma) = (x - x0_hat(x, sigma)) / sigma, a step sigma -> sigma_next is

    first call  (at sigma):       d1 = d(x, sigma);        x_E = x + d1 (sigma_next - sigma)   (Euler predictor)
    second call (at sigma_next):  d2 = d(x_E, sigma_next); x_next = x + (d1 + d2)/2 (sigma_next - sigma)

The last step (sigma_next = 0) is the Euler predictor alone. Between the two calls the scheduler
keeps d1, the step size and x (``set_timesteps`` resets them). No dtype upcast, as diffusers.
"""
from __future__ import annotations

import numpy

from npdiffusion.diffusion import schedules
from npdiffusion.schedulers.base import SchedulerMixin, register_to_config
from npdiffusion.schedulers.output import step_output
from npdiffusion.schedulers.predictions import ve_x0
from npdiffusion.schedulers.sigmas import SigmaScalingMixin, convert_sigmas, sigma_kind
from npdiffusion.schedulers.thresholding import clip_or_threshold
from npdiffusion.schedulers.timesteps import spaced_timesteps
from npdiffusion.schedulers.training_schedule import training_schedule
from npdiffusion.schedulers.validation import (
    check_array_pair,
    check_custom_timesteps,
    check_exactly_one,
    check_num_inference_steps,
    check_real,
    check_schedule_options,
)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

_F32 = numpy.float32


class HeunDiscreteScheduler(SigmaScalingMixin, SchedulerMixin):
    """Heun (2nd order) sampler in sigma space; constructor keywords are diffusers' config keys and defaults."""

    order = 2

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
                 use_beta_sigmas: bool = False, clip_sample: bool = False, clip_sample_range: float = 1.0,
                 timestep_spacing: str = "linspace", steps_offset: int = 0):
        name = type(self).__name__
        self._sigma_kind = sigma_kind(name, use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)
        self.betas, self.alphas, self.alphas_cumprod = training_schedule(
            name, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
            allowed=("linear", "scaled_linear", "squaredcos_cap_v2", "exp"))
        check_schedule_options(name, prediction_type, PREDICTION_TYPES, timestep_spacing, steps_offset)
        check_real(name, "clip_sample_range", clip_sample_range)
        self.set_timesteps(num_train_timesteps, None, num_train_timesteps)
        self._timesteps_set = False  # as the others: step needs the user's own set_timesteps first
        self.use_karras_sigmas = use_karras_sigmas

    @property
    def state_in_first_order(self) -> bool:
        """True when the next call is the first (Euler predictor) call of a Heun step."""
        return self.dt is None

    def scale_model_input(self, sample, timestep):
        """x / sqrt(sigma^2 + 1) at this call's sigma."""
        return self._scale_by_sigma(sample, timestep)

    def set_timesteps(self, num_inference_steps: int | None = None, device=None,
                      num_train_timesteps: int | None = None, timesteps=None) -> None:
        """Choose N timesteps (or custom ``timesteps``), their sigmas, and the doubled lists; reset the state."""
        name = type(self).__name__
        cfg = self._config
        check_exactly_one(name, num_inference_steps=num_inference_steps, timesteps=timesteps)
        self._refuse_respaced_custom_timesteps(timesteps)
        T = num_train_timesteps or cfg["num_train_timesteps"]
        if timesteps is not None:
            timesteps = check_custom_timesteps(f"{name}.set_timesteps", timesteps, T).astype(_F32)
            n = len(timesteps)
        else:
            n = check_num_inference_steps(name, num_inference_steps, T)
        self.num_inference_steps = n
        if timesteps is None:
            timesteps = spaced_timesteps(cfg["timestep_spacing"], T, n, cfg["steps_offset"], as_float=True)
        train_sigmas = schedules.sigmas_from_alphas_cumprod(self.alphas_cumprod)
        log_sigmas = numpy.log(train_sigmas)
        sigmas = numpy.interp(timesteps, numpy.arange(0, len(train_sigmas)), train_sigmas)
        if self._sigma_kind is not None:
            sigmas = convert_sigmas(name, self._sigma_kind, sigmas, n)
            timesteps = schedules.sigma_to_t(sigmas, log_sigmas)
        sigmas = numpy.concatenate([sigmas, [0.0]]).astype(_F32)
        self.sigmas = numpy.concatenate([sigmas[:1], numpy.repeat(sigmas[1:-1], 2), sigmas[-1:]])
        timesteps = numpy.asarray(timesteps)
        self.timesteps = numpy.concatenate([timesteps[:1], numpy.repeat(timesteps[1:], 2)]).astype(_F32)
        self.prev_derivative = None
        self.dt = None
        self.sample = None
        self._reset_step_index()
        self._timesteps_set = True

    def step(self, model_output, timestep, sample, return_dict: bool = True):
        """One call of a Heun step: the predictor or the corrector (module docstring).

        Returns prev_sample, pred_original_sample. Deterministic.
        """
        name = type(self).__name__
        check_array_pair(name, "model_output", model_output, "sample", sample)
        self._enter_step(timestep)
        cfg = self._config
        first = self.state_in_first_order
        if first:
            sigma = self.sigmas[self._step_index]
            sigma_next = self.sigmas[self._step_index + 1]
        else:
            sigma = self.sigmas[self._step_index - 1]
            sigma_next = self.sigmas[self._step_index]
        sigma_hat = sigma  # gamma = 0: no churn in this scheduler
        sigma_input = sigma_hat if first else sigma_next

        pred_original_sample = ve_x0(cfg["prediction_type"], model_output, sample, sigma_input)
        pred_original_sample = clip_or_threshold(pred_original_sample, cfg, clip_sample=cfg["clip_sample"])

        if first:
            derivative = (sample - pred_original_sample) / float(sigma_hat)
            dt = sigma_next - sigma_hat
            self.prev_derivative = derivative
            self.dt = dt
            self.sample = sample
        else:
            derivative = (sample - pred_original_sample) / float(sigma_next)
            derivative = (self.prev_derivative + derivative) / 2
            dt = self.dt
            sample = self.sample
            self.prev_derivative = None
            self.dt = None
            self.sample = None

        prev_sample = sample + derivative * float(dt)
        self._step_index += 1
        return step_output(return_dict, prev_sample, pred_original_sample)
