"""Write a full-size, random-weight Stable Diffusion single-file checkpoint (original layout), tensor by tensor.

    python tools/make_sd_checkpoint.py OUT_DIR [--version 1|2] [--seed 0] [--dtype float32|float16]

Writes OUT_DIR/sd{15,21}-random.safetensors (the U-Net of SD 1.5: 860 M parameters; SD 2.1's with
--version 2), its .yaml beside it, and OUT_DIR/tokenizer/ (a small BPE tokenizer trained here: a
single file holds no tokenizer, and ``npdiffusion convert FILE FOLDER --tokenizer OUT_DIR/tokenizer``
needs one). Nothing is downloaded: the shapes come from diffusers' and transformers' models built on
torch's meta device (no memory), the names from npdiffusion's tables, and each tensor is drawn from
N(0, 0.02^2) by its own seeded generator only when the writer reaches it, so the tool itself needs
about one tensor of memory. It is what docs/checkpoints.md's peak-memory figures were measured on.
"""
from __future__ import annotations

import argparse
import os
import zlib

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm
from transformers import CLIPTextConfig, CLIPTextModel

from npdiffusion.io.lazy_tensors import LazyTensor
from npdiffusion.models.clip.bpe_train import save_bpe_files, train_bpe
from npdiffusion.pipelines.original_config import original_config_for
from npdiffusion.pipelines.single_file import original_tensors, write_single_file

UNET_PARAMS = {1: {"num_heads": 8, "context_dim": 768},
               2: {"num_head_channels": 64, "use_linear_in_transformer": True, "context_dim": 1024}}
TEXT = {1: dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                hidden_act="quick_gelu", projection_dim=768),
        2: dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                hidden_act="gelu", projection_dim=512)}


def shapes(module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def random_state(shape_of: dict, seed: int, dtype) -> dict:
    """{name: LazyTensor} drawing N(0, 0.02^2) for each tensor when it is written (seed mixed with the name)."""
    def draw(name, shape):
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype)
    return {k: LazyTensor(s, dtype, lambda k=k, s=s: draw(k, s)) for k, s in shape_of.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--version", type=int, choices=(1, 2), default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    unet_params = {"model_channels": 320, "attention_resolutions": [4, 2, 1], "num_res_blocks": 2,
                   "channel_mult": [1, 2, 4, 4], "transformer_depth": 1, "in_channels": 4, "out_channels": 4,
                   **UNET_PARAMS[args.version]}
    original = {"model": {"params": {"unet_config": {"params": unet_params},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    with torch.device("meta"):
        unet_config = create_unet_diffusers_config_from_ldm(original, {})
        unet = UNet2DConditionModel(**{**unet_config, "sample_size": 64 if args.version == 1 else 96})
        vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            sample_size=512 if args.version == 1 else 768)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **TEXT[args.version]))
    dtype = np.dtype(args.dtype)
    text_shapes = {k.removeprefix("text_model."): s for k, s in shapes(text).items() if "position_ids" not in k}
    text_config = TEXT[args.version]
    kind = "clip" if args.version == 1 else "open_clip"
    tensors = original_tensors(random_state(shapes(unet), args.seed, dtype), dict(unet.config),
                               random_state(shapes(vae), args.seed + 1, dtype), dict(vae.config),
                               random_state(text_shapes, args.seed + 2, dtype), text_config, kind)
    scheduler = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
                 "prediction_type": "epsilon" if args.version == 1 else "v_prediction"}
    name = "sd15-random.safetensors" if args.version == 1 else "sd21-random.safetensors"
    path = write_single_file(os.path.join(args.out, name), tensors,
                             original_config_for(dict(unet.config), dict(vae.config), kind, scheduler))
    words = "a photo of an astronaut riding horse on the moon red blue green cat dog painting city".split()
    rng = np.random.default_rng(args.seed)
    vocab, merges = train_bpe([" ".join(rng.choice(words, 6)) for _ in range(200)], 600)
    save_bpe_files(os.path.join(args.out, "tokenizer"), vocab, merges)
    count = sum(int(np.prod(s)) for s in shapes(unet).values())
    print(f"{path}: {os.path.getsize(path) / 2**30:.2f} GiB, U-Net {count / 1e6:.0f} M parameters")


if __name__ == "__main__":
    main()
