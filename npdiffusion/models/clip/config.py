"""CLIP configurations with transformers' keys and defaults: ``CLIPTextConfig``, ``CLIPVisionConfig``,
``CLIPConfig`` (transformers 5.x ``configuration_clip.py``).

Each is a plain dataclass. ``from_dict(d)`` reads a transformers ``config.json`` object: the keys
listed here are read and checked, transformers' generic keys (``architectures``, ``id2label``,
``dtype``, ``transformers_version``...) are ignored. ``to_dict()`` gives the keys transformers writes
(the fields plus ``model_type``), so ``write_config`` produces the same ``config.json`` as
transformers' ``save_pretrained``.

Defaults are transformers' (the ViT-B/32 shapes); Stable Diffusion 1.x's text encoder is
``CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
num_attention_heads=12, projection_dim=768, bos_token_id=0, eos_token_id=2)``.
Docs: docs/clip.md.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping

from npdiffusion.checks import check_positive_int, check_real

#: hidden_act values and the activation each one means (transformers' ACT2FN names).
ACTIVATIONS = {
    "quick_gelu": "quick_gelu",     # x sigmoid(1.702 x)
    "gelu": "erf",                  # exact GELU (erf)
    "gelu_python": "erf",
    "gelu_new": "tanh",             # the tanh approximation, in its three spellings
    "gelu_pytorch_tanh": "tanh",
    "gelu_fast": "tanh",
}

LOGIT_SCALE_MAX = math.log(100.0)   # open_clip's training clamp (4.6052)


def _token_id(cls, name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{cls}: {name} must be an int or None, got {value!r}")
    return int(value)


def _check_act(cls, value):
    if value not in ACTIVATIONS:
        raise ValueError(f"{cls}: hidden_act must be one of {sorted(ACTIVATIONS)}, got {value!r}")
    return value


def _check_heads(cls, hidden_size, heads):
    if hidden_size % heads:
        raise ValueError(f"{cls}: hidden_size ({hidden_size}) must be a multiple of num_attention_heads ({heads})")


def _check_tower(config, sizes):
    """Check and normalize the fields the text and vision configs share, and the ``sizes``."""
    c = type(config).__name__
    for name in sizes:
        setattr(config, name, check_positive_int(name, getattr(config, name), c))
    if config.projection_dim is not None:
        config.projection_dim = check_positive_int("projection_dim", config.projection_dim, c)
    _check_heads(c, config.hidden_size, config.num_attention_heads)
    config.hidden_act = _check_act(c, config.hidden_act)
    for name in ("layer_norm_eps", "initializer_range", "initializer_factor"):
        setattr(config, name, check_real(name, getattr(config, name), 0.0, math.inf, c, finite=False))
    config.attention_dropout = check_real("attention_dropout", config.attention_dropout, 0.0, 1.0, c,
                                          exclusive_maximum=True)


class _Config:
    model_type = ""

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]):
        """Build from a transformers config dict; keys that are not fields are ignored."""
        if isinstance(config, cls):
            return config
        if not isinstance(config, Mapping):
            raise TypeError(f"{cls.__name__}: config must be a dict or a {cls.__name__}, got {type(config).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def to_dict(self) -> dict:
        """The keys transformers writes to config.json for this config (plus ``model_type``)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["model_type"] = self.model_type
        return out

    @classmethod
    def with_overrides(cls, config, overrides: dict):
        """A config from ``config`` (None, a dict or a config of this class) with ``overrides`` (keys
        to values) on top: how a tower takes ``Model(config, **keys)``."""
        if config is None:
            return cls(**overrides)
        base = cls.from_dict(config).to_dict()
        base.pop("model_type", None)
        base.update(overrides)
        return cls.from_dict(base)


