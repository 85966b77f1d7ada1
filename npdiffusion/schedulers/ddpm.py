"""DDPMScheduler: ancestral sampling with the Gaussian posterior q(x_{t'} | x_t, x0) (Ho et al. 2020).

Shapes: sample, model_output, noise (B, C, H, W) (any shape with batch first; model_output has 2C
channels on axis 1 for the learned variance types); T = num_train_timesteps; ``timesteps`` (N,)
int64 on the host. Mirrors diffusers' ``scheduling_ddpm.py`` (0.42); the step in the notation of the
code is derived in docs/schedulers.md, "DDPM", and the posterior in docs/diffusion.md.

With t' the next timestep of the schedule (t - 1 for the full chain), abar_t' = 1 when t' < 0,
alpha = abar_t / abar_t' and beta = 1 - alpha (the strided step):

    x0_hat  = from the model output by prediction_type (clipped to +-clip_sample_range if clip_sample)
    mean    = sqrt(abar_t') beta / (1 - abar_t) x0_hat + sqrt(alpha) (1 - abar_t') / (1 - abar_t) x_t
    x_t'    = mean + sigma z        (z ~ N(0, I), only when t > 0)

sigma^2 by ``variance_type``: fixed_small (1 - abar_t')/(1 - abar_t) beta (the posterior variance,
clamped >= 1e-20), fixed_large beta, learned (the model's second half), learned_range
exp(frac log beta + (1 - frac) log fixed_small), frac = (v + 1)/2.
"""
from __future__ import annotations

import numpy

from npdiffusion.backend import xp
from npdiffusion.schedulers.alpha_bar import AlphaBarVelocityMixin, alpha_bar_pair
from npdiffusion.schedulers.base import SchedulerMixin, register_to_config
from npdiffusion.schedulers.float32 import f32_exp, f32_log
from npdiffusion.schedulers.noise import standard_normal_like
from npdiffusion.schedulers.output import step_output
from npdiffusion.schedulers.predictions import vp_x0
from npdiffusion.schedulers.thresholding import clip_or_threshold
from npdiffusion.schedulers.timesteps import spaced_timesteps
from npdiffusion.schedulers.training_schedule import training_schedule
from npdiffusion.schedulers.validation import (
    check_choice,
    check_custom_timesteps,
    check_num_inference_steps,
    check_reals,
    check_same_shape,
    check_sample,
    check_schedule_options,
    schedule_positions,
)

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")

_F32 = numpy.float32


def predict_x0(prediction_type: str, model_output, sample, alpha_prod_t, beta_prod_t):
    """x0_hat from the model output (B, ...) given float32 host scalars abar_t and 1 - abar_t.

    epsilon: (x - sqrt(1 - abar) eps)/sqrt(abar); sample: the output itself;
    v_prediction: sqrt(abar) x - sqrt(1 - abar) v.
    """
    return vp_x0(prediction_type, model_output, sample, float(numpy.sqrt(alpha_prod_t)),
                 float(numpy.sqrt(beta_prod_t)))


