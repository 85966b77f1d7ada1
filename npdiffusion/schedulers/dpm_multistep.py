"""DPMSolverMultistepScheduler: DPM-Solver / DPM-Solver++ multistep (Lu et al. 2022a, 2022b).

Shapes: sample, model_output, noise (B, C, H, W) (any shape with batch first); ``timesteps`` (N,)
int64 and ``sigmas`` (N+1,) float32 on the host. Mirrors diffusers' ``scheduling_dpmsolver_multistep.py``
(0.42); derivation in docs/schedulers.md, "DPM-Solver++(2M)".

With sigma the VE noise level of a step: alpha = 1/sqrt(sigma^2 + 1), sigma_t = sigma alpha (the VP
coefficients, x_t = alpha x0 + sigma_t eps), lambda = log alpha - log sigma_t (half the log-SNR) and
h = lambda_t - lambda_s > 0 from the current level s to the next t. DPM-Solver++ works with data
predictions m = x0_hat (``algorithm_type="dpmsolver++"``, the default):

    first order (DDIM):  x_t = (sigma_t/sigma_s) x_s - alpha_t (e^{-h} - 1) m_0
    2M, midpoint:        x_t = (sigma_t/sigma_s) x_s - alpha_t (e^{-h} - 1) (m_0 + D1/2),
                         D1 = (m_0 - m_1) / r0,  r0 = h_prev / h
    2M, heun:            ... + alpha_t ((e^{-h} - 1)/h + 1) D1 in place of the D1/2 term

First-order steps are used at the start (no history yet) and at the last step when it goes to
sigma = 0 (there alpha_t = 1, sigma_t = 0 and the step returns m_0), or when
``lower_order_final`` and fewer than 15 steps. ``dpmsolver`` (noise predictions), the SDE variants
(``sde-dpmsolver++``, ``sde-dpmsolver``, which take standard-normal ``noise``) and third order are
implemented as in diffusers. The update runs in float32; the result has the model output's dtype.
The scheduler keeps the last ``solver_order`` data predictions; ``set_timesteps`` resets them.
"""
from __future__ import annotations

import numpy

from npdiffusion.diffusion import schedules
from npdiffusion.schedulers.base import SchedulerMixin, register_to_config
from npdiffusion.schedulers.float32 import f32_exp, f32_log
from npdiffusion.schedulers.noise import broadcast_per_sample, standard_normal_like
from npdiffusion.schedulers.output import step_output
from npdiffusion.schedulers.predictions import vp_epsilon, vp_x0
from npdiffusion.schedulers.sigmas import StepIndexMixin, convert_sigmas, sigma_kind
from npdiffusion.schedulers.thresholding import clip_or_threshold
from npdiffusion.schedulers.training_schedule import training_schedule
from npdiffusion.schedulers.validation import (
    check_choice,
    check_custom_timesteps,
    check_exactly_one,
    check_num_inference_steps,
    check_reals,
    check_same_shape,
    check_sample,
    check_schedule_options,
    merge_noise_alias,
)

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
ALGORITHM_TYPES = ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++")

_F32 = numpy.float32
_ONE = _F32(1.0)


def sigma_to_alpha_sigma_t(sigma):
    """(alpha, sigma_t) = (1/sqrt(sigma^2 + 1), sigma alpha) in sigma's float dtype."""
    one = numpy.asarray(sigma).dtype.type(1)
    alpha_t = one / numpy.sqrt(sigma * sigma + one)
    return alpha_t, sigma * alpha_t


def _lambda(alpha_t, sigma_t):
    """lambda = log alpha - log sigma_t (float32; +inf where sigma_t = 0)."""
    with numpy.errstate(invalid="ignore"):
        return f32_log(alpha_t) - f32_log(sigma_t)


