"""Reading and writing diffusers pipeline folders: ``model_index.json`` and the component subfolders.

A Stable Diffusion folder (what ``StableDiffusionPipeline.save_pretrained`` writes in diffusers)::

    model_index.json          {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers",
                               "UNet2DConditionModel"], ..., "safety_checker": [null, null], ...}
    unet/                     config.json + diffusion_pytorch_model.safetensors
    vae/                      config.json + diffusion_pytorch_model.safetensors
    text_encoder/             config.json + model.safetensors            (transformers)
    tokenizer/                vocab.json + merges.txt (+ configs), or tokenizer.json (transformers 5)
    scheduler/                scheduler_config.json

Each ``model_index.json`` entry is ``[library, class]``; ``[null, null]`` marks an absent component.
The safety checker, its feature extractor and the image encoder (IP-Adapter) are not part of
npdiffusion and are skipped whatever they hold. The scheduler class is looked up among
npdiffusion's schedulers by its diffusers name. Every problem (missing file, bad JSON, an unknown
class, a corrupt weights file) raises a ValueError / FileNotFoundError naming the component and
the folder. Docs: docs/pipeline.md ("Model folders").
"""
from __future__ import annotations

import json
import logging
import os

from npdiffusion.checks import read_json_object
from npdiffusion.io.atomic import atomic_write_text
from npdiffusion.io.pretrained import DIFFUSERS_VERSION, read_config
from npdiffusion.models.clip.tokenizer import AddedToken, CLIPTokenizer
from npdiffusion.schedulers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
)

logger = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"

#: diffusers' class name -> npdiffusion scheduler class
SCHEDULERS = {cls.__name__: cls for cls in (
    DDIMScheduler, DDPMScheduler, PNDMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
    HeunDiscreteScheduler, DPMSolverMultistepScheduler)}

#: the components a Stable Diffusion pipeline needs: name -> accepted (library, class) pairs
REQUIRED = {
    "unet": {("diffusers", "UNet2DConditionModel")},
    "vae": {("diffusers", "AutoencoderKL")},
    "text_encoder": {("transformers", "CLIPTextModel")},
    "tokenizer": {("transformers", "CLIPTokenizer"), ("transformers", "CLIPTokenizerFast")},
    "scheduler": {("diffusers", name) for name in SCHEDULERS},
}
#: components npdiffusion does not run; skipped whatever model_index.json says
IGNORED = ("safety_checker", "feature_extractor", "image_encoder")
#: non-component keys of model_index.json
CONFIG_KEYS = ("requires_safety_checker",)


class PipelineFolderError(ValueError):
    """A pipeline folder that cannot be loaded: names the folder, the component and what is wrong."""