@dataclass
class CLIPTextConfig(_Config):
    """transformers' ``CLIPTextConfig``: the text transformer's shape, activation and special ids.

    ``eos_token_id`` picks the pooled token (docs/clip.md, "The pooled output"): 2 selects the
    legacy rule (argmax of the ids), any other id the first position holding that id.
    """

    model_type = "clip_text_model"

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int | None = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407

    def __post_init__(self):
        c = type(self).__name__
        _check_tower(self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                            "num_attention_heads", "max_position_embeddings"))
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            setattr(self, name, _token_id(c, name, getattr(self, name)))


@dataclass
class CLIPVisionConfig(_Config):
    """transformers' ``CLIPVisionConfig``: a ViT over ``image_size`` square images cut into
    ``patch_size`` square patches ((image_size // patch_size)^2 of them, plus the class token)."""

    model_type = "clip_vision_model"

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int | None = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0

    def __post_init__(self):
        _check_tower(self, ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                            "num_channels", "image_size", "patch_size"))
        if self.patch_size > self.image_size:
            raise ValueError(f"{type(self).__name__}: patch_size ({self.patch_size}) must be at most "
                             f"image_size ({self.image_size})")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _sub_config(cls, value, extra):
    """A sub-config from a config object, a dict or None, with ``extra`` (a *_config_dict) on top."""
    if value is None:
        value = {}
    elif isinstance(value, cls):
        value = value.to_dict()
    elif not isinstance(value, Mapping):
        raise TypeError(f"CLIPConfig: {cls.__name__[4:-6].lower()}_config must be a dict, a {cls.__name__} "
                        f"or None, got {type(value).__name__}")
    value = dict(value)
    if extra is not None:
        if not isinstance(extra, Mapping):
            raise TypeError(f"CLIPConfig: {cls.__name__[4:-6].lower()}_config_dict must be a dict, "
                            f"got {type(extra).__name__}")
        value.update(extra)        # transformers: the *_config_dict entries win
    return cls.from_dict(value)


@dataclass
class CLIPConfig(_Config):
    """transformers' ``CLIPConfig``: a text and a vision config, the shared embedding width
    ``projection_dim`` and the initial ``logit_scale`` (ln(1/0.07) = 2.6592).

    Old config files may carry ``text_config_dict`` / ``vision_config_dict``; as in transformers,
    their entries override ``text_config`` / ``vision_config``.
    """

    model_type = "clip"

    text_config: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    vision_config: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    initializer_factor: float = 1.0

    def __post_init__(self):
        c = type(self).__name__
        self.text_config = _sub_config(CLIPTextConfig, self.text_config, None)
        self.vision_config = _sub_config(CLIPVisionConfig, self.vision_config, None)
        self.projection_dim = check_positive_int("projection_dim", self.projection_dim, c)
        v = self.logit_scale_init_value
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"{c}: logit_scale_init_value must be a finite number, got {v!r}")
        self.logit_scale_init_value = float(v)
        self.initializer_factor = check_real("initializer_factor", self.initializer_factor, 0.0, math.inf, c, finite=False)

    @classmethod
    def from_dict(cls, config):
        if isinstance(config, cls):
            return config
        if not isinstance(config, Mapping):
            raise TypeError(f"CLIPConfig: config must be a dict or a CLIPConfig, got {type(config).__name__}")
        text = _sub_config(CLIPTextConfig, config.get("text_config"), config.get("text_config_dict"))
        vision = _sub_config(CLIPVisionConfig, config.get("vision_config"), config.get("vision_config_dict"))
        kw = {k: config[k] for k in ("projection_dim", "logit_scale_init_value", "initializer_factor") if k in config}
        return cls(text_config=text, vision_config=vision, **kw)

    def to_dict(self) -> dict:
        return {"text_config": self.text_config.to_dict(), "vision_config": self.vision_config.to_dict(),
                "projection_dim": self.projection_dim, "logit_scale_init_value": self.logit_scale_init_value,
                "initializer_factor": self.initializer_factor, "model_type": self.model_type}
