"""PNDMScheduler: pseudo numerical methods (Liu et al. 2022): PLMS (linear multistep) and PRK steps.

Shapes: sample, model_output (B, C, H, W) (any shape with batch first); ``timesteps`` int64 on the
host. Mirrors diffusers' ``scheduling_pndm.py`` (0.42); derivation in docs/schedulers.md, "PNDM".

Every step applies the same transfer x_t -> x_t' to an effective noise estimate e (Liu et al. eq. 11):

    x_t' = sqrt(abar_t'/abar_t) x_t - (abar_t' - abar_t) e / D,
    D    = abar_t sqrt(1 - abar_t') + sqrt(abar_t (1 - abar_t) abar_t')

PLMS (``skip_prk_steps=True``, Stable Diffusion's default) takes e from the last model outputs with
Adams-Bashforth weights: e_0 (first step, then repeated at t' with the average (e_0 + e_1)/2 -- the
"pseudo improved Euler" start), (3e_1 - e_2)/2, (23e_1 - 16e_2 + 5e_3)/12, then
(55e_1 - 59e_2 + 37e_3 - 9e_4)/24. The PRK path (``skip_prk_steps=False``) starts with three
pseudo Runge-Kutta steps of four model calls each (weights 1/6, 1/3, 1/3, 1/6) before PLMS.
The scheduler keeps state (the past outputs ``ets``, a ``counter``); ``set_timesteps`` resets it.
"""
from __future__ import annotations

import numpy

from npdiffusion.schedulers.alpha_bar import AlphaBarNoiseMixin, alpha_bar_pair
from npdiffusion.schedulers.base import SchedulerMixin, register_to_config
from npdiffusion.schedulers.output import step_output
from npdiffusion.schedulers.predictions import vp_epsilon
from npdiffusion.schedulers.training_schedule import training_schedule
from npdiffusion.schedulers.validation import (
    check_array_pair,
    check_num_inference_steps,
    check_schedule_options,
    schedule_positions,
)

PREDICTION_TYPES = ("epsilon", "v_prediction")

_F32 = numpy.float32


