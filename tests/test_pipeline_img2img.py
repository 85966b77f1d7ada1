"""Image to image against diffusers' StableDiffusionImg2ImgPipeline on the tiny pipeline; the image
helpers against diffusers' VaeImageProcessor; the noise source against torch's generator; the grid."""
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline as DiffusersImg2Img
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from npdiffusion.backend import to_numpy
from npdiffusion.pipelines import StableDiffusionImg2ImgPipeline
from npdiffusion.pipelines.image_utils import image_grid, numpy_to_pil, pil_to_numpy, postprocess_image, preprocess_image
from npdiffusion.pipelines.noise import NoiseSource
from npdiffusion.random.torch_generator import TorchGenerator
from parity import torch_threads
from pipeline_dummy import NEGATIVES, PROMPTS, diffusers_pipeline, our_pipeline

TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    with torch_threads(1):
        yield


def make_image(h=70, w=66, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 3.5, y * 3.0, (x + y) * 1.8], -1) + rng.normal(0, 20, (h, w, 3))
    return Image.fromarray(base.clip(0, 255).astype(np.uint8))


def img2img_pair(name=None, **kw):
    ours = our_pipeline(name, **kw)
    base = diffusers_pipeline(name, **kw)
    theirs = DiffusersImg2Img(**base.components)
    theirs.set_progress_bar_config(disable=True)
    return ours, theirs


# ------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name, strength", [
    ("DDIMScheduler", 0.6),
    ("EulerAncestralDiscreteScheduler", 1.0),     # step noise from the seed's stream
    ("DPMSolverMultistepScheduler", 0.5),         # begins midway: set_begin_index
    ("HeunDiscreteScheduler", 0.75),              # order 2: timesteps[t_start * 2:]
])
def test_img2img_matches_diffusers(name, strength):
    ours, theirs = img2img_pair(name)
    image = make_image()
    kw = dict(strength=strength, num_inference_steps=4, guidance_scale=6.0, negative_prompt=NEGATIVES,
              num_images_per_prompt=2, output_type="np")
    a = ours.img2img(image, PROMPTS, seed=8, noise="torch", **kw).images
    b = theirs(PROMPTS, image=image, generator=torch.Generator().manual_seed(8), **kw).images
    assert a.shape == b.shape == (4, 70, 66, 3)          # the VAE factor is 2: 70 x 66 is kept
    assert np.abs(a - b).max() <= TOL
    assert ((a > 0) & (a < 1)).mean() > 0.5 and np.abs(a[0] - a[1]).max() > 1e-2


def test_img2img_list_of_seeds_and_array_input_match_diffusers():
    ours, theirs = img2img_pair()
    image = np.asarray(make_image(36, 41), dtype=np.float32) / 255.0        # (H, W, 3) in [0, 1]; 41 -> 40
    seeds = [3, 4]
    kw = dict(strength=0.8, num_inference_steps=3, output_type="np")
    a = ours.img2img(image, PROMPTS, seed=seeds, noise="torch", **kw).images
    b = theirs(PROMPTS, image=image, generator=[torch.Generator().manual_seed(s) for s in seeds], **kw).images
    assert a.shape == b.shape == (2, 36, 40, 3)
    assert np.abs(a - b).max() <= TOL


def test_img2img_pipeline_class_and_strength_effect():
    pipe = our_pipeline()
    image = make_image(32, 32)
    as_class = StableDiffusionImg2ImgPipeline(**pipe.components)
    kw = dict(num_inference_steps=4, seed=2, output_type="np")
    a = pipe.img2img(image, PROMPTS[0], strength=0.5, **kw).images
    assert np.array_equal(as_class(PROMPTS[0], image=image, strength=0.5, **kw).images, a)
    stronger = pipe.img2img(image, PROMPTS[0], strength=1.0, **kw).images
    source = pil_to_numpy(image)
    assert np.abs(a - source).mean() < np.abs(stronger - source).mean()   # less strength, closer to the input


def test_img2img_errors():
    pipe = our_pipeline()
    image = make_image(16, 16)
    with pytest.raises(ValueError, match=r"strength must lie in \[0.0, 1.0\]"):
        pipe.img2img(image, "a", strength=1.5)
    with pytest.raises(ValueError, match="at least 1 so that a step runs"):
        pipe.img2img(image, "a", strength=0.1, num_inference_steps=5)
    with pytest.raises(TypeError, match="image must be a PIL image"):
        pipe.img2img("picture.png", "a", num_inference_steps=2)
    with pytest.raises(ValueError, match="image is required"):
        pipe.img2img(None, "a")
    with pytest.raises(ValueError, match="cannot repeat 2 images to 3"):
        pipe.img2img([image, image], ["a", "b", "c"], num_inference_steps=2)


# ------------------------------------------------------------------------------ image helpers
@pytest.mark.parametrize("size", [(64, 64), (70, 66), (37, 50)])
def test_preprocess_pil_equals_vae_image_processor(size):
    image = make_image(*size)
    ref = VaeImageProcessor(vae_scale_factor=8).preprocess(image).numpy()
    ours = to_numpy(preprocess_image(image, 8))
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.array_equal(ours, ref)
    two = to_numpy(preprocess_image([image, image.transpose(Image.FLIP_LEFT_RIGHT)], 8, height=32, width=48))
    ref2 = VaeImageProcessor(vae_scale_factor=8).preprocess([image, image.transpose(Image.FLIP_LEFT_RIGHT)],
                                                            height=32, width=48).numpy()
    assert np.array_equal(two, ref2)


