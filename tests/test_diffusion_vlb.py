"""The variational bound, its decoders, learned-range variances and the hybrid loss (vlb.py).

Oracles: torch.distributions for Gaussian KL and densities; a torch transcription of
openai/improved-diffusion (losses.py and GaussianDiffusion.p_mean_variance / _vb_terms_bpd /
training_losses / calc_bpd_loop, commit 1e0dceb-derived) differentiated by torch autograd; diffusers'
DDPMScheduler._get_variance for learned_range; float64 central differences; exact properties
(KL(p||p) = 0, KL >= 0, the 256 bin probabilities sum to one, a point-mass data set has zero KL terms).
"""
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler as TorchDDPM
from hypothesis import given
from hypothesis import strategies as st

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.diffusion.forward import posterior_coefficients, q_sample
from npdiffusion.diffusion.objectives import training_target
from npdiffusion.diffusion.vlb import (
    bits_per_dim, discretized_gaussian_log_likelihood_backward, discretized_gaussian_log_likelihood_forward,
    gaussian_log_likelihood_backward, gaussian_log_likelihood_forward, hybrid_loss, learned_range_backward,
    learned_range_forward, normal_kl, normal_kl_backward, normal_kl_forward, prior_bpd, vlb_terms_backward,
    vlb_terms_forward,
)
from npdiffusion.testing import gradcheck_op, noncontiguous, relative_error

T = 40
BETAS = np.linspace(1e-3, 0.2, T)          # short chain: every term matters
ABAR = np.cumprod(1.0 - BETAS)
# Step and floor of the central differences: errors are |num - ana| / max(|num|, |ana|, 1e-4), since a
# directional derivative that nearly cancels (dKL/dlogvar2 near its zero, say) has no meaningful
# relative error; typical derivatives here are 1e-2 .. 1. A 1e-5 step balances rounding and truncation.
GRAD_KW = {"eps": 1e-5, "floor": 1e-4}


# ----------------------------------------------------------------------------- the torch oracle
def th_normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + ((mean1 - mean2) ** 2) * torch.exp(-logvar2))


def th_approx_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def th_discretized_ll(x, means, log_scales):
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = th_approx_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = th_approx_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))