class PNDMScheduler(AlphaBarNoiseMixin, SchedulerMixin):
    """The PNDM/PLMS sampler; constructor keywords are diffusers' config keys with diffusers' defaults."""

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, skip_prk_steps: bool = False,
                 set_alpha_to_one: bool = False, prediction_type: str = "epsilon",
                 timestep_spacing: str = "leading", steps_offset: int = 0):
        name = type(self).__name__
        self.betas, self.alphas, self.alphas_cumprod = training_schedule(
            name, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        check_schedule_options(name, prediction_type, PREDICTION_TYPES, timestep_spacing, steps_offset)
        self.final_alpha_cumprod = _F32(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.pndm_order = 4
        self.cur_model_output = 0
        self.counter = 0
        self.cur_sample = None
        self.ets = []
        self.num_inference_steps = None
        self._timesteps = numpy.arange(0, num_train_timesteps)[::-1].copy()
        self.prk_timesteps = None
        self.plms_timesteps = None
        self.timesteps = None

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Build the PRK and PLMS timestep lists and reset the multistep state (``device`` is ignored)."""
        cfg = self._config
        T = cfg["num_train_timesteps"]
        n = check_num_inference_steps(type(self).__name__, num_inference_steps, T)
        if not cfg["skip_prk_steps"] and n < self.pndm_order:
            raise ValueError(f"{type(self).__name__}.set_timesteps: the PRK warm-up (skip_prk_steps=False) needs "
                             f"num_inference_steps >= {self.pndm_order}, got {n}")
        self.num_inference_steps = n
        spacing = cfg["timestep_spacing"]
        if spacing == "linspace":
            self._timesteps = numpy.linspace(0, T - 1, n).round().astype(numpy.int64)
        elif spacing == "leading":
            step_ratio = T // n
            self._timesteps = (numpy.arange(0, n) * step_ratio).round()
            self._timesteps += cfg["steps_offset"]
        else:  # trailing
            step_ratio = T / n
            self._timesteps = numpy.round(numpy.arange(T, 0, -step_ratio))[::-1].astype(numpy.int64)
            self._timesteps -= 1

        if cfg["skip_prk_steps"]:
            self.prk_timesteps = numpy.array([])
            self.plms_timesteps = numpy.concatenate(
                [self._timesteps[:-1], self._timesteps[-2:-1], self._timesteps[-1:]])[::-1].copy()
        else:
            prk_timesteps = numpy.array(self._timesteps[-self.pndm_order:]).repeat(2) + numpy.tile(
                numpy.array([0, T // n // 2]), self.pndm_order)
            self.prk_timesteps = (prk_timesteps[:-1].repeat(2)[1:-1])[::-1].copy()
            self.plms_timesteps = self._timesteps[:-3][::-1].copy()

        self.timesteps = numpy.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(numpy.int64)
        self.ets = []
        self.counter = 0
        self.cur_model_output = 0
        self.cur_sample = None
        self._timesteps_set = True

    def scale_model_input(self, sample, timestep=None):
        """The identity (PNDM feeds x_t to the model unscaled); ``timestep``, if given, must lie in [0, T)."""
        return self._identity_scale(sample, timestep)

    def step(self, model_output, timestep, sample, return_dict: bool = True):
        """One PRK (while the PRK part of the schedule lasts) or PLMS step. Returns prev_sample only.

        Deterministic: there is no noise argument. ``timestep`` must be one of ``timesteps``: the
        multistep weights assume the schedule's stride T // N between calls.
        """
        name = type(self).__name__
        self._require_timesteps()
        check_array_pair(name, "model_output", model_output, "sample", sample)
        timestep = self._check_timestep("step", timestep)
        schedule_positions(f"{name}.step", timestep, self.timesteps)
        if self.counter < len(self.prk_timesteps) and not self._config["skip_prk_steps"]:
            prev = self._step_prk(model_output, timestep, sample)
        else:
            prev = self._step_plms(model_output, timestep, sample)
        return step_output(return_dict, prev)

    def _step_prk(self, model_output, timestep, sample):
        T = self._config["num_train_timesteps"]
        diff_to_prev = 0 if self.counter % 2 else T // self.num_inference_steps // 2
        prev_timestep = timestep - diff_to_prev
        timestep = int(self.prk_timesteps[self.counter // 4 * 4])
        if self.counter % 4 == 0:
            self.cur_model_output = self.cur_model_output + (1 / 6) * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif (self.counter - 1) % 4 == 0:
            self.cur_model_output = self.cur_model_output + (1 / 3) * model_output
        elif (self.counter - 2) % 4 == 0:
            self.cur_model_output = self.cur_model_output + (1 / 3) * model_output
        else:
            model_output = self.cur_model_output + (1 / 6) * model_output
            self.cur_model_output = 0
        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        prev_sample = self._get_prev_sample(cur_sample, timestep, prev_timestep, model_output)
        self.counter += 1
        return prev_sample

    def _step_plms(self, model_output, timestep, sample):
        name = type(self).__name__
        if not self._config["skip_prk_steps"] and len(self.ets) < 3:
            raise ValueError(f"{name}: PLMS steps need at least 3 previous outputs from the PRK steps "
                             "(run the full timestep list from set_timesteps)")
        T = self._config["num_train_timesteps"]
        prev_timestep = timestep - T // self.num_inference_steps
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:
            prev_timestep = timestep
            timestep = timestep + T // self.num_inference_steps
            if timestep >= T:  # the second PLMS call repeats the first one's timestep, one stride below it
                raise ValueError(f"{name}.step: the second PLMS step must get the timestep one stride "
                                 f"({T // self.num_inference_steps}) below the first, got {prev_timestep}")

        if len(self.ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(self.ets) == 1 and self.counter == 1:
            model_output = (model_output + self.ets[-1]) / 2
            sample = self.cur_sample
            self.cur_sample = None
        elif len(self.ets) == 2:
            model_output = (3 * self.ets[-1] - self.ets[-2]) / 2
        elif len(self.ets) == 3:
            model_output = (23 * self.ets[-1] - 16 * self.ets[-2] + 5 * self.ets[-3]) / 12
        else:
            model_output = (1 / 24) * (55 * self.ets[-1] - 59 * self.ets[-2] + 37 * self.ets[-3] - 9 * self.ets[-4])

        prev_sample = self._get_prev_sample(sample, timestep, prev_timestep, model_output)
        self.counter += 1
        return prev_sample

    def _get_prev_sample(self, sample, timestep: int, prev_timestep: int, model_output):
        """The PNDM transfer x_t -> x_t' for the effective noise estimate (module docstring, Liu et al. eq. 11)."""
        alpha_prod_t, alpha_prod_t_prev, beta_prod_t, beta_prod_t_prev = alpha_bar_pair(
            self.alphas_cumprod, timestep, prev_timestep, self.final_alpha_cumprod)
        # the transfer takes a noise estimate: a v output becomes eps_hat = sqrt(abar) v + sqrt(1 - abar) x_t
        model_output = vp_epsilon(self._config["prediction_type"], model_output, sample,
                                  float(numpy.sqrt(alpha_prod_t)), float(numpy.sqrt(beta_prod_t)))
        sample_coeff = numpy.sqrt(alpha_prod_t_prev / alpha_prod_t)
        model_output_denom_coeff = alpha_prod_t * numpy.sqrt(beta_prod_t_prev) + numpy.sqrt(
            alpha_prod_t * beta_prod_t * alpha_prod_t_prev)
        return (float(sample_coeff) * sample
                - float(alpha_prod_t_prev - alpha_prod_t) * model_output / float(model_output_denom_coeff))
