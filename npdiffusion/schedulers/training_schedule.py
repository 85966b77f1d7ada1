"""The training schedule a scheduler's constructor arguments ask for: betas, alphas and abar_t.

Shapes: T = num_train_timesteps; betas, alphas, alphas_cumprod (T,) float32 on the host.
"""
from __future__ import annotations

import numpy

from npdiffusion.backend import to_numpy
from npdiffusion.diffusion import schedules
from npdiffusion.schedulers.validation import check_choice, check_int, check_real


def make_betas(cls_name: str, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
               allowed=("linear", "scaled_linear", "squaredcos_cap_v2")) -> numpy.ndarray:
    """The float32 betas (T,) a scheduler's constructor arguments ask for (``trained_betas`` wins).

    Every scheduler builds its schedule here: ``trained_betas``, and ``beta_start`` / ``beta_end`` of
    the schedules that use them, must be finite and in (0, 1) with ``beta_end >= beta_start``
    (``schedules.check_betas``, ``schedules.betas_for``); a ValueError names the argument otherwise.
    """
    check_int(cls_name, "num_train_timesteps", num_train_timesteps, minimum=1)
    if trained_betas is not None:
        betas = numpy.asarray(to_numpy(trained_betas) if hasattr(trained_betas, "shape") else trained_betas)
        if betas.ndim != 1 or betas.size == 0 or betas.dtype.kind not in "fiu":
            raise ValueError(f"{cls_name}: trained_betas must be a non-empty 1-d list of reals, "
                             f"got shape {betas.shape} dtype {betas.dtype}")
        if betas.shape[0] != num_train_timesteps:                # the timesteps index them: one per step
            raise ValueError(f"{cls_name}: trained_betas must have num_train_timesteps = {num_train_timesteps} "
                             f"entries (one per training timestep), got {betas.shape[0]}")
    else:
        check_choice(cls_name, "beta_schedule", beta_schedule, allowed)
        check_real(cls_name, "beta_start", beta_start)
        check_real(cls_name, "beta_end", beta_end)
    try:
        if trained_betas is not None:
            return schedules.check_betas("trained_betas", betas).astype(numpy.float32)
        return schedules.betas_for(beta_schedule, num_train_timesteps, beta_start, beta_end)
    except ValueError as exc:
        raise ValueError(f"{cls_name}: {exc}") from None


def training_schedule(cls_name: str, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                      rescale_betas_zero_snr: bool = False, allowed=("linear", "scaled_linear", "squaredcos_cap_v2"),
                      terminal_floor: bool = False):
    """``(betas, alphas, alphas_cumprod)``, each (T,) float32: the training schedule of a constructor.

    betas from :func:`make_betas`, rescaled to zero terminal SNR when ``rescale_betas_zero_snr``
    (Lin et al. 2023); alphas = 1 - betas; alphas_cumprod = abar_t = prod_{s <= t} alpha_s. With
    ``terminal_floor`` (the sigma-space schedulers) a zero-SNR abar_{T-1} = 0 is raised to 2^-24, so
    that sigma = sqrt((1 - abar)/abar) stays finite, as diffusers does.
    """
    betas = make_betas(cls_name, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                       allowed=allowed)
    if rescale_betas_zero_snr:
        betas = schedules.rescale_zero_terminal_snr(betas)
    alphas = (numpy.float32(1.0) - betas).astype(numpy.float32)
    alphas_cumprod = schedules.alphas_cumprod(betas)
    if rescale_betas_zero_snr and terminal_floor:
        alphas_cumprod[-1] = numpy.float32(2.0 ** -24)
    return betas, alphas, alphas_cumprod