def read_model_index(folder) -> dict:
    """``folder/model_index.json`` checked: returns {component name: (library, class)} for the five
    components a Stable Diffusion pipeline needs. Raises PipelineFolderError / FileNotFoundError."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"pipeline folder {folder!r} does not exist or is not a folder")
    if not os.path.isfile(os.path.join(folder, MODEL_INDEX)):
        raise FileNotFoundError(f"{folder!r} is not a diffusers pipeline folder: it has no {MODEL_INDEX}")
    try:
        index = read_config(folder, MODEL_INDEX)
    except ValueError as exc:
        raise PipelineFolderError(str(exc)) from None
    components = {}
    for name, value in index.items():
        if name.startswith("_") or name in CONFIG_KEYS:
            continue
        if name in IGNORED:
            if isinstance(value, (list, tuple)) and any(v is not None for v in value):
                logger.info("%s: skipping the %s component %s (npdiffusion does not run it)", folder, name, value)
            continue
        if not (isinstance(value, (list, tuple)) and len(value) == 2):
            raise PipelineFolderError(f"{os.path.join(folder, MODEL_INDEX)!r}: entry {name!r} must be a "
                                      f"[library, class] pair, got {value!r}")
        if value[0] is None and value[1] is None:
            continue
        if name not in REQUIRED:
            raise PipelineFolderError(f"{os.path.join(folder, MODEL_INDEX)!r}: component {name!r} ({value[0]}."
                                      f"{value[1]}) is not part of a Stable Diffusion 1.x/2.x pipeline that "
                                      f"npdiffusion runs (it runs {sorted(REQUIRED)})")
        pair = (value[0], value[1])
        if pair not in REQUIRED[name]:
            if name == "scheduler":
                raise PipelineFolderError(
                    f"{os.path.join(folder, MODEL_INDEX)!r}: unknown scheduler class {value[1]!r}; npdiffusion "
                    f"has {sorted(SCHEDULERS)} (pick one with Scheduler.from_config(pipe.scheduler.config) "
                    "after editing the folder, or with the command's --scheduler option)")
            raise PipelineFolderError(f"{os.path.join(folder, MODEL_INDEX)!r}: component {name!r} is "
                                      f"{value[0]}.{value[1]}, npdiffusion loads only "
                                      f"{' or '.join(f'{a}.{b}' for a, b in sorted(REQUIRED[name]))}")
        components[name] = pair
    missing = [n for n in REQUIRED if n not in components]
    if missing:
        raise PipelineFolderError(f"{os.path.join(folder, MODEL_INDEX)!r} lacks the components {missing} "
                                  "(a Stable Diffusion pipeline needs unet, vae, text_encoder, tokenizer, scheduler)")
    for name in components:
        sub = os.path.join(folder, name)
        if not os.path.isdir(sub):
            raise FileNotFoundError(f"pipeline folder {folder!r}: model_index.json lists {name!r} but the "
                                    f"subfolder {sub!r} is missing")
    return components


def write_model_index(folder, scheduler_class: str, pipeline_class: str = "StableDiffusionPipeline") -> str:
    """Write ``folder/model_index.json`` (atomically) as diffusers' StableDiffusionPipeline does, with
    the safety checker, feature extractor and image encoder null and requires_safety_checker false."""
    index = {
        "_class_name": pipeline_class,
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    path = os.path.join(os.fspath(folder), MODEL_INDEX)
    atomic_write_text(path, json.dumps(index, indent=2, sort_keys=True) + "\n")
    return path


def scheduler_class(name: str):
    """npdiffusion's scheduler class for diffusers' class ``name``, or a PipelineFolderError listing them."""
    try:
        return SCHEDULERS[name]
    except KeyError:
        raise PipelineFolderError(f"unknown scheduler class {name!r}; npdiffusion has {sorted(SCHEDULERS)}") from None


# ------------------------------------------------------------------------------------ tokenizer
def _token_content(value, key):
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise PipelineFolderError(f"tokenizer_config.json: {key} must be a string or an AddedToken object, got {value!r}")


def tokenizer_from_tokenizer_json(folder) -> CLIPTokenizer:
    """A CLIPTokenizer from transformers 5's ``tokenizer.json`` (+ ``tokenizer_config.json``): the BPE
    vocabulary and merges of its ``model``, the added tokens with their flags, the special tokens and
    ``model_max_length`` of the config. This is the layout ``save_pretrained`` of transformers 5 writes
    (it no longer writes vocab.json and merges.txt)."""
    folder = os.fspath(folder)
    path = os.path.join(folder, "tokenizer.json")
    data = read_json_object(path, None, error=PipelineFolderError)
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict) \
            or not isinstance(model.get("merges"), list):
        raise PipelineFolderError(f"{path!r} must hold a BPE model with 'vocab' and 'merges' (a CLIP tokenizer)")
    if model.get("end_of_word_suffix") not in (None, "</w>") or model.get("continuing_subword_prefix") not in (None, ""):
        raise PipelineFolderError(f"{path!r}: a CLIP tokenizer marks word ends with '</w>' and has no subword "
                                  f"prefix, got {model.get('end_of_word_suffix')!r} / "
                                  f"{model.get('continuing_subword_prefix')!r}")
    config_path = os.path.join(folder, "tokenizer_config.json")
    config = read_config(folder, "tokenizer_config.json") if os.path.isfile(config_path) else {}
    defaults = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>"}
    names = {k: _token_content(config[k], k) if config.get(k) is not None else v for k, v in defaults.items()}
    added = []
    for entry in data.get("added_tokens") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise PipelineFolderError(f"{path!r}: added_tokens entries must be objects with a 'content', got {entry!r}")
        added.append(AddedToken(entry["content"], bool(entry.get("normalized", False)), bool(entry.get("special", True))))
    present = {t.content for t in added}
    for content in names.values():
        if content not in present:
            added.append(AddedToken(content))
            present.add(content)
    max_len = config.get("model_max_length", 77)
    if isinstance(max_len, float) and max_len.is_integer():
        max_len = int(max_len)
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len >= 10 ** 9:
        max_len = 77
    return CLIPTokenizer(model["vocab"], model["merges"], errors=config.get("errors", "replace"),
                         model_max_length=max_len, added_tokens=added, **names)


def load_tokenizer(folder) -> CLIPTokenizer:
    """The tokenizer in ``folder``: vocab.json + merges.txt (the usual layout) or tokenizer.json."""
    folder = os.fspath(folder)
    if os.path.isfile(os.path.join(folder, "vocab.json")) and os.path.isfile(os.path.join(folder, "merges.txt")):
        return CLIPTokenizer.from_pretrained(folder)
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return tokenizer_from_tokenizer_json(folder)
    raise FileNotFoundError(f"tokenizer folder {folder!r} holds neither vocab.json + merges.txt nor tokenizer.json")
