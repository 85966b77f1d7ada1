"""Noise schedules: betas, cumulative alphas, SNR, sigmas and Karras-style sigma ramps.

Shapes: T = num_train_timesteps, N = number of inference steps. Every function here works on small
host arrays (NumPy, on the CPU whatever the backend): a schedule has at most a few thousand entries
and is computed once. The schedulers (``npdiffusion.schedulers``) gather scalars from these arrays
and apply them to samples with the backend ``xp``.

Notation (docs/schedulers.md, "Schedules"; derivations of the forward process in docs/diffusion.md):

* beta_t, t = 0 .. T-1, the variance of noising step t; alpha_t = 1 - beta_t;
* abar_t = prod_{s <= t} alpha_s ("alphas_cumprod"), so q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I);
* SNR_t = abar_t / (1 - abar_t);
* sigma_t = sqrt((1 - abar_t) / abar_t) = SNR_t^(-1/2), the noise level of the variance-exploding
  form x_t / sqrt(abar_t) = x_0 + sigma_t eps used by the Euler/Heun/DPM-Solver schedulers.

Everything reproduces diffusers 0.42 bit for bit in float32 (see ``tests/test_diffusion_schedules.py``):
diffusers builds betas with ``torch.linspace(..., dtype=torch.float32)``, which is *not*
``np.linspace(...).astype(float32)`` (that one computes in float64 and rounds once); the float32
recipe torch uses is reproduced by :func:`linspace_float32`.
"""
from __future__ import annotations

import math

import numpy

from npdiffusion.checks import check_int, check_real

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "exp", "laplace")
#: the schedules built from beta_start .. beta_end (the others discretize a continuous abar(t) and ignore them)
RANGE_SCHEDULES = ("linear", "scaled_linear", "sigmoid")
#: why a beta must lie in (0, 1), for the error messages
BETA_RANGE_REASON = ("a beta is the variance of one noising step: 0 gives a zero noise level (log sigma = -inf), "
                     "1 or more leaves no signal, and both turn samples into NaN")
ALPHA_TRANSFORMS = ("cosine", "exp", "laplace")


def _fma_float32(a, b, c) -> numpy.ndarray:
    """Correctly rounded float32 ``a * b + c`` (one rounding, as a hardware FMA), elementwise.

    ``a``, ``b``, ``c`` are float32 arrays. The product of two float32 numbers is exact in float64;
    the float64 sum ``s`` is rounded once more to float32, and the only way that double rounding can
    go wrong is when ``s`` lands exactly on a float32 midpoint, which the exact error of the sum
    (TwoSum) then breaks in the right direction.
    """
    p = a.astype(numpy.float64) * b.astype(numpy.float64)  # exact
    c64 = c.astype(numpy.float64)
    s = p + c64
    bb = s - p
    err = (p - (s - bb)) + (c64 - bb)  # s + err == p + c exactly
    r = s.astype(numpy.float32)
    rd = r.astype(numpy.float64)
    toward = numpy.where(s > rd, numpy.float32(numpy.inf), numpy.float32(-numpy.inf)).astype(numpy.float32)
    other = numpy.nextafter(r, toward)
    mid = (rd + other.astype(numpy.float64)) * 0.5
    use_other = (s == mid) & (err != 0) & ((err > 0) == (other > r))
    return numpy.where(use_other, other, r).astype(numpy.float32)


