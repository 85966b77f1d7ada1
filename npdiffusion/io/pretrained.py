"""Model folders in the diffusers / transformers layout: ``config.json`` + safetensors weights.

Every model's ``from_pretrained`` / ``save_pretrained`` is built from these helpers::

    config = read_config(folder)                          # dict, from config.json
    state = load_weights(folder)                          # name -> NumPy array
    model = UNet2DConditionModel(**kwargs_from(config)); model.load_state_dict(state)

    write_config(folder, model_config, "UNet2DConditionModel")             # diffusers layout
    save_weights(folder, model.state_dict(), "diffusion_pytorch_model.safetensors")

    write_config(folder, cfg, "CLIPTextModel", library="transformers", model_type="clip_text_model")
    save_weights(folder, model.state_dict(), "model.safetensors")

A diffusers model folder holds ``config.json`` (with ``_class_name`` and ``_diffusers_version``)
and ``diffusion_pytorch_model.safetensors``; a transformers one holds ``config.json`` (with
``architectures``, ``model_type`` and ``transformers_version``) and ``model.safetensors``. Large
checkpoints may be sharded: ``<name>.safetensors.index.json`` maps each tensor to its shard file.
Pickle checkpoints (``.bin``, ``.ckpt``, ``.pt``...) are never opened: unpickling runs code.

Folder layout and conversion notes: docs/checkpoints.md ("Model folders").
"""
from __future__ import annotations

import json
import math
import os
from typing import Mapping

import numpy

from npdiffusion.backend import xp
from npdiffusion.checks import read_json_object
from npdiffusion.io.atomic import atomic_write_text
from npdiffusion.io.safetensors import load_file, save_file

DIFFUSERS_VERSION = "0.42.1"
TRANSFORMERS_VERSION = "5.23.0"
DEFAULT_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
LIBRARIES = ("diffusers", "transformers")


def _folder(folder, what: str) -> str:
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{what}: model folder {folder!r} does not exist or is not a folder")
    return folder


# ============================================================================ configs
def read_config(folder, filename: str = "config.json") -> dict:
    """The JSON object in ``folder/filename`` as a dict.

    Raises FileNotFoundError naming the folder when the file is missing, ValueError when it is not
    valid JSON or not a JSON object, or holds a non-finite number (``check_config_finite``).
    """
    folder = _folder(folder, "read_config")
    path = os.path.join(folder, filename)
    if not os.path.isfile(path):
        present = sorted(os.listdir(folder))[:20]
        raise FileNotFoundError(f"read_config: no {filename} in model folder {folder!r} (it holds {present})")
    config = read_json_object(path, "read_config")
    check_config_finite(config, path)
    return config


def _non_finite(value, key: str):
    """(key path, value) of the first non-finite float in a parsed JSON value, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return key, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        found = _non_finite(v, f"{key}[{k}]" if isinstance(k, int) else f"{key}.{k}" if key else str(k))
        if found is not None:
            return found
    return None


def check_config_finite(config: Mapping, source, infinite_ok=()) -> None:
    """Raise ValueError naming ``source`` and the key of the first NaN or infinite number in ``config``.

    Python's JSON reader accepts the non-standard literals ``NaN``, ``Infinity`` and ``-Infinity``
    and turns an overflowing number such as ``1e999`` into inf; no model setting is meaningful at
    those values (``"freq_shift": NaN`` makes every image black), so they are refused where a config
    file is read. Nested keys are named ``a.b`` and list entries ``a[1]``. The top-level keys in
    ``infinite_ok`` may be +-inf (not NaN): diffusers itself writes ``"lambda_min_clipped": -Infinity``
    (no clipping) in DPM-Solver scheduler configs.
    """
    config = dict(config)
    for key in infinite_ok:
        if isinstance(config.get(key), float) and math.isinf(config[key]):
            del config[key]
    found = _non_finite(config, "")
    if found is not None:
        key, value = found
        shown = "NaN" if math.isnan(value) else repr(value)
        raise ValueError(f"{os.fspath(source)!r}: {key!r} is {shown}; config numbers must be finite (NaN and "
                         "Infinity are not JSON numbers)")


def _json_value(key, value):
    """Config values as JSON types (tuples -> lists, NumPy scalars/arrays -> Python)."""
    if isinstance(value, numpy.ndarray):
        return value.tolist()
    if isinstance(value, numpy.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_json_value(key, v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(f"{key}.{k}", v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"write_config: config[{key!r}] is a {type(value).__name__}, which JSON cannot hold")


def write_config(folder, config: Mapping, class_name: str, filename: str = "config.json",
                 library: str = "diffusers", model_type: str | None = None) -> str:
    """Write ``config`` to ``folder/filename`` (atomically) the way diffusers/transformers do.

    ``library="diffusers"`` adds ``_class_name`` = ``class_name`` and ``_diffusers_version``;
    ``library="transformers"`` adds ``architectures`` = [``class_name``], ``model_type`` (when
    given) and ``transformers_version``. Keys are sorted, 2-space indent, trailing newline. The
    folder is created if needed. Returns the file's path.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"write_config: config must be a dict, got {type(config).__name__}")
    if not isinstance(class_name, str) or not class_name:
        raise TypeError(f"write_config: class_name must be a non-empty str, got {class_name!r}")
    if library not in LIBRARIES:
        raise ValueError(f"write_config: library must be one of {LIBRARIES}, got {library!r}")
    out = {str(k): _json_value(k, v) for k, v in config.items()}
    if library == "diffusers":
        out["_class_name"] = class_name
        out["_diffusers_version"] = DIFFUSERS_VERSION
    else:
        out["architectures"] = [class_name]
        if model_type is not None:
            out["model_type"] = model_type
        out["transformers_version"] = TRANSFORMERS_VERSION
    try:
        text = json.dumps(out, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except ValueError as exc:
        raise ValueError(f"write_config: config holds a NaN or infinite number: {exc}") from None
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, filename)
    atomic_write_text(path, text)
    return path


