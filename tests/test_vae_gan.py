"""OPTIONAL adversarial term: LeakyReLU, BatchNorm2d and the PatchGAN NLayerDiscriminator against
torch twins (taming-transformers' layout), the hinge loss, and KLAutoencoderGANLoss's generator
step (adaptive weight included) and discriminator step against torch autograd."""
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from torch import nn

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.models.vae.autoencoder_kl import AutoencoderKL
from npdiffusion.models.vae.discriminator import BatchNorm2d, LeakyReLU, NLayerDiscriminator
from npdiffusion.models.vae.loss import KLAutoencoderGANLoss, adopt_weight, hinge_d_loss_backward, hinge_d_loss_forward
from npdiffusion.testing import gradcheck, gradcheck_op, noncontiguous, relative_error
from parity import assert_parity, randomize_, torch_state_to_numpy, torch_threads
from vae_parity import assert_grads_match, zero_gradient_names


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """torch on one thread for these tiny models (see vae_parity.torch_threads)."""
    with torch_threads(1):
        yield


def torch_nlayer_discriminator(input_nc=3, ndf=64, n_layers=3):
    """taming-transformers' NLayerDiscriminator (BatchNorm variant), as an nn.Sequential ``main``."""
    seq = [nn.Conv2d(input_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
    mult = 1
    for n in range(1, n_layers):
        prev, mult = mult, min(2 ** n, 8)
        seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
    prev, mult = mult, min(2 ** n_layers, 8)
    seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1, bias=False), nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
    module = nn.Module()
    module.main = nn.Sequential(*seq)
    module.forward = lambda x: module.main(x)
    return module


# ============================================================================ layers
def test_leaky_relu_matches_torch_and_gradcheck(backend):
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5))
    x[0, 0, 0, :2] = 0.0                                                # the kink: torch's slope there
    assert_parity(LeakyReLU(0.2), nn.LeakyReLU(0.2), [x], dtype="float64", rtol=1e-15)
    x[np.abs(x) < 0.01] = 0.5                                          # piecewise linear: exact at eps 1e-3
    report = gradcheck(LeakyReLU(0.3), noncontiguous(x), full_max=120, eps=1e-3)
    assert report.passed, report


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
def test_batch_norm_matches_torch_in_both_modes(backend, dtype, rtol):
    rng = np.random.default_rng(1)
    theirs = randomize_(nn.BatchNorm2d(4), seed=2)
    ours = BatchNorm2d(4)
    x = rng.standard_normal((3, 4, 5, 2)) * 2.0 + 0.5
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert_parity(ours, theirs, [x], dtype=dtype, rtol=rtol)              # training mode: batch statistics
    for k in ("running_mean", "running_var"):
        assert relative_error(getattr(ours, k), getattr(theirs, k).numpy()) <= rtol, k
    assert int(to_numpy(ours.num_batches_tracked)) == int(theirs.num_batches_tracked) == 1
    theirs.eval()
    ours.eval()
    with torch.no_grad():
        expected = theirs(torch.tensor(x, dtype=getattr(torch, dtype))).numpy()
    assert relative_error(ours(asarray(x.astype(dtype))), expected) <= rtol


def test_batch_norm_gradcheck(backend):
    rng = np.random.default_rng(3)
    m = BatchNorm2d(3).to("float64")
    m.weight[...] = asarray(rng.standard_normal(3))
    m.bias[...] = asarray(rng.standard_normal(3))
    report = gradcheck(m, noncontiguous(rng.standard_normal((2, 3, 2, 3))), full_max=36)
    assert report.passed, report


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
def test_discriminator_matches_taming_layout(backend, dtype, rtol):
    theirs = randomize_(torch_nlayer_discriminator(3, 4, 3), seed=4)
    ours = NLayerDiscriminator(3, 4, 3)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [tuple(v.shape) for v in ours.state_dict().values()] == [tuple(v.shape) for v in theirs.state_dict().values()]
    x = np.random.default_rng(5).standard_normal((2, 3, 32, 32))
    assert_parity(ours, theirs, [x], dtype=dtype, rtol=rtol)