class TorchGaussianDiffusion:
    """improved-diffusion's GaussianDiffusion, reduced to what the bound and the hybrid loss need."""

    def __init__(self, betas, mean_type, var_type):
        self.betas = np.asarray(betas, dtype=np.float64)
        self.T = len(betas)
        self.mean_type, self.var_type = mean_type, var_type
        a = np.cumprod(1.0 - self.betas)
        a_prev = np.append(1.0, a[:-1])
        self.sqrt_a, self.sqrt_1ma = np.sqrt(a), np.sqrt(1 - a)
        self.sqrt_recip, self.sqrt_recipm1 = np.sqrt(1.0 / a), np.sqrt(1.0 / a - 1)
        self.post_var = self.betas * (1.0 - a_prev) / (1.0 - a)
        self.post_logvar_clipped = np.log(np.append(self.post_var[1], self.post_var[1:]))
        self.coef1 = self.betas * np.sqrt(a_prev) / (1.0 - a)
        self.coef2 = (1.0 - a_prev) * np.sqrt(1.0 - self.betas) / (1.0 - a)
        self.log_one_minus_a = np.log(1.0 - a)

    @staticmethod
    def ex(arr, t, shape):
        res = torch.from_numpy(arr)[t]
        return res.reshape((-1,) + (1,) * (len(shape) - 1)).expand(shape)

    def q_posterior(self, x0, xt, t):
        mean = self.ex(self.coef1, t, xt.shape) * x0 + self.ex(self.coef2, t, xt.shape) * xt
        return mean, self.ex(self.post_logvar_clipped, t, xt.shape)

    def p_mean_variance(self, out, x, t, clip_denoised):
        C = x.shape[1]
        if self.var_type in ("learned", "learned_range"):
            out, var_values = torch.split(out, C, dim=1)
            if self.var_type == "learned":
                log_var = var_values
            else:
                min_log = self.ex(self.post_logvar_clipped, t, x.shape)
                max_log = self.ex(np.log(self.betas), t, x.shape)
                frac = (var_values + 1) / 2
                log_var = frac * max_log + (1 - frac) * min_log
        else:
            table = {"fixed_large": np.log(np.append(self.post_var[1], self.betas[1:])),
                     "fixed_small": self.post_logvar_clipped}
            log_var = self.ex(table[self.var_type], t, x.shape)
        if self.mean_type == "sample":
            pred = out
        else:
            pred = self.ex(self.sqrt_recip, t, x.shape) * x - self.ex(self.sqrt_recipm1, t, x.shape) * out
        if clip_denoised:
            pred = pred.clamp(-1, 1)
        mean, _ = self.q_posterior(pred, x, t)
        return mean, log_var

    def vb_terms_bpd(self, out, x0, xt, t, clip_denoised):
        true_mean, true_logvar = self.q_posterior(x0, xt, t)
        mean, log_var = self.p_mean_variance(out, xt, t, clip_denoised)
        kl = th_normal_kl(true_mean, true_logvar, mean, log_var).mean(dim=tuple(range(1, x0.ndim))) / np.log(2.0)
        nll = -th_discretized_ll(x0, mean, 0.5 * log_var).mean(dim=tuple(range(1, x0.ndim))) / np.log(2.0)
        return torch.where(t == 0, nll, kl)

    def hybrid_loss(self, out, x0, xt, noise, t):
        """training_losses with LossType.RESCALED_MSE and a learned variance."""
        C = x0.shape[1]
        mean_out, var_values = torch.split(out, C, dim=1)
        frozen = torch.cat([mean_out.detach(), var_values], dim=1)
        vb = self.vb_terms_bpd(frozen, x0, xt, t, clip_denoised=False) * self.T / 1000.0
        target = noise if self.mean_type == "epsilon" else x0
        mse = ((target - mean_out) ** 2).mean(dim=tuple(range(1, x0.ndim)))
        return (mse + vb).mean()

    def prior_bpd(self, x0):
        t = torch.full((x0.shape[0],), self.T - 1, dtype=torch.long)
        mean = self.ex(self.sqrt_a, t, x0.shape) * x0
        logvar = self.ex(self.log_one_minus_a, t, x0.shape)
        kl = th_normal_kl(mean, logvar, torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
        return kl.mean(dim=tuple(range(1, x0.ndim))) / np.log(2.0)


def image_batch(rng, shape):
    """8-bit data scaled to [-1, 1], including both edge bins."""
    x = rng.integers(0, 256, size=shape).astype(np.float64) / 127.5 - 1.0
    flat = x.reshape(-1)
    flat[:2] = [-1.0, 1.0][:flat.size]
    return x


# ----------------------------------------------------------------------------- Gaussian KL
@given(seed=st.integers(0, 2**16), n=st.integers(1, 20))
def test_normal_kl_is_zero_on_itself_nonnegative_and_matches_torch(backend, seed, n):
    rng = np.random.default_rng(seed)
    m1, m2 = rng.standard_normal(n) * 3, rng.standard_normal(n) * 3
    lv1, lv2 = rng.uniform(-6, 3, n), rng.uniform(-6, 3, n)
    assert np.abs(to_numpy(normal_kl(asarray(m1), asarray(lv1), asarray(m1), asarray(lv1)))).max() < 1e-15
    kl = to_numpy(normal_kl(asarray(m1), asarray(lv1), asarray(m2), asarray(lv2)))
    assert (kl >= 0).all()
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(torch.from_numpy(m1), torch.from_numpy(np.exp(0.5 * lv1))),
        torch.distributions.Normal(torch.from_numpy(m2), torch.from_numpy(np.exp(0.5 * lv2)))).numpy()
    np.testing.assert_allclose(kl, ref, rtol=1e-10, atol=1e-13)


@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), broadcast=st.booleans(),
       seed=st.integers(0, 2**16))
def test_normal_kl_gradcheck(backend, shape, broadcast, seed):
    rng = np.random.default_rng(seed)
    lv_shape = (shape[0],) + (1,) * (len(shape) - 1) if broadcast else tuple(shape)
    inputs = [noncontiguous(rng.standard_normal(shape)), noncontiguous(rng.uniform(-2, 1, lv_shape)),
              noncontiguous(rng.standard_normal(shape)), noncontiguous(rng.uniform(-2, 1, shape))]
    report = gradcheck_op(normal_kl_forward, normal_kl_backward, inputs, full_max=24, **GRAD_KW)
    assert report.passed, report


