"""Pipeline folders both ways: a folder saved by npdiffusion loads in diffusers and gives the same images;
model_index.json rules (null components skipped, unknown scheduler / component refused); tokenizers in
both layouts; every damaged folder raises one clear error naming the component."""
import json
import os

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline as DiffusersPipeline
from transformers import CLIPTokenizer as HFTokenizer

from npdiffusion.io.safetensors import SafetensorsError
from npdiffusion.pipelines import StableDiffusionPipeline
from npdiffusion.pipelines.loading import PipelineFolderError, load_tokenizer, read_model_index
from parity import torch_threads
from pipeline_dummy import PROMPTS, copy_folder, dummy_folder, our_pipeline, quiet_diffusers


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def saved_by_us(tmp_path_factory):
    """Our pipeline with Euler ancestral swapped in, saved by our save_pretrained."""
    pipe = our_pipeline("EulerAncestralDiscreteScheduler")
    folder = pipe.save_pretrained(tmp_path_factory.mktemp("ours") / "tiny-sd")
    return pipe, folder


def edit_json(path, change):
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    change(data)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


# ------------------------------------------------------------------------------------- our folders
def test_saved_folder_layout_and_model_index(saved_by_us):
    _, folder = saved_by_us
    with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as f:
        index = json.load(f)
    assert index == {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": index["_diffusers_version"],
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
        "safety_checker": [None, None], "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    for sub, files in {"unet": ["config.json", "diffusion_pytorch_model.safetensors"],
                       "vae": ["config.json", "diffusion_pytorch_model.safetensors"],
                       "text_encoder": ["config.json", "model.safetensors"],
                       "tokenizer": ["vocab.json", "merges.txt"], "scheduler": ["scheduler_config.json"]}.items():
        for name in files:
            assert os.path.isfile(os.path.join(folder, sub, name)), f"{sub}/{name} missing"
    assert not [f for _, _, fs in os.walk(folder) for f in fs if f.endswith(".tmp")]


