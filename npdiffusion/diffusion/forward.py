"""The forward (noising) process of DDPM and its Gaussian posterior.

Shapes: x0, x_prev, x_t, noise (B, ...) (any trailing shape, e.g. (B, C, H, W)); t an int or an
integer array (B,); schedule arrays betas, alphas_cumprod (T,) on the host. A schedule coefficient
gathered at t is a Python float (scalar t) or a backend array (B, 1, ..., 1) in the sample's dtype,
so it broadcasts over the sample.

Notation (docs/diffusion.md, "Forward process"): beta_t the variance of step t, alpha_t = 1 - beta_t,
abar_t = alphas_cumprod[t] = prod_{s<=t} alpha_s (0-based t, as in diffusers: t = 0 is the first
noising step), abar_{-1} = 1.

* one step      q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t I)
* marginal      q(x_t | x_0)     = N(sqrt(abar_t) x_0, (1 - abar_t) I)
* posterior     q(x_{t-1} | x_t, x_0) = N(c0_t x_0 + ct_t x_t, betatilde_t I),
                c0_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t),
                ct_t = sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t),
                betatilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t).

Sampling takes the noise explicitly (draw it on the host from a NumPy Generator and move it with
``backend.asarray``, so runs are reproducible on both backends). Note the standard deviation of a
step is ``sqrt(beta_t)``: passing the variance ``beta_t`` where the standard deviation belongs is
the classic slip (docs/diffusion.md, "A common slip").

Coefficients are computed in float64 on the host and cast to the sample's dtype, so float32
samples stay float32.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.checks import check_same_shape, check_sample

__all__ = [
    "check_schedule", "check_timesteps", "gather", "q_step_mean_variance", "q_step",
    "marginal_coefficients", "checked_marginal", "q_mean_variance", "q_sample", "Posterior", "posterior_coefficients",
    "q_posterior_mean_variance",
]


# ----------------------------------------------------------------------------- argument checks
def check_schedule(name: str, values, *, lower_open: bool = False) -> numpy.ndarray:
    """``values`` as a float64 host array (T,) with entries in [0, 1]; a clear ValueError otherwise.

    ``lower_open=True`` also rejects 0. (A zero-terminal-SNR schedule has alphas_cumprod[-1] = 0.)
    """
    if not hasattr(values, "shape") and not isinstance(values, (list, tuple)):
        raise TypeError(f"{name} must be a 1-D array, got {type(values).__name__}")
    arr = to_numpy(values)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {tuple(arr.shape)}")
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real array, got dtype {arr.dtype}")
    arr = arr.astype(numpy.float64)
    bad = ~numpy.isfinite(arr) | (arr > 1.0) | ((arr <= 0.0) if lower_open else (arr < 0.0))
    if bad.any():
        i = int(numpy.flatnonzero(bad)[0])
        lo = "(0, 1]" if lower_open else "[0, 1]"
        raise ValueError(f"{name} must have entries in {lo}, got {name}[{i}] = {float(arr[i])!r}")
    return arr


def check_timesteps(t, T: int, batch=None):
    """``t`` as a Python int or an int64 host array (B,), each in [0, T); clear errors otherwise."""
    if isinstance(t, bool):
        raise TypeError(f"t must be an int or an integer array, got {t!r}")
    if isinstance(t, (int, numpy.integer)):
        if not 0 <= int(t) < T:
            raise ValueError(f"t must be in [0, {T}), got {int(t)}")
        return int(t)
    if not hasattr(t, "shape"):
        raise TypeError(f"t must be an int or an integer array, got {type(t).__name__}")
    arr = to_numpy(t)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"t must be an integer array, got dtype {arr.dtype}")
    if arr.ndim == 0:
        return check_timesteps(int(arr), T, batch)
    if arr.ndim != 1:
        raise ValueError(f"t must be an int or a 1-D integer array (B,), got shape {tuple(arr.shape)}")
    if batch is not None and arr.shape[0] != batch:
        raise ValueError(f"t must have one timestep per sample ({batch}), got shape {tuple(arr.shape)}")
    if arr.size and (arr.min() < 0 or arr.max() >= T):
        raise ValueError(f"t must be in [0, {T}), got values in [{int(arr.min())}, {int(arr.max())}]")
    return arr.astype(numpy.int64)


def gather(values, t, like):
    """``values[t]`` shaped to broadcast over ``like`` (B, ...), in ``like``'s dtype.

    ``values`` is a host float64 array (T,); ``t`` a checked timestep (int or (B,) int array).
    A scalar ``t`` gives a Python float (so NumPy keeps float32 samples float32); an array gives a
    backend array (B, 1, ..., 1).
    """
    if isinstance(t, int):
        return float(values[t])
    return asarray(values[t].reshape((-1,) + (1,) * (like.ndim - 1)), dtype=like.dtype)


# ----------------------------------------------------------------------------- q(x_t | x_{t-1})
def q_step_mean_variance(x_prev, t, betas):
    """Mean and variance of q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I).

    x_prev (B, ...); returns ``(mean (B, ...), variance)`` with the variance a float or (B, 1, ...).
    """
    check_sample("x_prev", x_prev)
    b = check_schedule("betas", betas)
    t = check_timesteps(t, b.size, x_prev.shape[0])
    return gather(numpy.sqrt(1.0 - b), t, x_prev) * x_prev, gather(b, t, x_prev)


def q_step(x_prev, t, betas, noise):
    """One noising step: x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) noise (the std, not beta_t)."""
    check_sample("noise", noise)
    check_same_shape("x_prev", x_prev, "noise", noise)
    mean, _ = q_step_mean_variance(x_prev, t, betas)
    b = check_schedule("betas", betas)
    t = check_timesteps(t, b.size, x_prev.shape[0])
    return mean + gather(numpy.sqrt(b), t, noise) * noise


# ----------------------------------------------------------------------------- q(x_t | x_0)
def marginal_coefficients(alphas_cumprod):
    """Host float64 arrays ``(sqrt(abar), sqrt(1 - abar))`` (T,) of q(x_t | x_0)."""
    a = check_schedule("alphas_cumprod", alphas_cumprod)
    return numpy.sqrt(a), numpy.sqrt(1.0 - a)


def checked_marginal(x0, noise, t, alphas_cumprod):
    """Check x0 and noise (floating, one shape (B, ...)) and t; returns ``(sqrt(abar), sqrt(1 - abar),
    t)``: the host (T,) coefficients of ``marginal_coefficients`` and the checked timestep."""
    check_sample("x0", x0)
    check_sample("noise", noise)
    check_same_shape("x0", x0, "noise", noise)
    sqrt_abar, sqrt_one_minus = marginal_coefficients(alphas_cumprod)
    return sqrt_abar, sqrt_one_minus, check_timesteps(t, sqrt_abar.size, x0.shape[0])


def q_mean_variance(x0, t, alphas_cumprod):
    """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).

    Returns ``(mean (B, ...), variance, log_variance)``; variance and log-variance are floats or
    (B, 1, ..., 1) arrays. log(1 - abar_t) is -inf where abar_t = 1.
    """
    check_sample("x0", x0)
    a = check_schedule("alphas_cumprod", alphas_cumprod)
    t = check_timesteps(t, a.size, x0.shape[0])
    one_minus = 1.0 - a
    with numpy.errstate(divide="ignore"):
        log_var = numpy.log(one_minus)
    return gather(numpy.sqrt(a), t, x0) * x0, gather(one_minus, t, x0), gather(log_var, t, x0)


def q_sample(x0, t, alphas_cumprod, noise):
    """A draw of x_t ~ q(x_t | x_0): sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise (noise ~ N(0, I))."""
    sqrt_abar, sqrt_one_minus, t = checked_marginal(x0, noise, t, alphas_cumprod)
    return gather(sqrt_abar, t, x0) * x0 + gather(sqrt_one_minus, t, noise) * noise


# ----------------------------------------------------------------------------- q(x_{t-1} | x_t, x_0)
class Posterior(NamedTuple):
    """Host float64 arrays (T,) of q(x_{t-1} | x_t, x_0) = N(coef_x0 x0 + coef_xt x_t, variance).

    ``betas`` are the (effective) step variances 1 - abar_t / abar_prev_t; ``log_variance_clipped``
    is log(variance) with entry 0 replaced by log(variance[1]) (variance[0] is 0 when abar_prev = 1),
    as in the DDPM reference code (Ho et al., diffusion_utils_2.py) and Improved DDPM.
    """

    betas: numpy.ndarray
    coef_x0: numpy.ndarray
    coef_xt: numpy.ndarray
    variance: numpy.ndarray
    log_variance_clipped: numpy.ndarray


def posterior_coefficients(alphas_cumprod, alphas_cumprod_prev=None) -> Posterior:
    """Posterior coefficients for the chain abar_prev -> abar (T,) (both float64 on the host).

    ``alphas_cumprod_prev`` defaults to (1, abar_0, ..., abar_{T-2}) (every timestep). For a strided
    sampler (DDIM/DDPM with fewer steps) pass ``abar[timesteps]`` and ``abar[prev_timesteps]``:
    the effective step variance is then beta_t = 1 - abar_t / abar_prev, as in diffusers.

    The arrays run along the chain (entry 0 is the step nearest the data). A variance that is still
    zero after the clipping (a chain of one step, or a strided step with abar_prev = abar) has its
    log clamped at log(1e-20), as diffusers' DDPMScheduler does.
    """
    a = check_schedule("alphas_cumprod", alphas_cumprod)
    if alphas_cumprod_prev is None:
        a_prev = numpy.append(1.0, a[:-1])
    else:
        a_prev = check_schedule("alphas_cumprod_prev", alphas_cumprod_prev)
        if a_prev.shape != a.shape:
            raise ValueError(f"alphas_cumprod_prev must have the shape of alphas_cumprod {a.shape}, "
                             f"got {a_prev.shape}")
    bad = (a > a_prev) | (a >= 1.0) | (a_prev <= 0.0)
    if bad.any():
        i = int(numpy.flatnonzero(bad)[0])
        raise ValueError(f"alphas_cumprod must satisfy alphas_cumprod[t] < 1, alphas_cumprod[t] <= "
                         f"alphas_cumprod_prev[t] and alphas_cumprod_prev[t] > 0, "
                         f"got {float(a[i])!r} (previous {float(a_prev[i])!r}) at t = {i}")
    betas = 1.0 - a / a_prev
    coef_x0 = numpy.sqrt(a_prev) * betas / (1.0 - a)
    coef_xt = numpy.sqrt(1.0 - betas) * (1.0 - a_prev) / (1.0 - a)
    variance = betas * (1.0 - a_prev) / (1.0 - a)
    clipped = numpy.append(variance[1], variance[1:]) if variance.size > 1 else variance
    log_var = numpy.log(numpy.maximum(clipped, 1e-20))
    return Posterior(betas, coef_x0, coef_xt, variance, log_var)


def q_posterior_mean_variance(x0, x_t, t, alphas_cumprod, alphas_cumprod_prev=None):
    """q(x_{t-1} | x_t, x_0): returns ``(mean (B, ...), variance, log_variance_clipped)``.

    x0, x_t (B, ...); variance and clipped log-variance are floats or (B, 1, ..., 1) arrays.
    """
    check_sample("x0", x0)
    check_sample("x_t", x_t)
    check_same_shape("x0", x0, "x_t", x_t)
    post = posterior_coefficients(alphas_cumprod, alphas_cumprod_prev)
    t = check_timesteps(t, post.betas.size, x0.shape[0])
    mean = gather(post.coef_x0, t, x0) * x0 + gather(post.coef_xt, t, x_t) * x_t
    return mean, gather(post.variance, t, x0), gather(post.log_variance_clipped, t, x0)
