"""Attach LoRA adapters to a model by target names, and the set of adapters that training and files see.

``add_lora(model, targets, rank, ...)`` replaces every ``Linear`` / ``Conv2d`` whose dotted name matches
``targets`` by a ``LoraLayer`` around it (PEFT's ``inject_adapter``), freezes the model and leaves only
the adapters trainable. Name matching is PEFT's ``target_modules`` rule:

* a list of names: a module matches a name t when its dotted path is t or ends with ``"." + t``
  (``"to_q"`` matches every ``...attn1.to_q`` and ``...attn2.to_q``; ``"to_out.0"`` the output
  projections; ``"attn2.to_k"`` only the cross-attention keys);
* one string: a regular expression the whole dotted path must match (``r".*attn2\\.to_(k|v)"``).

``rank_pattern`` / ``alpha_pattern`` ({name: value}, matched by the same suffix rule, PEFT's) give
single layers another rank or alpha.

The result is a ``LoraAdapters``: a Module whose children are the adapted layers' ``lora_A`` and
``lora_B`` (the same objects as inside the model), named so that its state dict has exactly the keys of
diffusers' ``pytorch_lora_weights.safetensors``: ``{prefix}.{module path}.lora_A.weight`` with prefix
``unet`` or ``text_encoder``. The trainer optimizes it; files are written from it (``lora.files``).
Docs: docs/lora.md.
"""
from __future__ import annotations

import re

from npdiffusion.checks import check_positive_int
from npdiffusion.nn.conv import Conv2d
from npdiffusion.nn.linear import Linear
from npdiffusion.nn.lora import LoraLayer
from npdiffusion.nn.module import Module

#: diffusers' train_text_to_image_lora.py targets: the attention projections of the U-Net
UNET_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: the CLIP text encoder's attention projections (diffusers' text_encoder_target_modules)
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def name_matches(name: str, target: str) -> bool:
    """PEFT's suffix rule: ``name`` is ``target`` or ends with ``"." + target``."""
    return name == target or name.endswith("." + target)


def _pattern_value(name: str, pattern: dict, default):
    for key, value in (pattern or {}).items():
        if name_matches(name, key):
            return value
    return default


def matching_modules(model: Module, targets) -> list[str]:
    """The dotted names of ``model``'s modules that ``targets`` selects (module docstring), in model
    order. A ValueError when nothing matches; a TypeError when a match is not a Linear or Conv2d."""
    if isinstance(targets, str):
        try:
            regex = re.compile(targets)
        except re.error as exc:
            raise ValueError(f"targets: {targets!r} is not a valid regular expression ({exc})") from None

        def wanted(n):
            return regex.fullmatch(n) is not None
    else:
        targets = tuple(targets)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"targets must be a non-empty list of module names or one regular expression, got "
                             f"{targets!r}")

        def wanted(n):
            return any(name_matches(n, t) for t in targets)
    names = []
    for name, module in model.named_modules():
        if not name or isinstance(module, LoraLayer) or not wanted(name):
            continue
        if not isinstance(module, (Linear, Conv2d)):
            raise TypeError(f"targets: {name!r} is a {type(module).__name__}; LoRA adapts Linear and Conv2d layers "
                            "only (name those inside it)")
        names.append(name)
    if not names:
        linear = [n for n, m in model.named_modules() if isinstance(m, (Linear, Conv2d))]
        raise ValueError(f"targets {targets!r} match no Linear or Conv2d layer of {type(model).__name__}; "
                         f"its layers are named like {', '.join(linear[:4])}, ...")
    return names


def _parent(model: Module, name: str):
    path, _, leaf = name.rpartition(".")
    parent = model
    for part in path.split(".") if path else ():
        parent = parent._modules[part]
    return parent, leaf


class LoraAdapters(Module):
    """The adapters of one or more models: children named ``{prefix}.{module path}`` holding that
    layer's ``lora_A`` / ``lora_B`` (module docstring). ``layers`` maps the same names to the
    ``LoraLayer`` objects (for the scale, fusing and the file's ranks and alphas)."""

    def __init__(self):
        super().__init__()
        object.__setattr__(self, "layers", {})

    def add(self, key: str, layer: LoraLayer) -> None:
        view = Module()
        view.lora_A = layer.lora_A
        view.lora_B = layer.lora_B
        if layer.dropout_p > 0.0:
            view.lora_dropout = layer.lora_dropout     # its generator is saved in checkpoints (loop.py)
        self._modules[key] = view
        self.layers[key] = layer

    def merge(self, other: "LoraAdapters") -> "LoraAdapters":
        for key, layer in other.layers.items():
            self.add(key, layer)
        return self

    def set_multiplier(self, multiplier: float) -> None:
        """The inference scale of every adapter (``--lora-scale``)."""
        for layer in self.layers.values():
            layer.set_multiplier(multiplier)

    def fuse(self) -> None:
        for layer in self.layers.values():
            layer.fuse()

    def unfuse(self) -> None:
        for layer in self.layers.values():
            layer.unfuse()


def add_lora(model: Module, targets, rank: int = 4, alpha: float | None = None, dropout: float = 0.0, *,
             prefix: str = "unet", rank_pattern: dict | None = None, alpha_pattern: dict | None = None,
             freeze: bool = True) -> LoraAdapters:
    """Wrap ``model``'s layers selected by ``targets`` in ``LoraLayer``s of ``rank`` / ``alpha`` (per-layer
    overrides in ``rank_pattern`` / ``alpha_pattern``) and return their ``LoraAdapters`` with key prefix
    ``prefix``. ``freeze``: the model computes input gradients only, the adapters their own (module
    docstring). The new adapters have the model's dtype and change nothing until trained (B = 0)."""
    check_positive_int("rank", rank, "add_lora")
    names = matching_modules(model, targets)
    if freeze:
        model.requires_grad_(False)
    adapters = LoraAdapters()
    for name in names:
        parent, leaf = _parent(model, name)
        base = parent._modules[leaf]
        layer = LoraLayer(base, _pattern_value(name, rank_pattern, rank), _pattern_value(name, alpha_pattern, alpha),
                          dropout)
        layer.train(model.training)
        parent._modules[leaf] = layer
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
        adapters.add(f"{prefix}.{name}", layer)
    return adapters


def remove_lora(model: Module) -> None:
    """Put every ``LoraLayer``'s base layer back in its place (unfused first: W is the original again)."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name in names:
        parent, leaf = _parent(model, name)
        layer = parent._modules[leaf]
        layer.unfuse()
        parent._modules[leaf] = layer.base_layer