def test_diffusers_loads_our_folder_and_gives_the_same_images(saved_by_us):
    pipe, folder = saved_by_us
    quiet_diffusers()
    theirs = DiffusersPipeline.from_pretrained(folder)
    theirs.set_progress_bar_config(disable=True)
    assert type(theirs.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    kw = dict(num_inference_steps=3, guidance_scale=5.0, output_type="np")
    a = pipe(PROMPTS, seed=21, noise="torch", **kw).images
    b = theirs(PROMPTS, generator=torch.Generator().manual_seed(21), **kw).images
    assert np.abs(a - b).max() <= 1e-4
    # and our own loader reads it back to the same numbers
    again = StableDiffusionPipeline.from_pretrained(folder)
    again.set_progress_bar_config(disable=True)
    assert np.array_equal(again(PROMPTS, seed=21, noise="torch", **kw).images, a)


def test_tokenizer_layouts_give_transformers_ids(saved_by_us):
    _, folder = saved_by_us
    texts = PROMPTS + ["Watercolor: a LARGE, bright forest...", "x" * 300]
    from_json = load_tokenizer(os.path.join(dummy_folder(), "tokenizer"))      # transformers 5: tokenizer.json
    from_vocab = load_tokenizer(os.path.join(folder, "tokenizer"))             # ours: vocab.json + merges.txt
    assert not os.path.exists(os.path.join(dummy_folder(), "tokenizer", "vocab.json"))
    hf = HFTokenizer.from_pretrained(dummy_folder(), subfolder="tokenizer")
    want = hf(texts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    assert np.array_equal(from_json(texts), want) and np.array_equal(from_vocab(texts), want)
    assert from_json.model_max_length == from_vocab.model_max_length == 77


# ------------------------------------------------------------------------------ model_index rules
def test_null_and_safety_components_are_skipped(tmp_path):
    folder = copy_folder(tmp_path / "sd")
    edit_json(os.path.join(folder, "model_index.json"), lambda d: d.update(
        safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
        feature_extractor=["transformers", "CLIPImageProcessor"], text_encoder_2=[None, None]))
    assert sorted(read_model_index(folder)) == ["scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    StableDiffusionPipeline.from_pretrained(folder)


@pytest.mark.parametrize("name, change, error, match", [
    ("unknown scheduler", lambda d: d.update(scheduler=["diffusers", "LMSDiscreteScheduler"]),
     PipelineFolderError, "unknown scheduler class 'LMSDiscreteScheduler'"),
    ("extra component", lambda d: d.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"]),
     PipelineFolderError, "'text_encoder_2'.*not part of"),
    ("wrong class", lambda d: d.update(vae=["diffusers", "AutoencoderTiny"]),
     PipelineFolderError, "npdiffusion loads only diffusers.AutoencoderKL"),
    ("missing component", lambda d: d.update(unet=[None, None]), PipelineFolderError, r"lacks the components \['unet'\]"),
    ("not a pair", lambda d: d.update(unet="UNet2DConditionModel"), PipelineFolderError, "must be a \\[library, class\\]"),
])
def test_model_index_problems_are_named(tmp_path, name, change, error, match):
    folder = copy_folder(tmp_path / "sd")
    edit_json(os.path.join(folder, "model_index.json"), change)
    with pytest.raises(error, match=match):
        StableDiffusionPipeline.from_pretrained(folder)


def test_damaged_folders_raise_errors_naming_the_component(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StableDiffusionPipeline.from_pretrained(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        StableDiffusionPipeline.from_pretrained(empty)

    folder = copy_folder(tmp_path / "bad-json")
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(PipelineFolderError, match="not valid JSON"):
        StableDiffusionPipeline.from_pretrained(folder)

    folder = copy_folder(tmp_path / "no-vae")
    for name in os.listdir(os.path.join(folder, "vae")):
        os.remove(os.path.join(folder, "vae", name))
    os.rmdir(os.path.join(folder, "vae"))
    with pytest.raises(FileNotFoundError, match="subfolder .*vae.* is missing"):
        StableDiffusionPipeline.from_pretrained(folder)

    folder = copy_folder(tmp_path / "corrupt")
    weights = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
    data = open(weights, "rb").read()
    with open(weights, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(PipelineFolderError, match="cannot load unet .*truncated|cannot load unet .*bytes") as info:
        StableDiffusionPipeline.from_pretrained(folder)
    assert isinstance(info.value.__cause__, SafetensorsError)

    folder = copy_folder(tmp_path / "bad-config")
    edit_json(os.path.join(folder, "unet", "config.json"), lambda d: d.update(block_out_channels="wide"))
    with pytest.raises(PipelineFolderError, match="cannot load unet"):
        StableDiffusionPipeline.from_pretrained(folder)

    folder = copy_folder(tmp_path / "no-tokenizer")
    os.remove(os.path.join(folder, "tokenizer", "tokenizer.json"))
    with pytest.raises(FileNotFoundError, match="neither vocab.json"):
        StableDiffusionPipeline.from_pretrained(folder)

    folder = copy_folder(tmp_path / "nan")
    from npdiffusion.io.safetensors import load_file, save_file
    path = os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors")
    state = load_file(path)
    key = sorted(state)[0]
    state[key] = state[key].copy()
    state[key].reshape(-1)[0] = np.nan
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(PipelineFolderError, match="cannot load vae .*non-finite"):
        StableDiffusionPipeline.from_pretrained(folder)


def test_old_unet_configs_get_diffusers_sample_size_rule(tmp_path):
    """diffusers: a U-Net saved before 0.9 with sample_size < 64 generates at sample_size 64."""
    folder = copy_folder(tmp_path / "old")
    edit_json(os.path.join(folder, "unet", "config.json"), lambda d: d.update(_diffusers_version="0.8.1"))
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert pipe.default_height_width() == (128, 128)            # 64 x the VAE factor 2
    assert our_pipeline().default_height_width() == (64, 64)     # a current config keeps its 32


def test_save_pretrained_refuses_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        our_pipeline().save_pretrained(target)
