"""What ``golden export`` can run: the built-in models, layers ("op:NAME") and schedulers.

A ``GoldenCase`` is one model (a Module), its named inputs and how to call it: ``forward(model,
inputs) -> {output name: array}`` and ``backward(model, output_grads) -> {input name: gradient}``.
``module_case`` wraps any Module (positional inputs, outputs ``output`` or ``output.<i>``), so
``export_golden`` works on your own modules too. Built-in cases draw every weight from the seed
(``randomize_weights``), so no parameter keeps a zero or one that would hide a bug; with
``from_pretrained`` the folder's weights are used as they are.

Shapes (default configs; docs/oracle.md lists them): U-Net sample (2, 4, 8, 8), timestep (2,),
context (2, 4, 8); VAE sample (2, 3, 8, 8); text encoder input_ids (2, 7); CLIP input_ids (2, 7),
pixel_values (2, 3, 8, 8); schedulers a sample of (2, 4, 8, 8).
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import os
from collections import OrderedDict
from typing import Callable

import numpy

from npdiffusion.backend import asarray, is_array
from npdiffusion.checks import read_json_object
from npdiffusion.nn.module import Module
from npdiffusion.nn.recorder import given_input_grads

#: U-Net timesteps whose float32 sinusoidal features torch computes bit-identically (a torch
#: candidate then sees exactly our time features; see tests/test_unet_model.py).
UNET_TIMESTEPS = (37, 14)

DEFAULT_CONFIGS = {
    # diffusers tests/models/unets/test_models_unet_2d_condition.py::get_init_dict
    "unet": dict(block_out_channels=[4, 8], norm_num_groups=4,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=8, attention_head_dim=2,
                 out_channels=4, in_channels=4, layers_per_block=1, sample_size=16),
    # diffusers tests/models/autoencoders/test_models_autoencoder_kl.py
    "vae": dict(block_out_channels=[2, 4], norm_num_groups=2, in_channels=3, out_channels=3, latent_channels=4,
                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2),
    # diffusers tests/pipelines/stable_diffusion/test_stable_diffusion.py::get_dummy_components
    "text-encoder": dict(bos_token_id=0, eos_token_id=2, hidden_size=8, intermediate_size=16, layer_norm_eps=1e-5,
                         num_attention_heads=2, num_hidden_layers=2, pad_token_id=1, vocab_size=1000),
    "clip": dict(text_config=dict(bos_token_id=0, eos_token_id=2, hidden_size=8, intermediate_size=16,
                                  num_attention_heads=2, num_hidden_layers=2, pad_token_id=1, vocab_size=1000),
                 vision_config=dict(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=2,
                                    image_size=8, patch_size=4, num_channels=3),
                 projection_dim=4),
}


@dataclasses.dataclass
class GoldenCase:
    """One model and how to run it (see the module docstring).

    ``model`` is a Module; ``inputs`` an ordered map of names to NumPy arrays (floats are cast to
    the export dtype, integers kept); ``forward(model, inputs)`` returns an ordered map of named
    outputs; ``backward(model, output_grads)`` returns a map of input names to gradients (names
    absent or None: no gradient). ``config`` is the JSON-able config written to the manifest and
    config.json; ``class_name`` the name of the model's class in diffusers/transformers terms.
    """

    name: str
    model: Module
    inputs: "OrderedDict[str, numpy.ndarray]"
    forward: Callable
    backward: Callable
    config: dict = dataclasses.field(default_factory=dict)
    class_name: str = ""
    notes: str = ""


# ============================================================================ weights
def randomize_weights(model: Module, seed: int) -> Module:
    """Redraw every parameter from ``seed`` (in state-dict order), in float64 then cast:
    matrices N(0, 0.25 / fan_in), vectors N(0, 0.0625), norm gains around one, logit_scale
    around its initial ln(1/0.07). In place; returns the model."""
    rng = numpy.random.default_rng([int(seed), 0])
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        if len(shape) > 1:
            w = rng.standard_normal(shape) * (0.5 / math.sqrt(max(1, int(numpy.prod(shape[1:])))))
        else:
            w = rng.standard_normal(shape) * 0.25
            leaf = name.rsplit(".", 1)[-1]
            owner = name.rsplit(".", 1)[0] if "." in name else ""
            if leaf == "weight" and len(shape) == 1 and "norm" in owner.rsplit(".", 1)[-1]:
                w = w + 1.0
            if leaf == "logit_scale":
                w = w + math.log(1 / 0.07)
        p[...] = asarray(w, dtype=p.dtype)
    return model


# ============================================================================ generic modules
def _positional_forward(model, inputs):
    out = model(*inputs.values())
    return _name_outputs(out)


def _name_outputs(out) -> "OrderedDict":
    from npdiffusion.nn.recorder import leaves  # noqa: PLC0415

    items = list(leaves(out))
    if len(items) == 1:
        return OrderedDict([("output", items[0][1])])
    return OrderedDict(("output" + "".join(f".{i}" for i in path), a) for path, a in items)


def _positional_backward(model, grads, float_names):
    result = model.backward(*grads.values())
    returned = given_input_grads(result)
    return {n: g for n, g in zip(float_names, returned) if is_array(g)}


def module_case(module: Module, inputs, name: str = "module", config: dict | None = None) -> GoldenCase:
    """A GoldenCase for any Module called as ``module(*inputs.values())``; its backward takes one
    gradient per output array (in order) and returns one per floating input (in order)."""
    if not isinstance(module, Module):
        raise TypeError(f"export_golden: model must be an npdiffusion Module, got {type(module).__name__}")
    if not hasattr(inputs, "items"):
        raise TypeError("export_golden: inputs must be a mapping of input names to arrays, "
                        f"got {type(inputs).__name__}")
    inputs = OrderedDict((str(k), numpy.asarray(v)) for k, v in inputs.items())
    floats = [k for k, v in inputs.items() if v.dtype.kind == "f"]

    def backward(model, grads):
        return _positional_backward(model, grads, floats)

    return GoldenCase(name=name, model=module, inputs=inputs, forward=_positional_forward, backward=backward,
                      config=dict(config or {}), class_name=type(module).__name__)


# ============================================================================ models
def _load_config(config) -> dict | None:
    """``config`` as a dict: a dict, a path to a JSON file, or None."""
    if config is None or isinstance(config, dict):
        return copy.deepcopy(config)
    path = os.fspath(config)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config: no such file {path!r}")
    return read_json_object(path, "--config")


def _json_ready(value):
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, numpy.generic):
        return value.item()
    return value


def _rng_inputs(seed):
    return numpy.random.default_rng([int(seed), 1])


def _unet_case(config, from_pretrained, seed):
    from npdiffusion.models.unet import UNet2DConditionModel  # noqa: PLC0415

    if from_pretrained is not None:
        model = UNet2DConditionModel.from_pretrained(from_pretrained).to("float64")
    else:
        model = randomize_weights(UNet2DConditionModel(**config).to("float64"), seed)
    cfg = model.config
    side = max(8, 2 ** getattr(model, "num_upsamplers", 0))
    cross = cfg["cross_attention_dim"]
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    rng = _rng_inputs(seed)
    inputs = OrderedDict(sample=rng.standard_normal((2, cfg["in_channels"], side, side)),
                         timestep=numpy.asarray(UNET_TIMESTEPS, dtype=numpy.int64),
                         encoder_hidden_states=rng.standard_normal((2, 4, cross)))

    def forward(m, x):
        return OrderedDict(sample=m(x["sample"], x["timestep"], x["encoder_hidden_states"]))

    def backward(m, g):
        ds, dc = m.backward(g["sample"])
        return {"sample": ds, "encoder_hidden_states": dc}

    return GoldenCase("unet", model, inputs, forward, backward, _json_ready(cfg), "UNet2DConditionModel",
                      notes="diffusers: UNet2DConditionModel(**config)(sample, timestep, encoder_hidden_states)"
                            ".sample; timesteps fixed at (37, 14), whose float32 features torch computes exactly")


def _vae_case(config, from_pretrained, seed):
    from npdiffusion.models.vae import AutoencoderKL  # noqa: PLC0415

    if from_pretrained is not None:
        model = AutoencoderKL.from_pretrained(from_pretrained).to("float64").train()
    else:
        model = randomize_weights(AutoencoderKL.from_config(config).to("float64"), seed)
    cfg = model.config
    side = max(8, 2 * model.encoder.downsample_factor)
    rng = _rng_inputs(seed)
    inputs = OrderedDict(sample=rng.standard_normal((2, cfg["in_channels"], side, side)))

    def forward(m, x):
        return OrderedDict(sample=m(x["sample"]))

    def backward(m, g):
        return {"sample": m.backward(g["sample"])}

    return GoldenCase("vae", model, inputs, forward, backward, _json_ready(cfg), "AutoencoderKL",
                      notes="diffusers: AutoencoderKL(**config)(sample).sample = decode(encode(sample).mode())")


def _clip_float64(cls, config, from_pretrained, seed):
    """A float64 CLIP model (``cls``) in train mode: read from the folder ``from_pretrained``, or built
    from ``config`` with ``randomize_weights(seed)``."""
    if from_pretrained is not None:
        return cls.from_pretrained(from_pretrained, dtype="float64").train()
    return randomize_weights(cls(config).to("float64"), seed)


def _text_case(config, from_pretrained, seed):
    from npdiffusion.models.clip.text_model import CLIPTextModel  # noqa: PLC0415

    model = _clip_float64(CLIPTextModel, config, from_pretrained, seed)
    cfg = model.config.to_dict()
    rng = _rng_inputs(seed)
    inputs = OrderedDict(input_ids=rng.integers(0, cfg["vocab_size"], size=(2, 7), dtype=numpy.int64))

    def forward(m, x):
        last, pooled = m(x["input_ids"])
        return OrderedDict(last_hidden_state=last, pooler_output=pooled)

    def backward(m, g):
        m.backward(g["last_hidden_state"], g["pooler_output"])
        return {}

    return GoldenCase("text-encoder", model, inputs, forward, backward, _json_ready(cfg), "CLIPTextModel",
                      notes="transformers 5.x: CLIPTextModel(CLIPTextConfig(**config))(input_ids); outputs "
                            "last_hidden_state, pooler_output; input ids get no gradient")


def _clip_case(config, from_pretrained, seed):
    from npdiffusion.models.clip.clip_model import CLIPModel  # noqa: PLC0415

    model = _clip_float64(CLIPModel, config, from_pretrained, seed)
    cfg = model.config.to_dict()
    vc = model.config.vision_config
    rng = _rng_inputs(seed)
    inputs = OrderedDict(
        input_ids=rng.integers(0, model.config.text_config.vocab_size, size=(2, 7), dtype=numpy.int64),
        pixel_values=rng.standard_normal((2, vc.num_channels, vc.image_size, vc.image_size)))

    def forward(m, x):
        out = m(x["input_ids"], x["pixel_values"], return_loss=True)
        return OrderedDict(loss=out.loss, logits_per_text=out.logits_per_text, text_embeds=out.text_embeds,
                           image_embeds=out.image_embeds)

    def backward(m, g):
        return {"pixel_values": m.backward(g["loss"], g["logits_per_text"], None, g["text_embeds"],
                                           g["image_embeds"])}

    return GoldenCase("clip", model, inputs, forward, backward, _json_ready(cfg), "CLIPModel",
                      notes="transformers: CLIPModel(CLIPConfig(**config))(input_ids, pixel_values, "
                            "return_loss=True); outputs loss, logits_per_text, text_embeds, image_embeds")


MODELS = {"unet": _unet_case, "vae": _vae_case, "text-encoder": _text_case, "clip": _clip_case}


# ============================================================================ layers ("op:NAME")
def _op_specs():
    """name -> (module path, class name, constructor kwargs, {input name: shape})."""
    return {
        "linear": ("npdiffusion.nn.linear", "Linear", dict(in_features=4, out_features=3), {"x": (2, 3, 4)}),
        "conv2d": ("npdiffusion.nn.conv", "Conv2d", dict(in_channels=2, out_channels=3, kernel_size=3, padding=1),
                   {"x": (2, 2, 5, 5)}),
        "group_norm": ("npdiffusion.nn.norm", "GroupNorm", dict(num_groups=2, num_channels=4, eps=1e-5),
                       {"x": (2, 4, 3, 3)}),
        "layer_norm": ("npdiffusion.nn.norm", "LayerNorm", dict(normalized_shape=5), {"x": (2, 3, 5)}),
        "silu": ("npdiffusion.nn.activations", "SiLU", {}, {"x": (2, 3, 4)}),
        "gelu": ("npdiffusion.nn.activations", "GELU", {}, {"x": (2, 3, 4)}),
        "attention": ("npdiffusion.nn.attention", "Attention", dict(query_dim=8, heads=2, dim_head=4),
                      {"hidden_states": (2, 3, 8)}),
        "cross_attention": ("npdiffusion.nn.attention", "Attention",
                            dict(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4),
                            {"hidden_states": (2, 3, 8), "encoder_hidden_states": (2, 4, 6)}),
        "geglu": ("npdiffusion.nn.feedforward", "GEGLU", dict(dim_in=6, dim_out=5), {"hidden_states": (2, 3, 6)}),
        "feedforward": ("npdiffusion.nn.feedforward", "FeedForward", dict(dim=6, mult=2),
                        {"hidden_states": (2, 3, 6)}),
        "resnet_block": ("npdiffusion.models.blocks.resnet", "ResnetBlock2D",
                         dict(in_channels=4, out_channels=6, temb_channels=5, groups=2),
                         {"x": (2, 4, 4, 4), "temb": (2, 5)}),
        "transformer_block": ("npdiffusion.models.unet.transformer_2d", "BasicTransformerBlock",
                              dict(dim=8, num_attention_heads=2, attention_head_dim=4, cross_attention_dim=6),
                              {"hidden_states": (2, 5, 8), "encoder_hidden_states": (2, 3, 6)}),
        "transformer_2d": ("npdiffusion.models.unet.transformer_2d", "Transformer2DModel",
                           dict(num_attention_heads=2, attention_head_dim=4, in_channels=8, norm_num_groups=2,
                                cross_attention_dim=6),
                           {"hidden_states": (2, 8, 3, 3), "encoder_hidden_states": (2, 5, 6)}),
    }


OPS = tuple(_op_specs())


def _op_case(name, config, seed):
    import importlib  # noqa: PLC0415

    specs = _op_specs()
    if name not in specs:
        raise KeyError(f"unknown op {name!r}; choose from {', '.join(specs)}")
    path, cls_name, kwargs, shapes = specs[name]
    config = config or {}
    unknown = sorted(set(config) - {"kwargs", "inputs"})
    if unknown:
        raise ValueError(f"op config: unknown keys {unknown}; expected \"kwargs\" (constructor arguments) and "
                         "\"inputs\" (input name -> shape)")
    kwargs = {**kwargs, **config.get("kwargs", {})}
    shapes = {**shapes, **{k: tuple(v) for k, v in config.get("inputs", {}).items()}}
    cls = getattr(importlib.import_module(path), cls_name)
    module = randomize_weights(cls(**kwargs).to("float64"), seed)
    rng = _rng_inputs(seed)
    inputs = OrderedDict((k, rng.standard_normal(s)) for k, s in shapes.items())
    case = module_case(module, inputs, name=f"op:{name}",
                       config={"class": cls_name, "kwargs": kwargs, "inputs": {k: list(s) for k, s in shapes.items()}})
    case.class_name = cls_name
    return case


# ============================================================================ schedulers
SCHEDULERS = {
    "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler",
    "dpm_multistep": "DPMSolverMultistepScheduler",
}
SCHEDULER_DEFAULT = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


@dataclasses.dataclass
class SchedulerCase:
    """A sampling loop of ``scheduler_class`` (diffusers' name) with the model stand-in
    model_output = scale_model_input(x, t) * t / (t + 1) (diffusers' scheduler tests' dummy)."""

    name: str
    scheduler_class: str
    scheduler_config: dict
    num_inference_steps: int
    sample_shape: tuple
    seed: int
    config: dict
    class_name: str
    notes: str = ""

    def make(self):
        import npdiffusion.schedulers as schedulers  # noqa: PLC0415

        return getattr(schedulers, self.scheduler_class).from_config(self.scheduler_config)

    @property
    def stochastic(self) -> bool:
        return "noise" in inspect.signature(self.make().step).parameters


def _scheduler_case(name, config, seed):
    if name not in SCHEDULERS:
        raise KeyError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
    config = config or {}
    sched_cfg = dict(config.get("scheduler", {k: v for k, v in config.items()
                                              if k not in ("num_inference_steps", "sample_shape")}))
    sched_cfg = {**SCHEDULER_DEFAULT, **sched_cfg}
    steps = int(config.get("num_inference_steps", 10))
    shape = tuple(config.get("sample_shape", (2, 4, 8, 8)))
    full = {"scheduler": sched_cfg, "num_inference_steps": steps, "sample_shape": list(shape)}
    cls = SCHEDULERS[name]
    return SchedulerCase(f"scheduler:{name}", cls, sched_cfg, steps, shape, int(seed), full, cls,
                         notes=f"diffusers: {cls}.from_config(config['scheduler']); set_timesteps("
                               "num_inference_steps); x = input/sample * init_noise_sigma; for each t: "
                               "m = scale_model_input(x, t); eps = m * t / (t + 1); x = step(eps, t, x"
                               "[, noise=input/noise.<k>]).prev_sample")


def build_case(spec, config=None, from_pretrained=None, seed: int = 0):
    """The GoldenCase (or SchedulerCase) named by ``spec``: "unet", "vae", "text-encoder", "clip",
    "op:NAME" or "scheduler:NAME". ``config``: a dict or a JSON file path; ``from_pretrained`` a
    model folder (models only)."""
    if not isinstance(spec, str):
        raise TypeError(f"model must be a name (unet, vae, text-encoder, clip, op:NAME, scheduler:NAME), a "
                        f"GoldenCase or a Module, got {type(spec).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    config = _load_config(config)
    kind, _, arg = spec.partition(":")
    if from_pretrained is not None:
        if spec not in MODELS:
            raise ValueError(f"--from-pretrained works with the models {', '.join(MODELS)}, not {spec!r}")
        if config is not None:
            raise ValueError("give --config or --from-pretrained, not both")
        if not os.path.isdir(os.fspath(from_pretrained)):
            raise FileNotFoundError(f"--from-pretrained: no such folder {os.fspath(from_pretrained)!r}")
    if spec in MODELS:
        return MODELS[spec](DEFAULT_CONFIGS[spec] if config is None and from_pretrained is None else config,
                            from_pretrained, seed)
    if kind == "op" and arg:
        return _op_case(arg, config, seed)
    if kind == "scheduler" and arg:
        return _scheduler_case(arg, config, seed)
    raise KeyError(f"unknown model {spec!r}; choose from {', '.join(MODELS)}, op:NAME ({', '.join(OPS)}) or "
                   f"scheduler:NAME ({', '.join(SCHEDULERS)})")
