"""Original single-file Stable Diffusion checkpoints (one ``.safetensors`` in the CompVis/LDM layout), both ways.

Shapes: none here (names and configs); the tensors move through as ``io.lazy_tensors.LazyTensor``.

    load   file -> lazy tensors (header only) -> what it holds (SD 1.x / 2.x, or a one-line refusal)
                -> configs (a diffusers folder, an original YAML, or the shapes) -> models, each filled
                tensor by tensor with the tensors renamed (pipelines/single_file_keys.py)
    save   models' state dicts -> original names -> one file written tensor by tensor, atomically,
                and the YAML beside it (<name>.yaml, the name A1111 and ComfyUI look for)
    convert  folder -> file streams the folder's files into the new one (no model is built); file ->
                folder loads the models (peak: the models plus one tensor) and saves the folder

PyTorch ``.ckpt`` files are pickles and are refused (with how to convert them); nothing is unpickled.
Docs: docs/checkpoints.md ("Original single-file checkpoints").
"""
from __future__ import annotations

import inspect
import os
from collections import Counter

import numpy

from npdiffusion.io.atomic import atomic_write_text
from npdiffusion.io.lazy_tensors import file_tensors
from npdiffusion.io.pretrained import PICKLE_SUFFIXES, load_weights, read_config
from npdiffusion.io.safetensors import SafetensorsError, save_file
from npdiffusion.models.clip.pretrained import strip_prefix
from npdiffusion.models.clip.text_model import CLIPTextModel
from npdiffusion.models.unet.unet_2d_condition import UNet2DConditionModel
from npdiffusion.models.vae.autoencoder_kl import AutoencoderKL
from npdiffusion.nn.module import canonical_dtype
from npdiffusion.pipelines import original_config as oc
from npdiffusion.pipelines import single_file_keys as keys
from npdiffusion.pipelines.loading import load_tokenizer, read_model_index, scheduler_class
from npdiffusion.pipelines.small_yaml import dump_yaml, parse_yaml
from npdiffusion.schedulers import DDIMScheduler

TEXT_FORMATS = ("clip", "open_clip")
CONVERT_HINT = ("python -c \"import torch; from safetensors.torch import save_file; sd = torch.load('IN.ckpt', "
                "map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); save_file({k: v.contiguous() "
                "for k, v in sd.items() if isinstance(v, torch.Tensor)}, 'OUT.safetensors')\"")


