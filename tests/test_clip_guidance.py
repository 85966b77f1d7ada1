"""CLIP guidance (npdiffusion/guidance/clip_guidance.py): the resize matrices against torch and PIL,
the image input against transformers' CLIPImageProcessor, a float64 central-difference check of the
whole gradient x_t -> similarity (tiny VAE + tiny CLIP), parity of the similarity and its gradient
with a torch autograd twin (transformers CLIPModel + diffusers AutoencoderKL on the same random
weights), a guided sampling step that raises the similarity, and clear errors.

Shapes: latents (B, 4, 4, 4) -> images (B, 3, 8, 8) -> pixel_values (B, 3, 6, 6) (a shrinking bicubic
resize), projection_dim E = 5.
"""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from diffusers import AutoencoderKL as TorchAutoencoderKL

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.guidance.clip_guidance import (
    CLIPImageInput,
    clip_gradient_fn,
    clip_similarity_backward,
    clip_similarity_forward,
    clip_similarity_grad,
    clip_text_embeds,
    predicted_x0,
    read_image_processor_config,
    resize_matrix,
)
from npdiffusion.guidance.classifier_guidance import guided_sample
from npdiffusion.models.clip.clip_model import CLIPModel
from npdiffusion.models.vae.autoencoder_kl import AutoencoderKL
from npdiffusion.schedulers import DDIMScheduler
from npdiffusion.testing import gradcheck_op, relative_error
from parity import randomize_, torch_state_to_numpy, torch_threads

transformers.logging.set_verbosity_error()

VAE_KW = dict(down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
              block_out_channels=[4, 8], norm_num_groups=2, latent_channels=4, scaling_factor=0.5)
CLIP_KW = dict(
    text_config=dict(hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                     max_position_embeddings=7, eos_token_id=2, bos_token_id=0, hidden_act="quick_gelu"),
    vision_config=dict(hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2, image_size=6,
                       patch_size=3, hidden_act="quick_gelu"),
    projection_dim=5)
IDS = np.array([[0, 5, 9, 33, 2, 2, 2], [0, 17, 40, 2, 2, 2, 2]])


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with torch_threads(1):
        yield


def torch_models():
    torch.manual_seed(0)
    vae = randomize_(TorchAutoencoderKL(**VAE_KW), seed=1, scale=0.8).double()
    clip = randomize_(transformers.CLIPModel(transformers.CLIPConfig(**CLIP_KW)), seed=2).double()
    return vae, clip


def our_models(dtype="float64"):
    tvae, tclip = torch_models()
    vae = AutoencoderKL(**VAE_KW).to(dtype)
    vae.load_state_dict(torch_state_to_numpy(tvae))
    clip = CLIPModel(**CLIP_KW).to(dtype)
    clip.load_state_dict(torch_state_to_numpy(tclip))
    return vae.eval(), clip.eval()


def inputs(b=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((b, 4, 4, 4)), rng.standard_normal((b, 4, 4, 4))   # x_t, eps


# ------------------------------------------------------------------------------------------ resize
@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("sizes", [(16, 12, 6, 5), (5, 7, 11, 9)])
def test_resize_matrix_equals_torch_antialiased_interpolate(mode, sizes):
    h, w, oh, ow = sizes
    x = np.random.default_rng(1).standard_normal((2, 3, h, w))
    ref = F.interpolate(torch.tensor(x), size=(oh, ow), mode=mode, antialias=True, align_corners=False).numpy()
    ours = resize_matrix(h, oh, mode) @ x @ resize_matrix(w, ow, mode).T
    assert relative_error(ours, ref) < 1e-13


def test_image_input_matches_clip_image_processor():
    """Our float pipeline against transformers' (PIL, uint8) processor on a non-square image (a random
    one: a wrong crop offset or filter would be off by tens of levels). PIL resizes uint8 images,
    rounding (measured: <= 0.8 level here) and clipping bicubic overshoot to [0, 255]; the image
    stays inside [40, 215] so that nothing is clipped."""
    processor_cls = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    proc = processor_cls(size={"shortest_edge": 6}, crop_size={"height": 6, "width": 6})
    img = (40 + np.random.default_rng(2).random((10, 15, 3)) * 175).round().astype(np.uint8)
    ref = proc(images=img, return_tensors="np")["pixel_values"]
    ours, _ = CLIPImageInput(6).forward(asarray(img.transpose(2, 0, 1)[None] / 127.5 - 1.0))
    assert to_numpy(ours).shape == ref.shape == (1, 3, 6, 6)
    assert np.abs(to_numpy(ours) - ref).max() <= 1.0 / 255 / min(proc.image_std)


def test_read_image_processor_config(tmp_path):
    processor_cls = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    processor_cls(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.25, 0.5], resample=2).save_pretrained(tmp_path)
    assert read_image_processor_config(tmp_path) == {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.25, 0.5),
                                                     "resample": "bilinear"}
    assert read_image_processor_config(tmp_path / "missing") == {}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"resample": 0}))
    with pytest.raises(ValueError, match="resample must be 2 .* or 3"):
        read_image_processor_config(tmp_path)