# ----------------------------------------------------------------------------- decoders
@given(mean=st.floats(-1.2, 1.2), log_scale=st.floats(-5.0, 0.5))
def test_discretized_bins_sum_to_one(backend, mean, log_scale):
    """The 256 bins tile the real line (edges at the midpoints, the end bins open), so the
    probabilities telescope to one; the 1e-12 clamp can only add mass."""
    x = np.arange(256) / 127.5 - 1.0
    logp, _ = discretized_gaussian_log_likelihood_forward(asarray(x), asarray(np.full(256, mean)),
                                                          asarray(np.full(256, log_scale)))
    total = np.exp(to_numpy(logp)).sum()
    assert 1.0 - 1e-12 < total < 1.0 + 256 * 1e-12


def test_discretized_log_likelihood_matches_improved_diffusion(backend):
    rng = np.random.default_rng(0)
    x = image_batch(rng, (3, 2, 4, 4))
    means = x + 0.05 * rng.standard_normal(x.shape)
    log_scales = rng.uniform(-4, -1, x.shape)
    ours, _ = discretized_gaussian_log_likelihood_forward(asarray(x), asarray(means), asarray(log_scales))
    ref = th_discretized_ll(*(torch.from_numpy(a) for a in (x, means, log_scales))).numpy()
    assert relative_error(ours, ref) < 1e-12


@given(seed=st.integers(0, 2**16), shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       broadcast=st.booleans())
def test_discretized_log_likelihood_gradcheck(backend, seed, shape, broadcast):
    rng = np.random.default_rng(seed)
    x = image_batch(rng, shape)
    means = x + 0.03 * rng.standard_normal(shape)
    ls_shape = (shape[0],) + (1,) * (len(shape) - 1) if broadcast else tuple(shape)
    log_scales = rng.uniform(-3.5, -1.5, ls_shape)
    report = gradcheck_op(discretized_gaussian_log_likelihood_forward, discretized_gaussian_log_likelihood_backward,
                          [asarray(x), noncontiguous(means), noncontiguous(log_scales)], grad_inputs=[1, 2],
                          # floor 1e-3: for bins far in a tail the log-likelihood itself loses ~1e-11
                          # to cancellation, so directional derivatives below 1e-3 are round-off in
                          # central differences (seed 800, shape (2, 3): 4e-6 at floor 1e-4).
                          full_max=24, eps=GRAD_KW["eps"], floor=1e-3)
    assert report.passed, report


def test_gaussian_log_likelihood_matches_torch_and_gradcheck(backend):
    rng = np.random.default_rng(1)
    x, m, ls = rng.standard_normal((3, 4)), rng.standard_normal((3, 4)), rng.uniform(-2, 1, (3, 1))
    ours, _ = gaussian_log_likelihood_forward(asarray(x), asarray(m), asarray(ls))
    ref = torch.distributions.Normal(torch.from_numpy(m), torch.from_numpy(np.exp(ls))).log_prob(torch.from_numpy(x))
    assert relative_error(ours, ref.numpy()) < 1e-12
    report = gradcheck_op(gaussian_log_likelihood_forward, gaussian_log_likelihood_backward,
                          [noncontiguous(x), noncontiguous(m), asarray(ls)], full_max=12, **GRAD_KW)
    assert report.passed, report


# ----------------------------------------------------------------------------- learned range
def test_learned_range_matches_diffusers_ddpm(backend):
    sched = TorchDDPM(num_train_timesteps=1000, beta_schedule="linear", variance_type="learned_range")
    for name in ("betas", "alphas", "alphas_cumprod"):
        setattr(sched, name, getattr(sched, name).double())
    abar = sched.alphas_cumprod.numpy()
    v = np.random.default_rng(2).uniform(-1, 1, (1, 3, 2, 2))
    for t in (1, 2, 500, 999):        # t = 0: diffusers clamps betatilde_0 = 0 at 1e-20, DDPM clips to betatilde_1
        theirs = sched._get_variance(t, predicted_variance=torch.from_numpy(v)).numpy()
        ours, _ = learned_range_forward(asarray(v), t, abar)
        assert relative_error(ours, theirs) < 1e-9


@given(seed=st.integers(0, 2**16), b=st.integers(1, 4))
def test_learned_range_gradcheck(backend, seed, b):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, T, size=b)
    # Linear in v: central differences are exact for any step, and a large one avoids rounding.
    report = gradcheck_op(lambda v: learned_range_forward(v, t, ABAR), learned_range_backward,
                          [noncontiguous(rng.uniform(-1, 1, (b, 2, 3)))], full_max=24, eps=1e-2)
    assert report.passed, report


