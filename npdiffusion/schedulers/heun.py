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

from npdiffusion.backend import xp
from npdiffusion.diffusion import schedules
from npdiffusion.schedulers.base import (
    SchedulerMixin,
    SchedulerOutput,
    StepIndexMixin,
    check_choice,
    check_int,
    check_num_inference_steps,
    check_real,
    check_same_shape,
    check_sample,
    convert_sigmas,
    make_betas,
    register_to_config,
    sigma_kind,
    spaced_timesteps,
)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

_F32 = numpy.float32


class HeunDiscreteScheduler(StepIndexMixin, SchedulerMixin):
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
        self.betas = make_betas(name, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                allowed=("linear", "scaled_linear", "squaredcos_cap_v2", "exp"))
        check_choice(name, "prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice(name, "timestep_spacing", timestep_spacing, ("linspace", "leading", "trailing"))
        check_int(name, "steps_offset", steps_offset)
        check_real(name, "clip_sample_range", clip_sample_range)
        self.alphas = (_F32(1.0) - self.betas).astype(_F32)
        self.alphas_cumprod = schedules.alphas_cumprod(self.betas)
        self.set_timesteps(num_train_timesteps, None, num_train_timesteps)
        self.use_karras_sigmas = use_karras_sigmas

    @property
    def init_noise_sigma(self) -> float:
        """The std of the initial noise: max sigma (linspace/trailing) or sqrt(max sigma^2 + 1) (leading)."""
        return self._sigma_init_noise_sigma()

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
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError(f"{name}.set_timesteps: pass exactly one of num_inference_steps and timesteps")
        if timesteps is not None and self._sigma_kind is not None:
            raise ValueError(f"{name}.set_timesteps: custom timesteps cannot be combined with "
                             f"use_{self._sigma_kind}_sigmas")
        n = check_num_inference_steps(name, num_inference_steps or len(timesteps))
        self.num_inference_steps = n
        T = num_train_timesteps or cfg["num_train_timesteps"]
        if timesteps is not None:
            timesteps = numpy.array(timesteps, dtype=_F32)
        else:
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
        self._step_index = None
        self._begin_index = None

    def step(self, model_output, timestep, sample, return_dict: bool = True):
        """One call of a Heun step: the predictor or the corrector (module docstring).

        Returns prev_sample, pred_original_sample. Deterministic.
        """
        name = type(self).__name__
        check_sample(name, "model_output", model_output)
        check_sample(name, "sample", sample)
        check_same_shape(name, "model_output", model_output, "sample", sample)
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._step_index + 1 >= len(self.sigmas):
            raise ValueError(f"{name}.step: all steps are done; call set_timesteps again")
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

        prediction_type = cfg["prediction_type"]
        if prediction_type == "epsilon":
            pred_original_sample = sample - float(sigma_input) * model_output
        elif prediction_type == "v_prediction":
            s2 = sigma_input * sigma_input + _F32(1.0)
            pred_original_sample = model_output * float(-sigma_input / numpy.sqrt(s2)) + sample / float(s2)
        else:
            pred_original_sample = model_output
        if cfg["clip_sample"]:
            r = float(cfg["clip_sample_range"])
            pred_original_sample = xp.clip(pred_original_sample, -r, r)

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
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def add_noise(self, original_samples, noise, timesteps):
        """x = x_0 + sigma noise at each item's timestep (sigma-space forward process). (B, ...)."""
        return self._sigma_add_noise(original_samples, noise, timesteps)
