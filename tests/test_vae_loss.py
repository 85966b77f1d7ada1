"""The KL autoencoder objective: the reconstruction and KL op pairs (float64 central differences,
torch formulas), the full objective against torch autograd on diffusers' AutoencoderKL (same
noise), a float64 gradient check of the full objective (fixed reparameterization noise), a few
training steps, and errors."""
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from hypothesis import given
from hypothesis import strategies as st

from npdiffusion.backend import asarray, to_numpy, xp
from npdiffusion.models.vae.autoencoder_kl import AutoencoderKL
from npdiffusion.models.vae.distribution import DiagonalGaussianDistribution
from npdiffusion.models.vae.loss import (KLAutoencoderLoss, kl_loss_backward, kl_loss_forward,
                                         reconstruction_loss_backward, reconstruction_loss_forward)
from npdiffusion.optim.adamw import AdamW
from npdiffusion.testing import gradcheck, gradcheck_op, noncontiguous, relative_error
from parity import randomize_, torch_state_to_numpy, torch_threads
from vae_parity import assert_grads_match, zero_gradient_names

CONFIG = dict(block_out_channels=[4, 8], norm_num_groups=2, in_channels=3, out_channels=3, latent_channels=2,
              down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
DIVISOR = {"batchmean": lambda x: x.shape[0], "mean": lambda x: x.numel(), "sum": lambda x: 1}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """torch on one thread for these tiny models (see vae_parity.torch_threads)."""
    with torch_threads(1):
        yield


# ============================================================================ op pairs
@given(shape=st.lists(st.integers(1, 4), min_size=2, max_size=4), kind=st.sampled_from(["l1", "l2"]),
       reduction=st.sampled_from(["batchmean", "mean", "sum"]))
def test_reconstruction_loss_gradcheck(backend, shape, kind, reduction):
    rng = np.random.default_rng(sum(shape) * 7 + len(shape))
    target = rng.standard_normal(shape)
    d = rng.uniform(0.2, 1.0, shape) * rng.choice([-1.0, 1.0], shape)    # |recon - target| >= 0.2: no kink
    report = gradcheck_op(reconstruction_loss_forward, reconstruction_loss_backward,
                          [noncontiguous(target + d), noncontiguous(target)], full_max=64, kind=kind,
                          reduction=reduction)
    assert report.passed, report


@pytest.mark.parametrize("kind", ["l1", "l2"])
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
def test_reconstruction_loss_matches_torch(backend, kind, reduction):
    rng = np.random.default_rng(0)
    recon, target = rng.standard_normal((3, 2, 4, 5)), rng.standard_normal((3, 2, 4, 5))
    tr = torch.tensor(recon, requires_grad=True)
    t = torch.tensor(target)
    expected = ((tr - t).abs() if kind == "l1" else (tr - t) ** 2).sum() / DIVISOR[reduction](tr)
    expected.backward(torch.tensor(0.7, dtype=torch.float64))
    loss, cache = reconstruction_loss_forward(asarray(recon), asarray(target), kind, reduction)
    d_recon, d_target = reconstruction_loss_backward(0.7, cache)
    assert loss.shape == () and relative_error(loss, expected.detach().numpy()) <= 1e-14
    assert relative_error(d_recon, tr.grad.numpy()) <= 1e-14
    assert np.array_equal(to_numpy(d_target), -to_numpy(d_recon))


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
def test_kl_loss_matches_torch_and_gradcheck(backend, reduction):
    rng = np.random.default_rng(1)
    p = rng.standard_normal((3, 4, 2, 3))
    tp = torch.tensor(p, requires_grad=True)
    mean, logvar = torch.chunk(tp, 2, dim=1)
    expected = (0.5 * (mean ** 2 + logvar.exp() - 1.0 - logvar).sum(dim=[1, 2, 3])).sum() / DIVISOR[reduction](mean)
    expected.backward(torch.tensor(1.3, dtype=torch.float64))
    loss, cache = kl_loss_forward(DiagonalGaussianDistribution(asarray(p)), reduction)
    dp = cache[0].parameters_backward(*kl_loss_backward(1.3, cache))
    assert relative_error(loss, expected.detach().numpy()) <= 1e-14
    assert relative_error(dp, tp.grad.numpy()) <= 1e-14

    def forward(moments):
        return kl_loss_forward(DiagonalGaussianDistribution(moments), reduction)

    def backward(dl, c):
        return c[0].parameters_backward(*kl_loss_backward(dl, c))

    report = gradcheck_op(forward, backward, [noncontiguous(p)], full_max=72)
    assert report.passed, report


# ============================================================================ the full objective
def _models(dtype="float64", seed=3):
    torch.manual_seed(0)
    theirs = randomize_(TorchAutoencoderKL(**CONFIG), seed=seed).to(getattr(torch, dtype))
    ours = AutoencoderKL(**CONFIG).to(dtype)
    ours.load_state_dict(torch_state_to_numpy(theirs))
    return ours.train(), theirs


def _torch_objective(theirs, x, noise, beta, kind, reduction, dtype):
    tx = torch.tensor(x, dtype=dtype, requires_grad=True)
    posterior = theirs.encode(tx).latent_dist
    recon = theirs.decode(posterior.mean + posterior.std * torch.tensor(noise, dtype=dtype)).sample
    d = recon - tx
    rec = (d.abs() if kind == "l1" else d * d).sum() / DIVISOR[reduction](tx)
    kl = posterior.kl().sum() / DIVISOR[reduction](posterior.mean)
    loss = rec + beta * kl
    loss.backward()
    return loss.item(), rec.item(), kl.item(), tx.grad.numpy(), {k: p.grad.numpy() for k, p in theirs.named_parameters()}


@pytest.mark.parametrize("kind,reduction", [("l1", "batchmean"), ("l2", "mean"), ("l2", "sum")])
@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-9), ("float32", 1e-4)])
def test_objective_matches_torch_autograd(backend, kind, reduction, dtype, rtol):
    """loss = rec(decode(mean + std * noise), x) + beta * KL and every gradient (x feeds both the
    encoder and the reconstruction target) against torch autograd on diffusers' model."""
    rng = np.random.default_rng(4)
    x, noise = rng.standard_normal((2, 3, 8, 8)), rng.standard_normal((2, 2, 4, 4))
    beta = 0.25
    ours, theirs = _models(dtype)
    loss_t, rec_t, kl_t, dx_t, grads_t = _torch_objective(theirs, x, noise, beta, kind, reduction,
                                                          getattr(torch, dtype))
    zero = zero_gradient_names(_torch_objective(_models()[1], x, noise, beta, kind, reduction, torch.float64)[4])
    objective = KLAutoencoderLoss(ours, beta=beta, reconstruction=kind, reduction=reduction)
    loss = objective(asarray(x.astype(dtype)), asarray(noise.astype(dtype)))
    dx = objective.backward()
    assert loss.dtype == np.dtype(dtype) and dx.dtype == np.dtype(dtype)
    assert relative_error(loss, np.array(loss_t)) <= rtol
    assert relative_error(objective.terms["reconstruction"], np.array(rec_t)) <= rtol
    assert relative_error(objective.terms["kl"], np.array(kl_t)) <= rtol
    assert relative_error(dx, dx_t) <= rtol
    assert_grads_match({k[len("vae."):]: g for k, g in objective.named_grads()}, grads_t, zero, rtol)