# ----------------------------------------------------------------------------- vlb terms
def vlb_case(seed, prediction_type, variance_type, b=4, c=2, side=3, t=None):
    rng = np.random.default_rng(seed)
    x0 = image_batch(rng, (b, c, side, side))
    noise = rng.standard_normal(x0.shape)
    t = np.array([0, 1, 17, T - 1][:b]) if t is None else t
    xt = to_numpy(q_sample(asarray(x0), t, ABAR, asarray(noise)))
    guess = noise if prediction_type == "epsilon" else x0
    mean_out = guess + 0.1 * rng.standard_normal(x0.shape)
    out = mean_out
    if variance_type in ("learned", "learned_range"):
        var_part = rng.uniform(-0.9, 0.9, x0.shape)
        if variance_type == "learned":
            var_part = posterior_coefficients(ABAR).log_variance_clipped[t].reshape(-1, 1, 1, 1) + 0.3 * var_part
        out = np.concatenate([mean_out, var_part], axis=1)
    return out, x0, xt, noise, t


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned", "learned_range"])
@pytest.mark.parametrize("clip_denoised", [False, True])
def test_vlb_terms_match_improved_diffusion_with_autograd(backend, prediction_type, variance_type, clip_denoised):
    out, x0, xt, _, t = vlb_case(7, prediction_type, variance_type)
    oracle = TorchGaussianDiffusion(BETAS, prediction_type, variance_type)
    out_t = torch.from_numpy(out).requires_grad_(True)
    ref = oracle.vb_terms_bpd(out_t, torch.from_numpy(x0), torch.from_numpy(xt), torch.from_numpy(t), clip_denoised)
    dbits = np.random.default_rng(8).standard_normal(ref.shape)
    (ref * torch.from_numpy(dbits)).sum().backward()
    ours, cache = vlb_terms_forward(asarray(out), asarray(x0), asarray(xt), t, ABAR, prediction_type,
                                   variance_type, clip_denoised=clip_denoised)
    assert relative_error(ours, ref.detach().numpy()) < 1e-10
    grad = vlb_terms_backward(asarray(dbits), cache)[0]
    assert relative_error(grad, out_t.grad.numpy()) < 1e-10


# Central differences need a well-conditioned chain: on a long fine chain log beta - log betatilde
# (the learned-range slope) is ~1e-3 at large t, so the variance head's derivatives drown in rounding.
# The fine chain is covered to 1e-10 by the autograd comparison above. Six coarse steps instead:
GRAD_BETAS = np.linspace(0.05, 0.6, 6)
GRAD_ABAR = np.cumprod(1.0 - GRAD_BETAS)


def grad_case(seed, prediction_type, variance_type, t):
    """Model outputs near the truth (x0_hat within ~ the decoder's std at t = 0), variance heads
    anywhere in their range."""
    rng = np.random.default_rng(seed)
    x0 = image_batch(rng, (t.size, 2, 2, 2))
    noise = rng.standard_normal(x0.shape)
    xt = to_numpy(q_sample(asarray(x0), t, GRAD_ABAR, asarray(noise)))
    a, s = (np.sqrt(v)[t].reshape(-1, 1, 1, 1) for v in (GRAD_ABAR, 1.0 - GRAD_ABAR))
    truth = {"epsilon": noise, "sample": x0, "v_prediction": a * noise - s * x0}[prediction_type]
    out = truth + 0.1 * rng.standard_normal(x0.shape)
    if variance_type in ("learned", "learned_range"):
        v = rng.uniform(-1, 1, x0.shape)
        if variance_type == "learned":
            v = v + posterior_coefficients(GRAD_ABAR).log_variance_clipped[t].reshape(-1, 1, 1, 1)
        out = np.concatenate([out, v], axis=1)
    return out, x0, xt, noise


@given(prediction_type=st.sampled_from(["epsilon", "sample", "v_prediction"]),
       variance_type=st.sampled_from(["fixed_small", "fixed_large", "learned", "learned_range"]),
       decoder=st.sampled_from(["discretized", "gaussian"]), seed=st.integers(0, 2**16),
       t=st.lists(st.integers(0, 5), min_size=1, max_size=4))
def test_vlb_terms_gradcheck(backend, prediction_type, variance_type, decoder, seed, t):
    t = np.array(t)
    out, x0, xt, _ = grad_case(seed, prediction_type, variance_type, t)

    def forward(o):
        return vlb_terms_forward(o, asarray(x0), asarray(xt), t, GRAD_ABAR, prediction_type, variance_type, decoder)

    report = gradcheck_op(forward, vlb_terms_backward, [noncontiguous(out)], grad_inputs=[0], full_max=64, **GRAD_KW)
    assert report.passed, report


