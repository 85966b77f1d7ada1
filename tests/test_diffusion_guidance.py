"""Classifier-free guidance and rescale_noise_cfg (guidance.py) against diffusers.

Oracles: diffusers' ``rescale_noise_cfg`` (pipelines/stable_diffusion/pipeline_stable_diffusion.py)
and the guidance lines of StableDiffusionPipeline.__call__ (chunk(2), eps_u + w (eps_c - eps_u)),
in torch float64 and float32; exact identities (w = 0, 1; phi = 0, 1).
"""
import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg as torch_rescale
from hypothesis import given
from hypothesis import strategies as st

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.diffusion.guidance import classifier_free_guidance, guided_prediction, rescale_noise_cfg
from npdiffusion.testing import noncontiguous, relative_error


def torch_pipeline_guidance(noise_pred, guidance_scale, guidance_rescale):
    """The CFG lines of diffusers' StableDiffusionPipeline.__call__ (denoising loop)."""
    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
    noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
    if guidance_rescale > 0.0:
        noise_pred = torch_rescale(noise_pred, noise_pred_text, guidance_rescale=guidance_rescale)
    return noise_pred


@given(batch=st.integers(1, 3), shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       w=st.floats(0.0, 15.0), phi=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_guidance_matches_the_diffusers_pipeline_float64(backend, batch, shape, w, phi, seed):
    size = int(np.prod(shape))
    if size < 2:
        shape = list(shape) + [2]
    x = np.random.default_rng(seed).standard_normal((2 * batch, *shape))
    ours = guided_prediction(noncontiguous(x), w, phi)
    theirs = torch_pipeline_guidance(torch.from_numpy(x), w, phi).numpy()
    assert relative_error(ours, theirs) < 1e-10


@pytest.mark.parametrize("phi", [0.0, 0.7])
def test_guidance_matches_the_diffusers_pipeline_float32(backend, phi):
    x = np.random.default_rng(0).standard_normal((4, 4, 8, 8)).astype(np.float32)
    ours = guided_prediction(asarray(x), 7.5, phi)
    assert ours.dtype == np.float32
    assert relative_error(ours, torch_pipeline_guidance(torch.from_numpy(x), 7.5, phi).numpy()) < 1e-5


def test_rescale_uses_the_unbiased_std_per_sample(backend):
    rng = np.random.default_rng(1)
    cfg, text = rng.standard_normal((3, 2, 5)) * 4.0, rng.standard_normal((3, 2, 5))
    out = to_numpy(rescale_noise_cfg(asarray(cfg), asarray(text), 1.0))
    for b in range(3):     # phi = 1: each sample rescaled to the std (ddof = 1) of its text prediction
        assert out[b].std(ddof=1) == pytest.approx(text[b].std(ddof=1), rel=1e-12)
        assert relative_error(out[b], cfg[b] * text[b].std(ddof=1) / cfg[b].std(ddof=1)) < 1e-12
    assert relative_error(rescale_noise_cfg(asarray(cfg), asarray(text), 0.0), cfg) == 0.0
    assert relative_error(rescale_noise_cfg(asarray(cfg), asarray(text), 0.3),
                          torch_rescale(torch.from_numpy(cfg), torch.from_numpy(text), 0.3).numpy()) < 1e-12


def test_guidance_scale_identities(backend):
    rng = np.random.default_rng(2)
    u, c = asarray(rng.standard_normal((2, 3))), asarray(rng.standard_normal((2, 3)))
    assert relative_error(classifier_free_guidance(u, c, 0.0), u) == 0.0
    assert relative_error(classifier_free_guidance(u, c, 1.0), c) < 1e-15
    # Linear extrapolation along eps_c - eps_u: w = 2 lands at 2 eps_c - eps_u.
    assert relative_error(classifier_free_guidance(u, c, 2.0), 2 * to_numpy(c) - to_numpy(u)) < 1e-15


def test_clear_errors(backend):
    x = asarray(np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"model_output must stack \[uncond, cond\] on axis 0 \(an even batch\)"):
        guided_prediction(x, 7.5)
    with pytest.raises(ValueError, match=r"eps_cond must have the shape of eps_uncond \(3, 4\), got \(2, 4\)"):
        classifier_free_guidance(x, asarray(np.zeros((2, 4))), 7.5)
    with pytest.raises(TypeError, match="guidance_scale must be a real number, got str"):
        classifier_free_guidance(x, x, "7.5")
    with pytest.raises(ValueError, match="noise_cfg must have at least 2 entries per sample"):
        rescale_noise_cfg(asarray(np.zeros((3, 1))), asarray(np.zeros((3, 1))), 0.5)
