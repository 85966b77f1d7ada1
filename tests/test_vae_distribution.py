"""DiagonalGaussianDistribution: values against diffusers' class (clamp bounds included), every
backward helper against torch autograd and against float64 central differences, torch-identical
sampling from a TorchGenerator, the deterministic mode, and errors."""
import numpy as np
import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as TorchDistribution
from hypothesis import given
from hypothesis import strategies as st

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.models.vae.distribution import DiagonalGaussianDistribution
from npdiffusion.random.torch_generator import TorchGenerator
from npdiffusion.testing import gradcheck_op, noncontiguous, relative_error
from parity import TORCH_NORMAL_KERNEL, torch_threads


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """torch on one thread for these tiny models (see vae_parity.torch_threads)."""
    with torch_threads(1):
        yield


def _moments(rng, shape, spread=3.0, clamp_cases=True):
    """(B, 2L, h, w) moments; with ``clamp_cases`` some log-variances lie beyond and exactly on the bounds."""
    p = rng.standard_normal(shape)
    latent = shape[1] // 2
    p[:, latent:] *= spread
    if clamp_cases:
        flat = p[:, latent:].reshape(-1)
        flat[:6] = [-30.0, 20.0, -45.0, 33.0, -30.5, 20.25]                # on and beyond both bounds
        p[:, latent:] = flat.reshape(p[:, latent:].shape)
    return p


def test_values_match_diffusers(backend):
    rng = np.random.default_rng(0)
    p, other_p = _moments(rng, (2, 6, 3, 4)), _moments(rng, (2, 6, 3, 4), clamp_cases=False)
    sample = rng.standard_normal((2, 3, 3, 4))
    noise = rng.standard_normal((2, 3, 3, 4))
    ours, other = DiagonalGaussianDistribution(asarray(p)), DiagonalGaussianDistribution(asarray(other_p))
    theirs, t_other = TorchDistribution(torch.tensor(p)), TorchDistribution(torch.tensor(other_p))
    pairs = {"mean": (ours.mean, theirs.mean), "logvar": (ours.logvar, theirs.logvar), "std": (ours.std, theirs.std),
             "var": (ours.var, theirs.var), "mode": (ours.mode(), theirs.mode()), "kl": (ours.kl(), theirs.kl()),
             "kl_other": (ours.kl(other), theirs.kl(t_other)),
             "nll": (ours.nll(asarray(sample)), theirs.nll(torch.tensor(sample))),
             "nll_dims": (ours.nll(asarray(sample), dims=(1, 3)), theirs.nll(torch.tensor(sample), dims=[1, 3])),
             "sample": (ours.sample(asarray(noise)), theirs.mean + theirs.std * torch.tensor(noise))}
    for name, (o, t) in pairs.items():
        assert relative_error(o, t.numpy()) <= 1e-14, name
    assert to_numpy(ours.logvar).min() == -30.0 and to_numpy(ours.logvar).max() == 20.0