def test_full_objective_gradient_check_float64():
    """Central differences of the whole objective (encode -> reparameterize with fixed noise ->
    decode -> L2 + beta KL) in float64, relative error <= 1e-6.

    (a) Along random directions in *all* parameters and the image at once (no floor needed: the
        directional derivative is large). (b) Per array, along random directions, with a floor of
        1e-4 for derivatives that are zero or nearly so in exact arithmetic (to_k.bias, biases
        feeding one-channel groups): central differences of a loss of ~1 hold ~1e-11 of round-off.
    """
    ours, _ = _models("float64", seed=5)
    rng = np.random.default_rng(6)
    x, noise = asarray(rng.standard_normal((2, 3, 8, 8))), asarray(rng.standard_normal((2, 2, 4, 4)))
    objective = KLAutoencoderLoss(ours, beta=0.5, reconstruction="l2", reduction="mean")
    objective.zero_grad()
    objective(x, noise)
    dx = to_numpy(objective.backward())
    grads = {k: to_numpy(g).copy() for k, g in objective.named_grads()}
    arrays = [("x", x)] + list(objective.named_parameters())
    analytic = dict(grads, x=dx)
    saved = {name: a.copy() for name, a in arrays}

    def loss_at(step, direction):
        for name, a in arrays:
            a[...] = saved[name] + step * direction[name]
        value = float(objective.forward(x, noise))
        for name, a in arrays:
            a[...] = saved[name]
        return value

    eps = 1e-5
    for _ in range(3):
        direction = {name: asarray(rng.standard_normal(a.shape)) for name, a in arrays}
        num = (loss_at(eps, direction) - loss_at(-eps, direction)) / (2 * eps)
        ana = sum(float(np.sum(analytic[name] * to_numpy(direction[name]))) for name, _ in arrays)
        assert abs(num - ana) <= 1e-6 * abs(ana), (num, ana)
    report = gradcheck(objective, x, noise, grad_inputs=[0], eps=eps, floor=1e-4, directions=1)
    assert report.passed, report


