"""StableDiffusionPipeline against diffusers on the tiny random pipeline (tests/pipeline_dummy.py).

The folder is written by diffusers' save_pretrained and loaded by both libraries. From the same
initial latents the images must agree within 1e-4 (float32) for every scheduler, with guidance,
negative prompts and guidance_rescale; with ``seed=K, noise="torch"`` the seed alone must give
diffusers' image (``generator=torch.Generator().manual_seed(K)``), stochastic schedulers included.
Memory: nothing is cached during a generation (every module's cache stays empty, and the traced
heap does not grow from step to step).
"""
import tracemalloc

import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer as HFTokenizer

import npdiffusion.schedulers as schedulers
from npdiffusion.backend import to_numpy
from npdiffusion.models.clip.text_model import CLIPTextModel
from npdiffusion.models.unet.unet_2d_condition import UNet2DConditionModel
from npdiffusion.models.vae.autoencoder_kl import AutoencoderKL
from npdiffusion.pipelines import StableDiffusionPipeline, StableDiffusionPipelineOutput
from parity import torch_threads
from pipeline_dummy import NEGATIVES, PROMPTS, diffusers_pipeline, dummy_folder, our_pipeline

TOL = 1e-4
STEPS = 3
SCHEDULERS = {  # name -> extra from_config arguments (the same on both sides)
    "PNDMScheduler": {"skip_prk_steps": True},
    "DDIMScheduler": {},
    "EulerDiscreteScheduler": {},
    "EulerAncestralDiscreteScheduler": {},
    "DPMSolverMultistepScheduler": {},
    "DDPMScheduler": {},
    "HeunDiscreteScheduler": {},
}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    with torch_threads(1):
        yield


def initial_latents(batch, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 4, 32, 32)).astype(np.float32)


def assert_meaningful(images):
    """The comparison is not vacuous: most pixels are not clamped, and the images differ."""
    inside = ((images > 0) & (images < 1)).mean()
    assert inside > 0.5, f"only {inside:.0%} of the pixels are inside (0, 1)"
    if images.shape[0] > 1:
        assert np.abs(images[0] - images[1]).max() > 1e-2


def max_diff(a, b):
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# ------------------------------------------------------------------------------------------ loading
def test_from_pretrained_reads_the_diffusers_folder():
    pipe = our_pipeline()
    theirs = diffusers_pipeline()
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.vae_scale_factor == theirs.vae_scale_factor == 2
    assert pipe.default_height_width() == (64, 64)
    # diffusers' pipeline rewrites steps_offset to 1 at construction; so do we
    assert pipe.scheduler.config["steps_offset"] == theirs.scheduler.config.steps_offset == 1
    assert all(not m.training for part in (pipe.unet, pipe.vae, pipe.text_encoder) for m in part.modules())
    # the transformers-5 tokenizer.json layout gives transformers' ids
    hf = HFTokenizer.from_pretrained(dummy_folder(), subfolder="tokenizer")
    texts = PROMPTS + ["An OLD painting, of a river!", ""]
    ours = pipe.tokenizer(texts)
    assert np.array_equal(ours, hf(texts, padding="max_length", max_length=77, truncation=True,
                                   return_tensors="np").input_ids)


def test_encode_prompt_equals_diffusers():
    pipe, theirs = our_pipeline(), diffusers_pipeline()
    ours = pipe.encode_prompt(PROMPTS, 2, True, NEGATIVES)
    with torch.no_grad():
        ref = theirs.encode_prompt(PROMPTS, "cpu", 2, True, NEGATIVES)
    for a, b in zip(ours, ref):
        assert a.shape == tuple(b.shape) == (4, 77, 8)
        assert max_diff(to_numpy(a), b.numpy()) < 1e-5    # float32 rounding of values up to ~2
    assert max_diff(to_numpy(ours[0][0]), to_numpy(ours[0][1])) == 0      # [p0, p0, p1, p1]
    assert max_diff(to_numpy(ours[0][1]), to_numpy(ours[0][2])) > 1e-3