def test_discriminator_gradcheck_and_init():
    d = NLayerDiscriminator(2, 2, 2)
    convs = [p for n, p in d.named_parameters() if p.ndim == 4]
    assert all(abs(float(to_numpy(p).std()) - 0.02) < 0.02 for p in convs)
    d.to("float64")
    rng = np.random.default_rng(6)
    for _, p in d.named_parameters():                                    # larger weights: clear of rounding
        p[...] = asarray(rng.standard_normal(p.shape) * 0.5 + (1.0 if p.ndim == 1 and p.shape[0] > 1 else 0.0))
    report = gradcheck(d, noncontiguous(rng.standard_normal((2, 2, 12, 12))), directions=2, floor=1e-6)
    assert report.passed, report


def test_hinge_loss_gradcheck_and_values(backend):
    rng = np.random.default_rng(7)
    real = rng.uniform(-3, 3, (2, 1, 3, 3))
    fake = rng.uniform(-3, 3, (2, 1, 4, 4))
    real[np.abs(real - 1) < 0.1] = 0.0                                   # keep away from the kinks at +-1
    fake[np.abs(fake + 1) < 0.1] = 0.0
    loss, _ = hinge_d_loss_forward(asarray(real), asarray(fake))
    expected = 0.5 * (np.maximum(1 - real, 0).mean() + np.maximum(1 + fake, 0).mean())
    assert abs(float(loss) - expected) <= 1e-15
    report = gradcheck_op(hinge_d_loss_forward, hinge_d_loss_backward, [noncontiguous(real), noncontiguous(fake)],
                          full_max=64)
    assert report.passed, report
    assert adopt_weight(1.0, 5, threshold=10) == 0.0 and adopt_weight(1.0, 10, threshold=10) == 1.0


# ============================================================================ the GAN objective
VAE = dict(block_out_channels=[4, 8], norm_num_groups=2, latent_channels=2,
           down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)


def _pairs(dtype):
    torch.manual_seed(0)
    t_vae = randomize_(TorchAutoencoderKL(**VAE), seed=8).to(getattr(torch, dtype))
    t_disc = randomize_(torch_nlayer_discriminator(3, 4, 2), seed=9).to(getattr(torch, dtype))
    vae = AutoencoderKL(**VAE).to(dtype)
    vae.load_state_dict(torch_state_to_numpy(t_vae))
    disc = NLayerDiscriminator(3, 4, 2).to(dtype)
    disc.load_state_dict(torch_state_to_numpy(t_disc))
    return vae.train(), disc.train(), t_vae.train(), t_disc.train()


def _torch_generator_step(t_vae, t_disc, x, noise, logvar, kl_weight, disc_weight, factor, dtype):
    tdt = getattr(torch, dtype)
    tx = torch.tensor(x, dtype=tdt, requires_grad=True)
    t_logvar = torch.tensor(logvar, dtype=tdt, requires_grad=True)
    post = t_vae.encode(tx).latent_dist
    rec = t_vae.decode(post.mean + post.std * torch.tensor(noise, dtype=tdt)).sample
    nll = ((tx - rec).abs() / torch.exp(t_logvar) + t_logvar).sum() / x.shape[0]          # taming's nll
    kl = post.kl().sum() / x.shape[0]
    g = -t_disc(rec).mean()
    last = t_vae.decoder.conv_out.weight
    nll_grads = torch.autograd.grad(nll, last, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g, last, retain_graph=True)[0]
    d_weight = torch.clamp(torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4), 0.0, 1e4).detach() * disc_weight
    loss = nll + kl_weight * kl + d_weight * factor * g
    loss.backward()
    return dict(loss=loss.item(), d_weight=d_weight.item(), dx=tx.grad.numpy(), dlogvar=t_logvar.grad.item(),
                grads={k: p.grad.numpy().copy() for k, p in t_vae.named_parameters()}, rec=rec.detach().numpy())