def test_hybrid_loss_matches_improved_diffusion(backend):
    for prediction_type in ("epsilon", "sample"):
        out, x0, xt, noise, t = vlb_case(9, prediction_type, "learned_range")
        oracle = TorchGaussianDiffusion(BETAS, prediction_type, "learned_range")
        out_t = torch.from_numpy(out).requires_grad_(True)
        ref = oracle.hybrid_loss(out_t, *(torch.from_numpy(a) for a in (x0, xt, noise, t)))
        ref.backward()
        # improved-diffusion's RESCALED_MSE multiplies the vb term by T/1000: lambda = 1e-3.
        loss, grad = hybrid_loss(asarray(out), asarray(x0), asarray(xt), asarray(noise), t, ABAR, prediction_type,
                                 lambda_vlb=1e-3)
        assert relative_error(loss, ref.detach().numpy()) < 1e-10
        assert relative_error(grad, out_t.grad.numpy()) < 1e-10


@given(seed=st.integers(0, 2**16), lam=st.sampled_from([0.0, 1e-3, 0.5]),
       prediction_type=st.sampled_from(["epsilon", "sample", "v_prediction"]))
def test_hybrid_loss_gradcheck_and_stop_gradient(backend, seed, lam, prediction_type):
    """The hybrid gradient is the gradient of the surrogate with the mean frozen inside the vlb term:
    f(o) = mse(o_mean) + lambda T mean_b L_t([m0 | o_var]), m0 the mean half at the checked point."""
    t = np.array([0, 2, 5])
    out, x0, xt, noise = grad_case(seed, prediction_type, "learned_range", t)
    c = x0.shape[1]
    m0 = out[:, :c].copy()
    data = (asarray(x0), asarray(xt))
    target = to_numpy(training_target(*(asarray(a) for a in (x0, noise)), t, GRAD_ABAR, prediction_type))
    n_steps = GRAD_ABAR.size

    def surrogate(o):
        mse = ((to_numpy(o)[:, :c] - target) ** 2).mean()
        frozen = asarray(np.concatenate([m0, to_numpy(o)[:, c:]], axis=1))
        vb, _ = vlb_terms_forward(frozen, *data, t, GRAD_ABAR, prediction_type, "learned_range")
        return asarray(mse + lam * n_steps * to_numpy(vb).mean()), None

    loss, grad = hybrid_loss(asarray(out), *data, asarray(noise), t, GRAD_ABAR, prediction_type, lam)
    assert abs(float(loss) - float(surrogate(asarray(out))[0])) < 1e-13
    report = gradcheck_op(surrogate, lambda d, _: d * grad, [noncontiguous(out)], full_max=48, **GRAD_KW)
    assert report.passed, report
    # The mean half gets exactly the MSE gradient whatever lambda is: the vlb term does not reach it.
    mse_grad = 2.0 * (out[:, :c] - target) / target.size
    np.testing.assert_allclose(to_numpy(grad)[:, :c], mse_grad, rtol=1e-13)


# ----------------------------------------------------------------------------- the whole bound
def test_bits_per_dim_matches_improved_diffusion_calc_bpd_loop(backend):
    rng = np.random.default_rng(11)
    x0 = image_batch(rng, (2, 1, 3, 3))
    w = rng.standard_normal((2, 2)) * 0.3

    def model(x, t):                                # any deterministic function of (x_t, t) will do
        mix = np.einsum("oc,bc...->bo...", w, to_numpy(x)) * (1 + t.reshape(-1, 1, 1, 1) / T)
        return asarray(np.concatenate([to_numpy(x), np.tanh(mix[:, :1])], axis=1))

    ours = bits_per_dim(model, asarray(x0), ABAR, np.random.default_rng(5), variance_type="learned_range")
    oracle = TorchGaussianDiffusion(BETAS, "epsilon", "learned_range")
    noise_rng = np.random.default_rng(5)
    vb = np.zeros((2, T))
    for step in range(T - 1, -1, -1):
        t = np.full(2, step)
        xt = to_numpy(q_sample(asarray(x0), t, ABAR, asarray(noise_rng.standard_normal(x0.shape))))
        vb[:, step] = oracle.vb_terms_bpd(torch.from_numpy(to_numpy(model(asarray(xt), t))), torch.from_numpy(x0),
                                          torch.from_numpy(xt), torch.from_numpy(t), True).numpy()
    prior = oracle.prior_bpd(torch.from_numpy(x0)).numpy()
    np.testing.assert_allclose(ours["vb"], vb, rtol=1e-10)
    np.testing.assert_allclose(ours["prior_bpd"], prior, rtol=1e-10)
    np.testing.assert_allclose(ours["total_bpd"], vb.sum(axis=1) + prior, rtol=1e-10)