# ----------------------------------------------------------------------------- same latents, same images
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_same_latents_give_diffusers_images(name):
    """Guidance 6, a negative prompt per prompt, guidance_rescale 0.7, two prompts; the stochastic
    schedulers' step noise comes from the same seed on both sides."""
    ours = our_pipeline(name, **SCHEDULERS[name])
    theirs = diffusers_pipeline(name, **SCHEDULERS[name])
    lat = initial_latents(2)
    kw = dict(num_inference_steps=STEPS, guidance_scale=6.0, guidance_rescale=0.7, negative_prompt=NEGATIVES,
              output_type="np")
    a = ours(PROMPTS, latents=lat, seed=11, noise="torch", **kw).images
    b = theirs(PROMPTS, latents=torch.from_numpy(lat), generator=torch.Generator().manual_seed(11), **kw).images
    assert a.dtype == np.float32 and a.shape == b.shape == (2, 64, 64, 3)
    assert max_diff(a, b) <= TOL
    assert_meaningful(a)


def test_guidance_off_and_num_images_match_diffusers():
    """guidance_scale 1 (no unconditional batch), two images per prompt, a str negative prompt that
    guidance ignores."""
    ours, theirs = our_pipeline("EulerDiscreteScheduler"), diffusers_pipeline("EulerDiscreteScheduler")
    lat = initial_latents(2, seed=1)
    kw = dict(num_inference_steps=2, guidance_scale=1.0, num_images_per_prompt=2, output_type="np",
              negative_prompt="ignored")
    a = ours(PROMPTS[0], latents=lat, **kw).images
    b = theirs(PROMPTS[0], latents=torch.from_numpy(lat), **kw).images
    assert max_diff(a, b) <= TOL
    assert_meaningful(a)
    guided = ours(PROMPTS[0], latents=lat, **dict(kw, guidance_scale=4.0)).images
    assert max_diff(a, guided) > 1e-2                                     # guidance changes the image


def test_clip_skip_is_diffusers_rule():
    """clip_skip=k: final_layer_norm(hidden_states[-(k + 1)]) for the prompt, the plain last state for the
    negative prompt (diffusers' encode_prompt). diffusers' own clip_skip path reads
    text_encoder.text_model, which transformers 5 removed, so the rule is checked on transformers' model."""
    from transformers import CLIPTextModel as HFText

    pipe = our_pipeline()
    hf = HFText.from_pretrained(dummy_folder(), subfolder="text_encoder").eval()
    ids = torch.from_numpy(pipe.tokenizer(PROMPTS))
    uncond = torch.from_numpy(pipe.tokenizer(["", ""]))
    with torch.no_grad():
        states = hf(ids, output_hidden_states=True).hidden_states
        want = hf.final_layer_norm(states[-2]).numpy()
        want_neg = hf(uncond).last_hidden_state.numpy()
    pos, neg = pipe.encode_prompt(PROMPTS, 1, True, None, clip_skip=1)
    assert max_diff(to_numpy(pos), want) < 1e-5 and max_diff(to_numpy(neg), want_neg) < 1e-5
    plain, _ = pipe.encode_prompt(PROMPTS, 1, True, None)
    assert max_diff(to_numpy(plain), to_numpy(pos)) > 1e-2


def test_latent_output_and_default_size_match_diffusers():
    ours, theirs = our_pipeline("DPMSolverMultistepScheduler"), diffusers_pipeline("DPMSolverMultistepScheduler")
    lat = initial_latents(1, seed=2)
    a = ours(PROMPTS[1], latents=lat, num_inference_steps=STEPS, output_type="latent").images
    b = theirs(PROMPTS[1], latents=torch.from_numpy(lat), num_inference_steps=STEPS, output_type="latent").images
    assert a.shape == tuple(b.shape) == (1, 4, 32, 32)
    assert max_diff(to_numpy(a), b.numpy()) <= TOL * float(np.abs(b.numpy()).max())