def test_sample_from_a_torch_generator_equals_diffusers(backend):
    """The noise is torch's draw bit for bit; the sample equals diffusers' to float32 rounding (exp
    differs between libm and torch's vectorized kernel by an ulp)."""
    p = _moments(np.random.default_rng(1), (2, 8, 5, 6), clamp_cases=False).astype(np.float32)
    shape = (2, 4, 5, 6)
    def gen(seed):
        return TorchGenerator(seed, kernel=TORCH_NORMAL_KERNEL)
    assert np.array_equal(to_numpy(DiagonalGaussianDistribution(asarray(p)).draw_noise(gen(123))),
                          torch.randn(shape, generator=torch.Generator().manual_seed(123)).numpy())
    theirs = TorchDistribution(torch.tensor(p)).sample(generator=torch.Generator().manual_seed(123)).numpy()
    ours = DiagonalGaussianDistribution(asarray(p)).sample(generator=gen(123))
    assert ours.dtype == np.float32
    assert relative_error(ours, theirs) <= 1e-6
    per_item = DiagonalGaussianDistribution(asarray(p)).sample(generator=[gen(1), gen(2)])
    t_item = TorchDistribution(torch.tensor(p)).sample(generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
    assert relative_error(per_item, t_item.numpy()) <= 1e-6

def test_backward_helpers_match_torch_autograd(backend):
    """L = <g_z, sample(noise)> + <g_kl, kl()> + <g_nll, nll(s)> + <g_m, mode()>: the gradient of L with
    respect to the moments (through the clamp) and to s, against torch autograd, float64."""
    rng = np.random.default_rng(2)
    p = _moments(rng, (3, 4, 2, 5))
    noise, s = rng.standard_normal((3, 2, 2, 5)), rng.standard_normal((3, 2, 2, 5))
    g_z, g_m, g_kl, g_nll = rng.standard_normal((3, 2, 2, 5)), rng.standard_normal((3, 2, 2, 5)), \
        rng.standard_normal(3), rng.standard_normal(3)
    tp, ts = torch.tensor(p, requires_grad=True), torch.tensor(s, requires_grad=True)
    t = TorchDistribution(tp)
    loss = ((t.mean + t.std * torch.tensor(noise)) * torch.tensor(g_z)).sum() + (t.kl() * torch.tensor(g_kl)).sum() \
        + (t.nll(ts) * torch.tensor(g_nll)).sum() + (t.mode() * torch.tensor(g_m)).sum()
    loss.backward()

    d = DiagonalGaussianDistribution(asarray(p))
    gm1, gl1 = d.sample_backward(asarray(g_z), asarray(noise))
    gm2, gl2 = d.kl_backward(asarray(g_kl))
    gm3, gl3, gs = d.nll_backward(asarray(g_nll), asarray(s))
    dp = d.parameters_backward(gm1 + gm2 + gm3 + asarray(g_m), gl1 + gl2 + gl3)
    assert relative_error(dp, tp.grad.numpy()) <= 1e-12
    assert relative_error(gs, ts.grad.numpy()) <= 1e-12
    clamped = ~((p[:, 2:] >= -30) & (p[:, 2:] <= 20))
    assert clamped.sum() == 4 and np.all(to_numpy(dp)[:, 2:][clamped] == 0.0)
    on_bound = (p[:, 2:] == -30) | (p[:, 2:] == 20)
    assert np.all(to_numpy(dp)[:, 2:][on_bound] != 0.0)                # torch.clamp passes gradients on the bounds


def test_parameters_backward_accepts_one_missing_gradient(backend):
    p = _moments(np.random.default_rng(3), (1, 4, 2, 2))
    d = DiagonalGaussianDistribution(asarray(p))
    g = asarray(np.ones((1, 2, 2, 2)))
    assert np.array_equal(to_numpy(d.parameters_backward(g, None))[:, 2:], np.zeros((1, 2, 2, 2)))
    assert np.array_equal(to_numpy(d.parameters_backward(None, g))[:, :2], np.zeros((1, 2, 2, 2)))


def _dist_ops(kind):
    """(forward, backward) op pairs over the moments for gradcheck_op."""
    if kind == "sample":
        def forward(p, noise):
            d = DiagonalGaussianDistribution(p)
            return d.sample(noise), (d, noise)

        def backward(dz, cache):
            d, noise = cache
            return d.parameters_backward(*d.sample_backward(dz, noise)), None
    elif kind == "kl":
        def forward(p):
            d = DiagonalGaussianDistribution(p)
            return d.kl(), d

        def backward(dk, d):
            return d.parameters_backward(*d.kl_backward(dk))
    else:
        def forward(p, s):
            d = DiagonalGaussianDistribution(p)
            return d.nll(s), (d, s)

        def backward(dn, cache):
            d, s = cache
            gm, gl, gs = d.nll_backward(dn, s)
            return d.parameters_backward(gm, gl), gs
    return forward, backward


@given(b=st.integers(1, 3), latent=st.integers(1, 3), h=st.integers(1, 4), w=st.integers(1, 4),
       kind=st.sampled_from(["sample", "kl", "nll"]))
def test_backward_helpers_gradcheck(backend, b, latent, h, w, kind):
    rng = np.random.default_rng(b * 1000 + latent * 100 + h * 10 + w)
    p = noncontiguous(_moments(rng, (b, 2 * latent, h, w), spread=1.5, clamp_cases=False))   # away from the kinks
    forward, backward = _dist_ops(kind)
    other = noncontiguous(rng.standard_normal((b, latent, h, w)))
    inputs = [p] if kind == "kl" else [p, other]
    # eps 1e-5: the summed outputs reach ~1e2, so eps 1e-6 would leave ~1e-8 of round-off in each difference
    report = gradcheck_op(forward, backward, inputs, grad_inputs=[0] if kind == "sample" else None, full_max=48,
                          eps=1e-5)
    assert report.passed, report


def test_deterministic_mode_matches_diffusers(backend):
    p = _moments(np.random.default_rng(4), (2, 4, 3, 3))
    ours, theirs = DiagonalGaussianDistribution(asarray(p), deterministic=True), TorchDistribution(torch.tensor(p), True)
    noise = asarray(np.ones((2, 2, 3, 3)))
    assert np.array_equal(to_numpy(ours.std), theirs.std.numpy()) and np.array_equal(to_numpy(ours.var), theirs.var.numpy())
    assert np.array_equal(to_numpy(ours.sample(noise)), to_numpy(ours.mean))
    assert np.array_equal(to_numpy(ours.nll(noise)), theirs.nll(torch.ones(2, 2, 3, 3)).numpy())
    assert np.all(to_numpy(ours.kl()) == 0.0)
    gm, gl = ours.sample_backward(noise, noise)
    assert np.all(to_numpy(gl) == 0.0) and np.array_equal(to_numpy(gm), to_numpy(noise))


def test_float32_stays_float32(backend):
    p = asarray(_moments(np.random.default_rng(5), (1, 4, 2, 2)).astype(np.float32))
    d = DiagonalGaussianDistribution(p)
    n = asarray(np.ones((1, 2, 2, 2), np.float32))
    for a in (d.logvar, d.std, d.kl(), d.nll(n), d.sample(n), *d.kl_backward(1.0), *d.sample_backward(n, n),
              d.parameters_backward(n, n)):
        assert a.dtype == np.float32


def test_errors(backend):
    with pytest.raises(ValueError, match=r"even, nonzero channel count .* got shape \(1, 3, 2, 2\)"):
        DiagonalGaussianDistribution(asarray(np.zeros((1, 3, 2, 2))))
    with pytest.raises(TypeError, match="parameters must be a floating array, got dtype int64"):
        DiagonalGaussianDistribution(asarray(np.zeros((1, 2, 2, 2), np.int64)))
    d = DiagonalGaussianDistribution(asarray(np.zeros((2, 4, 2, 2))))
    with pytest.raises(ValueError, match=r"noise must have the shape of mean \(2, 2, 2, 2\), got shape \(2, 2, 2\)"):
        d.sample(asarray(np.zeros((2, 2, 2))))
    with pytest.raises(ValueError, match=r"grad_kl must have shape \(2,\)"):
        d.kl_backward(asarray(np.zeros(3)))
    with pytest.raises(TypeError, match="generator must be a TorchGenerator"):
        d.sample(generator=torch.Generator())
    with pytest.raises(ValueError, match="other must be a DiagonalGaussianDistribution of shape"):
        d.kl(DiagonalGaussianDistribution(asarray(np.zeros((1, 4, 2, 2)))))
