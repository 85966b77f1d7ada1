"""LoRA files both ways with diffusers, on the tiny pipeline of pipeline_dummy.py (saved by diffusers in a
temporary folder, offline): our pytorch_lora_weights.safetensors loads in diffusers' load_lora_weights and
gives diffusers our images; a LoRA saved by diffusers + peft loads here with diffusers' images; a kohya-layout
file built from the same weights gives the same images; bad files fail with one clear error."""
import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline as TorchPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.io.safetensors import load_with_metadata, save_file
from npdiffusion.lora import (TEXT_ENCODER_TARGETS, UNET_ATTENTION_TARGETS, LoraFileError, add_lora, load_lora,
                              save_lora)
from parity import torch_threads
from pipeline_dummy import PROMPTS, dummy_folder, our_pipeline, quiet_diffusers

TOL = 1e-4          # float32 images, as tests/test_pipeline_parity.py
KW = dict(num_inference_steps=2, guidance_scale=7.5, output_type="np", height=32, width=32)


def _latents():
    return np.random.default_rng(0).standard_normal((len(PROMPTS), 4, 16, 16)).astype(np.float32)


def _ours(pipe):
    return pipe(PROMPTS, latents=_latents(), **KW).images


def _theirs(pipe):
    with torch_threads(1):
        return pipe(PROMPTS, latents=torch.from_numpy(_latents()), **KW).images


def _diffusers_pipe():
    quiet_diffusers()
    pipe = TorchPipeline.from_pretrained(dummy_folder())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _our_trained_lora(pipe):
    """Adapters on the U-Net (rank 2, alpha 3, attention) and the text encoder (rank 2, alpha 1), drawn
    at random (B != 0, large enough to change the images)."""
    adapters = add_lora(pipe.unet, UNET_ATTENTION_TARGETS, 2, 3.0)
    adapters.merge(add_lora(pipe.text_encoder, TEXT_ENCODER_TARGETS, 2, 1.0, prefix="text_encoder"))
    rng = np.random.default_rng(3)
    for _, p in adapters.named_parameters():
        p[...] = asarray(rng.standard_normal(p.shape) * 0.5, dtype=p.dtype)
    return adapters


def test_our_file_loads_in_diffusers_with_the_same_images(tmp_path):
    plain = _ours(our_pipeline())
    pipe = our_pipeline()
    adapters = _our_trained_lora(pipe)
    path = save_lora(adapters, tmp_path)
    ours = _ours(pipe)
    assert np.abs(ours - plain).max() > 1e-2                          # the LoRA changes the images
    tensors, metadata = load_with_metadata(path)
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in tensors
    assert "text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight" in tensors
    config = json.loads(metadata["lora_adapter_metadata"])
    assert config["unet.r"] == 2 and config["unet.lora_alpha"] == 3.0 and config["text_encoder.lora_alpha"] == 1.0
    theirs_pipe = _diffusers_pipe()
    with torch_threads(1):
        theirs_pipe.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")
    theirs = _theirs(theirs_pipe)
    assert np.abs(ours - theirs).max() <= TOL
    # the inference scale: ours with multiplier 0.5, diffusers with the adapter weight 0.5
    adapters.set_multiplier(0.5)
    half = _ours(pipe)
    assert np.abs(half - ours).max() > 1e-3
    with torch_threads(1):
        theirs_pipe.set_adapters(theirs_pipe.get_active_adapters(), adapter_weights=[0.5])
    assert np.abs(half - _theirs(theirs_pipe)).max() <= TOL


def test_diffusers_peft_lora_loads_here_with_the_same_images(tmp_path):
    pipe = _diffusers_pipe()
    with torch_threads(1):
        pipe.unet.add_adapter(LoraConfig(r=3, lora_alpha=6, target_modules=list(UNET_ATTENTION_TARGETS),
                                         init_lora_weights=False))          # random A and B
        pipe.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=list(TEXT_ENCODER_TARGETS),
                                                 init_lora_weights=False))
        TorchPipeline.save_lora_weights(
            str(tmp_path), unet_lora_layers=get_peft_model_state_dict(pipe.unet),
            text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
            unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
            text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict())
    theirs = _theirs(pipe)
    ours_pipe = our_pipeline()
    adapters = load_lora(tmp_path / "pytorch_lora_weights.safetensors",
                         {"unet": ours_pipe.unet, "text_encoder": ours_pipe.text_encoder})
    assert {layer.alpha / layer.rank for layer in adapters.layers.values()} == {2.0, 1.0}
    ours = _ours(ours_pipe)
    assert np.abs(ours - _ours(our_pipeline())).max() > 1e-2
    assert np.abs(ours - theirs).max() <= TOL


def _kohya_name(key: str) -> str:
    prefix, _, module = key.partition(".")
    head = "lora_unet_" if prefix == "unet" else "lora_te_text_model_"
    return head + module.replace(".", "_")


def test_kohya_file_from_the_same_weights_gives_the_same_images(tmp_path):
    pipe = our_pipeline()
    adapters = _our_trained_lora(pipe)
    want = _ours(pipe)
    kohya = {}
    for key, layer in adapters.layers.items():
        name = _kohya_name(key)
        kohya[f"{name}.lora_down.weight"] = to_numpy(layer.lora_A.weight)
        kohya[f"{name}.lora_up.weight"] = to_numpy(layer.lora_B.weight)
        kohya[f"{name}.alpha"] = np.asarray(layer.alpha, dtype=np.float32)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in kohya
    save_file(kohya, tmp_path / "kohya.safetensors")
    fresh = our_pipeline()
    loaded = load_lora(tmp_path / "kohya.safetensors", {"unet": fresh.unet, "text_encoder": fresh.text_encoder})
    assert sorted(loaded.layers) == sorted(adapters.layers)
    assert np.array_equal(_ours(fresh), want)


def test_bad_lora_files_fail_with_one_clear_error(tmp_path):
    pipe = our_pipeline()
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    a, b = np.zeros((2, 8), np.float32), np.zeros((8, 2), np.float32)
    cases = {
        "other.safetensors": ({"unet.conv_in.weight": a}, "is not a LoRA weight"),
        "half.safetensors": ({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": a},
                             "needs both LoRA matrices"),
        "kohya.safetensors": ({"lora_unet_no_such_layer.lora_down.weight": a,
                               "lora_unet_no_such_layer.lora_up.weight": b},
                              "fits no layer of the unet"),
        "prefix.safetensors": ({"vae.x.lora_A.weight": a, "vae.x.lora_B.weight": b}, "must start with 'unet.'"),
        "rank.safetensors": ({"unet.x.lora_A.weight": a, "unet.x.lora_B.weight": np.zeros((8, 3), np.float32)},
                             "lora_A has rank 2 but lora_B"),
    }
    for name, (tensors, message) in cases.items():
        save_file(tensors, tmp_path / name)
        with pytest.raises(LoraFileError, match=message):
            load_lora(tmp_path / name, models)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_lora(tmp_path / "missing.safetensors", models)
