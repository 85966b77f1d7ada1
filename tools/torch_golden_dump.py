"""Dump a PyTorch model's activations and gradients under npdiffusion's golden key names.

Standalone (torch, numpy and safetensors only; no npdiffusion import), so a PyTorch project can
copy it. Used by tests/test_oracle_models.py on diffusers' and transformers' models, and shown in
docs/oracle.md. Usage::

    from torch_golden_dump import dump_candidate
    model = ...                                          # your implementation, weights loaded
    dump_candidate(model, "golden/", "candidate.safetensors",
                   forward=lambda m, x: {"sample": m(x["sample"], x["timestep"],
                                                     x["encoder_hidden_states"]).sample})
    # then: npdiffusion golden check golden/ candidate.safetensors

How names are reproduced (docs/oracle.md, "Key names"): hooks on every named submodule of the
root (``root.named_modules()``; the root itself is the caller's) record

    act/<m>/input.<i|kw>    a forward-pre hook; each floating input is replaced by an alias
                            (``t.view_as(t)``) whose tensor hook records grad/<m>/input.<i|kw>,
                            the gradient this module's backward produced for that input alone
    act/<m>/output[.<i>]    a forward hook; each output array is replaced by an alias whose
                            tensor hook records grad/<m>/output[.<i>] (the gradient arriving at
                            that output position, as npdiffusion's backward receives it)

Outputs are flattened like npdiffusion's: one tensor is ``output``; tuples, lists and
``ModelOutput``/``BaseOutput`` objects (their non-None fields, in order) give ``output.<i>``.
When the golden folder records a single ``output`` for a module that returns several tensors
here (attention weights beside the result, say), the first one is taken.

Teacher forcing (``teacher_forcing=True``): every module output the golden folder holds is
replaced by ``out + (golden - out).detach()`` (the golden value, with this module's own gradient
path), and every gradient it holds (a module's output gradient, or the gradient a module returns
for one input) is replaced by the golden one once recorded. Each layer then runs on golden
inputs and golden output gradients, and errors do not propagate, so a layer's
forward or backward error shows at that layer only: the report's first divergence is the layer
at fault, in the forward and in the backward. What is recorded is always this implementation's
own value, before the replacement.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict

import numpy as np
import torch
from safetensors.numpy import load_file as _load_numpy
from safetensors.torch import save_file as _save_torch


def _leaves(value, path=()):
    """(path, tensor) pairs of a nested output; ModelOutput/BaseOutput count as their non-None values."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif hasattr(value, "to_tuple") and hasattr(value, "keys"):
        for i, v in enumerate(value.to_tuple()):
            yield from _leaves(v, path + (i,))
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from _leaves(v, path + (i,))


def _replace(value, new, path=()):
    """``value`` with the tensors at the paths in ``new`` (path -> tensor) swapped in."""
    if isinstance(value, torch.Tensor):
        return new.get(path, value)
    if hasattr(value, "to_tuple") and hasattr(value, "keys"):
        keys = [k for k in value.keys() if value[k] is not None]
        out = type(value)(**{k: value[k] for k in value.keys()})
        for i, k in enumerate(keys):
            out[k] = _replace(value[k], new, path + (i,))
        return out
    if isinstance(value, (tuple, list)):
        return type(value)(_replace(v, new, path + (i,)) for i, v in enumerate(value))
    return value


def _suffix(path):
    return "".join(f".{i}" for i in path)