# ----------------------------------------------------------------------------------- seeds alone
@pytest.mark.parametrize("name", ["EulerAncestralDiscreteScheduler", "DDPMScheduler"])
def test_torch_seed_alone_gives_diffusers_image(name):
    """No latents passed: the initial latents and every step's noise come from the seed."""
    ours, theirs = our_pipeline(name), diffusers_pipeline(name)
    kw = dict(num_inference_steps=STEPS, guidance_scale=7.5, num_images_per_prompt=2, output_type="np")
    a = ours(PROMPTS, seed=1234, noise="torch", **kw).images
    b = theirs(PROMPTS, generator=torch.Generator().manual_seed(1234), **kw).images
    assert a.shape == (4, 64, 64, 3)
    assert max_diff(a, b) <= TOL
    assert_meaningful(a)


def test_list_of_torch_seeds_and_ddim_eta_match_diffusers():
    ours, theirs = our_pipeline(), diffusers_pipeline()
    seeds = [5, 6]
    kw = dict(num_inference_steps=STEPS, eta=0.7, output_type="np")
    a = ours(PROMPTS, seed=seeds, noise="torch", **kw).images
    b = theirs(PROMPTS, generator=[torch.Generator().manual_seed(s) for s in seeds], **kw).images
    assert max_diff(a, b) <= TOL
    # image 1 of the batch is the image of seed 6 alone
    single = ours(PROMPTS[1], seed=[6], noise="torch", **kw).images
    assert max_diff(single[0], a[1]) <= TOL


def test_numpy_noise_is_default_rng_of_the_seed():
    pipe = our_pipeline()
    kw = dict(num_inference_steps=2, output_type="np")
    by_seed = pipe(PROMPTS[0], seed=3, **kw).images
    lat = np.random.default_rng(3).standard_normal((1, 4, 32, 32), dtype=np.float32)
    assert np.array_equal(by_seed, pipe(PROMPTS[0], latents=lat, **kw).images)
    assert np.array_equal(by_seed, pipe(PROMPTS[0], seed=3, noise="numpy", **kw).images)
    assert max_diff(by_seed, pipe(PROMPTS[0], seed=4, **kw).images) > 1e-2


def test_output_object_and_pil_output():
    pipe = our_pipeline()
    lat = initial_latents(1, seed=3)
    out = pipe(PROMPTS[0], latents=lat, num_inference_steps=2, output_type="pil")
    assert isinstance(out, StableDiffusionPipelineOutput) and out.nsfw_content_detected is None
    assert out[0] is out.images and out["images"] is out.images and len(out.to_tuple()) == 1
    (image,) = out.images
    assert image.mode == "RGB" and image.size == (64, 64)
    np_images = pipe(PROMPTS[0], latents=lat, num_inference_steps=2, output_type="np").images
    assert np.array_equal(np.asarray(image), (np_images[0] * 255).round().astype(np.uint8))
    images, nsfw = pipe(PROMPTS[0], latents=lat, num_inference_steps=2, output_type="np", return_dict=False)
    assert nsfw is None and np.array_equal(images, np_images)