@pytest.mark.parametrize("global_step", [0, 10])
@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-9), ("float32", 1e-4)])
def test_generator_step_matches_torch(backend, global_step, dtype, rtol):
    """disc_start 5: step 0 has no adversarial term, step 10 has it with the adaptive weight."""
    rng = np.random.default_rng(10)
    x, noise = rng.standard_normal((2, 3, 16, 16)), rng.standard_normal((2, 2, 8, 8))
    kw = dict(kl_weight=0.1, disc_weight=0.5)
    factor = adopt_weight(1.0, global_step, 5)
    vae, disc, t_vae, t_disc = _pairs(dtype)
    ref = _torch_generator_step(t_vae, t_disc, x, noise, 0.3, kw["kl_weight"], kw["disc_weight"], factor, dtype)
    _, _, t64, d64 = _pairs("float64")
    zero = zero_gradient_names(_torch_generator_step(t64, d64, x, noise, 0.3, kw["kl_weight"], kw["disc_weight"],
                                                     factor, "float64")["grads"])
    objective = KLAutoencoderGANLoss(vae, disc, logvar_init=0.3, disc_start=5, **kw)
    assert [k for k, _ in objective.named_parameters()][0] == "logvar"
    assert not any(k.startswith("discriminator") for k, _ in objective.named_parameters())
    loss = objective(asarray(x.astype(dtype)), asarray(noise.astype(dtype)), global_step=global_step)
    dx = objective.backward()
    assert relative_error(loss, np.array(ref["loss"])) <= rtol
    assert abs(objective.terms["d_weight"] - ref["d_weight"]) <= rtol * ref["d_weight"]
    assert relative_error(dx, ref["dx"]) <= rtol
    grads = dict(objective.named_grads())
    assert relative_error(grads.pop("logvar"), np.array(ref["dlogvar"])) <= rtol
    assert_grads_match({k[len("vae."):]: g for k, g in grads.items()}, ref["grads"], zero, rtol)
    assert all(float(np.abs(to_numpy(g)).max()) == 0.0 for _, g in disc.named_grads())    # D untouched


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
def test_discriminator_step_matches_torch(backend, dtype, rtol):
    rng = np.random.default_rng(11)
    x, x_hat = rng.standard_normal((2, 3, 16, 16)), rng.standard_normal((2, 3, 16, 16)) * 0.5
    vae, disc, _, t_disc = _pairs(dtype)
    tdt = getattr(torch, dtype)
    logits_real, logits_fake = t_disc(torch.tensor(x, dtype=tdt)), t_disc(torch.tensor(x_hat, dtype=tdt))
    expected = 0.7 * 0.5 * (torch.relu(1.0 - logits_real).mean() + torch.relu(1.0 + logits_fake).mean())
    expected.backward()
    objective = KLAutoencoderGANLoss(vae, disc, disc_factor=0.7)
    loss = objective.discriminator_step(asarray(x.astype(dtype)), asarray(x_hat.astype(dtype)), global_step=0)
    assert relative_error(loss, np.array(expected.item())) <= rtol
    for k, g in disc.named_grads():
        assert relative_error(g, dict(t_disc.named_parameters())[k].grad.numpy(), floor=1e-12) <= rtol, k
    for k, v in t_disc.state_dict().items():                            # running statistics after two calls
        if "running" in k:
            assert relative_error(disc.state_dict()[k], v.numpy()) <= rtol, k
    assert float(objective.discriminator_step(asarray(x.astype(dtype)), asarray(x_hat.astype(dtype)))) > 0
    late = KLAutoencoderGANLoss(vae, disc, disc_start=100)
    disc.zero_grad()
    assert float(late.discriminator_step(asarray(x.astype(dtype)), asarray(x_hat.astype(dtype)), 3)) == 0.0
    assert all(float(np.abs(to_numpy(g)).max()) == 0.0 for _, g in disc.named_grads())


def test_gan_loss_errors():
    vae = AutoencoderKL(**VAE)
    with pytest.raises(ValueError, match="disc_weight must be a non-negative number, got -1"):
        KLAutoencoderGANLoss(vae, NLayerDiscriminator(3, 2, 1), disc_weight=-1)
    with pytest.raises(ValueError, match="NLayerDiscriminator: x must have 3 entries on axis 1"):
        NLayerDiscriminator(3, 2, 1)(asarray(np.zeros((1, 2, 8, 8), np.float32)))
    with pytest.raises(ValueError, match="training needs more than one value per channel"):
        BatchNorm2d(2)(asarray(np.zeros((1, 2, 1, 1), np.float32)))