class DDPMScheduler(AlphaBarVelocityMixin, SchedulerMixin):
    """The DDPM sampler; constructor keywords are diffusers' config keys with diffusers' defaults.

    ``thresholding`` (dynamic thresholding of x0_hat) is supported. The ``fixed_large_log`` variance
    type of diffusers is refused: its step takes the square root of log(beta) < 0 and returns NaN.
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, variance_type: str = "fixed_small",
                 clip_sample: bool = True, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False):
        name = type(self).__name__
        self.betas, self.alphas, self.alphas_cumprod = training_schedule(
            name, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr,
            allowed=("linear", "scaled_linear", "squaredcos_cap_v2", "laplace", "sigmoid"))
        if variance_type == "fixed_large_log":
            raise ValueError(f"{name}: variance_type 'fixed_large_log' is not supported: diffusers' step takes "
                             "sqrt(log beta) with log beta < 0, which is NaN; use 'fixed_large'")
        check_choice(name, "variance_type", variance_type, VARIANCE_TYPES)
        check_schedule_options(name, prediction_type, PREDICTION_TYPES, timestep_spacing, steps_offset)
        check_reals(name, clip_sample_range=clip_sample_range, sample_max_value=sample_max_value,
                    dynamic_thresholding_ratio=dynamic_thresholding_ratio)
        self.one = _F32(1.0)
        self.init_noise_sigma = 1.0
        self.custom_timesteps = False
        self.num_inference_steps = None
        self.timesteps = numpy.arange(0, num_train_timesteps)[::-1].copy().astype(numpy.int64)
        self.variance_type = variance_type

    def scale_model_input(self, sample, timestep=None):
        """The identity (DDPM feeds x_t to the model unscaled); ``timestep``, if given, must lie in [0, T)."""
        return self._identity_scale(sample, timestep)

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None) -> None:
        """Choose the N inference timesteps (by ``timestep_spacing``), or custom descending ``timesteps``.

        ``device`` is accepted for diffusers compatibility and ignored: timesteps live on the host.
        """
        name = type(self).__name__
        cfg = self._config
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError(f"{name}.set_timesteps: pass num_inference_steps or timesteps, not both")
        if timesteps is not None:
            self.timesteps = check_custom_timesteps(f"{name}.set_timesteps", timesteps, cfg["num_train_timesteps"],
                                                    integer=True, descending=True)
            self.custom_timesteps = True
            self._timesteps_set = True
            return
        if num_inference_steps is None:
            raise ValueError(f"{name}.set_timesteps: pass num_inference_steps or timesteps")
        n = check_num_inference_steps(name, num_inference_steps, cfg["num_train_timesteps"])
        self.num_inference_steps = n
        self.custom_timesteps = False
        self.timesteps = spaced_timesteps(cfg["timestep_spacing"], cfg["num_train_timesteps"], n,
                                          cfg["steps_offset"])
        self._timesteps_set = True

    def previous_timestep(self, timestep) -> int:
        """The timestep after ``timestep`` in the schedule (-1 after the last; t - 1 before set_timesteps).

        ``timestep`` must be a whole number in [0, T) and, after ``set_timesteps``, one of ``timesteps``.
        """
        t = self._check_timestep("previous_timestep", timestep)
        if self.custom_timesteps or self.num_inference_steps:
            index = int(schedule_positions(type(self).__name__, t, self.timesteps)[0])
            return -1 if index == self.timesteps.shape[0] - 1 else int(self.timesteps[index + 1])
        return t - 1

    def _get_variance(self, t: int, predicted_variance=None, variance_type: str | None = None):
        """The step's variance (a float32 host scalar, or an array for the learned types)."""
        prev_t = self.previous_timestep(t)
        alpha_prod_t, alpha_prod_t_prev, beta_prod_t, beta_prod_t_prev = alpha_bar_pair(
            self.alphas_cumprod, t, prev_t, self.one)
        current_beta_t = _F32(1.0) - alpha_prod_t / alpha_prod_t_prev
        variance = beta_prod_t_prev / beta_prod_t * current_beta_t
        variance = max(variance, _F32(1e-20))
        variance_type = variance_type or self._config["variance_type"]
        if variance_type == "fixed_small":
            return variance
        if variance_type == "fixed_small_log":
            return f32_exp(_F32(0.5) * f32_log(variance))
        if variance_type == "fixed_large":
            return current_beta_t
        if variance_type == "learned":
            return predicted_variance
        # learned_range: interpolate the log variance between fixed_small and fixed_large
        min_log = float(f32_log(variance))
        max_log = float(f32_log(current_beta_t))
        frac = (predicted_variance + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def step(self, model_output, timestep, sample, noise=None, rng=None, return_dict: bool = True):
        """One ancestral step x_t -> x_t' (see the module docstring). Returns prev_sample, pred_original_sample.

        ``noise`` is the standard-normal z (shape of ``sample``); without it z is drawn from ``rng``.
        No noise is drawn at t = 0.
        """
        name = type(self).__name__
        check_sample(name, "model_output", model_output)
        check_sample(name, "sample", sample)
        cfg = self._config
        t = self._check_timestep("step", timestep)
        prev_t = self.previous_timestep(t)
        if (len(model_output.shape) > 1 and len(sample.shape) > 1 and model_output.shape[1] == sample.shape[1] * 2
                and self.variance_type in ("learned", "learned_range")):
            c = sample.shape[1]
            model_output, predicted_variance = model_output[:, :c], model_output[:, c:]
        else:
            predicted_variance = None
        check_same_shape(name, "model_output", model_output, "sample", sample)

        alpha_prod_t, alpha_prod_t_prev, beta_prod_t, beta_prod_t_prev = alpha_bar_pair(
            self.alphas_cumprod, t, prev_t, self.one)
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = _F32(1.0) - current_alpha_t

        pred_original_sample = predict_x0(cfg["prediction_type"], model_output, sample, alpha_prod_t, beta_prod_t)
        pred_original_sample = clip_or_threshold(pred_original_sample, cfg, cfg["thresholding"], cfg["clip_sample"])

        pred_original_sample_coeff = numpy.sqrt(alpha_prod_t_prev) * current_beta_t / beta_prod_t
        current_sample_coeff = numpy.sqrt(current_alpha_t) * beta_prod_t_prev / beta_prod_t
        pred_prev_sample = (float(pred_original_sample_coeff) * pred_original_sample
                            + float(current_sample_coeff) * sample)

        if t > 0:
            z = standard_normal_like(name, model_output, noise=noise, rng=rng)
            variance = self._get_variance(t, predicted_variance=predicted_variance)
            if self.variance_type == "fixed_small_log":
                pred_prev_sample = pred_prev_sample + float(variance) * z
            elif self.variance_type == "learned_range":
                pred_prev_sample = pred_prev_sample + xp.exp(0.5 * variance) * z
            elif self.variance_type == "learned":
                pred_prev_sample = pred_prev_sample + xp.sqrt(variance) * z
            else:
                pred_prev_sample = pred_prev_sample + float(numpy.sqrt(variance)) * z

        return step_output(return_dict, pred_prev_sample, pred_original_sample)
