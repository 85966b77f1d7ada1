"""StableDiffusionInpaintPipeline against diffusers' on tiny 4- and 9-channel pipelines saved by diffusers.

The 4-channel folder is the shared tiny pipeline (tests/pipeline_dummy.py); the 9-channel one is the same
pipeline with a U-Net of 9 input channels (latents + mask + masked-image latents), saved by diffusers'
StableDiffusionInpaintPipeline in a temporary folder. With ``seed=K, noise="torch"`` on our side and
``generator=torch.Generator().manual_seed(K)`` on diffusers', the images must agree within 1e-4
(float32; PIL outputs, with padding_mask_crop, within one level of 255: a float difference below
1e-4 moves round(255 x) by at most one) for three schedulers (one of them stochastic), strengths 0.5
and 1, with and without padding_mask_crop.
"""
import functools
import os
import shutil
import tempfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import npdiffusion.schedulers as schedulers
from npdiffusion.pipelines.inpaint import StableDiffusionInpaintPipeline
from npdiffusion.pipelines.mask_processing import get_crop_region, preprocess_mask
from parity import torch_threads
from pipeline_dummy import NEGATIVES, PROMPTS, dummy_folder, quiet_diffusers

TOL = 1e-4
STEPS = 4
SCHEDULERS = ("DDIMScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    with torch_threads(1):
        yield


@functools.lru_cache(maxsize=None)
def folder(channels: int) -> str:
    """The 4-channel dummy folder, or a copy with a 9-channel U-Net saved by diffusers."""
    if channels == 4:
        return dummy_folder()
    from diffusers import StableDiffusionInpaintPipeline as Theirs
    from diffusers import UNet2DConditionModel

    quiet_diffusers()
    root = tempfile.mkdtemp(prefix="npd-inpaint-")
    import atexit

    atexit.register(shutil.rmtree, root, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        base = Theirs.from_pretrained(dummy_folder())
    torch.manual_seed(0)
    base.unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=9, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, norm_num_groups=2)
    path = os.path.join(root, "tiny-sd-inpaint")
    base.register_modules(unet=base.unet)
    base.save_pretrained(path)
    return path


@functools.lru_cache(maxsize=None)
def _theirs(channels: int):
    from diffusers import StableDiffusionInpaintPipeline as Theirs

    quiet_diffusers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pipe = Theirs.from_pretrained(folder(channels))
    pipe.set_progress_bar_config(disable=True)
    return pipe, pipe.scheduler


def theirs(channels: int, scheduler: str):
    import diffusers

    pipe, base = _theirs(channels)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(base.config)
    return pipe


def ours(channels: int, scheduler: str | None = None):
    pipe = StableDiffusionInpaintPipeline.from_pretrained(folder(channels))
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        pipe.scheduler = getattr(schedulers, scheduler).from_config(pipe.scheduler.config)
    return pipe


def picture(width: int, height: int) -> Image.Image:
    """An RGB picture with no flat area: red along x, green along y, a blue disc."""
    y, x = np.mgrid[0:height, 0:width]
    disc = ((x - width / 3) ** 2 + (y - height / 2) ** 2 < (min(width, height) / 4) ** 2) * 200
    rgb = np.stack([x * 255 // width, y * 255 // height, disc + 20], -1).astype(np.uint8)
    return Image.fromarray(rgb)


def box_mask(width: int, height: int, box) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


def max_diff(a, b):
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# ------------------------------------------------------------------------------------- the grid
# every scheduler x strength x crop once; the U-Net alternates, so each U-Net meets every scheduler and both crops
CASES = [(4 if crop != (strength == 1.0) else 9, name, strength, crop)
         for name in SCHEDULERS for strength in (0.5, 1.0) for crop in (False, True)]


@pytest.mark.parametrize("channels, name, strength, crop", CASES)
def test_same_seed_gives_diffusers_image(channels, name, strength, crop):
    """Two prompts with negative prompts, guidance 6; the seed alone draws the VAE samples, the
    initial noise and the stochastic scheduler's step noise on both sides."""
    kw = dict(num_inference_steps=STEPS, guidance_scale=6.0, negative_prompt=NEGATIVES, strength=strength)
    if crop:   # a 96 x 80 picture, a small mask: only a padded box around it is inpainted, at 64 x 64
        image, mask = picture(96, 80), box_mask(96, 80, (30, 20, 52, 40))
        kw.update(padding_mask_crop=6, output_type="pil")
    else:
        image, mask = picture(64, 64), box_mask(64, 64, (16, 8, 47, 39))
        kw.update(output_type="np")
    a = ours(channels, name)(PROMPTS, image=image, mask_image=mask, seed=7, noise="torch", **kw).images
    b = theirs(channels, name)(PROMPTS, image=image, mask_image=mask, generator=torch.Generator().manual_seed(7),
                               **kw).images
    if crop:
        a, b = np.stack([np.asarray(i) for i in a]).astype(int), np.stack([np.asarray(i) for i in b]).astype(int)
        assert a.shape == b.shape == (2, 80, 96, 3)
        assert np.abs(a - b).max() <= 1
        outside = np.asarray(mask) == 0                 # apply_overlay: the original's pixels outside the mask
        assert np.array_equal(a[0][outside], np.asarray(image)[outside])
        assert (a[0] != a[1]).any()
    else:
        assert a.dtype == np.float32 and a.shape == b.shape == (2, 64, 64, 3)
        assert max_diff(a, b) <= TOL
        assert 0.5 < ((a > 0) & (a < 1)).mean() and max_diff(a[0], a[1]) > 1e-2


def test_arrays_seed_lists_and_masked_image_latents_match_diffusers():
    """Float-array image and mask, two images per prompt with a seed each, latents of the masked image
    given, no guidance (9 channels); and the same seeds on the 4-channel model with DDPM."""
    image = np.asarray(picture(64, 64), dtype=np.float32) / 255
    mask = np.zeros((64, 64), np.float32)
    mask[10:50, 20:44] = 0.8
    masked_latents = np.random.default_rng(0).standard_normal((1, 4, 32, 32)).astype(np.float32)
    seeds = [3, 4]
    kw = dict(num_inference_steps=3, guidance_scale=1.0, num_images_per_prompt=2, output_type="np")
    a = ours(9)(PROMPTS[0], image=image, mask_image=mask, masked_image_latents=masked_latents, seed=seeds,
                noise="torch", **kw).images
    b = theirs(9, "DDIMScheduler")(PROMPTS[0], image=image, mask_image=mask,
                                   masked_image_latents=torch.from_numpy(masked_latents),
                                   generator=[torch.Generator().manual_seed(s) for s in seeds], **kw).images
    assert max_diff(a, b) <= TOL and max_diff(a[0], a[1]) > 1e-2
    kw.update(guidance_scale=3.0, strength=0.7)
    a = ours(4, "DDPMScheduler")(PROMPTS[1], image=image, mask_image=mask, seed=seeds, noise="torch", **kw).images
    b = theirs(4, "DDPMScheduler")(PROMPTS[1], image=image, mask_image=mask,
                                   generator=[torch.Generator().manual_seed(s) for s in seeds], **kw).images
    assert max_diff(a, b) <= TOL


# ------------------------------------------------------------------------------------- masks
def test_mask_processing_equals_diffusers():
    """Binarised grayscale masks after resize, "fill" and crop, blur, and the crop box, as diffusers'."""
    from diffusers.image_processor import VaeImageProcessor

    proc = VaeImageProcessor(vae_scale_factor=2, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    mask = box_mask(90, 70, (10, 30, 40, 50)).convert("RGB")
    blurred = proc.blur(mask, blur_factor=5)
    assert np.array_equal(np.asarray(blurred), np.asarray(ours(4).mask_processor.blur(mask, blur_factor=5)))
    for pad in (0, 4, 40):
        for w, h in ((64, 64), (96, 48), (40, 80)):
            box = get_crop_region(blurred, w, h, pad=pad)
            assert box == proc.get_crop_region(blurred, w, h, pad=pad)
            for mode, coords in (("default", None), ("fill", box)):
                want = proc.preprocess(blurred, height=h, width=w, resize_mode=mode, crops_coords=coords).numpy()
                got = preprocess_mask(blurred, 2, h, w, coords, mode)
                assert got.shape == want.shape and np.array_equal(got, want)
                assert 0 < got.mean() < 1
    arr = np.random.default_rng(1).random((2, 30, 20)).astype(np.float32)
    assert np.array_equal(preprocess_mask(arr, 2, 16, 24), proc.preprocess(arr, height=16, width=24).numpy())


# ------------------------------------------------------------------------------------- folders, errors
def test_save_pretrained_round_trip_loads_in_diffusers(tmp_path):
    from diffusers import StableDiffusionInpaintPipeline as Theirs

    pipe = ours(9)
    pipe.save_pretrained(tmp_path / "saved")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        back = Theirs.from_pretrained(tmp_path / "saved")
    assert back.unet.config.in_channels == 9
    import json

    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["_class_name"] == \
        "StableDiffusionInpaintPipeline"
    again = StableDiffusionInpaintPipeline.from_pretrained(tmp_path / "saved")
    image, mask = picture(64, 64), box_mask(64, 64, (0, 0, 31, 63))
    kw = dict(num_inference_steps=2, output_type="np", seed=1)
    assert np.array_equal(pipe("a cat", image=image, mask_image=mask, **kw).images,
                          again("a cat", image=image, mask_image=mask, **kw).images)


def test_bad_arguments_raise_clear_errors():
    pipe = ours(4)
    image, mask = picture(64, 64), box_mask(64, 64, (0, 0, 31, 63))
    with pytest.raises(ValueError, match="needs image and mask_image"):
        pipe("a cat", image=image)
    with pytest.raises(ValueError, match=r"strength must lie in \[0.0, 1.0\]"):
        pipe("a cat", image=image, mask_image=mask, strength=1.5)
    with pytest.raises(ValueError, match="padding_mask_crop needs output_type 'pil'"):
        pipe("a cat", image=image, mask_image=mask, padding_mask_crop=4, output_type="np")
    with pytest.raises(ValueError, match="padding_mask_crop needs image and mask_image as PIL images"):
        pipe("a cat", image=np.zeros((64, 64, 3), np.float32), mask_image=mask, padding_mask_crop=4)
    with pytest.raises(ValueError, match="no non-zero pixel"):
        pipe("a cat", image=image, mask_image=Image.new("L", (64, 64), 0), padding_mask_crop=4)
    with pytest.raises(TypeError, match="mask_image must be a PIL image"):
        pipe("a cat", image=image, mask_image="mask.png")
    with pytest.raises(ValueError, match="jump_n_sample > 1 .* needs one of"):
        ours(4, "EulerDiscreteScheduler")("a cat", image=image, mask_image=mask, jump_n_sample=2)
    with pytest.raises(ValueError, match="for ordinary U-Nets"):
        ours(9)("a cat", image=image, mask_image=mask, jump_n_sample=2)
    with pytest.raises(ValueError, match="4 input channels .* or 9"):
        StableDiffusionInpaintPipeline(pipe.vae, pipe.text_encoder, pipe.tokenizer, _unet_with_channels(5),
                                       pipe.scheduler)


def _unet_with_channels(n):
    from npdiffusion.models.unet.unet_2d_condition import UNet2DConditionModel

    return UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=n,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=2)
