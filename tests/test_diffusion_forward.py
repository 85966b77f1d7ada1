"""Forward process, posterior and prediction-type conversions (npdiffusion/diffusion/forward.py,
parameterization.py).

Oracles: the chain of one-step transitions composed by hand; Gaussian conditioning of the joint
(x_{t-1}, x_t | x_0) computed with the generic block formula; diffusers' DDPMScheduler (add_noise,
get_velocity, step, _get_variance) and DDIMScheduler (_get_variance); Monte-Carlo moments.
"""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler as TorchDDIM
from diffusers import DDPMScheduler as TorchDDPM
from hypothesis import given
from hypothesis import strategies as st

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.diffusion.forward import (
    posterior_coefficients, q_mean_variance, q_posterior_mean_variance, q_sample, q_step,
    q_step_mean_variance,
)
from npdiffusion.diffusion.parameterization import (
    PREDICTION_TYPES, convert, convert_backward, convert_forward, velocity,
)
from npdiffusion.schedulers.ddim import DDIMScheduler
from npdiffusion.testing import gradcheck_op, noncontiguous, relative_error

betas_strategy = st.lists(st.floats(1e-4, 0.6), min_size=2, max_size=12)


def linear_betas(T=1000, start=1e-4, end=0.02):
    return np.linspace(start, end, T, dtype=np.float64)


def value(c, b):
    """A gathered coefficient (float or (B, 1, ...) array) as a host array of shape (b,)."""
    return np.broadcast_to(np.asarray(to_numpy(c), dtype=np.float64).reshape(-1), (b,))


# ----------------------------------------------------------------------------- the marginal
@given(betas=betas_strategy, seed=st.integers(0, 2**16))
def test_marginal_equals_composed_one_step_transitions(backend, betas, seed):
    """Pushing a Gaussian N(m, v) through q(x_t | x_{t-1}) step by step gives q(x_t | x_0)."""
    betas = np.asarray(betas)
    abar = np.cumprod(1.0 - betas)
    x0 = asarray(np.random.default_rng(seed).standard_normal((3, 2, 2)))
    mean, var = x0, 0.0                     # x_{-1} = x0 exactly
    for t in range(betas.size):
        mean, step_var = q_step_mean_variance(mean, t, betas)           # linear in its input
        var = (1.0 - betas[t]) * var + value(step_var, 3)[0]             # Var(a X + noise)
        m_closed, v_closed, lv_closed = q_mean_variance(x0, t, abar)
        assert relative_error(mean, m_closed) < 1e-12
        assert abs(var - value(v_closed, 3)[0]) <= 1e-12 * max(var, 1e-300)
        assert abs(np.log(var) - value(lv_closed, 3)[0]) < 1e-10


def test_q_step_uses_the_standard_deviation_not_the_variance(backend):
    """The slip docs/diffusion.md warns about: noise is scaled by sqrt(beta), not beta."""
    betas = np.array([0.09, 0.25])
    x = asarray(np.zeros((4, 3)))
    ones = asarray(np.ones((4, 3)))
    np.testing.assert_allclose(to_numpy(q_step(x, 1, betas, ones)), 0.5)        # sqrt(0.25)
    np.testing.assert_allclose(to_numpy(q_step(x + 1.0, 0, betas, ones)), np.sqrt(0.91) + 0.3)


def test_q_step_chain_and_q_sample_have_the_same_moments(backend):
    """Monte Carlo: x_t by t one-step draws and by one marginal draw agree in mean and variance."""
    rng = np.random.default_rng(5)
    betas = linear_betas(40, 1e-3, 0.2)
    abar = np.cumprod(1.0 - betas)
    n = 40000
    x0 = asarray(np.full((n, 1), 1.5))
    x = x0
    for t in range(betas.size):
        x = q_step(x, t, betas, asarray(rng.standard_normal((n, 1))))
    direct = q_sample(x0, betas.size - 1, abar, asarray(rng.standard_normal((n, 1))))
    for sample in (to_numpy(x), to_numpy(direct)):
        m, v = sample.mean(), sample.var(ddof=1)
        se_m, se_v = np.sqrt((1 - abar[-1]) / n), (1 - abar[-1]) * np.sqrt(2.0 / n)
        assert abs(m - 1.5 * np.sqrt(abar[-1])) < 5 * se_m
        assert abs(v - (1 - abar[-1])) < 5 * se_v


def test_q_sample_and_velocity_match_diffusers(backend):
    sched = TorchDDPM(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                      beta_end=0.012)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    abar = sched.alphas_cumprod.numpy()
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((4, 3, 5, 5)), rng.standard_normal((4, 3, 5, 5))
    t = np.array([0, 17, 500, 999])
    theirs = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    ours = q_sample(asarray(x0), t, abar, asarray(noise))
    assert relative_error(ours, theirs) < 1e-12
    theirs_v = sched.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    assert relative_error(velocity(asarray(x0), asarray(noise), t, abar), theirs_v) < 1e-12


