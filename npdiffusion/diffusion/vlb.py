"""The variational bound of DDPM in bits per dimension, the learned-range variance head and the
hybrid loss of Improved DDPM, each with its gradient with respect to the model output by hand.

Shapes: x0, x_t (B, C, ...) with M = C * prod(...) entries per sample; model_output (B, C, ...) or,
for the learned variance types, (B, 2C, ...) = [mean part | variance part] on axis 1; t an int or an
integer array (B,); alphas_cumprod (T,) on the host; per-sample terms (B,).
Derivation: docs/diffusion.md, "The variational bound" and "Learned variances and the hybrid loss".

The bound (Ho et al. 2020 eq. 5, Nichol & Dhariwal 2021 eq. 4-6), per sample, in bits per dimension:

    L   = L_prior + sum_{t=1}^{T-1} L_t + L_0
    L_t = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) / (M ln 2)          (0-based t >= 1)
    L_0 = -log p(x_0 | x_1) / (M ln 2)  (discretized Gaussian decoder: data in [-1, 1], 256 bins)
    L_prior = KL(q(x_T | x_0) || N(0, I)) / (M ln 2)

p(x_{t-1} | x_t) = N(mu, exp(logvar)) with mu the posterior mean at the predicted x0, and logvar
fixed ("fixed_small": log betatilde clipped, "fixed_large": log beta with entry 0 = betatilde_1),
free ("learned") or interpolated ("learned_range"): logvar = f log beta_t + (1 - f) log betatilde_t,
f = (v + 1) / 2, exactly as openai/improved-diffusion's gaussian_diffusion.py and diffusers'
DDPMScheduler compute them. Where the text says "t = 0" it means the decoder step (0-based, as in the
code and in diffusers), which the papers call t = 1.

The Gaussian CDF is Improved DDPM's tanh approximation (``approx_standard_normal_cdf``), so the
decoder log-likelihood matches their numbers; the bins are +-1/255 around each data value, and the
edge bins reach to -+infinity.

``decoder="gaussian"`` replaces the discretized decoder by the continuous density log N(x0; mu, var)
(for continuous data, where the discrete likelihood is meaningless; see tests/test_diffusion_gmm.py).

Every function keeps the input dtype (float16 is computed in float32).
"""
from __future__ import annotations

import math

import numpy

from npdiffusion.backend import asarray, to_numpy, xp
from npdiffusion.checks import check_same_shape, check_sample, compute_dtype
from npdiffusion.diffusion.forward import (
    check_schedule, check_timesteps, gather, posterior_coefficients,
    q_mean_variance, q_sample,
)
from npdiffusion.diffusion.objectives import training_target
from npdiffusion.diffusion.parameterization import check_prediction_type, conversion_coefficients

__all__ = [
    "VARIANCE_TYPES", "DECODERS", "normal_kl_forward", "normal_kl_backward", "normal_kl",
    "approx_standard_normal_cdf", "discretized_gaussian_log_likelihood_forward",
    "discretized_gaussian_log_likelihood_backward", "gaussian_log_likelihood_forward",
    "gaussian_log_likelihood_backward", "fixed_log_variances", "learned_range_forward",
    "learned_range_backward", "p_mean_variance_forward", "p_mean_variance_backward",
    "vlb_terms_forward", "vlb_terms_backward", "prior_bpd", "bits_per_dim", "hybrid_loss",
]

VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")
DECODERS = ("discretized", "gaussian")
LN2 = math.log(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_BIN = 1.0 / 255.0       # half a bin of 8-bit data scaled to [-1, 1]
_FLOOR = 1e-12           # Improved DDPM's clamp before each log


def _arrays_dtype(*values):
    """The compute dtype of the first array among ``values`` (Python floats may stand for some)."""
    for v in values:
        if hasattr(v, "dtype"):
            return compute_dtype(v.dtype)
    return numpy.dtype(numpy.float64)


def _arr(v, dtype):
    """``v`` (array or Python float) as a backend array of ``dtype``."""
    return v.astype(dtype, copy=False) if hasattr(v, "astype") and not isinstance(v, float) else \
        asarray(v, dtype=dtype)


def _unbroadcast(g, like):
    """Sum ``g`` down to the shape of ``like`` (None for a Python float: it gets no gradient)."""
    shape = getattr(like, "shape", None)
    if shape is None:
        return None
    shape = tuple(shape)
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    if lead:
        g = g.sum(axis=tuple(range(lead)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)


def _flat_mean(x):
    """Mean over every axis but the first: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).mean(axis=1)


# ----------------------------------------------------------------------------- Gaussian KL
def normal_kl_forward(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) element-wise, in nats (broadcast shapes).

    Returns ``(kl, cache)``; cache = (diff, inv_var2, ratio, the four inputs' shapes' holders).
    """
    dtype = _arrays_dtype(mean1, logvar1, mean2, logvar2)
    m1, lv1, m2, lv2 = (_arr(v, dtype) for v in (mean1, logvar1, mean2, logvar2))
    diff = m1 - m2
    inv_var2 = xp.exp(-lv2)
    ratio = xp.exp(lv1 - lv2)
    kl = 0.5 * (-1.0 + lv2 - lv1 + ratio + diff * diff * inv_var2)
    return kl, (diff, inv_var2, ratio, (mean1, logvar1, mean2, logvar2))


def normal_kl_backward(dkl, cache):
    """Returns the gradients for (mean1, logvar1, mean2, logvar2) (None for a Python float):

    dKL/dmean1 = (mean1 - mean2) / var2 = -dKL/dmean2,  dKL/dlogvar1 = (var1/var2 - 1) / 2,
    dKL/dlogvar2 = (1 - var1/var2 - (mean1 - mean2)^2 / var2) / 2.
    """
    diff, inv_var2, ratio, inputs = cache
    dm1 = dkl * diff * inv_var2
    dlv1 = 0.5 * dkl * (ratio - 1.0)
    dlv2 = 0.5 * dkl * (1.0 - ratio - diff * diff * inv_var2)
    grads = (dm1, dlv1, -dm1, dlv2)
    return tuple(_unbroadcast(g * xp.ones_like(diff), x) for g, x in zip(grads, inputs))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """``normal_kl_forward`` without the cache (Improved DDPM's ``normal_kl``)."""
    return normal_kl_forward(mean1, logvar1, mean2, logvar2)[0]


# ----------------------------------------------------------------------------- decoders
def approx_standard_normal_cdf(x):
    """Phi(x) ~= (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2 (Improved DDPM's approximation)."""
    return 0.5 * (1.0 + xp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))


def _approx_cdf_and_pdf(x):
    th = xp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
    return 0.5 * (1.0 + th), 0.5 * _SQRT_2_OVER_PI * (1.0 - th * th) * (1.0 + 3.0 * 0.044715 * x * x)


def discretized_gaussian_log_likelihood_forward(x, means, log_scales):
    """log P(x) of 8-bit data x in [-1, 1] under a Gaussian discretized into 256 bins of width 2/255.

    x (B, ...); means and log_scales broadcast to x. The bin of x is [x - 1/255, x + 1/255], the
    lowest (x < -0.999) extends to -inf and the highest (x > 0.999) to +inf; probabilities are
    clamped at 1e-12 before the log, as in Improved DDPM. Returns ``(log_probs (B, ...), cache)``.
    """
    dtype = _arrays_dtype(means, x, log_scales)
    x_, m, ls = (_arr(v, dtype) for v in (x, means, log_scales))
    centered = x_ - m
    inv_stdv = xp.exp(-ls)
    plus_in = inv_stdv * (centered + _BIN)
    min_in = inv_stdv * (centered - _BIN)
    cdf_plus, pdf_plus = _approx_cdf_and_pdf(plus_in)
    cdf_min, pdf_min = _approx_cdf_and_pdf(min_in)
    one_minus_cdf_min = 1.0 - cdf_min
    cdf_delta = cdf_plus - cdf_min
    low = x_ < -0.999
    high = x_ > 0.999
    prob = xp.where(low, cdf_plus, xp.where(high, one_minus_cdf_min, cdf_delta))
    log_probs = xp.log(xp.maximum(prob, _FLOOR))
    # d log P / d plus_in and d log P / d min_in, zero where the clamp is active.
    live = prob > _FLOOR
    safe = xp.where(live, prob, 1.0)
    g_plus = xp.where(live & ~high, pdf_plus / safe, 0.0)
    g_min = xp.where(live & ~low, -pdf_min / safe, 0.0)
    return log_probs, (g_plus, g_min, inv_stdv, plus_in, min_in, (x, means, log_scales))


def discretized_gaussian_log_likelihood_backward(dlogp, cache):
    """Returns ``(None, dmeans, dlog_scales)`` (the data x gets no gradient).

    With u = (x - mean +- 1/255) e^{-log_scale}: du/dmean = -e^{-log_scale}, du/dlog_scale = -u, and
    d log P/du = pdf(u_+)/P on the upper edge, -pdf(u_-)/P on the lower edge.
    """
    g_plus, g_min, inv_stdv, plus_in, min_in, (x, means, log_scales) = cache
    dmeans = -dlogp * (g_plus + g_min) * inv_stdv
    dls = -dlogp * (g_plus * plus_in + g_min * min_in)
    return None, _unbroadcast(dmeans, means), _unbroadcast(dls, log_scales)


def gaussian_log_likelihood_forward(x, means, log_scales):
    """Continuous log N(x; mean, e^{2 log_scale}) element-wise. Returns ``(log_probs, cache)``."""
    dtype = _arrays_dtype(means, x, log_scales)
    x_, m, ls = (_arr(v, dtype) for v in (x, means, log_scales))
    inv_std = xp.exp(-ls)
    z = (x_ - m) * inv_std
    return -_HALF_LOG_2PI - ls - 0.5 * z * z, (z, inv_std, (x, means, log_scales))


def gaussian_log_likelihood_backward(dlogp, cache):
    """Returns ``(dx, dmeans, dlog_scales)``: dx = -z/std, dmean = z/std, dlog_scale = z^2 - 1."""
    z, inv_std, (x, means, log_scales) = cache
    dm = dlogp * z * inv_std
    return _unbroadcast(-dm, x), _unbroadcast(dm, means), _unbroadcast(dlogp * (z * z - 1.0), log_scales)


# ----------------------------------------------------------------------------- model variances
def fixed_log_variances(alphas_cumprod, variance_type: str) -> numpy.ndarray:
    """Host float64 (T,) log-variances of p(x_{t-1} | x_t) for a fixed variance type.

    "fixed_small": log betatilde_t with entry 0 replaced by log betatilde_1 (DDPM's clipping);
    "fixed_large": log beta_t with entry 0 replaced by log betatilde_1 (Improved DDPM's choice, so the
    decoder's variance is the same as fixed_small's).
    """
    post = posterior_coefficients(alphas_cumprod)
    if variance_type == "fixed_small":
        return post.log_variance_clipped
    if variance_type == "fixed_large":
        if post.betas.size == 1:
            return numpy.log(post.betas)
        return numpy.log(numpy.append(post.variance[1], post.betas[1:]))
    raise ValueError(f"variance_type must be 'fixed_small' or 'fixed_large' here, got {variance_type!r}")


def learned_range_forward(v, t, alphas_cumprod):
    """Learned-range log-variance: f log beta_t + (1 - f) log betatilde_t (clipped), f = (v + 1)/2.

    v (B, ...) in about [-1, 1] (not clamped). Returns ``(log_variance (B, ...), cache)``.
    """
    check_sample("v", v)
    post = posterior_coefficients(alphas_cumprod)
    t = check_timesteps(t, post.betas.size, v.shape[0])
    max_log = numpy.log(post.betas)
    min_log = post.log_variance_clipped
    lo, hi = gather(min_log, t, v), gather(max_log, t, v)
    frac = (v + 1.0) * 0.5
    return frac * hi + (1.0 - frac) * lo, (0.5 * (hi - lo), v.shape)


def learned_range_backward(dlogvar, cache):
    """Returns dv = dlogvar * (log beta_t - log betatilde_t) / 2."""
    half_span, shape = cache
    return (dlogvar * half_span).reshape(shape)


# ----------------------------------------------------------------------------- p(x_{t-1} | x_t)
def _split_output(model_output, x_t, variance_type):
    c = x_t.shape[1] if x_t.ndim > 1 else None
    if variance_type in ("learned", "learned_range"):
        if c is None or model_output.ndim != x_t.ndim or model_output.shape[1] != 2 * c \
                or model_output.shape[2:] != x_t.shape[2:] or model_output.shape[0] != x_t.shape[0]:
            raise ValueError(f"model_output must have shape {(x_t.shape[0], 2 * (c or 0)) + tuple(x_t.shape[2:])} "
                             f"(mean and variance halves on axis 1) for variance_type={variance_type!r}, "
                             f"got {tuple(model_output.shape)}")
        return model_output[:, :c], model_output[:, c:]
    check_same_shape("x_t", x_t, "model_output", model_output)
    return model_output, None


def p_mean_variance_forward(model_output, x_t, t, alphas_cumprod, prediction_type: str = "epsilon",
                            variance_type: str = "fixed_small", clip_denoised: bool = False):
    """Mean and log-variance of p(x_{t-1} | x_t) from the model output.

    x_t (B, C, ...); model_output (B, C, ...) or (B, 2C, ...) for learned variances. The mean part is
    converted to x0 (clipped to [-1, 1] when ``clip_denoised``), then mu = c0_t x0 + ct_t x_t.
    Returns ``((mean, log_variance, pred_x0), cache)``; log_variance is a float, a (B, 1, ...) array
    (fixed types) or (B, C, ...) (learned types).
    """
    check_sample("model_output", model_output)
    check_sample("x_t", x_t)
    check_prediction_type("prediction_type", prediction_type)
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
    a = check_schedule("alphas_cumprod", alphas_cumprod)
    t = check_timesteps(t, a.size, x_t.shape[0])
    mean_out, var_out = _split_output(model_output, x_t, variance_type)
    dtype = compute_dtype(model_output.dtype)
    mean_out = mean_out.astype(dtype, copy=False)
    x_t = x_t.astype(dtype, copy=False)
    coef_out, coef_x = conversion_coefficients(a, prediction_type, "sample")
    ca = gather(coef_out, t, mean_out)
    pred_x0 = ca * mean_out + gather(coef_x, t, x_t) * x_t
    keep = None
    if clip_denoised:
        keep = (pred_x0 >= -1.0) & (pred_x0 <= 1.0)
        pred_x0 = xp.clip(pred_x0, -1.0, 1.0)
    post = posterior_coefficients(a)
    c0 = gather(post.coef_x0, t, pred_x0)
    mean = c0 * pred_x0 + gather(post.coef_xt, t, x_t) * x_t
    lr_cache = None
    if variance_type in ("fixed_small", "fixed_large"):
        log_var = gather(fixed_log_variances(a, variance_type), t, mean)
    elif variance_type == "learned":
        log_var = var_out.astype(dtype, copy=False)
    else:
        log_var, lr_cache = learned_range_forward(var_out.astype(dtype, copy=False), t, a)
    cache = (variance_type, ca, c0, keep, lr_cache, tuple(model_output.shape), model_output.dtype,
             mean_out.shape[1] if var_out is not None else None)
    return (mean, log_var, pred_x0), cache


def p_mean_variance_backward(dmean, dlog_variance, cache, dpred_x0=None):
    """d model_output (B, C or 2C, ...) from the gradients of the mean, the log-variance (None for
    the fixed types, which do not depend on the model) and optionally of pred_x0.

    mean = c0 x0_hat + ..., x0_hat = A out + ...: d out_mean = A (c0 dmean + dpred_x0), masked where
    x0_hat was clipped; d out_var = dlogvar (learned) or dlogvar (log beta - log betatilde)/2.
    """
    variance_type, ca, c0, keep, lr_cache, shape, dtype, c = cache
    dx0 = c0 * dmean if dmean is not None else None
    if dpred_x0 is not None:
        dx0 = dpred_x0 if dx0 is None else dx0 + dpred_x0
    if dx0 is None:
        dx0 = xp.zeros(shape if c is None else (shape[0], c) + shape[2:], dtype=dtype)
    if keep is not None:
        dx0 = dx0 * keep
    dmean_out = ca * dx0
    if c is None:
        return dmean_out.astype(dtype, copy=False)
    grad = xp.empty(shape, dtype=dtype)
    grad[:, :c] = dmean_out
    if dlog_variance is None:
        grad[:, c:] = 0.0
    elif variance_type == "learned":
        grad[:, c:] = dlog_variance
    else:
        grad[:, c:] = learned_range_backward(dlog_variance, lr_cache)
    return grad


# ----------------------------------------------------------------------------- the bound
def vlb_terms_forward(model_output, x0, x_t, t, alphas_cumprod, prediction_type: str = "epsilon",
                      variance_type: str = "fixed_small", decoder: str = "discretized",
                      clip_denoised: bool = False):
    """The bound's term at t for each sample, in bits per dimension (B,).

    For t >= 1: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)); for t = 0: the decoder's negative
    log-likelihood of x0 (discretized, or ``decoder="gaussian"``). Both are averaged over the M
    entries of a sample and divided by ln 2. Returns ``(bits (B,), cache)``.
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    check_sample("x0", x0)
    check_sample("x_t", x_t)
    check_same_shape("x0", x0, "x_t", x_t)
    a = check_schedule("alphas_cumprod", alphas_cumprod)
    t = check_timesteps(t, a.size, x0.shape[0])
    (mean, log_var, _), pmv_cache = p_mean_variance_forward(
        model_output, x_t, t, a, prediction_type, variance_type, clip_denoised)
    dtype = mean.dtype
    x0c = x0.astype(dtype, copy=False)
    true_mean, _, true_log_var = _posterior(x0c, x_t.astype(dtype, copy=False), t, a)
    batch = x0.shape[0]
    m = x0.size // batch
    t_host = numpy.broadcast_to(numpy.asarray(t), (batch,))
    has_zero, has_pos = bool((t_host == 0).any()), bool((t_host > 0).any())
    kl_cache = dec_cache = None
    terms = xp.zeros((batch,), dtype=dtype)
    if has_pos:
        kl, kl_cache = normal_kl_forward(true_mean, true_log_var, mean, log_var)
        terms = terms + _flat_mean(kl) / LN2
    if has_zero:
        if decoder == "discretized":
            logp, dec_cache = discretized_gaussian_log_likelihood_forward(x0c, mean, 0.5 * log_var)
        else:
            logp, dec_cache = gaussian_log_likelihood_forward(x0c, mean, 0.5 * log_var)
        dec = -_flat_mean(logp) / LN2
        terms = dec if not has_pos else xp.where(asarray(t_host == 0), dec, terms)
    cache = (pmv_cache, kl_cache, dec_cache, decoder, t_host, m, log_var, variance_type)
    return terms, cache


def _posterior(x0, x_t, t, a):
    post = posterior_coefficients(a)
    mean = gather(post.coef_x0, t, x0) * x0 + gather(post.coef_xt, t, x_t) * x_t
    return mean, gather(post.variance, t, x0), gather(post.log_variance_clipped, t, x0)


def vlb_terms_backward(dbits, cache):
    """Returns ``(d model_output, None, None)`` (x0 and x_t are data here).

    Each sample's term is mean_i(term_i)/ln 2, so d term_i = dbits_b / (M ln 2); the KL rows use
    dKL/dmean2 and dKL/dlogvar2, the decoder rows -dlogP/dmean and -dlogP/dlog_scale / 2
    (log_scale = logvar / 2).
    """
    pmv_cache, kl_cache, dec_cache, decoder, t_host, m, log_var, variance_type = cache
    learned = variance_type in ("learned", "learned_range")
    batch = t_host.shape[0]
    zero_rows = asarray(t_host == 0)
    shape_b = (batch,) + (1,) * (_ndim_of(pmv_cache) - 1)
    g = (dbits / (m * LN2)).reshape(shape_b)
    dmean = dlogvar = None
    if kl_cache is not None:
        gk = g if dec_cache is None else g * (~zero_rows).reshape(shape_b)
        _, _, dm2, dlv2 = normal_kl_backward(gk * xp.ones_like(kl_cache[0]), kl_cache)
        dmean, dlogvar = dm2, (dlv2 if learned else None)
    if dec_cache is not None:
        gd = -g if kl_cache is None else -g * zero_rows.reshape(shape_b)
        gd = gd * xp.ones_like(dec_cache[0])
        if decoder == "discretized":
            _, dm, dls = discretized_gaussian_log_likelihood_backward(gd, dec_cache)
        else:
            _, dm, dls = gaussian_log_likelihood_backward(gd, dec_cache)
        dmean = dm if dmean is None else dmean + dm
        if learned:
            dlogvar = 0.5 * dls if dlogvar is None else dlogvar + 0.5 * dls
    return p_mean_variance_backward(dmean, dlogvar, pmv_cache), None, None


def _ndim_of(pmv_cache):
    return len(pmv_cache[5])


def prior_bpd(x0, alphas_cumprod):
    """KL(q(x_T | x0) || N(0, I)) per sample in bits per dimension (B,); no model involved."""
    a = check_schedule("alphas_cumprod", alphas_cumprod)
    mean, _, log_var = q_mean_variance(x0, a.size - 1, a)
    kl = normal_kl(mean, log_var, xp.zeros_like(mean), 0.0)
    return _flat_mean(kl) / LN2


def bits_per_dim(model_fn, x0, alphas_cumprod, rng, prediction_type: str = "epsilon",
                 variance_type: str = "fixed_small", clip_denoised: bool = True,
                 decoder: str = "discretized"):
    """A one-sample Monte-Carlo estimate of the whole bound per data point (Improved DDPM's
    ``calc_bpd_loop``), in bits per dimension.

    ``model_fn(x_t, t)`` gets x_t (B, C, ...) and t (B,) int64 on the host and returns the model
    output. ``rng`` is a NumPy Generator: one noise draw per timestep, on the host (reproducible on
    both backends). Returns a dict of host float64 arrays: ``total_bpd`` (B,), ``prior_bpd`` (B,),
    ``vb`` (B, T) (column t is the term at t), and ``xstart_mse`` (B, T).
    """
    check_sample("x0", x0)
    if not isinstance(rng, numpy.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    a = check_schedule("alphas_cumprod", alphas_cumprod)
    batch, T = x0.shape[0], a.size
    vb = numpy.zeros((batch, T))
    mse = numpy.zeros((batch, T))
    for step in range(T - 1, -1, -1):
        t = numpy.full((batch,), step, dtype=numpy.int64)
        noise = asarray(rng.standard_normal(x0.shape), dtype=x0.dtype)
        x_t = q_sample(x0, t, a, noise)
        out = model_fn(x_t, t)
        terms, _ = vlb_terms_forward(out, x0, x_t, t, a, prediction_type, variance_type, decoder, clip_denoised)
        coef_out, coef_x = conversion_coefficients(a, prediction_type, "sample")
        mean_out = _split_output(out, x_t, variance_type)[0]
        pred_x0 = gather(coef_out, t, mean_out) * mean_out + gather(coef_x, t, x_t) * x_t
        if clip_denoised:
            pred_x0 = xp.clip(pred_x0, -1.0, 1.0)
        vb[:, step] = to_numpy(terms)
        mse[:, step] = to_numpy(_flat_mean((pred_x0 - x0) ** 2))
    prior = to_numpy(prior_bpd(x0, a)).astype(numpy.float64)
    return {"total_bpd": vb.sum(axis=1) + prior, "prior_bpd": prior, "vb": vb, "xstart_mse": mse}


# ----------------------------------------------------------------------------- hybrid loss
def hybrid_loss(model_output, x0, x_t, noise, t, alphas_cumprod, prediction_type: str = "epsilon",
                lambda_vlb: float = 0.001, variance_type: str = "learned_range"):
    """Improved DDPM's L_hybrid = L_simple + lambda L_vlb, one timestep per sample.

    model_output (B, 2C, ...) = [prediction | variance head]; x0, x_t, noise (B, C, ...). With t
    drawn uniformly, T L_t is an unbiased estimate of L_vlb = sum_t L_t, so the per-sample loss is
    mean_i (pred - target)^2 + lambda T L_t, averaged over the batch. The vlb term sees the mean part
    through a stop-gradient: it trains only the variance head (Nichol & Dhariwal, sec. 3.1). With
    lambda = 0.001 this equals improved-diffusion's default RESCALED_MSE loss (vb * T / 1000).

    Returns ``(loss (0-d), grad (B, 2C, ...))``.
    """
    if variance_type not in ("learned", "learned_range"):
        raise ValueError(f"variance_type must be 'learned' or 'learned_range' for the hybrid loss, "
                         f"got {variance_type!r}")
    if isinstance(lambda_vlb, bool) or not isinstance(lambda_vlb, (int, float)) or lambda_vlb < 0:
        raise ValueError(f"lambda_vlb must be a non-negative number, got {lambda_vlb!r}")
    a = check_schedule("alphas_cumprod", alphas_cumprod)
    t = check_timesteps(t, a.size, x0.shape[0])
    mean_out, _ = _split_output(model_output, x_t, variance_type)
    target = training_target(x0, noise, t, a, prediction_type)
    dtype = compute_dtype(model_output.dtype)
    batch = x0.shape[0]
    diff = mean_out.astype(dtype, copy=False) - target.astype(dtype, copy=False)
    mse = _flat_mean(diff * diff)                                   # (B,)
    vb, cache = vlb_terms_forward(model_output, x0, x_t, t, a, prediction_type, variance_type,
                                  "discretized", False)
    scale = float(lambda_vlb) * a.size
    loss = xp.mean(mse + scale * vb)
    dvb = xp.full((batch,), scale / batch, dtype=dtype)
    grad = vlb_terms_backward(dvb, cache)[0]
    c = x_t.shape[1]
    grad[:, :c] = diff * (2.0 / diff.size)                          # stop-gradient: mean part sees only the MSE
    return loss, grad
