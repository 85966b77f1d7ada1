"""LoRA files: write diffusers' ``pytorch_lora_weights.safetensors``; read it, PEFT's and kohya's layouts.

Shapes: per adapted layer A (r, I) or (r, C, kh, kw), B (O, r) or (O, r, 1, 1), alpha a scalar.

**diffusers / PEFT** (what ``StableDiffusionPipeline.save_lora_weights`` writes and ``load_lora_weights``
reads)::

    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight   (r, I)
    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight   (O, r)
    text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight                     (older: text_encoder.text_model.)
    __metadata__: {"format": "pt", "lora_adapter_metadata": JSON of the LoraConfig, each key prefixed
                   "unet." / "text_encoder.": r, lora_alpha, target_modules, rank_pattern, alpha_pattern, ...}

Without the metadata diffusers takes alpha = r (scale 1). We always write it, so alpha survives.

**kohya / A1111** (``lora_unet_`` / ``lora_te_`` + the module path with ``_`` for ``.``)::

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight   (r, I)  = A
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight     (O, r)  = B
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha              ()      alpha
    lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight

The underscored path is resolved against the model's own layer names (so ``to_out_0`` finds
``to_out.0``); a name that fits no layer, or two, is an error naming it. Every layout gives the same
``y = W x + (alpha / r) B A x``. Docs: docs/lora.md ("File formats").
"""
from __future__ import annotations

import json
import os
from collections import Counter

import numpy

from npdiffusion.io.safetensors import load_with_metadata, save_file
from npdiffusion.lora.attach import LoraAdapters, add_lora, name_matches
from npdiffusion.nn.conv import Conv2d
from npdiffusion.nn.linear import Linear
from npdiffusion.nn.lora import LoraLayer

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"          # diffusers' LORA_ADAPTER_METADATA_KEY
PREFIXES = ("unet", "text_encoder")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder"}
#: the last part of a key -> what it holds (PEFT, kohya, and diffusers' older "lora.down" names)
SUFFIXES = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_down.weight": "A", "lora_up.weight": "B",
            "lora.down.weight": "A", "lora.up.weight": "B", "alpha": "alpha"}


class LoraFileError(ValueError):
    """A LoRA file that cannot be used: names the file and the key."""


# ============================================================================ writing
def adapter_config(adapters: LoraAdapters, prefix: str) -> dict:
    """PEFT's LoraConfig fields of the adapters under ``prefix``: the most common rank and alpha as r and
    lora_alpha, the others in rank_pattern / alpha_pattern (keyed by the full module path)."""
    layers = {k[len(prefix) + 1:]: v for k, v in adapters.layers.items() if k.startswith(prefix + ".")}
    if not layers:
        return {}
    r = Counter(layer.rank for layer in layers.values()).most_common(1)[0][0]
    alpha = Counter(layer.alpha for layer in layers.values()).most_common(1)[0][0]
    return {"r": r, "lora_alpha": alpha, "target_modules": sorted(layers),
            "rank_pattern": {n: layer.rank for n, layer in layers.items() if layer.rank != r},
            "alpha_pattern": {n: layer.alpha for n, layer in layers.items() if layer.alpha != alpha},
            "lora_dropout": max(layer.dropout_p for layer in layers.values()), "bias": "none",
            "init_lora_weights": True, "use_dora": False, "use_rslora": False}


def save_lora(adapters: LoraAdapters, path) -> str:
    """Write ``adapters`` to ``path`` (a file, or a folder that gets ``pytorch_lora_weights.safetensors``)
    in diffusers' layout with the adapter metadata, atomically. Returns the file's path."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, WEIGHT_NAME)
    packed = {}
    for prefix in PREFIXES:
        for key, value in adapter_config(adapters, prefix).items():
            packed[f"{prefix}.{key}"] = value
    metadata = {"format": "pt", METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}
    save_file(dict(adapters.state_dict()), path, metadata=metadata)
    return path


# ============================================================================ reading
def _peft_alphas(metadata: dict, prefix: str, source: str) -> tuple[float | None, dict]:
    """(lora_alpha, alpha_pattern) of ``prefix`` from diffusers' metadata; (None, {}) when absent."""
    text = metadata.get(METADATA_KEY)
    if not text:
        return None, {}
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LoraFileError(f"{source}: metadata {METADATA_KEY!r} is not JSON ({exc})") from None
    alpha = config.get(f"{prefix}.lora_alpha")
    pattern = config.get(f"{prefix}.alpha_pattern") or {}
    if not isinstance(pattern, dict):
        raise LoraFileError(f"{source}: metadata {prefix}.alpha_pattern must be an object, got {pattern!r}")
    return alpha, {k.lstrip("^"): v for k, v in pattern.items()}


def _split_key(key: str):
    for suffix in SUFFIXES:
        if key.endswith("." + suffix):
            return key[:-len(suffix) - 1], SUFFIXES[suffix]
    return None, None