def test_float32_samples_stay_float32(backend):
    abar = np.cumprod(1.0 - linear_betas(10))
    x = asarray(np.ones((2, 3), dtype=np.float32))
    assert q_sample(x, np.array([1, 2]), abar, x).dtype == np.float32
    assert q_sample(x, 3, abar, x).dtype == np.float32
    assert q_posterior_mean_variance(x, x, np.array([1, 2]), abar)[0].dtype == np.float32
    assert convert(x, x, 4, abar, "epsilon", "v_prediction").dtype == np.float32


# ----------------------------------------------------------------------------- the posterior
def gaussian_condition(mu, cov, x2):
    """Mean and covariance of block 1 given block 2 = x2 for a joint N(mu, cov) (generic formula)."""
    s11, s12, s22 = cov[:1, :1], cov[:1, 1:], cov[1:, 1:]
    gain = s12 @ np.linalg.inv(s22)
    return mu[0] + (gain @ (x2 - mu[1:]))[0], (s11 - gain @ s12.T)[0, 0]


@given(betas=betas_strategy, seed=st.integers(0, 2**16), data=st.data())
def test_posterior_equals_joint_gaussian_conditioning(backend, betas, seed, data):
    betas = np.asarray(betas)
    abar = np.cumprod(1.0 - betas)
    t = data.draw(st.integers(1, betas.size - 1))
    rng = np.random.default_rng(seed)
    x0, xt = rng.standard_normal(5), rng.standard_normal(5)
    mean, var, logvar = q_posterior_mean_variance(asarray(x0), asarray(xt), t, abar)
    # Joint of (x_{t-1}, x_t) given x0, built from the two transitions, then conditioned on x_t.
    v1 = 1.0 - abar[t - 1]
    cov = np.array([[v1, np.sqrt(1 - betas[t]) * v1],
                    [np.sqrt(1 - betas[t]) * v1, (1 - betas[t]) * v1 + betas[t]]])
    for i in range(5):
        mu = np.array([np.sqrt(abar[t - 1]) * x0[i], np.sqrt(abar[t]) * x0[i]])
        m_ref, v_ref = gaussian_condition(mu, cov, np.array([xt[i]]))
        assert abs(to_numpy(mean)[i] - m_ref) <= 1e-12 * max(1.0, abs(m_ref))
        assert abs(value(var, 5)[i] - v_ref) <= 1e-9 * v_ref       # the oracle cancels
        assert abs(value(logvar, 5)[i] - np.log(v_ref)) < 1e-9


def test_posterior_at_the_first_step_returns_x0_and_clips_the_log_variance(backend):
    betas = linear_betas(20)
    abar = np.cumprod(1.0 - betas)
    x0, xt = asarray(np.array([[0.3, -0.7]])), asarray(np.array([[2.0, 1.0]]))
    mean, var, logvar = q_posterior_mean_variance(x0, xt, 0, abar)
    np.testing.assert_allclose(to_numpy(mean), to_numpy(x0), rtol=1e-14)
    assert var == 0.0
    post = posterior_coefficients(abar)
    assert logvar == pytest.approx(np.log(post.variance[1]), rel=1e-14)


@given(seed=st.integers(0, 2**16), n=st.integers(2, 30))
def test_ddim_eta_one_variance_is_ddpm_fixed_small(n, seed):
    """For any strided chain abar_prev -> abar, the DDPM posterior variance equals DDIM's
    sigma^2 at eta = 1: (1 - a_prev)/(1 - a_t) (1 - a_t/a_prev)."""
    abar = np.cumprod(1.0 - linear_betas())
    rng = np.random.default_rng(seed)
    ts = np.sort(rng.choice(np.arange(1, 1000), size=n, replace=False))
    prev = np.append(0, ts[:-1])
    a, a_prev = abar[ts], abar[prev]
    post = posterior_coefficients(a, a_prev)
    ddim = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    np.testing.assert_allclose(post.variance, ddim, rtol=1e-12)
    # ... and with that sigma the DDIM mean sqrt(a') x0 + sqrt(1 - a' - sigma^2) (x_t - sqrt(a) x0)/sqrt(1 - a)
    # is the posterior mean: the coefficients of x0 and of x_t agree.
    eps_coef = np.sqrt(1 - a_prev - ddim) / np.sqrt(1 - a)
    np.testing.assert_allclose(post.coef_xt, eps_coef, rtol=1e-9)
    np.testing.assert_allclose(post.coef_x0, np.sqrt(a_prev) - eps_coef * np.sqrt(a), rtol=1e-7, atol=1e-12)


def test_ddim_variance_matches_diffusers_ddim_scheduler():
    sched = TorchDDIM(num_train_timesteps=1000, beta_schedule="linear", set_alpha_to_one=False)
    sched.set_timesteps(50)
    abar = sched.alphas_cumprod.double().numpy()
    ts = sched.timesteps.numpy()
    prev = ts - 1000 // 50
    a = abar[ts]
    a_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], float(sched.final_alpha_cumprod))
    post = posterior_coefficients(a, a_prev)
    theirs = np.array([float(sched._get_variance(int(t), int(p))) for t, p in zip(ts, prev)])
    np.testing.assert_allclose(post.variance, theirs, rtol=2e-5)     # diffusers computes in float32
    assert float(sched._get_variance(487, 486)) == pytest.approx(0.00979, abs=1e-5)


