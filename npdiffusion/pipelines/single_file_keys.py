"""Tensor names of the original single-file Stable Diffusion checkpoints <-> diffusers' names, both ways.

Shapes: C channels, D the text width, n down blocks, L resnets per down block (L + 1 per up block),
N text layers.

The original (CompVis / Stability "LDM") file holds every model under one prefix::

    model.diffusion_model.*          the U-Net (openaimodel.UNetModel names)
    model_ema.*                      an EMA copy of the U-Net, names with their dots removed
    first_stage_model.*              the VAE (ldm.models.autoencoder names)
    cond_stage_model.transformer.*   SD 1.x: transformers' CLIPTextModel (text_model.* names)
    cond_stage_model.model.*         SD 2.x: OpenCLIP's text tower (resblocks, fused in_proj)

Each model's mapping is one ``KeyTable``: rows ``(diffusers prefix, original prefix, renames)`` built
from the model's config, read in one direction to save and in the other to load, so the two
directions cannot disagree. A key is translated by its longest prefix found in the table; the rest
of the key keeps its name except for the row's ``renames`` (pairs of leading name parts, e.g.
``norm1`` <-> ``in_layers.0`` inside a U-Net resnet). Besides renaming, three tensors change shape:
the VAE's attention q/k/v/proj_out are 1x1 convolutions (C, C, 1, 1) in the original and linear
(C, C) in diffusers; OpenCLIP fuses q, k, v into ``in_proj_weight`` (3D, D) / ``in_proj_bias`` (3D,);
and OpenCLIP's text tower has one more block (SD 2.x takes the penultimate layer's output, so the
last block is never run): it is dropped on load and written as zeros (an identity block) on save.
The rules are those of diffusers' ``loaders/single_file_utils.py`` (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_open_clip_checkpoint``), written as a table. Every name
table and every rule: docs/checkpoints.md ("Original single-file checkpoints").
"""
from __future__ import annotations

import numpy

from npdiffusion.io.lazy_tensors import concatenated, derived, reshaped, take_rows

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
VAE_PREFIXES = ("first_stage_model.", "vae.")   # diffusers also reads "vae." and a VAE file without a prefix
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."

UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
               ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
VAE_RESNET = (("conv_shortcut", "nin_shortcut"),)
VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
OPEN_CLIP_LAYER = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                   ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj"))
#: original OpenCLIP tensors that a CLIPTextModel has no place for (the pooled projection, CLIP's temperature)
OPEN_CLIP_UNUSED = ("text_projection", "logit_scale", "attn_mask")


class KeyTable:
    """Rows ``(diffusers prefix, original prefix, renames)`` read in both directions (module docstring)."""

    def __init__(self, rows):
        self._to_original = {d: (o, tuple(renames)) for d, o, renames in rows}
        self._to_diffusers = {o: (d, tuple((b, a) for a, b in renames)) for d, o, renames in rows}

    @staticmethod
    def _translate(key: str, table: dict):
        parts = key.split(".")
        for k in range(len(parts), -1, -1):
            hit = table.get(".".join(parts[:k]))
            if hit is None:
                continue
            target, renames = hit
            rest = ".".join(parts[k:])
            for a, b in renames:
                if rest == a or rest.startswith(a + "."):
                    rest = b + rest[len(a):]
                    break
            return ".".join(p for p in (target, rest) if p)
        return None

    def to_original(self, key: str):
        """The original name of the diffusers name ``key`` (None when no row covers it)."""
        return self._translate(key, self._to_original)

    def to_diffusers(self, key: str):
        """The diffusers name of the original name ``key`` (None when no row covers it)."""
        return self._translate(key, self._to_diffusers)