# ------------------------------------------------------------------------------------------ reading
def read_checkpoint(path) -> dict:
    """{name: LazyTensor} of a single-file checkpoint; refuses pickles (.ckpt ...) and folders, naming why."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a folder; a single-file checkpoint is one .safetensors file (a diffusers "
                         "folder loads with from_pretrained)")
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise ValueError(f"{path!r} is a PyTorch pickle checkpoint: npdiffusion never unpickles (loading a pickle runs "
                         f"whatever code its author put in it); convert it once, on a machine you trust: {CONVERT_HINT}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"single-file checkpoint {path!r} does not exist")
    try:
        return file_tensors(path)
    except SafetensorsError:
        with open(path, "rb") as f:
            head = f.read(2)
        if head in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
            raise ValueError(f"{path!r} is a PyTorch pickle (zip or pickle bytes) named like a safetensors file: "
                             f"npdiffusion never unpickles; convert it on a machine you trust: {CONVERT_HINT}") from None
        raise


def describe(tensors) -> str:
    """'N tensors: 120 under a.b.*, ...' (the five largest two-part prefixes) for error messages."""
    counts = Counter(".".join(k.split(".")[:max(1, min(2, k.count(".")))]) for k in tensors)
    shown = ", ".join(f"{n} under {p}.*" for p, n in counts.most_common(5))
    return f"{len(tensors)} tensors ({shown}{', ...' if len(counts) > 5 else ''})"


PARTS = {"unet": (keys.UNET_PREFIX,), "vae": (keys.VAE_PREFIXES[0],),
         "text_encoder": (keys.CLIP_PREFIX, keys.OPEN_CLIP_PREFIX)}
PART_NAMES = {"unet": "the U-Net (model.diffusion_model.*)", "vae": "the VAE (first_stage_model.*)",
              "text_encoder": "the text encoder (cond_stage_model.transformer.* or cond_stage_model.model.*)"}


def check_stable_diffusion(tensors, path, parts=tuple(PARTS)) -> None:
    """Raise a one-line ValueError unless ``tensors`` hold ``parts`` of an SD 1.x / 2.x checkpoint."""
    if any(k.startswith("conditioner.embedders.") for k in tensors):
        raise ValueError(f"{os.fspath(path)!r} is an SDXL checkpoint (conditioner.embedders.*): npdiffusion runs Stable "
                         "Diffusion 1.x and 2.x")
    missing = [p for p in parts if not any(k.startswith(pre) for k in tensors for pre in PARTS[p])]
    if missing:
        hint = ""
        if any(k.startswith(("down_blocks.", "up_blocks.", "encoder.down_blocks.")) for k in tensors):
            hint = "; these are diffusers names: load the model folder with from_pretrained"
        elif any(k.startswith(("lora_unet_", "lora_te_")) or ".lora_" in k for k in tensors):
            hint = "; this looks like a LoRA, not a whole model"
        raise ValueError(f"{os.fspath(path)!r} is not a Stable Diffusion 1.x/2.x checkpoint: it lacks "
                         f"{' and '.join(PART_NAMES[p] for p in missing)}; it holds {describe(tensors)}{hint}")


def text_kind(tensors) -> str:
    return "clip" if any(k.startswith(keys.CLIP_PREFIX) for k in tensors) else "open_clip"


def yaml_path(path) -> str:
    """The YAML beside a checkpoint: ``model.safetensors`` -> ``model.yaml``."""
    return os.path.splitext(os.fspath(path))[0] + ".yaml"


def read_original_config(original_config, path=None):
    """A parsed original config: ``original_config`` (a YAML path or an already parsed dict), else the
    YAML beside ``path`` when there is one, else None."""
    if isinstance(original_config, dict):
        return original_config
    source = original_config if original_config is not None else yaml_path(path) if path is not None else None
    if source is None or (original_config is None and not os.path.isfile(source)):
        return None
    if not os.path.isfile(source):
        raise FileNotFoundError(f"original_config {os.fspath(source)!r} does not exist")
    with open(source, encoding="utf-8") as f:
        return parse_yaml(f.read(), repr(os.fspath(source)))


def _component_folder(config, name: str) -> str:
    """``config/name`` (a pipeline folder) or ``config`` itself (a component folder with config.json)."""
    config = os.fspath(config)
    for folder in (os.path.join(config, name), config):
        if os.path.isfile(os.path.join(folder, "config.json")):
            return folder
    raise FileNotFoundError(f"config {config!r} is neither a diffusers pipeline folder with {name}/config.json nor "
                            "a model folder with config.json")


def model_configs(tensors, path, config=None, original_config=None) -> dict:
    """{"unet", "vae", "text_encoder": config dict, "original": the original config or None}. A diffusers
    folder ``config`` gives all three, except that an explicit ``original_config`` still gives the U-Net and
    VAE (diffusers' rule); otherwise the original config (given, beside the file, or read off the shapes)
    gives the U-Net and VAE and the shapes the text encoder."""
    original = read_original_config(original_config, None if config is not None else path)
    out = {"original": original}
    if config is not None:
        for name in ("unet", "vae", "text_encoder"):
            out[name] = read_config(_component_folder(config, name))
    if original is None and config is None:
        original = oc.infer_original_config(tensors)
    params = oc.get_path(original, "model", "params", default={}) or {}
    if original is not None and (config is None or original_config is not None):
        if "unet_config" in params:
            out["unet"] = oc.unet_config_from_original(original)
        if "first_stage_config" in params:
            out["vae"] = oc.vae_config_from_original(original, out.get("unet", {}).get("sample_size", 64))
    if "text_encoder" not in out and any(k.startswith(PARTS["text_encoder"]) for k in tensors):
        out["text_encoder"] = oc.text_config_from_tensors(tensors)
    return out


# ------------------------------------------------------------------------------------------ models
def _dtype(dtype):
    return canonical_dtype("float32" if dtype is None else dtype)


def build_unet(tensors, config: dict, extract_ema: bool = False, dtype=None) -> UNet2DConditionModel:
    model = UNet2DConditionModel(**config)
    model.to(_dtype(dtype))
    model.load_state_dict(keys.unet_from_original(tensors, model.config, extract_ema))
    return model.eval()


def build_vae(tensors, config: dict, dtype=None) -> AutoencoderKL:
    model = AutoencoderKL.from_config(config)
    model.to(_dtype(dtype))
    model.load_state_dict(keys.vae_from_original(tensors, model.config))
    return model.eval()


def build_text_encoder(tensors, config: dict, dtype=None) -> CLIPTextModel:
    model = CLIPTextModel.from_config(config)
    model.to(_dtype(dtype))
    layers = model.config.num_hidden_layers
    state = keys.clip_from_original(tensors) if text_kind(tensors) == "clip" else \
        keys.open_clip_from_original(tensors, layers)
    model.load_state_dict(state)
    return model.eval()


def load_component(kind: str, path, config=None, original_config=None, dtype=None, **options):
    """One model of a single file: ``kind`` "unet" / "vae" / "text_encoder" (the models' ``from_single_file``).
    A VAE file of its own (keys without first_stage_model.) loads too."""
    tensors = read_checkpoint(path)
    if not (kind == "vae" and "encoder.conv_in.weight" in _under_vae(tensors)):
        check_stable_diffusion(tensors, path, (kind,))
    configs = model_configs(tensors, path, config, original_config)
    build = {"unet": build_unet, "vae": build_vae, "text_encoder": build_text_encoder}[kind]
    return build(tensors, configs[kind], dtype=dtype, **options)


def _under_vae(tensors) -> dict:
    prefix = keys.vae_prefix(tensors)
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _scheduler(tensors, configs, config, prediction_type):
    if config is not None:
        index = read_model_index(config)
        cls = scheduler_class(index["scheduler"][1])
        scheduler = cls.from_pretrained(os.path.join(os.fspath(config), "scheduler"))
        return scheduler if prediction_type is None else cls.from_config(scheduler.config, prediction_type=prediction_type)
    step = tensors.get("global_step")
    step = int(numpy.asarray(step).reshape(-1)[0]) if step is not None else None
    return DDIMScheduler.from_config(oc.scheduler_config_from_original(
        configs["original"], oc.sd_version(tensors), prediction_type, step))


def load_pipeline(cls, path, config=None, original_config=None, prediction_type=None, tokenizer=None,
                  scheduler=None, extract_ema: bool = False, dtype=None):
    """``cls`` (StableDiffusionPipeline) from a single file (``StableDiffusionPipeline.from_single_file``)."""
    tensors = read_checkpoint(path)
    check_stable_diffusion(tensors, path)
    configs = model_configs(tensors, path, config, original_config)
    if tokenizer is None:
        if config is None:
            raise ValueError("a single-file checkpoint holds no tokenizer: pass config=<a diffusers folder of the same "
                             "kind of model> (its tokenizer/ is used) or tokenizer=<a CLIPTokenizer or its folder>")
        tokenizer = os.path.join(os.fspath(config), "tokenizer")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    unet = build_unet(tensors, configs["unet"], extract_ema, dtype)
    vae = build_vae(tensors, configs["vae"], dtype)
    text_encoder = build_text_encoder(tensors, configs["text_encoder"], dtype)
    if scheduler is None:
        scheduler = _scheduler(tensors, configs, config, prediction_type)
    return cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)


# ------------------------------------------------------------------------------------------ writing
def original_tensors(unet_state, unet_config, vae_state, vae_config, text_state, text_config, kind: str,
                     ema_state=None) -> dict:
    """The whole checkpoint under original names (values: arrays or lazy tensors, not copied)."""
    if kind not in TEXT_FORMATS:
        raise ValueError(f"text_encoder_format must be one of {TEXT_FORMATS}, got {kind!r}")
    out = keys.unet_to_original(unet_state, unet_config)
    if ema_state is not None:
        out.update(keys.unet_ema_to_original(ema_state, unet_config))
    out.update(keys.vae_to_original(vae_state, vae_config))
    text_state = strip_prefix(text_state, "text_model.")
    out.update(keys.clip_to_original(text_state) if kind == "clip" else
               keys.open_clip_to_original(text_state, text_config["num_hidden_layers"]))
    return out


def write_single_file(path, tensors: dict, original: dict) -> str:
    """Write ``tensors`` to ``path`` (a new .safetensors, tensor by tensor, atomically) and the YAML beside it."""
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"the single file must be a .safetensors file (npdiffusion writes no pickles), got {path!r}")
    save_file(tensors, path, metadata={"format": "pt"})
    atomic_write_text(yaml_path(path), dump_yaml(original))
    return path


def default_text_format(text_config: dict) -> str:
    """OpenCLIP's layout (SD 2.x) for a GELU text encoder, CLIP's (SD 1.x, quick_gelu) otherwise."""
    return "open_clip" if text_config.get("hidden_act") == "gelu" else "clip"


def save_pipeline(pipe, path, text_encoder_format=None, ema_unet=None) -> str:
    """Write ``pipe`` as one original-layout file + YAML (``StableDiffusionPipeline.save_single_file``)."""
    text_config = pipe.text_encoder.config.to_dict()
    kind = text_encoder_format or default_text_format(text_config)
    ema = ema_unet.state_dict() if hasattr(ema_unet, "state_dict") else ema_unet
    tensors = original_tensors(pipe.unet.state_dict(), pipe.unet.config, pipe.vae.state_dict(), pipe.vae.config,
                               pipe.text_encoder.state_dict(), text_config, kind, ema)
    original = oc.original_config_for(pipe.unet.config, pipe.vae.config, kind, dict(pipe.scheduler.config))
    return write_single_file(path, tensors, original)


def _folder_weights(folder: str, names) -> dict:
    """A model folder's weights, lazily when they are one file (sharded ones are read whole)."""
    for name in names:
        if os.path.isfile(os.path.join(folder, name)):
            return file_tensors(os.path.join(folder, name))
    return load_weights(folder, names)


def folder_to_file(folder, path, text_encoder_format=None) -> str:
    """A diffusers pipeline folder -> one original-layout file + YAML, streamed (no model is built)."""
    folder = os.fspath(folder)
    index = read_model_index(folder)
    unet_config = UNet2DConditionModel._resolve_config(read_config(os.path.join(folder, "unet")))
    defaults = {k: p.default for k, p in inspect.signature(AutoencoderKL.__init__).parameters.items() if k != "self"}
    vae_config = {**defaults, **{k: v for k, v in read_config(os.path.join(folder, "vae")).items() if k in defaults}}
    text_config = CLIPTextModel.config_class.from_dict(read_config(os.path.join(folder, "text_encoder"))).to_dict()
    scheduler = dict(scheduler_class(index["scheduler"][1]).from_pretrained(os.path.join(folder, "scheduler")).config)
    vae_state = AutoencoderKL.rename_legacy_keys(
        _folder_weights(os.path.join(folder, "vae"), ("diffusion_pytorch_model.safetensors",)),
        ["encoder.mid_block.attentions.0", "decoder.mid_block.attentions.0"])
    kind = text_encoder_format or default_text_format(text_config)
    tensors = original_tensors(
        _folder_weights(os.path.join(folder, "unet"), ("diffusion_pytorch_model.safetensors",)), unet_config,
        vae_state, vae_config, _folder_weights(os.path.join(folder, "text_encoder"), ("model.safetensors",)),
        text_config, kind)
    return write_single_file(path, tensors, oc.original_config_for(unet_config, vae_config, kind, scheduler))


def convert(src, dst, **options) -> str:
    """``npdiffusion convert``: a diffusers folder ``src`` -> single file ``dst`` (options: text_encoder_format),
    or a single file -> a diffusers folder (options: those of ``load_pipeline``). Returns ``dst``."""
    from npdiffusion.pipelines.stable_diffusion import StableDiffusionPipeline

    src, dst = os.fspath(src), os.fspath(dst)
    if os.path.isdir(src):
        return folder_to_file(src, dst, **options)
    return StableDiffusionPipeline.from_single_file(src, **options).save_pretrained(dst)