def test_ddim_variance_matches_our_ddim_scheduler():
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(25)
    abar = np.asarray(sched.alphas_cumprod, dtype=np.float64)
    ts = np.asarray(sched.timesteps)
    prev = ts - 1000 // 25
    a_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], float(sched.final_alpha_cumprod))
    post = posterior_coefficients(abar[ts], a_prev)
    ours = np.array([float(sched._get_variance(int(t), int(p))) for t, p in zip(ts, prev)])
    np.testing.assert_allclose(post.variance, ours, rtol=2e-5)        # the scheduler works in float32


def test_posterior_mean_matches_diffusers_ddpm_step(backend):
    """The DDPM step: posterior mean at x0_hat = (x_t - sqrt(1-abar) eps)/sqrt(abar), fixed_small std."""
    sched = TorchDDPM(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.betas = sched.betas.double()
    sched.alphas = sched.alphas.double()
    abar = sched.alphas_cumprod.numpy()
    rng = np.random.default_rng(1)
    x, eps = rng.standard_normal((2, 3, 4, 4)), rng.standard_normal((2, 3, 4, 4))
    for t in (0, 1, 250, 999):
        g = torch.Generator().manual_seed(7)
        theirs = sched.step(torch.from_numpy(eps), t, torch.from_numpy(x), generator=g).prev_sample.numpy()
        x0_hat = convert(asarray(eps), asarray(x), t, abar, "epsilon", "sample")
        mean, var, _ = q_posterior_mean_variance(x0_hat, asarray(x), t, abar)
        if t > 0:
            z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).numpy()
            theirs = theirs - np.sqrt(var) * z
        assert relative_error(mean, theirs) < 1e-10


# ----------------------------------------------------------------------------- conversions
@given(seed=st.integers(0, 2**16), src=st.sampled_from(PREDICTION_TYPES), dst=st.sampled_from(PREDICTION_TYPES))
def test_conversions_agree_with_the_truth_and_round_trip(backend, seed, src, dst):
    rng = np.random.default_rng(seed)
    abar = np.cumprod(1.0 - linear_betas())
    t = rng.integers(0, 1000, size=3)
    x0, eps = asarray(rng.standard_normal((3, 2, 3))), asarray(rng.standard_normal((3, 2, 3)))
    xt = q_sample(x0, t, abar, eps)
    truth = {"epsilon": eps, "sample": x0, "v_prediction": velocity(x0, eps, t, abar)}
    y = convert(truth[src], xt, t, abar, src, dst)
    assert relative_error(y, truth[dst]) < 1e-7     # abar near 1 at t = 0 amplifies rounding
    back = convert(y, xt, t, abar, dst, src)
    assert relative_error(back, truth[src]) < 1e-7


@given(src=st.sampled_from(PREDICTION_TYPES), dst=st.sampled_from(PREDICTION_TYPES),
       lead=st.integers(1, 4), c=st.integers(1, 3), scalar_t=st.booleans())
def test_conversion_gradcheck(backend, src, dst, lead, c, scalar_t):
    rng = np.random.default_rng(lead * 10 + c)
    abar = np.cumprod(1.0 - linear_betas(30, 1e-3, 0.1))
    t = 11 if scalar_t else rng.integers(0, 30, size=lead)
    out = noncontiguous(rng.standard_normal((lead, c, 2)))
    xt = noncontiguous(rng.standard_normal((lead, c, 2)))
    report = gradcheck_op(lambda o, x: convert_forward(o, x, t, abar, src, dst), convert_backward,
                          [out, xt], full_max=24)
    assert report.passed, report


# ----------------------------------------------------------------------------- errors
def test_clear_errors(backend):
    abar = np.cumprod(1.0 - linear_betas(10))
    x = asarray(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"t must be in \[0, 10\), got 10"):
        q_sample(x, 10, abar, x)
    with pytest.raises(TypeError, match="t must be an integer array, got dtype float64"):
        q_sample(x, np.array([1.0, 2.0]), abar, x)
    with pytest.raises(ValueError, match=r"t must have one timestep per sample \(2\), got shape \(3,\)"):
        q_sample(x, np.array([1, 2, 3]), abar, x)
    with pytest.raises(ValueError, match=r"noise must have the shape of x0 \(2, 3\), got \(2, 4\)"):
        q_sample(x, 1, abar, asarray(np.zeros((2, 4))))
    with pytest.raises(ValueError,
                       match=r"alphas_cumprod must have entries in \[0, 1\], got alphas_cumprod\[0\] = 1.5"):
        q_sample(x, 1, np.array([1.5, 0.5]), x)
    with pytest.raises(ValueError, match="from_type must be one of"):
        convert(x, x, 1, abar, "eps", "sample")
    with pytest.raises(TypeError, match="x0 must be a floating array"):
        q_sample(asarray(np.zeros((2, 3), dtype=np.int64)), 1, abar, x)