def _per_block(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def unet_table(config) -> KeyTable:
    """The U-Net's rows: input_blocks.{i} (i = 1 + b (L + 1) + j) <-> down_blocks.{b}.resnets/attentions.{j},
    input_blocks.{(b + 1)(L + 1)}.0.op <-> the down block's downsampler, middle_block.{0, 1, 2} <-> the mid
    block, output_blocks.{b (L + 1) + j} <-> up_blocks.{b}, the upsampler at .1.conv (.2.conv after an
    attention) of each up block's last layer."""
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    n = len(down)
    layers = _per_block(config["layers_per_block"], n)
    rows = [("time_embedding.linear_1", "time_embed.0", ()), ("time_embedding.linear_2", "time_embed.2", ()),
            ("conv_in", "input_blocks.0.0", ()), ("conv_norm_out", "out.0", ()), ("conv_out", "out.2", ())]
    i = 1
    for b, kind in enumerate(down):
        for j in range(layers[b]):
            rows.append((f"down_blocks.{b}.resnets.{j}", f"input_blocks.{i}.0", UNET_RESNET))
            if kind.startswith("CrossAttn"):
                rows.append((f"down_blocks.{b}.attentions.{j}", f"input_blocks.{i}.1", ()))
            i += 1
        if b != n - 1:
            rows.append((f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{i}.0.op", ()))
            i += 1
    rows += [("mid_block.resnets.0", "middle_block.0", UNET_RESNET), ("mid_block.attentions.0", "middle_block.1", ()),
             ("mid_block.resnets.1", "middle_block.2", UNET_RESNET)]
    i = 0
    for b, kind in enumerate(up):
        attention = kind.startswith("CrossAttn")
        count = layers[n - 1 - b] + 1
        for j in range(count):
            rows.append((f"up_blocks.{b}.resnets.{j}", f"output_blocks.{i}.0", UNET_RESNET))
            if attention:
                rows.append((f"up_blocks.{b}.attentions.{j}", f"output_blocks.{i}.1", ()))
            if j == count - 1 and b != n - 1:
                rows.append((f"up_blocks.{b}.upsamplers.0.conv", f"output_blocks.{i}.{2 if attention else 1}.conv", ()))
            i += 1
    return KeyTable(rows)


def vae_table(config) -> KeyTable:
    """The VAE's rows: encoder.down.{i}.block.{j} <-> encoder.down_blocks.{i}.resnets.{j}, decoder.up.{n-1-i}
    <-> decoder.up_blocks.{i} (the original numbers the decoder's levels from the bottom), mid.block_{1,2}
    <-> mid_block.resnets.{0,1}, mid.attn_1 <-> mid_block.attentions.0, norm_out <-> conv_norm_out."""
    n = len(config["block_out_channels"])
    layers = config.get("layers_per_block", 1)
    rows = []
    for part in ("encoder", "decoder"):
        rows += [(f"{part}.conv_in", f"{part}.conv_in", ()), (f"{part}.conv_out", f"{part}.conv_out", ()),
                 (f"{part}.conv_norm_out", f"{part}.norm_out", ())]
        rows += [(f"{part}.mid_block.resnets.{j}", f"{part}.mid.block_{j + 1}", VAE_RESNET) for j in range(2)]
        if config.get("mid_block_add_attention", True):
            rows.append((f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", VAE_ATTENTION))
    for i in range(n):
        rows += [(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", VAE_RESNET)
                 for j in range(layers)]
        rows += [(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{n - 1 - i}.block.{j}", VAE_RESNET)
                 for j in range(layers + 1)]
        if i != n - 1:
            rows.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", ()))
            rows.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{n - 1 - i}.upsample.conv", ()))
    rows += [("quant_conv", "quant_conv", ()), ("post_quant_conv", "post_quant_conv", ())]
    return KeyTable(rows)


def open_clip_table(num_layers: int) -> KeyTable:
    """OpenCLIP's rows (names under cond_stage_model.model.); q/k/v are fused apart from the table."""
    rows = [("embeddings.token_embedding.weight", "token_embedding.weight", ()),
            ("embeddings.position_embedding.weight", "positional_embedding", ()),
            ("final_layer_norm", "ln_final", ())]
    rows += [(f"encoder.layers.{i}", f"transformer.resblocks.{i}", OPEN_CLIP_LAYER) for i in range(num_layers)]
    return KeyTable(rows)


def _renamed(state, translate, what: str) -> dict:
    out, missing = {}, []
    for key, value in state.items():
        name = translate(key)
        if name is None:
            missing.append(key)
        else:
            out[name] = value
    if missing:
        raise ValueError(f"{what}: no counterpart for {len(missing)} tensors, e.g. {missing[:5]} (the config does not "
                         "describe these weights)")
    return out


def _under(tensors, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def ema_key(original_key: str) -> str:
    """The EMA name of an original U-Net name: ``model.diffusion_model.a.0.weight`` -> ``model_ema.diffusion_modela0weight``
    (LDM's LitEma stores each parameter under its name with the dots removed)."""
    return EMA_PREFIX + "".join(original_key.split(".")[1:])


# ------------------------------------------------------------------------------------------ U-Net
def unet_to_original(state, config) -> dict:
    """{model.diffusion_model.*: tensor} of a U-Net state dict (diffusers names)."""
    table = unet_table(config)
    return {UNET_PREFIX + k: v for k, v in _renamed(state, table.to_original, "U-Net to the original layout").items()}


def unet_ema_to_original(state, config) -> dict:
    """{model_ema.*: tensor} of an EMA U-Net state dict (diffusers names)."""
    return {ema_key(k): v for k, v in unet_to_original(state, config).items()}


def unet_from_original(tensors, config, extract_ema: bool = False) -> dict:
    """The U-Net state dict (diffusers names) in an original checkpoint; ``extract_ema`` takes the
    ``model_ema.*`` copies of the same parameters (diffusers' ``extract_ema``), as LDM does with ``use_ema``."""
    table = unet_table(config)
    state = _renamed(_under(tensors, UNET_PREFIX), table.to_diffusers, "original U-Net to diffusers")
    if not extract_ema:
        return state
    out, missing = {}, []
    for key in state:
        name = ema_key(UNET_PREFIX + table.to_original(key))
        if name in tensors:
            out[key] = tensors[name]
        else:
            missing.append(name)
    if missing:
        raise ValueError(f"extract_ema=True: the checkpoint has no EMA copy of {len(missing)} U-Net tensors, "
                         f"e.g. {missing[:3]}")
    return out


# ------------------------------------------------------------------------------------------ VAE
def _is_attention_weight(name: str) -> bool:
    return ".mid_block.attentions." in name and name.endswith(".weight") and ".group_norm." not in name


def vae_to_original(state, config) -> dict:
    """{first_stage_model.*: tensor} of a VAE state dict; attention weights (C, C) -> (C, C, 1, 1)."""
    table = vae_table(config)
    out = {}
    for key, value in state.items():
        name = table.to_original(key)
        if name is None:
            raise ValueError(f"VAE to the original layout: no counterpart for {key!r}")
        out[VAE_PREFIXES[0] + name] = reshaped(value, tuple(value.shape) + (1, 1)) if _is_attention_weight(key) \
            and len(value.shape) == 2 else value
    return out


def vae_prefix(tensors) -> str:
    """The prefix of the VAE's tensors: ``first_stage_model.`` (a whole checkpoint), ``vae.``, or none
    (a VAE file such as vae-ft-mse-840000-ema-pruned.safetensors)."""
    for prefix in VAE_PREFIXES:
        if any(k.startswith(prefix) for k in tensors):
            return prefix
    return ""


def vae_from_original(tensors, config) -> dict:
    """The VAE state dict (diffusers names) in an original checkpoint; 1x1-conv attention weights -> (C, C)."""
    table = vae_table(config)
    found = {k: v for k, v in _under(tensors, vae_prefix(tensors)).items() if k.split(".")[0] in
             ("encoder", "decoder", "quant_conv", "post_quant_conv")}
    state = _renamed(found, table.to_diffusers, "original VAE to diffusers")
    return {k: reshaped(v, tuple(v.shape[:2])) if _is_attention_weight(k) and len(v.shape) > 2 else v
            for k, v in state.items()}


# ------------------------------------------------------------------------------------------ text encoders
def clip_to_original(state) -> dict:
    """SD 1.x: {cond_stage_model.transformer.text_model.*: tensor} of a CLIPTextModel state dict."""
    return {CLIP_PREFIX + k: v for k, v in state.items() if not k.endswith("position_ids")}


def clip_from_original(tensors) -> dict:
    """SD 1.x: the CLIPTextModel state dict (position_ids dropped, as transformers does)."""
    return {k: v for k, v in _under(tensors, CLIP_PREFIX).items() if not k.endswith("position_ids")}


def open_clip_layer_count(tensors) -> int:
    """The number of OpenCLIP resblocks in a checkpoint (24 in SD 2.x, whose text encoder runs 23)."""
    found = {int(k.split(".")[4]) for k in tensors if k.startswith(OPEN_CLIP_PREFIX + "transformer.resblocks.")}
    return max(found) + 1 if found else 0


def open_clip_to_original(state, num_layers: int) -> dict:
    """SD 2.x: OpenCLIP's tensors of a CLIPTextModel state dict with ``num_layers`` layers: q, k, v fused
    into in_proj (3D, D) / (3D,); one more block of zeros (an identity: each branch adds 0) that the
    penultimate-layer text encoder never runs; an identity ``text_projection`` (D, D) (unused by SD)."""
    table = open_clip_table(num_layers)
    state = dict(state)
    out = {}
    for i in range(num_layers):
        for kind in ("weight", "bias"):
            parts = [state.pop(f"encoder.layers.{i}.self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = concatenated(parts)
    out.update(_renamed({k: v for k, v in state.items() if not k.endswith("position_ids")}, table.to_original,
                        "text encoder to OpenCLIP"))
    width = out["token_embedding.weight"].shape[1]
    dtype = out["token_embedding.weight"].dtype
    for key in [k for k in out if k.startswith(f"transformer.resblocks.{num_layers - 1}.")]:
        extra = key.replace(f"resblocks.{num_layers - 1}.", f"resblocks.{num_layers}.", 1)
        shape = tuple(out[key].shape)
        out[extra] = derived(shape, dtype, lambda shape=shape: numpy.zeros(shape, dtype))
    out["text_projection"] = derived((width, width), dtype, lambda: numpy.eye(width, dtype=dtype))
    return {OPEN_CLIP_PREFIX + k: v for k, v in out.items()}


def open_clip_from_original(tensors, num_layers: int) -> dict:
    """SD 2.x: the CLIPTextModel state dict (``num_layers`` layers) in OpenCLIP's tensors: in_proj split into
    q, k, v (rows [0, D), [D, 2D), [2D, 3D)); the blocks from ``num_layers`` on and the unused tensors dropped."""
    table = open_clip_table(num_layers)
    found = _under(tensors, OPEN_CLIP_PREFIX)
    state = {}
    for key, value in found.items():
        parts = key.split(".")
        if key in OPEN_CLIP_UNUSED or (parts[:2] == ["transformer", "resblocks"] and int(parts[2]) >= num_layers):
            continue
        if parts[-1] in ("in_proj_weight", "in_proj_bias"):
            width = value.shape[0] // 3
            base = f"encoder.layers.{parts[2]}.self_attn"
            for j, p in enumerate("qkv"):
                state[f"{base}.{p}_proj.{parts[-1][len('in_proj_'):]}"] = take_rows(value, j * width, (j + 1) * width)
            continue
        name = table.to_diffusers(key)
        if name is None:
            raise ValueError(f"OpenCLIP text encoder: no counterpart for {OPEN_CLIP_PREFIX + key!r}")
        state[name] = value
    return state
