"""The tiny random Stable Diffusion pipeline the pipeline and CLI tests share, built in diffusers.

Components as diffusers' own ``tests/pipelines/stable_diffusion/test_stable_diffusion.py::
get_dummy_components`` (../shared/reference/parity-facts.md section 1 (b)): U-Net (4, 8) channels,
sample_size 32, cross-attention width 8, 2 groups; VAE (4, 8), factor 2; CLIP text model hidden 8,
2 layers, vocabulary 1000; DDIM scheduler (scaled_linear 0.00085 .. 0.012). Weights come from
``torch.manual_seed(0)``. Nothing is downloaded: the tokenizer is trained here with our
``train_bpe`` on a small caption set (568 tokens, well inside the text model's 1000) and loaded by
transformers' CLIPTokenizer. The pipeline is saved once per test process with diffusers'
``save_pretrained`` (safetensors; transformers 5 writes the tokenizer as tokenizer.json) into a
temporary folder that is removed at exit.
"""
from __future__ import annotations

import atexit
import functools
import os
import random
import shutil
import tempfile
import warnings

from parity import torch_threads

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ("a photo of an astronaut riding horse cat dog red blue green painting city night sky mountain "
         "watercolor portrait landscape old young small large bright dark forest river").split()
PROMPTS = ["a photo of a cat", "a red dog at night"]
NEGATIVES = ["blue sky", "green painting"]


def gradient_png(folder, height: int, width: int) -> str:
    """Write folder/input.png, an RGB image of height x width whose red rises along x, green along y
    and blue along both (no two neighbours equal); returns its path."""
    import numpy as np
    from PIL import Image

    path = os.path.join(folder, "input.png")
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * (256 // width), y * (256 // height), (x + y) * (128 // max(height, width))], -1)
    Image.fromarray(rgb.astype(np.uint8)).save(path)
    return path


def quiet_diffusers():
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def build_tokenizer_files(folder: str) -> None:
    """A CLIP BPE tokenizer trained on generated captions (vocab.json + merges.txt + configs)."""
    from npdiffusion.models.clip.bpe_train import save_bpe_files, train_bpe

    r = random.Random(0)
    corpus = [" ".join(r.choice(WORDS) for _ in range(6)) for _ in range(300)]
    vocab, merges = train_bpe(corpus, 600)
    save_bpe_files(folder, vocab, merges)


def build_diffusers_pipeline(tokenizer_dir: str):
    """diffusers' StableDiffusionPipeline from get_dummy_components (DDIM scheduler)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    quiet_diffusers()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, norm_num_groups=2)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False)
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, norm_num_groups=2)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=8, intermediate_size=16, layer_norm_eps=1e-05,
        num_attention_heads=2, num_hidden_layers=2, pad_token_id=1, vocab_size=1000))
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    pipe = StableDiffusionPipeline(unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                   tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.lru_cache(maxsize=None)
def dummy_folder() -> str:
    """Path of the tiny pipeline saved by diffusers (built on first use, removed at exit). Read-only:
    tests that damage a folder copy it first (``copy_folder``)."""
    root = tempfile.mkdtemp(prefix="npd-pipeline-")
    atexit.register(shutil.rmtree, root, True)
    tok = os.path.join(root, "bpe")
    build_tokenizer_files(tok)
    folder = os.path.join(root, "tiny-sd")
    with torch_threads(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)         # diffusers: "steps_offset should be 1"
        build_diffusers_pipeline(tok).save_pretrained(folder)
    return folder


@functools.lru_cache(maxsize=None)
def _diffusers_pipeline():
    from diffusers import StableDiffusionPipeline

    quiet_diffusers()
    pipe = StableDiffusionPipeline.from_pretrained(dummy_folder())
    pipe.set_progress_bar_config(disable=True)
    return pipe, pipe.scheduler


def diffusers_pipeline(scheduler: str | None = None, **scheduler_kwargs):
    """diffusers' pipeline loaded from ``dummy_folder()`` (one per process) with its DDIM scheduler, or with
    ``scheduler`` (a diffusers class name) built by ``from_config`` of that DDIM scheduler's config."""
    import diffusers

    pipe, base = _diffusers_pipeline()
    pipe.scheduler = base if scheduler is None else getattr(diffusers, scheduler).from_config(base.config,
                                                                                            **scheduler_kwargs)
    return pipe


def our_pipeline(scheduler: str | None = None, **scheduler_kwargs):
    """npdiffusion's pipeline loaded from ``dummy_folder()`` (fresh each call: loading takes ~20 ms)."""
    import npdiffusion.schedulers as schedulers
    from npdiffusion.pipelines.stable_diffusion import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(dummy_folder())
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        pipe.scheduler = getattr(schedulers, scheduler).from_config(pipe.scheduler.config, **scheduler_kwargs)
    return pipe


def copy_folder(dst) -> str:
    """A private copy of ``dummy_folder()`` at ``dst`` (to damage in error tests)."""
    shutil.copytree(dummy_folder(), dst)
    return os.fspath(dst)
