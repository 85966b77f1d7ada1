"""Diffusion math: schedules, the forward process, posteriors, objectives, the variational bound, guidance.

Derivations in docs/diffusion.md. One module per concept:

    schedules.py         betas (linear, scaled_linear, cosine), alphas_cumprod, SNR, sigmas, Karras
    forward.py           q(x_t | x_{t-1}), q(x_t | x_0), the posterior q(x_{t-1} | x_t, x_0)
    parameterization.py  epsilon <-> x0 <-> v conversions
    objectives.py        the simple loss (epsilon / x0 / v targets, min-SNR weights) and its gradient
    vlb.py               the variational bound in bits per dimension, learned-range variance, hybrid loss
    guidance.py          classifier-free guidance and guidance_rescale
"""
from npdiffusion.diffusion.forward import (posterior_coefficients, q_mean_variance, q_posterior_mean_variance,
                                           q_sample, q_step, q_step_mean_variance)
from npdiffusion.diffusion.guidance import classifier_free_guidance, guided_prediction, rescale_noise_cfg
from npdiffusion.diffusion.objectives import min_snr_weights, simple_loss, training_target
from npdiffusion.diffusion.parameterization import convert, velocity
from npdiffusion.diffusion.schedules import (alphas_cumprod, betas_for, karras_sigmas, rescale_zero_terminal_snr,
                                             sigmas_from_alphas_cumprod, snr)
from npdiffusion.diffusion.vlb import bits_per_dim, hybrid_loss, normal_kl

__all__ = ["betas_for", "alphas_cumprod", "snr", "sigmas_from_alphas_cumprod", "rescale_zero_terminal_snr",
           "karras_sigmas", "q_step", "q_step_mean_variance", "q_mean_variance", "q_sample",
           "posterior_coefficients", "q_posterior_mean_variance", "convert", "velocity", "training_target",
           "min_snr_weights", "simple_loss", "normal_kl", "bits_per_dim", "hybrid_loss",
           "classifier_free_guidance", "rescale_noise_cfg", "guided_prediction"]