def test_preprocess_arrays_equal_vae_image_processor():
    rng = np.random.default_rng(0)
    for shape in [(2, 37, 53, 3), (40, 24, 3)]:
        arr = rng.random(shape, dtype=np.float32)
        ref = VaeImageProcessor(vae_scale_factor=8).preprocess(arr).numpy()
        assert np.array_equal(to_numpy(preprocess_image(arr, 8)), ref)
    signed = rng.uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)           # already in [-1, 1]: unchanged
    with pytest.warns(FutureWarning):
        ref = VaeImageProcessor(vae_scale_factor=8).preprocess(signed).numpy()
    assert np.array_equal(to_numpy(preprocess_image(signed, 8)), ref)


def test_postprocess_and_numpy_to_pil_equal_vae_image_processor():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 0.8, (2, 3, 8, 12)).astype(np.float32)
    proc = VaeImageProcessor(vae_scale_factor=8)
    ref_np = proc.postprocess(torch.from_numpy(x), output_type="np")
    assert np.array_equal(postprocess_image(x, "np"), ref_np)
    ours_pil, ref_pil = postprocess_image(x, "pil"), proc.postprocess(torch.from_numpy(x), output_type="pil")
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ours_pil, ref_pil))
    assert postprocess_image(x, "latent") is x
    assert numpy_to_pil(np.full((4, 4, 1), 0.5, np.float32))[0].mode == "L"
    with pytest.raises(ValueError, match="output_type must be one of"):
        postprocess_image(x, "pt")


def test_pil_to_numpy_converts_other_modes_to_rgb():
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), mode="L")
    arr = pil_to_numpy(gray)
    assert arr.shape == (1, 8, 8, 3) and np.array_equal(arr[..., 0], arr[..., 2])
    with pytest.raises(ValueError, match="same size"):
        pil_to_numpy([gray, gray.resize((4, 4))])


def test_image_grid_layout_and_labels():
    tiles = [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue", "black", "gray")]
    grid = image_grid(tiles, [f"label {i}" for i in range(5)], cols=2)
    a = np.asarray(grid)
    # 64 px tiles are scaled by 3 (>= 192 px), three rows of two, labels under each tile
    assert grid.size[0] == 2 * 192 + 3 * 4 and grid.size[1] > 3 * 192
    assert tuple(a[4 + 10, 4 + 10]) == (255, 0, 0) and tuple(a[4 + 10, 4 + 192 + 4 + 10]) == (0, 128, 0)
    label_band = a[4 + 192: 4 + 192 + 20, 4: 4 + 192]
    assert (label_band < 128).any(), "no text drawn under the first tile"
    assert image_grid(tiles[:1]).size == (192 + 8, 192 + 8)                  # no labels: no label band
    long = image_grid(tiles[:1], ["a " * 200 + "verylongwordwithoutspaces" * 10])
    assert long.size[1] < 192 + 8 + 4 * 30                                   # wrapped to at most 3 lines
    with pytest.raises(ValueError, match="one entry per image"):
        image_grid(tiles, ["a"])
    with pytest.raises(ValueError, match="same size"):
        image_grid([tiles[0], Image.new("RGB", (8, 8))])


# ------------------------------------------------------------------------------------ noise
def test_noise_source_follows_torch_streams():
    """NoiseSource("torch") draws from TorchGenerator streams (the image noise, then the scheduler's
    draws from the same stream); that TorchGenerator equals torch bit for bit on the kernel it
    emulates is tests/test_random_torch.py's job, so this test holds on every CPU."""
    shape = (2, 4, 5, 3)
    src = NoiseSource("torch", 77)
    rng = src.scheduler_rng()
    g = TorchGenerator(77)
    assert np.array_equal(src.randn(shape), g.randn(shape))
    assert np.array_equal(rng.standard_normal(shape, dtype=np.float32), g.randn(shape))
    assert isinstance(rng, np.random.Generator)
    with pytest.raises(AttributeError, match="standard_normal only"):
        rng.random()
    per_image = NoiseSource("torch", [1, 2], batch=2)
    want = np.concatenate([TorchGenerator(s).randn((1,) + shape[1:]) for s in (1, 2)])
    assert np.array_equal(per_image.randn(shape), want)
    numpy_src = NoiseSource("numpy", 5)
    assert numpy_src.scheduler_rng() is numpy_src.generators
    assert np.array_equal(NoiseSource("numpy", 5).randn(shape),
                          np.random.default_rng(5).standard_normal(shape, dtype=np.float32))
    assert 0 <= NoiseSource("numpy", None).seeds < 2 ** 31                 # a fresh seed is drawn and kept
    assert NoiseSource("numpy", [3, 4], 2).scheduler_rng().standard_normal(shape).shape == shape
    with pytest.raises(ValueError, match=">= 0 with noise='numpy'"):
        NoiseSource("numpy", -1)
    with pytest.raises(TypeError, match="seed must be an int"):
        NoiseSource("torch", 1.5)
    with pytest.raises(ValueError, match="one per image, 3"):
        NoiseSource("torch", [1, 2], batch=3)