def test_point_mass_data_with_the_exact_model_has_zero_kl_terms(backend):
    """Data = one image x*. The exact denoiser predicts x0 = x*, so for t >= 1 the model's mean and
    fixed_small variance equal the posterior's: every KL term is 0, and the bound is the prior term
    plus the decoder's -log P(bin of x* | N(x*, betatilde_1)), known in closed form."""
    rng = np.random.default_rng(12)
    x_star = image_batch(rng, (1, 3, 4, 4))
    x0 = np.repeat(x_star, 3, axis=0)
    res = bits_per_dim(lambda x, t: asarray(x0), asarray(x0), ABAR, np.random.default_rng(0),
                       prediction_type="sample", variance_type="fixed_small")
    assert np.abs(res["vb"][:, 1:]).max() < 1e-12
    half_bin = torch.tensor(1.0 / 255.0 / np.sqrt(posterior_coefficients(ABAR).variance[1]), dtype=torch.float64)
    p_inner = float(th_approx_cdf(half_bin) - th_approx_cdf(-half_bin))
    p_edge = float(th_approx_cdf(half_bin))      # the end bins are open: P = Phi(half bin)
    edge = np.abs(x_star) > 0.999
    expected = -np.where(edge, np.log(p_edge), np.log(p_inner)).mean() / np.log(2.0)
    np.testing.assert_allclose(res["vb"][:, 0], expected, rtol=1e-12)
    np.testing.assert_allclose(res["total_bpd"], res["prior_bpd"] + expected, rtol=1e-12)
    np.testing.assert_allclose(res["prior_bpd"], to_numpy(prior_bpd(asarray(x0), ABAR)), rtol=1e-12)


def test_float32_stays_float32_and_agrees_with_float64(backend):
    for variance_type in ("fixed_small", "learned_range"):
        out, x0, xt, noise, t = vlb_case(3, "epsilon", variance_type)
        ours64, cache64 = vlb_terms_forward(asarray(out), asarray(x0), asarray(xt), t, ABAR,
                                            variance_type=variance_type)
        f32 = [asarray(a.astype(np.float32)) for a in (out, x0, xt)]
        ours32, cache32 = vlb_terms_forward(*f32, t, ABAR, variance_type=variance_type)
        dbits = np.linspace(0.5, 1.5, t.size)
        g64 = vlb_terms_backward(asarray(dbits), cache64)[0]
        g32 = vlb_terms_backward(asarray(dbits.astype(np.float32)), cache32)[0]
        assert ours32.dtype == np.float32 and g32.dtype == np.float32
        assert relative_error(ours32, ours64) < 1e-4 and relative_error(g32, g64) < 1e-4
    loss, grad = hybrid_loss(*f32, asarray(noise.astype(np.float32)), t, ABAR)
    assert loss.dtype == np.float32 and grad.dtype == np.float32


def test_clear_errors(backend):
    out, x0, xt, noise, t = vlb_case(0, "epsilon", "fixed_small")
    with pytest.raises(ValueError, match=r"model_output must have shape \(4, 4, 3, 3\) \(mean and variance halves"):
        vlb_terms_forward(asarray(out), asarray(x0), asarray(xt), t, ABAR, variance_type="learned_range")
    with pytest.raises(ValueError, match="variance_type must be one of"):
        vlb_terms_forward(asarray(out), asarray(x0), asarray(xt), t, ABAR, variance_type="small")
    with pytest.raises(ValueError, match="decoder must be one of"):
        vlb_terms_forward(asarray(out), asarray(x0), asarray(xt), t, ABAR, decoder="logistic")
    with pytest.raises(ValueError, match="variance_type must be 'learned' or 'learned_range' for the hybrid loss"):
        hybrid_loss(asarray(out), asarray(x0), asarray(xt), asarray(noise), t, ABAR, variance_type="fixed_small")
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        bits_per_dim(lambda x, t: x, asarray(x0), ABAR, rng=0)