def linspace_float32(start: float, end: float, steps: int, fused: bool = True) -> numpy.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` on the CPU, bit for bit. (steps,).

    torch's CPU kernel works in float32: ``step = (end - start) / (steps - 1)``; entry i is
    ``start + step * i`` for i < steps // 2 and ``end - step * (steps - 1 - i)`` from the middle on
    (so both ends are exact). torch's AVX2/AVX-512 kernels (the ones x86 machines use) are compiled
    with fused multiply-add, so each entry is rounded once: ``fma(step, i, start)``. Its
    ``ATEN_CPU_CAPABILITY=default`` kernel rounds the product and the sum separately; ``fused=False``
    reproduces that one. The two differ by one ulp in a few entries; ``np.linspace`` (float64, then
    rounded) differs from both.
    """
    steps = check_int("steps", steps, minimum=0)
    s = numpy.float32(check_real("start", start))
    e = numpy.float32(check_real("end", end))
    if steps == 0:
        return numpy.zeros(0, dtype=numpy.float32)
    if steps == 1:
        return numpy.array([s], dtype=numpy.float32)
    step = numpy.float32((e - s) / numpy.float32(steps - 1))
    idx = numpy.arange(steps)
    lower = idx < steps // 2
    k = numpy.where(lower, idx, steps - 1 - idx).astype(numpy.float32)
    base = numpy.where(lower, s, e).astype(numpy.float32)
    signed_step = numpy.where(lower, step, -step).astype(numpy.float32)
    if fused:
        return _fma_float32(signed_step, k, base)
    return (base + signed_step * k).astype(numpy.float32)


def check_betas(name: str, betas) -> numpy.ndarray:
    """``betas`` (T,) as a float64 array, every entry finite and in (0, 1); else a ValueError naming
    ``name`` and the first bad entry."""
    arr = numpy.asarray(betas, dtype=numpy.float64)
    bad = numpy.flatnonzero(~(numpy.isfinite(arr) & (arr > 0.0) & (arr < 1.0)))
    if bad.size:
        raise ValueError(f"{name} must hold finite numbers in (0, 1) ({BETA_RANGE_REASON}), "
                         f"got {name}[{bad[0]}] = {float(arr[bad[0]])!r}")
    return arr


def check_beta_range(beta_start: float, beta_end: float) -> None:
    """ValueError unless 0 < beta_start <= beta_end < 1 (an increasing schedule of variances), naming the argument."""
    for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
        if not 0.0 < value < 1.0:                                  # False for NaN too
            raise ValueError(f"{name} must be a finite number in (0, 1) ({BETA_RANGE_REASON}), got {value!r}")
    if beta_end < beta_start:
        raise ValueError(f"beta_end must be >= beta_start (the noise schedule increases), got beta_start="
                         f"{beta_start!r}, beta_end={beta_end!r}")


def betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999,
                        alpha_transform_type: str = "cosine") -> numpy.ndarray:
    """Betas that discretize a continuous abar(t), t in [0, 1]. (T,) float32.

    beta_i = min(1 - abar((i + 1)/T) / abar(i/T), max_beta), computed in Python doubles and stored
    in float32, as diffusers' ``betas_for_alpha_bar``. ``alpha_transform_type``:

    * ``"cosine"`` (Nichol & Dhariwal 2021, "squaredcos_cap_v2"): abar(t) = cos^2((t + 0.008)/1.008 * pi/2);
    * ``"exp"``: abar(t) = exp(-12 t);
    * ``"laplace"``: lambda = -0.5 sign(0.5 - t) log(1 - 2|0.5 - t| + 1e-6), abar = sqrt(e^lambda / (1 + e^lambda)).

    A Python loop over T scalars on purpose: ``math.cos`` is what diffusers calls, and NumPy's
    vectorized cosine may differ from it in the last bit.
    """
    num_train_timesteps = check_int("num_train_timesteps", num_train_timesteps)
    max_beta = check_real("max_beta", max_beta)
    if alpha_transform_type == "cosine":
        def abar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    elif alpha_transform_type == "laplace":
        def abar(t):
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr_ = math.exp(lmb)
            return math.sqrt(snr_ / (1 + snr_))
    elif alpha_transform_type == "exp":
        def abar(t):
            return math.exp(t * -12.0)
    else:
        raise ValueError(f"alpha_transform_type must be one of {ALPHA_TRANSFORMS}, got {alpha_transform_type!r}")
    betas = []
    for i in range(num_train_timesteps):
        t1 = i / num_train_timesteps
        t2 = (i + 1) / num_train_timesteps
        betas.append(min(1 - abar(t2) / abar(t1), max_beta))
    return numpy.array(betas, dtype=numpy.float32)


def betas_for(schedule: str, num_train_timesteps: int = 1000, beta_start: float = 0.0001,
              beta_end: float = 0.02) -> numpy.ndarray:
    """The betas of a named diffusers ``beta_schedule``. (T,) float32, equal to diffusers' bit for bit.

    * ``"linear"``: linspace(beta_start, beta_end, T) in float32 (DDPM, Ho et al. 2020);
    * ``"scaled_linear"``: linspace(sqrt(beta_start), sqrt(beta_end), T)^2 in float32 (Stable Diffusion:
      0.00085 -> 0.012);
    * ``"squaredcos_cap_v2"``: the cosine schedule, :func:`betas_for_alpha_bar` with cap 0.999;
    * ``"exp"``, ``"laplace"``: :func:`betas_for_alpha_bar` with those transforms (Heun / DDPM use them);
    * ``"sigmoid"`` (DDPM only): sigmoid(linspace(-6, 6, T)) (beta_end - beta_start) + beta_start. torch
      evaluates the sigmoid with its own vectorized exp, so this one agrees to a few ulp, not bitwise.

    For the schedules that use them (``RANGE_SCHEDULES``), ``check_beta_range``: 0 < beta_start <=
    beta_end < 1, so every beta lies in (0, 1); the others ignore beta_start and beta_end.
    """
    num_train_timesteps = check_int("num_train_timesteps", num_train_timesteps)
    beta_start = check_real("beta_start", beta_start)
    beta_end = check_real("beta_end", beta_end)
    if schedule in RANGE_SCHEDULES:
        check_beta_range(beta_start, beta_end)
    if schedule == "linear":
        return linspace_float32(beta_start, beta_end, num_train_timesteps)
    if schedule == "scaled_linear":
        root = linspace_float32(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps)
        return root * root
    if schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_train_timesteps, alpha_transform_type="cosine")
    if schedule in ("exp", "laplace"):
        return betas_for_alpha_bar(num_train_timesteps, alpha_transform_type=schedule)
    if schedule == "sigmoid":
        x = linspace_float32(-6.0, 6.0, num_train_timesteps)
        sig = (numpy.float32(1) / (numpy.float32(1) + numpy.exp(-x))).astype(numpy.float32)
        return (sig * numpy.float32(beta_end - beta_start) + numpy.float32(beta_start)).astype(numpy.float32)
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {schedule!r}")


def _as_schedule(name: str, values) -> numpy.ndarray:
    arr = numpy.asarray(values)
    if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be a non-empty 1-d array of reals, got shape {arr.shape} dtype {arr.dtype}")
    return arr.astype(numpy.float32)


def alphas_cumprod(betas) -> numpy.ndarray:
    """abar_t = prod_{s <= t} (1 - beta_s). (T,) float32, as ``torch.cumprod(1 - betas)``.

    alpha = 1 - beta is rounded to float32; torch's CPU cumprod then multiplies in double precision
    and rounds each partial product to float32, which is what this does.
    """
    alphas = (numpy.float32(1.0) - _as_schedule("betas", betas)).astype(numpy.float32)
    return numpy.cumprod(alphas.astype(numpy.float64)).astype(numpy.float32)


def snr(alphas_cumprod_) -> numpy.ndarray:
    """Signal-to-noise ratio SNR_t = abar_t / (1 - abar_t). (T,), in the input's float dtype (float32 default)."""
    a = numpy.asarray(alphas_cumprod_)
    if a.dtype.kind != "f":
        a = a.astype(numpy.float32)
    with numpy.errstate(divide="ignore"):
        return a / (a.dtype.type(1) - a)


def sigmas_from_alphas_cumprod(alphas_cumprod_) -> numpy.ndarray:
    """sigma_t = sqrt((1 - abar_t) / abar_t) = SNR_t^(-1/2). (T,) float32, as diffusers computes it in float32."""
    a = _as_schedule("alphas_cumprod", alphas_cumprod_)
    one = numpy.float32(1.0)
    return numpy.sqrt((one - a) / a).astype(numpy.float32)


def rescale_zero_terminal_snr(betas) -> numpy.ndarray:
    """Rescale betas so that the last step has zero SNR (Lin et al. 2023, Algorithm 1). (T,) float32.

    With r_t = sqrt(abar_t): r'_t = (r_t - r_{T-1}) * r_0 / (r_0 - r_{T-1}), so r'_0 = r_0 and
    r'_{T-1} = 0; then abar' = r'^2, alpha'_t = abar'_t / abar'_{t-1} (alpha'_0 = abar'_0) and
    beta' = 1 - alpha'. Float32 throughout, in diffusers' order of operations.
    """
    one = numpy.float32(1.0)
    a = alphas_cumprod(betas)
    r = numpy.sqrt(a).astype(numpy.float32)
    r0, rT = r[0], r[-1]
    r = r - rT
    r = r * numpy.float32(r0 / (r0 - rT))
    abar = (r * r).astype(numpy.float32)
    with numpy.errstate(divide="ignore", invalid="ignore"):
        alphas = numpy.concatenate([abar[:1], abar[1:] / abar[:-1]]).astype(numpy.float32)
    return (one - alphas).astype(numpy.float32)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> numpy.ndarray:
    """Karras et al. (2022, eq. 5) noise levels from sigma_max down to sigma_min. (n,) float64.

    sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0 .. n-1,
    in float64 exactly as diffusers' ``_convert_to_karras`` (``ramp = np.linspace(0, 1, n)``).
    """
    n = check_int("n", n)
    sigma_min = check_real("sigma_min", sigma_min)
    sigma_max = check_real("sigma_max", sigma_max)
    rho = check_real("rho", rho)
    ramp = numpy.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> numpy.ndarray:
    """Log-uniform noise levels exp(linspace(log sigma_max, log sigma_min, n)). (n,) float64 (diffusers)."""
    n = check_int("n", n)
    return numpy.exp(numpy.linspace(math.log(check_real("sigma_max", sigma_max)),
                                    math.log(check_real("sigma_min", sigma_min)), n))


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, alpha: float = 0.6, beta: float = 0.6) -> numpy.ndarray:
    """Noise levels at the quantiles of a Beta(alpha, beta) law (Lee et al. 2024). (n,) float64.

    sigma_i = sigma_min + ppf(1 - i/(n-1)) (sigma_max - sigma_min), as diffusers' ``_convert_to_beta``.
    """
    import scipy.stats  # noqa: PLC0415 - only this option needs SciPy

    n = check_int("n", n)
    sigma_min = check_real("sigma_min", sigma_min)
    sigma_max = check_real("sigma_max", sigma_max)
    ppf = [scipy.stats.beta.ppf(t, alpha, beta) for t in 1 - numpy.linspace(0, 1, n)]
    return numpy.array([sigma_min + (p * (sigma_max - sigma_min)) for p in ppf])


def lu_lambdas(lambda_min: float, lambda_max: float, n: int) -> numpy.ndarray:
    """Uniform log-SNR steps (Lu et al., DPM-Solver): linspace(lambda_max, lambda_min, n). (n,) float64.

    Written as diffusers' ``_convert_to_lu`` (a Karras ramp with rho = 1).
    """
    n = check_int("n", n)
    ramp = numpy.linspace(0, 1, n)
    return lambda_max + ramp * (lambda_min - lambda_max)


def sigma_to_t(sigma, log_sigmas) -> numpy.ndarray:
    """The (fractional) training timestep of noise level ``sigma``: linear interpolation in log sigma.

    ``log_sigmas`` (T,) is log(sigma_t) of the training schedule (increasing in t); ``sigma`` is a
    scalar or array. Finds the bracketing pair (low, low+1) with log_sigmas[low] <= log sigma and
    returns (1 - w) low + w (low + 1), w = (log_sigmas[low] - log sigma)/(log_sigmas[low] -
    log_sigmas[low + 1]) clipped to [0, 1]: diffusers' ``_sigma_to_t``, in float64.
    """
    sigma = numpy.asarray(sigma)
    log_sigmas = numpy.asarray(log_sigmas)
    log_sigma = numpy.log(numpy.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, numpy.newaxis]
    low_idx = numpy.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low = log_sigmas[low_idx]
    high = log_sigmas[high_idx]
    w = (low - log_sigma) / (low - high)
    w = numpy.clip(w, 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)