# ------------------------------------------------------------------------- the whole gradient
def _x_t_op(vae, clip, te, eps, abar):
    a = abar ** 0.5

    def forward(x_t):
        return clip_similarity_forward(predicted_x0(x_t, eps, abar), clip, te, vae)

    def backward(dsim, cache):
        return clip_similarity_backward(dsim, cache) / a

    return forward, backward


@pytest.mark.parametrize("latent", [True, False])
def test_whole_gradient_central_differences_float64(backend, latent):
    vae, clip = our_models()
    te = clip_text_embeds(clip, IDS)
    x_t, eps = inputs()
    if not latent:                       # a pixel-space model: x_t (B, 3, 8, 8), no VAE
        rng = np.random.default_rng(3)
        x_t, eps, vae = 0.5 * rng.standard_normal((2, 3, 8, 8)), 0.5 * rng.standard_normal((2, 3, 8, 8)), None
    forward, backward = _x_t_op(vae, clip, te, asarray(eps), 0.7)
    report = gradcheck_op(forward, backward, [asarray(x_t)], directions=4)
    assert report.passed, str(report)
    # the guidance term (upstream ones) equals the finite differences of sum_b sim_b along a direction
    table = np.linspace(0.999, 0.01, 100)
    fn = clip_gradient_fn(clip, te, table, vae=vae)
    t = 37.25                                            # a fractional timestep: abar interpolated
    abar = float(np.interp(t, np.arange(100), table))
    grad = to_numpy(fn(asarray(x_t), t, asarray(eps)))
    d = np.random.default_rng(4).standard_normal(x_t.shape)

    def f(x):
        return float(to_numpy(clip_similarity_forward(predicted_x0(asarray(x), asarray(eps), abar), clip, te,
                                                      vae)[0]).sum())

    h = 1e-6
    numeric = (f(x_t + h * d) - f(x_t - h * d)) / (2 * h)
    assert abs(numeric - float((grad * d).sum())) <= 1e-6 * max(abs(numeric), 1e-8)
    np.testing.assert_allclose(fn.last_similarity, to_numpy(
        clip_similarity_forward(predicted_x0(asarray(x_t), asarray(eps), abar), clip, te, vae)[0]), rtol=1e-12)


# ------------------------------------------------------------------------------ torch twin
def _torch_similarity(tvae, tclip, x_t, eps, abar, ids, scaling_factor):
    a, s = abar ** 0.5, (1 - abar) ** 0.5
    x0 = (x_t - s * eps) / a
    image = tvae.decode(x0 / scaling_factor).sample
    u = (image / 2 + 0.5).clamp(0, 1)
    r = F.interpolate(u, size=(6, 6), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], dtype=r.dtype).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], dtype=r.dtype).view(1, 3, 1, 1)
    pooled = tclip.vision_model(pixel_values=(r - mean) / std).pooler_output
    ie = tclip.visual_projection(pooled)
    te = tclip.text_projection(tclip.text_model(input_ids=torch.tensor(ids)).pooler_output)
    ie, te = ie / ie.norm(dim=-1, keepdim=True), te / te.norm(dim=-1, keepdim=True)
    return (ie * te).sum(-1), te


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-9), ("float32", 1e-4)])
def test_similarity_and_gradient_match_torch_autograd(backend, dtype, rtol):
    tvae, tclip = torch_models()
    tdt = {"float64": torch.float64, "float32": torch.float32}[dtype]
    tvae, tclip = tvae.to(tdt), tclip.to(tdt)
    x_t, eps = inputs(seed=5)
    abar = 0.6
    xt_t = torch.tensor(x_t, dtype=tdt, requires_grad=True)
    sim_t, te_t = _torch_similarity(tvae, tclip, xt_t, torch.tensor(eps, dtype=tdt), abar, IDS, 0.5)
    sim_t.sum().backward()
    vae, clip = our_models(dtype)
    te = clip_text_embeds(clip, IDS)
    assert relative_error(te, te_t.detach().numpy()) < rtol
    fn = clip_gradient_fn(clip, te, np.full(10, abar), vae=vae)
    grad = fn(asarray(x_t.astype(dtype)), 3, asarray(eps.astype(dtype)))
    assert grad.dtype == np.dtype(dtype)
    assert relative_error(fn.last_similarity, sim_t.detach().numpy()) < rtol
    assert relative_error(grad, xt_t.grad.numpy()) < rtol
    # v-prediction: the model output v gives the same eps, so the same gradient
    a, s = abar ** 0.5, (1 - abar) ** 0.5
    v = (eps - s * x_t) / a
    fv = clip_gradient_fn(clip, te, np.full(10, abar), vae=vae, prediction_type="v_prediction")
    assert relative_error(fv(asarray(x_t.astype(dtype)), 3, asarray(v.astype(dtype))), xt_t.grad.numpy()) < 10 * rtol


