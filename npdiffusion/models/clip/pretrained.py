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
from npdiffusion.models.clip.config import CLIPConfig
from npdiffusion.nn.module import canonical_dtype

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


class TowerFolders:
    """State dicts and model folders of a CLIP tower (a Module subclass lists this class first).

    The tower sets ``config_class`` (its config class), ``state_prefix`` (``"text_model."``, the key
    level published checkpoints carry) and ``clip_config_key`` (``"text_config"``, where a
    ``CLIPModel`` folder keeps the tower's config).
    """

    config_class = None
    state_prefix = ""
    clip_config_key = ""

    def load_state_dict(self, state_dict, strict: bool = True):
        """Module.load_state_dict, also accepting keys with ``state_prefix`` and ignoring a stored
        ``position_ids`` (see the module docstring)."""
        return super().load_state_dict(strip_prefix(state_dict, self.state_prefix), strict=strict)

    @classmethod
    def from_config(cls, config):
        return cls(cls.config_class.from_dict(config))

    @classmethod
    def from_pretrained(cls, folder, subfolder: str | None = None, dtype=None):
        """Load a transformers folder (``config.json`` + ``model.safetensors``) of this tower or of a
        ``CLIPModel`` (its tower is read), e.g. ``from_pretrained(sd_folder, subfolder="text_encoder")``.
        ``dtype`` (default float32) is the parameters' dtype. Returns the model in eval() mode, as
        transformers does."""
        config, state = read_folder(folder, subfolder)
        is_clip = config.get("model_type") == "clip" or cls.clip_config_key in config
        model = cls(getattr(CLIPConfig.from_dict(config), cls.clip_config_key) if is_clip else config)
        model.to(canonical_dtype("float32" if dtype is None else dtype))
        model.load_state_dict(strip_prefix(state, cls.state_prefix, only=is_clip))
        return model.eval()

    def save_pretrained(self, folder) -> str:
        """Write ``config.json`` and ``model.safetensors`` (keys with ``state_prefix``, which
        transformers 4.x and 5.x both load) into ``folder``. Returns the folder."""
        return write_folder(folder, self.config.to_dict(), type(self).__name__, self.config_class.model_type,
                            self.state_dict(), self.dtype, prefix=self.state_prefix)


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