# ============================================================================ weights
def _add_variant(name: str, variant: str | None) -> str:
    """diffusers' naming: ``model.safetensors`` + ``fp16`` -> ``model.fp16.safetensors``."""
    if not variant:
        return name
    parts = name.split(".")
    return ".".join(parts[:-1] + [variant] + parts[-1:])


def _load_sharded(folder: str, index_path: str) -> dict:
    weight_map = read_json_object(index_path, "load_weights: shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ValueError(f"load_weights: shard index {index_path!r} needs a 'weight_map' object of "
                         "tensor name -> shard file name")
    by_shard: dict[str, list] = {}
    for tensor, shard in weight_map.items():
        if os.path.basename(shard) != shard or shard in (".", "..") or not shard.endswith(".safetensors"):
            raise ValueError(f"load_weights: shard index {index_path!r} maps {tensor!r} to {shard!r}; shard "
                             "entries must be plain .safetensors file names inside the model folder")
        by_shard.setdefault(shard, []).append(tensor)
    state: dict = {}
    for shard in sorted(by_shard):
        path = os.path.join(folder, shard)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"load_weights: shard {shard!r} listed in {index_path!r} is missing")
        tensors = load_file(path)
        missing = [t for t in by_shard[shard] if t not in tensors]
        if missing:
            raise ValueError(f"load_weights: shard {path!r} lacks tensors the index assigns to it: {missing[:10]}")
        for name, arr in tensors.items():
            if name in state:
                raise ValueError(f"load_weights: tensor {name!r} appears in more than one shard of {folder!r}")
            state[name] = arr
    return state


def load_weights(folder, filenames=DEFAULT_WEIGHT_FILES, *, variant: str | None = None,
                 verify_finite: bool = True) -> dict:
    """The state dict (name -> NumPy array) stored in the model folder ``folder``.

    Tries each of ``filenames`` in order (a single name is fine); for each, a plain file wins over
    a sharded checkpoint ``<name>.index.json``. ``variant`` (e.g. ``"fp16"``) selects diffusers'
    variant files (``diffusion_pytorch_model.fp16.safetensors``). With ``verify_finite`` a tensor
    holding NaN or inf raises (see ``check_finite``). A folder holding only pickle checkpoints is
    refused with a ValueError; nothing is ever unpickled.
    """
    folder = _folder(folder, "load_weights")
    if isinstance(filenames, (str, os.PathLike)):
        filenames = (os.fspath(filenames),)
    names = [_add_variant(n, variant) for n in filenames]
    for base, name in zip(filenames, names):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            state = load_file(path)
            source = path
            break
        index = os.path.join(folder, _add_variant(base + ".index.json", variant))
        if os.path.isfile(index):
            state = _load_sharded(folder, index)
            source = index
            break
    else:
        pickles = sorted(f for f in os.listdir(folder) if f.lower().endswith(PICKLE_SUFFIXES))
        if pickles:
            raise ValueError(
                f"load_weights: model folder {folder!r} holds only pickle checkpoints {pickles}: pickle "
                "checkpoints are not loaded; convert to safetensors (unpickling can run arbitrary code), "
                "e.g. with diffusers/transformers on a machine you trust: "
                "Model.from_pretrained(folder).save_pretrained(out, safe_serialization=True)")
        raise FileNotFoundError(f"load_weights: no weights in model folder {folder!r}: looked for {names} "
                                "and their sharded .index.json forms")
    if verify_finite:
        check_finite(state, source)
    return state


def save_weights(folder, state_dict: Mapping, filename: str = "diffusion_pytorch_model.safetensors",
                 metadata: Mapping | None = None) -> str:
    """Write ``state_dict`` (NumPy or CuPy arrays) to ``folder/filename`` atomically; returns the path.

    ``metadata`` defaults to ``{"format": "pt"}``, which diffusers and transformers expect.
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, filename)
    save_file(dict(state_dict), path, metadata={"format": "pt"} if metadata is None else metadata)
    return path


def check_finite(state_dict: Mapping, source) -> None:
    """Raise ValueError naming ``source`` and the first tensor holding NaN or inf (floats only)."""
    for name, arr in state_dict.items():
        if getattr(arr, "dtype", None) is None or arr.dtype.kind not in "fc" or arr.size == 0:
            continue
        mod = numpy if isinstance(arr, numpy.ndarray) else xp
        finite = mod.isfinite(arr)
        if not bool(finite.all()):
            bad = int(arr.size - int(finite.sum()))
            raise ValueError(f"{os.fspath(source) if isinstance(source, os.PathLike) else source}: tensor "
                             f"{name!r} of shape {tuple(arr.shape)} holds {bad} non-finite values (NaN or inf)")