def test_objective_with_l1_gradient_check_along_joint_directions():
    """The L1 objective (a kink only where recon == x, never hit here) checked the same way (a)."""
    ours, _ = _models("float64", seed=7)
    rng = np.random.default_rng(8)
    x, noise = asarray(rng.standard_normal((1, 3, 8, 8))), asarray(rng.standard_normal((1, 2, 4, 4)))
    objective = KLAutoencoderLoss(ours, beta=1e-2, reconstruction="l1")
    objective.zero_grad()
    objective(x, noise)
    grads = {"x": to_numpy(objective.backward())}
    grads.update({k: to_numpy(g).copy() for k, g in objective.named_grads()})
    arrays = [("x", x)] + list(objective.named_parameters())
    saved = {name: a.copy() for name, a in arrays}
    eps = 1e-6
    for _ in range(3):
        direction = {name: rng.standard_normal(a.shape) for name, a in arrays}
        values = []
        for step in (eps, -eps):
            for name, a in arrays:
                a[...] = saved[name] + step * asarray(direction[name])
            values.append(float(objective.forward(x, noise)))
        for name, a in arrays:
            a[...] = saved[name]
        num = (values[0] - values[1]) / (2 * eps)
        ana = sum(float(np.sum(grads[name] * direction[name])) for name, _ in arrays)
        assert abs(num - ana) <= 1e-6 * abs(ana), (num, ana)


def test_a_few_adamw_steps_reduce_the_loss():
    ours, _ = _models("float32", seed=9)
    rng = np.random.default_rng(10)
    x = asarray(np.tanh(rng.standard_normal((2, 3, 8, 8))).astype(np.float32))
    noise = asarray(rng.standard_normal((2, 2, 4, 4)).astype(np.float32))
    objective = KLAutoencoderLoss(ours, beta=1e-3, reconstruction="l2")
    opt = AdamW(ours, lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(15):
        ours.zero_grad()
        losses.append(float(objective(x, noise)))
        objective.backward()
        opt.step()
    assert losses[-1] < 0.7 * losses[0], losses


def test_noise_is_drawn_when_not_given_and_kept():
    ours, _ = _models("float32")
    objective = KLAutoencoderLoss(ours, beta=1.0)
    x = asarray(np.random.default_rng(0).standard_normal((1, 3, 4, 4)).astype(np.float32))
    a = objective(x, generator=np.random.default_rng(3))
    b = objective(x, objective.noise)
    assert float(a) == float(b) and objective.noise.shape == (1, 2, 2, 2)
    terms = {k: float(v) for k, v in objective.terms.items()}
    assert abs(terms["loss"] - terms["reconstruction"] - terms["kl"]) <= 1e-6 * terms["loss"]


def test_objective_errors():
    ours, _ = _models("float32")
    with pytest.raises(ValueError, match="beta must be a non-negative number, got -1"):
        KLAutoencoderLoss(ours, beta=-1)
    with pytest.raises(ValueError, match="reconstruction must be one of \\('l1', 'l2'\\), got 'lpips'"):
        KLAutoencoderLoss(ours, reconstruction="lpips")
    with pytest.raises(ValueError, match="reduction must be one of"):
        KLAutoencoderLoss(ours, reduction="max")
    objective = KLAutoencoderLoss(ours)
    with pytest.raises(ValueError, match=r"multiples of the VAE's downsampling factor 2 .* got shape \(1, 3, 5, 4\)"):
        objective(asarray(np.zeros((1, 3, 5, 4), np.float32)))
    with pytest.raises(ValueError, match=r"x must have 3 channels on axis 1 \(in_channels\), got shape \(1, 1, 4, 4\)"):
        objective(asarray(np.zeros((1, 1, 4, 4), np.float32)))
    with pytest.raises(ValueError, match=r"noise must have the shape of mean \(1, 2, 2, 2\)"):
        objective(asarray(np.zeros((1, 3, 4, 4), np.float32)), asarray(np.zeros((1, 2, 4, 4), np.float32)))
    with pytest.raises(ValueError, match="recon must have target's shape"):
        reconstruction_loss_forward(xp.zeros((1, 2)), xp.zeros((1, 3)))