def test_long_prompts_are_cut_with_a_warning(caplog):
    pipe = our_pipeline()
    long = " ".join(["a red dog"] * 40)                          # 120 words: more than 75 tokens
    with caplog.at_level("WARNING", logger="npdiffusion.pipelines.stable_diffusion"):
        pos, _ = pipe.encode_prompt(long, 1, False)
    assert "truncated" in caplog.text and "red dog" in caplog.text
    hf = HFTokenizer.from_pretrained(dummy_folder(), subfolder="tokenizer")
    ids = hf([long], padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    assert np.array_equal(pipe.tokenizer([long]), ids) and pos.shape == (1, 77, 8)


def test_prompt_embeds_give_the_prompt_image():
    pipe = our_pipeline()
    lat = initial_latents(1, seed=4)
    pos, neg = pipe.encode_prompt(PROMPTS[0], 1, True, NEGATIVES[0])
    kw = dict(latents=lat, num_inference_steps=2, output_type="np")
    a = pipe(PROMPTS[0], negative_prompt=NEGATIVES[0], **kw).images
    b = pipe(prompt_embeds=pos, negative_prompt_embeds=neg, **kw).images
    assert np.array_equal(a, b)


# ---------------------------------------------------------------------------------------- memory
def test_memory_stays_flat_and_nothing_is_cached():
    """12 steps with the U-Net left in training mode: no_cache keeps every module's cache empty, and the
    traced heap (NumPy reports its buffers to tracemalloc) is the same after each step."""
    pipe = our_pipeline("EulerAncestralDiscreteScheduler")
    pipe.unet.train()
    current = []

    def record(p, i, t, kwargs):
        current.append(tracemalloc.get_traced_memory()[0])
        return kwargs

    tracemalloc.start()
    try:
        pipe(PROMPTS[0], num_inference_steps=12, seed=0, output_type="np", callback_on_step_end=record)
    finally:
        tracemalloc.stop()
    latent_bytes = 1 * 4 * 32 * 32 * 4                  # keeping one latents array per step would show
    steady = current[2:]
    assert max(steady) - min(steady) < latent_bytes, current
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        for name, m in part.named_modules():
            assert not m._caches, f"{type(part).__name__}.{name} kept a cache"


# ---------------------------------------------------------------------------------------- errors
def test_bad_arguments_raise_clear_errors():
    pipe = our_pipeline()
    with pytest.raises(ValueError, match="multiples of 8"):
        pipe(PROMPTS[0], height=60, width=64, num_inference_steps=1)
    with pytest.raises(ValueError, match="num_inference_steps must be a positive int"):
        pipe(PROMPTS[0], num_inference_steps=0)
    with pytest.raises(TypeError, match="prompt must be a str or a list of str"):
        pipe(3)
    with pytest.raises(ValueError, match="or prompt_embeds"):
        pipe()
    with pytest.raises(TypeError, match="negative_prompt should be the same type as prompt"):
        pipe(PROMPTS, negative_prompt="x", num_inference_steps=1)
    with pytest.raises(ValueError, match="negative_prompt has batch size 1"):
        pipe(PROMPTS, negative_prompt=["x"], num_inference_steps=1)
    with pytest.raises(ValueError, match=r"latents must have shape \(1, 4, 32, 32\)"):
        pipe(PROMPTS[0], latents=np.zeros((1, 4, 16, 16), np.float32), num_inference_steps=1)
    with pytest.raises(ValueError, match="output_type must be one of"):
        pipe(PROMPTS[0], num_inference_steps=1, output_type="pt")
    with pytest.raises(ValueError, match="noise must be one of"):
        pipe(PROMPTS[0], num_inference_steps=1, noise="cuda")
    with pytest.raises(ValueError, match="one per image"):
        pipe(PROMPTS, seed=[1, 2, 3], num_inference_steps=1)
    with pytest.raises(TypeError, match="vae must be an npdiffusion AutoencoderKL"):
        StableDiffusionPipeline(vae=object(), text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                unet=pipe.unet, scheduler=pipe.scheduler)
    with pytest.raises(TypeError, match="scheduler must be an npdiffusion scheduler"):
        pipe.scheduler = "ddim"
    with pytest.raises(ValueError, match="safety_checker must be None"):
        StableDiffusionPipeline(pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet, pipe.scheduler,
                                safety_checker=object())


def test_scheduler_swap_keeps_diffusers_config_rules():
    pipe = our_pipeline()
    pipe.scheduler = schedulers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    # the folder's config names "leading" and steps_offset 1 explicitly, so they carry over
    assert pipe.scheduler.config["timestep_spacing"] == "leading" and pipe.scheduler.config["steps_offset"] == 1
    theirs = diffusers_pipeline("EulerDiscreteScheduler")
    pipe.scheduler.set_timesteps(4)
    theirs.scheduler.set_timesteps(4)
    assert np.array_equal(pipe.scheduler.timesteps, theirs.scheduler.timesteps.numpy())
