"""Classifier guidance step: the formula, its form for v- and x0-predicting models, the guided loop
(equal to the plain scheduler loop at scale 0) and a small end-to-end check that guidance moves the
samples of an unconditional model toward the class."""
import numpy as np
import pytest

from npdiffusion.backend import asarray, to_numpy, xp
from npdiffusion.diffusion.parameterization import convert
from npdiffusion.diffusion.schedules import alphas_cumprod, betas_for
from npdiffusion.guidance.classifier import NoiseAwareClassifier
from npdiffusion.guidance.classifier_guidance import (
    abar_at,
    apply_classifier_guidance,
    classifier_gradient_fn,
    guide_model_output,
    guided_sample,
)
from npdiffusion.schedulers.ddim import DDIMScheduler
from npdiffusion.schedulers.ddpm import DDPMScheduler
from npdiffusion.schedulers.euler import EulerDiscreteScheduler
from npdiffusion.training.classifier_stage import load_classifier, save_classifier, train_classifier

A = alphas_cumprod(betas_for("linear", 1000)).astype(np.float64)


def test_apply_classifier_guidance_formula(backend):
    rng = np.random.default_rng(0)
    eps, g = rng.standard_normal((2, 2, 3, 4, 4))
    t = 417
    expected = eps - 2.5 * np.sqrt(1.0 - A[t]) * g                  # Dhariwal & Nichol, eq. 14
    got = apply_classifier_guidance(asarray(eps), asarray(g), float(np.sqrt(1.0 - A[t])), 2.5)
    np.testing.assert_allclose(to_numpy(got), expected, rtol=1e-14)
    got = guide_model_output(asarray(eps), asarray(rng.standard_normal(eps.shape)), t, A, asarray(g), 2.5)
    np.testing.assert_allclose(to_numpy(got), expected, rtol=1e-14)


@pytest.mark.parametrize("ptype", ["v_prediction", "sample"])
def test_guide_model_output_other_parameterizations(backend, ptype):
    """Convert to eps (the library's conversion table), guide, convert back: the same as ours."""
    rng = np.random.default_rng(1)
    out, x_t, g = (asarray(a) for a in rng.standard_normal((3, 2, 3, 4, 4)))
    t = 600
    eps = convert(out, x_t, t, A, ptype, "epsilon")
    eps_hat = eps - 1.7 * np.sqrt(1.0 - A[t]) * g
    expected = convert(eps_hat, x_t, t, A, "epsilon", ptype)
    got = guide_model_output(out, x_t, t, A, g, 1.7, prediction_type=ptype)
    np.testing.assert_allclose(to_numpy(got), to_numpy(expected), rtol=1e-12, atol=1e-12)


def test_abar_at_interpolates_and_checks():
    assert abar_at(A, 10) == A[10]
    assert abar_at(A, 10.5) == pytest.approx(0.5 * (A[10] + A[11]), rel=1e-15)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 999\]"):
        abar_at(A, 1000.5)
    with pytest.raises(ValueError, match="grad_log_prob must have eps's shape"):
        apply_classifier_guidance(np.zeros((1, 3)), np.zeros((1, 4)), 0.5, 1.0)
    with pytest.raises(TypeError, match="scale must be a number"):
        apply_classifier_guidance(np.zeros((1, 3)), np.zeros((1, 3)), 0.5, "1")


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler])
def test_guided_sample_at_scale_zero_is_the_plain_loop(backend, scheduler_cls):
    rng = np.random.default_rng(2)
    w = asarray(rng.standard_normal(3))                             # on the device, as the latents

    def model(x, t):                                                # any deterministic model
        return xp.tanh(x * w[None, :, None, None] + 1e-3 * t)

    clf = NoiseAwareClassifier(3, 3, (4,), 1, 2)
    got = guided_sample(model, scheduler_cls(), (2, 3, 4, 4), 5, np.random.default_rng(7),
                        guidance=[(0.0, classifier_gradient_fn(clf, 1))])
    sched, gen = scheduler_cls(), np.random.default_rng(7)
    sched.set_timesteps(5)
    x = asarray(gen.standard_normal((2, 3, 4, 4)).astype(np.float32) * float(sched.init_noise_sigma))
    kw = {"rng": gen} if scheduler_cls is DDPMScheduler else {}
    for t in to_numpy(sched.timesteps).tolist():
        x = sched.step(model(sched.scale_model_input(x, t), t), t, x, return_dict=False, **kw)[0]
    np.testing.assert_array_equal(to_numpy(got), to_numpy(x))


def test_classifier_guidance_moves_unconditional_samples_toward_the_class(tmp_path):
    """Data: 4x4 images whose channel ``y`` is +1 and the others -1 (plus noise). The unconditional
    model is the exact eps of a N(0, I) data distribution (eps = sqrt(1 - abar_t) x_t), so unguided
    samples carry no class; a classifier trained for 40 steps guides them to it."""
    rng = np.random.default_rng(0)
    n = 256
    y = rng.integers(0, 3, n)
    x0 = -np.ones((n, 3, 4, 4), np.float32)
    x0[np.arange(n), y] = 1.0
    x0 += 0.2 * rng.standard_normal(x0.shape).astype(np.float32)
    clf = NoiseAwareClassifier(3, 3, (8,), 1, 4)
    losses = train_classifier(clf, x0, y, A, steps=40, batch_size=32, lr=1e-2, seed=0, max_timestep=900)
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    save_classifier(clf, tmp_path / "clf", attribute="channel")
    clf, attribute = load_classifier(tmp_path / "clf")
    assert attribute == "channel"

    def model(x, t):
        return np.sqrt(1.0 - abar_at(A, t)) * x

    target = 2
    hits = {}
    for scale in (0.0, 4.0):
        # clip_sample=False: DDIM's default clips x0_hat to [-1, 1] but keeps eps_hat, which would turn
        # a large guidance term against itself (see guided_sample's docstring).
        out = guided_sample(model, DDIMScheduler(clip_sample=False), (24, 3, 4, 4), 10, np.random.default_rng(1),
                            guidance=[(scale, classifier_gradient_fn(clf, target))])
        hits[scale] = float(np.mean(to_numpy(out).mean(axis=(2, 3)).argmax(axis=1) == target))
    assert hits[0.0] < 0.6 and hits[4.0] >= 0.9, hits