class DPMSolverMultistepScheduler(StepIndexMixin, SchedulerMixin):
    """DPM-Solver(++) multistep sampler; constructor keywords are diffusers' config keys and defaults.

    Not supported: the flow-matching options (``use_flow_sigmas=True``, ``prediction_type="flow_prediction"``,
    ``set_timesteps(mu=...)``), which Stable Diffusion 1.x/2.x does not use.
    """

    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, solver_order: int = 2,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint", lower_order_final: bool = True,
                 euler_at_final: bool = False, use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
                 use_beta_sigmas: bool = False, use_lu_lambdas: bool = False, use_flow_sigmas: bool = False,
                 flow_shift: float = 1.0, final_sigmas_type: str = "zero",
                 lambda_min_clipped: float = -float("inf"), variance_type: str | None = None,
                 timestep_spacing: str = "linspace", steps_offset: int = 0, rescale_betas_zero_snr: bool = False,
                 use_dynamic_shifting: bool = False, time_shift_type: str = "exponential"):
        name = type(self).__name__
        self._sigma_kind = sigma_kind(name, use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)
        if use_flow_sigmas:
            raise ValueError(f"{name}: use_flow_sigmas=True (flow matching) is not supported, got True")
        self.betas, self.alphas, self.alphas_cumprod = training_schedule(
            name, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr,
            terminal_floor=True)
        if algorithm_type == "deis":  # diffusers maps these aliases silently
            algorithm_type = "dpmsolver++"
            self._update_config(algorithm_type=algorithm_type)
        if solver_type in ("logrho", "bh1", "bh2"):
            solver_type = "midpoint"
            self._update_config(solver_type=solver_type)
        check_choice(name, "algorithm_type", algorithm_type, ALGORITHM_TYPES)
        check_choice(name, "solver_type", solver_type, ("midpoint", "heun"))
        check_choice(name, "solver_order", solver_order, (1, 2, 3))
        check_schedule_options(name, prediction_type, PREDICTION_TYPES, timestep_spacing, steps_offset)
        check_choice(name, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        if variance_type is not None and not isinstance(variance_type, str):
            raise TypeError(f"{name}: variance_type must be None or a string, got {type(variance_type).__name__}")
        # only "learned"/"learned_range" change anything here; other values (a DDPM config's
        # "fixed_small", say) are accepted and ignored, as diffusers does
        check_reals(name, lambda_min_clipped=lambda_min_clipped, sample_max_value=sample_max_value,
                    dynamic_thresholding_ratio=dynamic_thresholding_ratio)
        if algorithm_type not in ("dpmsolver++", "sde-dpmsolver++") and final_sigmas_type == "zero":
            raise ValueError(f"{name}: final_sigmas_type='zero' is not supported for algorithm_type "
                             f"{algorithm_type!r}; choose final_sigmas_type='sigma_min'")
        self.alpha_t = numpy.sqrt(self.alphas_cumprod)
        self.sigma_t = numpy.sqrt(_ONE - self.alphas_cumprod)
        self.lambda_t = _lambda(self.alpha_t, self.sigma_t)
        self.sigmas = schedules.sigmas_from_alphas_cumprod(self.alphas_cumprod)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = numpy.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=_F32)[::-1].copy()
        self.model_outputs = [None] * solver_order
        self.lower_order_nums = 0
        self._reset_step_index()

    # ------------------------------------------------------------------------------ timesteps
    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None) -> None:
        """Choose the timesteps (N + 1 points with the final 0 dropped, or custom ``timesteps``) and sigmas.

        Resets the multistep history. ``device`` is ignored (host arrays).
        """
        name = type(self).__name__
        cfg = self._config
        check_exactly_one(name, num_inference_steps=num_inference_steps, timesteps=timesteps)
        if timesteps is not None and (self._sigma_kind is not None or cfg["use_lu_lambdas"]):
            raise ValueError(f"{name}.set_timesteps: custom timesteps cannot be combined with the "
                             "karras/exponential/beta/lu sigma options")
        T = cfg["num_train_timesteps"]
        if timesteps is not None:
            timesteps = check_custom_timesteps(f"{name}.set_timesteps", timesteps, T, integer=True)
            n = len(timesteps)
        else:
            n = check_num_inference_steps(name, num_inference_steps, T)
            flipped = self.lambda_t[::-1]
            clipped_idx = int(numpy.searchsorted(flipped, _F32(cfg["lambda_min_clipped"])))
            last_timestep = T - clipped_idx
            spacing = cfg["timestep_spacing"]
            if spacing == "linspace":
                timesteps = numpy.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].copy().astype(numpy.int64)
            elif spacing == "leading":
                step_ratio = last_timestep // (n + 1)
                timesteps = (numpy.arange(0, n + 1) * step_ratio).round()[::-1][:-1].copy().astype(numpy.int64)
                timesteps += cfg["steps_offset"]
            else:  # trailing
                step_ratio = T / n
                timesteps = numpy.arange(last_timestep, 0, -step_ratio).round().copy().astype(numpy.int64)
                timesteps -= 1

        train_sigmas = schedules.sigmas_from_alphas_cumprod(self.alphas_cumprod)
        log_sigmas = numpy.log(train_sigmas)
        round_t = cfg["beta_schedule"] != "squaredcos_cap_v2"
        if self._sigma_kind is not None:
            sigmas = convert_sigmas(name, self._sigma_kind, train_sigmas[::-1].copy(), n)
            timesteps = schedules.sigma_to_t(sigmas, log_sigmas)
            if self._sigma_kind == "karras" and round_t:
                timesteps = timesteps.round()
        elif cfg["use_lu_lambdas"]:
            lambdas = log_sigmas[::-1].copy()
            lambdas = schedules.lu_lambdas(float(lambdas[-1]), float(lambdas[0]), n)
            sigmas = numpy.exp(lambdas)
            timesteps = schedules.sigma_to_t(sigmas, log_sigmas)
            if round_t:
                timesteps = timesteps.round()
        else:
            sigmas = numpy.interp(timesteps, numpy.arange(0, len(train_sigmas)), train_sigmas)
        sigma_last = train_sigmas[0] if cfg["final_sigmas_type"] == "sigma_min" else 0
        self.sigmas = numpy.concatenate([sigmas, [sigma_last]]).astype(_F32)
        self.timesteps = numpy.asarray(timesteps).astype(numpy.int64)
        self.num_inference_steps = len(self.timesteps)
        self.model_outputs = [None] * cfg["solver_order"]
        self.lower_order_nums = 0
        self._reset_step_index()
        self._timesteps_set = True

    def scale_model_input(self, sample, timestep=None):
        """The identity: DPM-Solver models see x_t itself (``init_noise_sigma`` is 1).

        ``timestep``, if given, must lie in [0, T).
        """
        return self._identity_scale(sample, timestep)

    # ------------------------------------------------------------------------------ the math
    def convert_model_output(self, model_output, sample):
        """The model output as a data prediction x0_hat (dpmsolver++) or noise prediction (dpmsolver). (B, ...)."""
        cfg = self._config
        prediction_type = cfg["prediction_type"]
        alpha_t, sigma_t = sigma_to_alpha_sigma_t(self.sigmas[self._step_index])
        a, s = float(alpha_t), float(sigma_t)
        if cfg["variance_type"] in ("learned", "learned_range") and prediction_type == "epsilon":
            model_output = model_output[:, :3]
        if cfg["algorithm_type"] in ("dpmsolver++", "sde-dpmsolver++"):
            x0_pred = vp_x0(prediction_type, model_output, sample, a, s)
            return clip_or_threshold(x0_pred, cfg, thresholding=cfg["thresholding"])
        epsilon = vp_epsilon(prediction_type, model_output, sample, a, s)
        if cfg["thresholding"]:
            x0_pred = clip_or_threshold(vp_x0("epsilon", epsilon, sample, a, s), cfg, thresholding=True)
            epsilon = vp_epsilon("sample", x0_pred, sample, a, s)
        return epsilon

    def _levels(self, *offsets):
        """(alpha, sigma_t, lambda) at sigmas[step_index + k] for each offset k (float32 host scalars)."""
        out = []
        for k in offsets:
            alpha, sig = sigma_to_alpha_sigma_t(self.sigmas[self._step_index + k])
            out.append((alpha, sig, _lambda(alpha, sig)))
        return out

    def dpm_solver_first_order_update(self, model_output, sample, noise=None):
        """One first-order step (DDIM in log-SNR time) from sigmas[i] to sigmas[i+1]. (B, ...) float32."""
        (alpha_t, sigma_t, lambda_t), (alpha_s, sigma_s, lambda_s) = self._levels(1, 0)
        h = lambda_t - lambda_s
        algo = self._config["algorithm_type"]
        with numpy.errstate(over="ignore", invalid="ignore"):
            if algo == "dpmsolver++":
                return (float(sigma_t / sigma_s) * sample
                        - float(alpha_t * (f32_exp(-h) - _ONE)) * model_output)
            if algo == "dpmsolver":
                return (float(alpha_t / alpha_s) * sample
                        - float(sigma_t * (f32_exp(h) - _ONE)) * model_output)
            if algo == "sde-dpmsolver++":
                return (float(sigma_t / sigma_s * f32_exp(-h)) * sample
                        + float(alpha_t * (_ONE - f32_exp(_F32(-2.0) * h))) * model_output
                        + float(sigma_t * numpy.sqrt(_ONE - f32_exp(_F32(-2) * h))) * noise)
            return (float(alpha_t / alpha_s) * sample
                    - float(_F32(2.0) * (sigma_t * (f32_exp(h) - _ONE))) * model_output
                    + float(sigma_t * numpy.sqrt(f32_exp(_F32(2) * h) - _ONE)) * noise)

    def multistep_dpm_solver_second_order_update(self, model_output_list, sample, noise=None):
        """One second-order multistep update from the last two predictions. (B, ...) float32."""
        (alpha_t, sigma_t, lambda_t), (alpha_s0, sigma_s0, lambda_s0), (_, _, lambda_s1) = self._levels(1, 0, -1)
        m0, m1 = model_output_list[-1], model_output_list[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        with numpy.errstate(divide="ignore", invalid="ignore"):  # repeated levels give h = 0, as in torch
            r0 = h_0 / h
            D0, D1 = m0, float(_ONE / r0) * (m0 - m1)
        cfg = self._config
        algo, solver = cfg["algorithm_type"], cfg["solver_type"]
        with numpy.errstate(over="ignore", invalid="ignore", divide="ignore"):
            em, ep = f32_exp(-h), f32_exp(h)
            if algo == "dpmsolver++":
                c = alpha_t * (em - _ONE)
                if solver == "midpoint":
                    return float(sigma_t / sigma_s0) * sample - float(c) * D0 - float(_F32(0.5) * c) * D1
                return (float(sigma_t / sigma_s0) * sample - float(c) * D0
                        + float(alpha_t * ((em - _ONE) / h + _ONE)) * D1)
            if algo == "dpmsolver":
                c = sigma_t * (ep - _ONE)
                if solver == "midpoint":
                    return float(alpha_t / alpha_s0) * sample - float(c) * D0 - float(_F32(0.5) * c) * D1
                return (float(alpha_t / alpha_s0) * sample - float(c) * D0
                        - float(sigma_t * ((ep - _ONE) / h - _ONE)) * D1)
            if algo == "sde-dpmsolver++":
                e2 = f32_exp(_F32(-2.0) * h)
                c = alpha_t * (_ONE - e2)
                noise_term = float(sigma_t * numpy.sqrt(_ONE - f32_exp(_F32(-2) * h))) * noise
                if solver == "midpoint":
                    return (float(sigma_t / sigma_s0 * em) * sample + float(c) * D0
                            + float(_F32(0.5) * c) * D1 + noise_term)
                return (float(sigma_t / sigma_s0 * em) * sample + float(c) * D0
                        + float(alpha_t * ((_ONE - e2) / (_F32(-2.0) * h) + _ONE)) * D1 + noise_term)
            c = sigma_t * (ep - _ONE)
            noise_term = float(sigma_t * numpy.sqrt(f32_exp(_F32(2) * h) - _ONE)) * noise
            if solver == "midpoint":
                return float(alpha_t / alpha_s0) * sample - float(_F32(2.0) * c) * D0 - float(c) * D1 + noise_term
            return (float(alpha_t / alpha_s0) * sample - float(_F32(2.0) * c) * D0
                    - float(_F32(2.0) * (sigma_t * ((ep - _ONE) / h - _ONE))) * D1 + noise_term)

    def multistep_dpm_solver_third_order_update(self, model_output_list, sample, noise=None):
        """One third-order multistep update from the last three predictions. (B, ...) float32."""
        levels = self._levels(1, 0, -1, -2)
        (alpha_t, sigma_t, lambda_t), (alpha_s0, sigma_s0, lambda_s0) = levels[0], levels[1]
        lambda_s1, lambda_s2 = levels[2][2], levels[3][2]
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        with numpy.errstate(divide="ignore", invalid="ignore"):
            r0, r1 = h_0 / h, h_1 / h
            D0 = m0
            D1_0, D1_1 = float(_ONE / r0) * (m0 - m1), float(_ONE / r1) * (m1 - m2)
            D1 = D1_0 + float(r0 / (r0 + r1)) * (D1_0 - D1_1)
            D2 = float(_ONE / (r0 + r1)) * (D1_0 - D1_1)
        algo = self._config["algorithm_type"]
        with numpy.errstate(over="ignore", invalid="ignore", divide="ignore"):
            em, ep = f32_exp(-h), f32_exp(h)
            if algo == "dpmsolver++":
                return (float(sigma_t / sigma_s0) * sample
                        - float(alpha_t * (em - _ONE)) * D0
                        + float(alpha_t * ((em - _ONE) / h + _ONE)) * D1
                        - float(alpha_t * ((em - _ONE + h) / (h * h) - _F32(0.5))) * D2)
            if algo == "dpmsolver":
                return (float(alpha_t / alpha_s0) * sample
                        - float(sigma_t * (ep - _ONE)) * D0
                        - float(sigma_t * ((ep - _ONE) / h - _ONE)) * D1
                        - float(sigma_t * ((ep - _ONE - h) / (h * h) - _F32(0.5))) * D2)
            if algo == "sde-dpmsolver++":
                e2 = f32_exp(_F32(-2.0) * h)
                return (float(sigma_t / sigma_s0 * em) * sample
                        + float(alpha_t * (_ONE - e2)) * D0
                        + float(alpha_t * ((_ONE - e2) / (_F32(-2.0) * h) + _ONE)) * D1
                        + float(alpha_t * ((_ONE - e2 - _F32(2.0) * h) / ((_F32(2.0) * h) ** 2) - _F32(0.5))) * D2
                        + float(sigma_t * numpy.sqrt(_ONE - f32_exp(_F32(-2) * h))) * noise)
        # diffusers has no third-order sde-dpmsolver update: it returns None there
        raise ValueError(f"{type(self).__name__}: solver_order=3 is not available for algorithm_type 'sde-dpmsolver'")

    def step(self, model_output, timestep, sample, noise=None, rng=None, return_dict: bool = True,
             variance_noise=None):
        """One multistep update (module docstring). Returns prev_sample only (as diffusers).

        ``noise`` (alias ``variance_noise``) is the standard-normal draw of the SDE variants; drawn
        from ``rng`` (float32) when not given. The ODE variants use no noise.
        """
        name = type(self).__name__
        self._require_timesteps()
        check_sample(name, "model_output", model_output)
        check_sample(name, "sample", sample)
        noise = merge_noise_alias(name, noise, variance_noise)
        cfg = self._config
        # a learned-variance epsilon model outputs 2C channels; convert_model_output keeps the first 3, as diffusers
        if cfg["variance_type"] in ("learned", "learned_range") and cfg["prediction_type"] == "epsilon":
            check_same_shape(name, "model_output[:, :3]", model_output[:, :3], "sample", sample)
        else:
            check_same_shape(name, "model_output", model_output, "sample", sample)
        self._enter_step(timestep)
        n_ts = len(self.timesteps)
        lower_order_final = (self._step_index == n_ts - 1) and (
            cfg["euler_at_final"] or (cfg["lower_order_final"] and n_ts < 15) or cfg["final_sigmas_type"] == "zero")
        lower_order_second = (self._step_index == n_ts - 2) and cfg["lower_order_final"] and n_ts < 15

        model_output = self.convert_model_output(model_output, sample=sample)
        order = cfg["solver_order"]
        for i in range(order - 1):
            self.model_outputs[i] = self.model_outputs[i + 1]
        self.model_outputs[-1] = model_output

        sample = sample.astype(_F32, copy=False)
        if cfg["algorithm_type"] in ("sde-dpmsolver", "sde-dpmsolver++"):
            z = standard_normal_like(name, model_output, noise=noise, rng=rng, dtype=_F32)
        else:
            z = None

        if order == 1 or self.lower_order_nums < 1 or lower_order_final:
            prev_sample = self.dpm_solver_first_order_update(model_output, sample=sample, noise=z)
        elif order == 2 or self.lower_order_nums < 2 or lower_order_second:
            prev_sample = self.multistep_dpm_solver_second_order_update(self.model_outputs, sample=sample, noise=z)
        else:
            prev_sample = self.multistep_dpm_solver_third_order_update(self.model_outputs, sample=sample, noise=z)
        if self.lower_order_nums < order:
            self.lower_order_nums += 1
        prev_sample = prev_sample.astype(model_output.dtype, copy=False)
        self._step_index += 1
        return step_output(return_dict, prev_sample)

    def add_noise(self, original_samples, noise, timesteps):
        """x_t = alpha x_0 + sigma_t noise at each item's timestep (VP form). (B, ...)."""
        sigma = self._add_noise_sigmas(original_samples, noise, timesteps)
        alpha_t, sigma_t = sigma_to_alpha_sigma_t(sigma)
        return (broadcast_per_sample(alpha_t, original_samples) * original_samples
                + broadcast_per_sample(sigma_t, original_samples) * noise)