def test_per_sample_gradients_and_state_restored(backend):
    """Each sample's gradient is its own (batch of 2 == two batches of 1); parameter gradients and
    eval mode survive; nothing stays cached in eval mode."""
    vae, clip = our_models()
    te = clip_text_embeds(clip, IDS)
    x0, _ = inputs(seed=6)
    sim, grad = clip_similarity_grad(clip, te, asarray(x0), vae)
    for i in range(2):
        s1, g1 = clip_similarity_grad(clip, te[i:i + 1], asarray(x0[i:i + 1]), vae)
        assert relative_error(s1, sim[i:i + 1]) < 1e-12 and relative_error(g1, grad[i:i + 1]) < 1e-10
    assert not clip.training and not vae.training
    assert all(not m._caches for root in (clip, vae) for m in root.modules())
    assert all(g is None for root in (clip, vae) for m in root.modules() for g in m._grads.values())


# ------------------------------------------------------------------------------ guidance works
@pytest.mark.parametrize("steps", [1, 3])
def test_guided_sampling_raises_the_similarity(steps):
    """With the same seed and model, CLIP-guided DDIM ends at a decoded x0 closer to the prompt."""
    vae, clip = our_models("float32")
    te = clip_text_embeds(clip, IDS[:1])
    sched = DDIMScheduler(num_train_timesteps=100, clip_sample=False, timestep_spacing="trailing")

    def model_fn(x, t):                                  # a fixed stand-in for the U-Net
        return 0.3 * x

    def final_similarity(scale):
        fn = clip_gradient_fn(clip, te, sched.alphas_cumprod, vae=vae)
        x = guided_sample(model_fn, sched, (2, 4, 4, 4), steps, np.random.default_rng(7), guidance=[(scale, fn)])
        return to_numpy(clip_similarity_grad(clip, te, x, vae)[0])

    base, guided = final_similarity(0.0), final_similarity(10.0)
    assert np.all(guided > base + 1e-3), (base, guided)


# ------------------------------------------------------------------------------------- errors
def test_clear_errors(backend):
    vae, clip = our_models("float32")
    te = clip_text_embeds(clip, IDS)
    x0 = asarray(np.zeros((2, 4, 4, 4), np.float32))
    with pytest.raises(TypeError, match="clip_model must be a CLIPModel"):
        clip_similarity_grad(clip.vision_model, te, x0, vae)
    with pytest.raises(TypeError, match="vae must be an AutoencoderKL"):
        clip_similarity_grad(clip, te, x0, vae.decoder)
    with pytest.raises(ValueError, match=r"x0 must have shape \(B, 4, H, W\)"):
        clip_similarity_grad(clip, te, asarray(np.zeros((2, 3, 4, 4), np.float32)), vae)
    with pytest.raises(TypeError, match="x0 must be a floating array"):
        clip_similarity_grad(clip, te, [[0.0]], vae)
    with pytest.raises(ValueError, match=r"text_embeds must have shape \(1, 5\) or \(2, 5\)"):
        clip_similarity_grad(clip, te[:, :4], x0, vae)
    with pytest.raises(ValueError, match="image_input.image_size must be the vision tower's image_size 6"):
        clip_similarity_grad(clip, te, x0, vae, CLIPImageInput(7))
    with pytest.raises(ValueError, match="std must be 3 positive"):
        CLIPImageInput(6, std=(0.5, 0.0, 0.5))
    with pytest.raises(ValueError, match="resample must be one of"):
        CLIPImageInput(6, resample="lanczos")
    with pytest.raises(ValueError, match="prediction_type must be"):
        clip_gradient_fn(clip, te, np.full(10, 0.5), vae=vae, prediction_type="x0")
    with pytest.raises(ValueError, match=r"alphas_cumprod must be a 1-D table of values in \(0, 1\]"):
        clip_gradient_fn(clip, te, np.zeros(10), vae=vae)
    fn = clip_gradient_fn(clip, te, np.full(10, 0.5), vae=vae)
    with pytest.raises(ValueError, match="model_output must have x_t's shape"):
        fn(x0, 3, x0[:1])
    with pytest.raises(ValueError, match=r"t must lie in \[0, 9\]"):
        fn(x0, 12, x0)
    # the guidance leaves the models as they were even when it fails midway
    assert not clip.training and not vae.training