class GoldenDumper:
    """Context manager installing the hooks on ``root``'s named submodules (see the module docstring).

    ``golden``: the golden tensors (key -> numpy array), needed for teacher forcing and to name a
    single output; ``tensors`` collects the dump (key -> numpy array, float64 copies kept in the
    model's dtype).
    """

    def __init__(self, root: torch.nn.Module, golden: dict | None = None, teacher_forcing: bool = False):
        self.root = root
        self.golden = golden or {}
        self.teacher_forcing = teacher_forcing
        self.tensors = OrderedDict()
        self._handles = []
        self._calls = {}

    # ------------------------------------------------------------------ recording
    def put(self, key, t):
        self.tensors[key] = t.detach().cpu().numpy().copy()

    def _golden_like(self, key, t):
        g = self.golden.get(key)
        if g is None or g.size != t.numel():
            return None
        return torch.from_numpy(np.ascontiguousarray(g)).to(t.dtype).reshape(t.shape)

    def _grad_hook(self, key):
        def hook(grad):
            self.put(key, grad)
            if self.teacher_forcing:
                forced = self._golden_like(key, grad)
                if forced is not None:
                    return forced
            return None
        return hook

    def _label(self, name):
        k = self._calls.get(name, 0)
        self._calls[name] = k + 1
        return name if k == 0 else f"{name}#{k}"

    def _pre_hook(self, name):
        def hook(module, args, kwargs):
            label = self._label(name)
            module._golden_label = label

            def alias(t, key):
                self.put(key, t)
                if t.is_floating_point() and t.requires_grad:
                    a = t.view_as(t)
                    a.register_hook(self._grad_hook(key.replace("act/", "grad/", 1)))
                    return a
                return t

            new_args = tuple(_replace(a, {p: alias(t, f"act/{label}/input.{i}{_suffix(p)}")
                                          for p, t in _leaves(a)})
                             for i, a in enumerate(args))
            new_kwargs = {k: _replace(v, {p: alias(t, f"act/{label}/input.{k}{_suffix(p)}")
                                          for p, t in _leaves(v)})
                          for k, v in kwargs.items()}
            return new_args, new_kwargs
        return hook

    def _post_hook(self, name):
        def hook(module, args, kwargs, output):
            label = module._golden_label
            items = list(_leaves(output))
            if not items:
                return None
            single = len(items) == 1 or (f"act/{label}/output" in self.golden
                                         and f"act/{label}/output.0" not in self.golden)
            if single:
                items = items[:1]
            new = {}
            for path, t in items:
                key = f"act/{label}/output" + ("" if single else _suffix(path))
                self.put(key, t)
                if not t.is_floating_point():
                    continue
                if self.teacher_forcing:
                    g = self._golden_like(key, t)
                    if g is not None:
                        t = t + (g - t).detach()
                if t.requires_grad:
                    t = t.view_as(t)
                    t.register_hook(self._grad_hook(key.replace("act/", "grad/", 1)))
                new[path] = t
            return _replace(output, new)
        return hook

    # ------------------------------------------------------------------ context
    def __enter__(self):
        for name, module in self.root.named_modules():
            if not name:
                continue
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post_hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False


def load_golden(golden_dir):
    """(manifest dict, tensors dict of numpy arrays) of a golden folder."""
    with open(os.path.join(golden_dir, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    return manifest, _load_numpy(os.path.join(golden_dir, "golden.safetensors"))


def load_weights(model: torch.nn.Module, golden: dict, prefix: str = "") -> None:
    """Copy the golden ``param/*`` weights into ``model`` (keys after ``prefix`` is prepended)."""
    state = {prefix + k[len("param/"):]: torch.from_numpy(np.ascontiguousarray(v))
             for k, v in golden.items() if k.startswith("param/")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise KeyError(f"weights do not fit the model: missing {missing}, unexpected {unexpected}")


def dump_candidate(root: torch.nn.Module, golden_dir, out_path, forward, *, dtype=torch.float32,
                   teacher_forcing: bool = False, params=True) -> dict:
    """Run ``forward(root, inputs) -> {output name: tensor}`` on the golden inputs, back-propagate the
    golden output gradients, and write every recorded tensor to ``out_path`` (safetensors).

    ``root`` must already hold the golden weights (``load_weights``) in ``dtype``; its named
    submodules are hooked. Returns the dump (key -> numpy array)."""
    manifest, golden = load_golden(golden_dir)
    inputs = OrderedDict()
    for k in (e["key"] for e in manifest["keys"]):          # the manifest's order = the call's order
        if k.startswith("input/"):
            t = torch.from_numpy(np.ascontiguousarray(golden[k]))
            if t.is_floating_point():
                t = t.to(dtype).requires_grad_(True)
            inputs[k[len("input/"):]] = t
    with GoldenDumper(root, golden, teacher_forcing) as dumper:
        outputs = forward(root, inputs)
        names = [k for k in outputs if outputs[k] is not None]
        grads = [torch.from_numpy(np.ascontiguousarray(golden[f"output_grad/{k}"])).to(outputs[k].dtype)
                 .reshape(outputs[k].shape) for k in names]
        torch.autograd.backward([outputs[k] for k in names], grads)
    dump = dumper.tensors
    for k, t in inputs.items():
        dump[f"input/{k}"] = t.detach().numpy().copy()
        if t.grad is not None:
            dump[f"input_grad/{k}"] = t.grad.numpy().copy()
    for k in names:
        dump[f"output/{k}"] = outputs[k].detach().numpy().copy()
    if params:
        for name, p in root.named_parameters():
            dump[f"param/{name}"] = p.detach().numpy().copy()
            dump[f"param_grad/{name}"] = (p.grad if p.grad is not None else torch.zeros_like(p)).numpy().copy()
    meta = {"teacher_forcing": "true" if teacher_forcing else "false", "implementation": type(root).__name__}
    _save_torch({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in dump.items()}, os.fspath(out_path),
                metadata=meta)
    return dump
