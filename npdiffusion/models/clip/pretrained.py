"""Model folders for the CLIP models: transformers' layout (``config.json`` + ``model.safetensors``)
and the key conventions of its checkpoints.

Key prefixes. transformers 5.x builds ``CLIPTextModel`` / ``CLIPVisionModel`` without the
``text_model.`` / ``vision_model.`` level that 4.x had, so their state dicts start at
``embeddings.``; every published checkpoint (OpenAI CLIP, Stable Diffusion's ``text_encoder/``)
still carries the prefix, and transformers 5.x strips it on load (``PrefixChange`` in its
``conversion_mapping.py``) and adds it back when it saves a model it loaded that way. Our
state dicts equal transformers 5.x's; ``save_pretrained`` writes the prefixed keys, which every
transformers version (4.x and 5.x) loads, and loading accepts both.

``position_ids`` is a non-persistent buffer in transformers (absent from its state dict); older
checkpoints stored it, so a stored ``*.embeddings.position_ids`` is dropped on load, as
transformers does.
"""
from __future__ import annotations

import os

from npdiffusion.backend import to_numpy
from npdiffusion.io.atomic_folder import atomic_folder
from npdiffusion.io.pretrained import load_weights, read_config, save_weights, write_config

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def folder_path(folder, subfolder):
    path = os.fspath(folder)
    return os.path.join(path, subfolder) if subfolder else path


def strip_prefix(state_dict, prefix: str, only: bool = False) -> dict:
    """``state_dict`` with ``prefix`` removed from the keys that carry it (when any does).

    ``only``: keep just the keys that carry the prefix (a tower read out of a CLIPModel
    checkpoint). ``*position_ids`` entries are dropped either way.
    """
    if not hasattr(state_dict, "items"):
        raise TypeError(f"state_dict must be a mapping of names to arrays, got {type(state_dict).__name__}")
    has = any(k.startswith(prefix) for k in state_dict)
    out = {}
    for key, value in state_dict.items():
        if key.endswith("embeddings.position_ids"):
            continue
        if has and key.startswith(prefix):
            out[key[len(prefix):]] = value
        elif not only:
            out[key] = value
    return out


def drop_position_ids(state_dict) -> dict:
    if not hasattr(state_dict, "items"):
        raise TypeError(f"state_dict must be a mapping of names to arrays, got {type(state_dict).__name__}")
    return {k: v for k, v in state_dict.items() if not k.endswith("embeddings.position_ids")}


def read_folder(folder, subfolder=None):
    """``(config dict, state dict)`` of a transformers model folder."""
    path = folder_path(folder, subfolder)
    return read_config(path, CONFIG_NAME), load_weights(path, (WEIGHTS_NAME,))


def write_folder(folder, config: dict, class_name: str, model_type: str, state_dict, dtype, prefix: str = "") -> str:
    """Write ``config.json`` (with transformers' ``dtype`` entry) and ``model.safetensors``
    (keys prefixed with ``prefix``), replacing ``folder`` as a whole, atomically (``io.atomic_folder``).
    Returns the folder."""
    folder = os.fspath(folder)
    config = dict(config, dtype=str(dtype))
    with atomic_folder(folder) as tmp:
        write_config(tmp, config, class_name, CONFIG_NAME, library="transformers", model_type=model_type)
        save_weights(tmp, {prefix + k: to_numpy(v) for k, v in state_dict.items()}, WEIGHTS_NAME)
    return folder