def _layer_names(model) -> dict:
    """underscored path -> dotted path of every Linear / Conv2d of ``model`` (both with and without
    transformers 4's ``text_model.`` level), ambiguous names mapped to None."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (Linear, Conv2d)) and not name.endswith(("lora_A", "lora_B")):
            name = name.replace(".base_layer", "")
            for key in (name.replace(".", "_"), "text_model_" + name.replace(".", "_")):
                out[key] = None if key in out and out[key] != name else name
    return out


def read_lora(path, models: dict) -> dict:
    """``{(prefix, module path): {"A": array, "B": array, "alpha": float}}`` from the LoRA file at ``path``
    (any layout of the module docstring); ``models`` maps ``"unet"`` / ``"text_encoder"`` to the models
    (kohya names are resolved against them)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, WEIGHT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file {path!r} does not exist")
    tensors, metadata = load_with_metadata(path)
    source = os.path.basename(path)
    entries: dict = {}
    lookups = {}
    for key, value in tensors.items():
        module, part = _split_key(key)
        if module is None:
            raise LoraFileError(f"{source}: key {key!r} is not a LoRA weight (expected names ending in "
                                f"lora_A.weight / lora_B.weight, or kohya's lora_down.weight / lora_up.weight / alpha)")
        kohya = next((p for p in KOHYA_PREFIXES if module.startswith(p)), None)
        if kohya is not None:
            prefix = KOHYA_PREFIXES[kohya]
            if prefix not in models:
                raise LoraFileError(f"{source}: {key!r} adapts the {prefix}, which is not loaded")
            names = lookups.setdefault(prefix, _layer_names(models[prefix]))
            underscored = module[len(kohya):]
            if names.get(underscored) is None:
                why = "two layers" if underscored in names else "no layer"
                raise LoraFileError(f"{source}: kohya name {module!r} fits {why} of the {prefix}")
            module = names[underscored]
        else:
            prefix, _, module = module.partition(".")
            if prefix not in PREFIXES or not module:
                raise LoraFileError(f"{source}: key {key!r} must start with 'unet.' or 'text_encoder.' (diffusers' "
                                    "layout) or 'lora_unet_' / 'lora_te_' (kohya's)")
            if prefix == "text_encoder" and module.startswith("text_model."):
                module = module[len("text_model."):]
        entry = entries.setdefault((prefix, module), {})
        entry[part] = float(numpy.asarray(value).reshape(-1)[0]) if part == "alpha" else value
    for (prefix, module), entry in entries.items():
        if "A" not in entry or "B" not in entry:
            raise LoraFileError(f"{source}: {prefix}.{module} has only {sorted(entry)}; it needs both LoRA matrices")
        rank = entry["A"].shape[0]
        if entry["B"].shape[1] != rank:
            raise LoraFileError(f"{source}: {prefix}.{module}: lora_A has rank {rank} but lora_B "
                                f"{tuple(entry['B'].shape)} (expected (out, {rank}, ...))")
        if "alpha" not in entry:
            alpha, pattern = _peft_alphas(metadata, prefix, source)
            for name, value in pattern.items():
                if name_matches(module, name):
                    alpha = value
                    break
            entry["alpha"] = float(rank if alpha is None else alpha)
    return entries


def load_lora(path, models: dict, multiplier: float = 1.0) -> LoraAdapters:
    """Attach the adapters of the LoRA file ``path`` to ``models`` (``{"unet": ..., "text_encoder": ...}``)
    with their ranks and alphas, load their weights and set the inference ``multiplier``. Returns them."""
    entries = read_lora(path, models)
    adapters = LoraAdapters()
    groups: dict = {}
    for (prefix, module), entry in entries.items():
        groups.setdefault((prefix, entry["A"].shape[0], entry["alpha"]), []).append(module)
    for prefix in {prefix for prefix, _, _ in groups}:
        if any(isinstance(m, LoraLayer) for m in models[prefix].modules()):
            raise LoraFileError(f"the {prefix} already has LoRA adapters; load one LoRA file at a time")
    for (prefix, rank, alpha), modules in groups.items():
        try:
            adapters.merge(add_lora(models[prefix], modules, rank, alpha, prefix=prefix, freeze=False))
        except (TypeError, ValueError) as exc:
            raise LoraFileError(f"{os.path.basename(os.fspath(path))}: {exc}") from None
    state = {}
    for key, view in adapters._modules.items():
        prefix, _, module = key.partition(".")
        entry = entries[(prefix, module)]
        for part, child in (("A", view.lora_A), ("B", view.lora_B)):
            value = numpy.asarray(entry[part])
            if value.shape != child.weight.shape and value.size == child.weight.size:
                value = value.reshape(child.weight.shape)             # a 1x1 conv's (r, I, 1, 1) for a Linear
            state[f"{key}.lora_{part}.weight"] = value
    adapters.load_state_dict(state)
    adapters.set_multiplier(multiplier)
    return adapters
