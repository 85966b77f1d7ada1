"""The simple loss with epsilon / x0 / v targets and Min-SNR-gamma weights (objectives.py).

Oracles: float64 central differences of the loss (gradient w.r.t. the model output); the loss block
of diffusers' examples/text_to_image/train_text_to_image.py transcribed in torch, with
``diffusers.training_utils.compute_snr`` and torch autograd for the gradient.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler as TorchDDPM
from diffusers.training_utils import compute_snr
from hypothesis import given
from hypothesis import strategies as st

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.diffusion.objectives import min_snr_weights, simple_loss, snr_at, training_target
from npdiffusion.diffusion.parameterization import PREDICTION_TYPES
from npdiffusion.testing import gradcheck_op, noncontiguous, relative_error

ABAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))


def loss_pair(target, t, abar, prediction_type, snr_gamma):
    def forward(out):
        loss, grad = simple_loss(out, target, t, abar, prediction_type, snr_gamma)
        return loss, grad

    def backward(dloss, grad):
        return dloss * grad

    return forward, backward


@given(batch=st.integers(1, 4), c=st.integers(1, 3), side=st.integers(1, 3),
       prediction_type=st.sampled_from(PREDICTION_TYPES), gamma=st.sampled_from([None, 0.5, 5.0]),
       seed=st.integers(0, 2**16))
def test_simple_loss_gradcheck(backend, batch, c, side, prediction_type, gamma, seed):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, 1000, size=batch)
    out = noncontiguous(rng.standard_normal((batch, c, side, side)))
    target = noncontiguous(rng.standard_normal((batch, c, side, side)))
    fwd, bwd = loss_pair(target, t, ABAR, prediction_type, gamma)
    # The loss is quadratic in the output, so central differences are exact for any step: a large
    # step keeps rounding out of the entries whose Min-SNR weight is ~1e-4.
    report = gradcheck_op(fwd, bwd, [out], full_max=36, eps=1e-3)
    assert report.passed, report


def train_text_to_image_loss(model_pred, target, timesteps, scheduler, snr_gamma):
    """The loss block of diffusers' train_text_to_image.py (transcribed; torch is the oracle)."""
    if snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    snr = compute_snr(scheduler, timesteps)
    mse_loss_weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if scheduler.config.prediction_type == "epsilon":
        mse_loss_weights = mse_loss_weights / snr
    elif scheduler.config.prediction_type == "v_prediction":
        mse_loss_weights = mse_loss_weights / (snr + 1)
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    loss = loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights
    return loss.mean()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_simple_loss_matches_train_text_to_image(backend, prediction_type, gamma):
    sched = TorchDDPM(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                      beta_end=0.012, prediction_type=prediction_type)
    abar = sched.alphas_cumprod.numpy()          # float32, as the training script sees it
    rng = np.random.default_rng(3)
    x0 = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    noise = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    out = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    t = np.array([0, 3, 100, 400, 800, 999])
    tt = torch.from_numpy(t)
    their_target = noise if prediction_type == "epsilon" else sched.get_velocity(
        torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
    our_target = training_target(asarray(x0), asarray(noise), t, abar, prediction_type)
    assert relative_error(our_target, their_target) < 1e-6
    pred = torch.from_numpy(out).requires_grad_(True)
    their_loss = train_text_to_image_loss(pred, torch.from_numpy(their_target), tt, sched, gamma)
    their_loss.backward()
    loss, grad = simple_loss(asarray(out), asarray(their_target), t, abar, prediction_type, gamma)
    assert loss.dtype == np.float32 and grad.dtype == np.float32
    assert relative_error(loss, their_loss.detach().numpy()) < 1e-5
    assert relative_error(grad, pred.grad.numpy()) < 1e-5


def test_float64_loss_matches_torch_to_1e10(backend):
    rng = np.random.default_rng(4)
    out, target = rng.standard_normal((3, 2, 5)), rng.standard_normal((3, 2, 5))
    t = np.array([5, 60, 700])
    pred = torch.from_numpy(out).requires_grad_(True)
    w = torch.from_numpy(min_snr_weights(t, ABAR, 2.0, "sample"))
    their = (((pred - torch.from_numpy(target)) ** 2).mean(dim=(1, 2)) * w).mean()
    their.backward()
    loss, grad = simple_loss(asarray(out), asarray(target), t, ABAR, "sample", 2.0)
    assert relative_error(loss, their.detach().numpy()) < 1e-10
    assert relative_error(grad, pred.grad.numpy()) < 1e-10


def test_min_snr_weights():
    snr = ABAR / (1 - ABAR)
    t = np.array([0, 200, 500, 999])
    gamma = 5.0
    np.testing.assert_allclose(snr_at(t, ABAR), snr[t], rtol=1e-15)
    np.testing.assert_allclose(min_snr_weights(t, ABAR, gamma, "epsilon"), np.minimum(snr[t], gamma) / snr[t])
    np.testing.assert_allclose(min_snr_weights(t, ABAR, gamma, "v_prediction"),
                               np.minimum(snr[t], gamma) / (snr[t] + 1))
    np.testing.assert_allclose(min_snr_weights(t, ABAR, gamma, "sample"), np.minimum(snr[t], gamma))
    # High-SNR steps are down-weighted, low-SNR steps keep weight 1 (epsilon).
    w = min_snr_weights(t, ABAR, gamma, "epsilon")
    assert w[0] < 0.01 and w[-1] == 1.0


def test_zero_terminal_snr_gives_finite_weights():
    """SNR = 0 at the last step of a zero-terminal-SNR schedule: the epsilon weight is its limit, 1
    (min(SNR, gamma) / SNR = 1 for every 0 < SNR < gamma); v and x0 weights are 0 there."""
    abar = ABAR.copy()
    abar[-1] = 0.0
    t = np.array([0, 999])
    with np.errstate(all="raise"):
        eps_w = min_snr_weights(t, abar, 5.0, "epsilon")
        v_w = min_snr_weights(t, abar, 5.0, "v_prediction")
        x0_w = min_snr_weights(t, abar, 5.0, "sample")
    assert eps_w[1] == 1.0 and v_w[1] == 0.0 and x0_w[1] == 0.0
    assert np.isfinite(eps_w).all() and eps_w[0] < 0.01


def test_loss_is_zero_at_the_target_and_errors(backend):
    x = asarray(np.ones((2, 3)))
    loss, grad = simple_loss(x, x)
    assert float(loss) == 0.0 and not to_numpy(grad).any()
    with pytest.raises(ValueError, match="snr_gamma needs t and alphas_cumprod"):
        simple_loss(x, x, snr_gamma=5.0)
    with pytest.raises(ValueError, match=r"target must have the shape of model_output \(2, 3\), got \(3, 2\)"):
        simple_loss(x, asarray(np.ones((3, 2))))
    with pytest.raises(ValueError, match="snr_gamma must be a positive number, got -1"):
        simple_loss(x, x, np.array([1, 2]), ABAR, "epsilon", -1)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        simple_loss(x, x, prediction_type="x0")
