"""The module protocol every layer and model of npdiffusion follows.

A ``Module`` owns named parameters (arrays of the active backend) and child modules, and chains
stateless op pairs (``npdiffusion.ops``). Attribute paths equal torch/diffusers state-dict keys:
``self.to_q = Linear(...)`` inside ``attn1`` gives the parameter ``attn1.to_q.weight``.

The protocol:

* ``forward(*inputs)`` (also ``__call__``). In training mode (``train()``, the default) a module
  keeps what its backward needs from the *last* forward; in ``eval()`` mode it keeps nothing, so a
  50-step sampler never grows memory.
* ``backward(*grad_outputs)`` returns the gradient of each array input of the last forward: one
  array when there was one input, a tuple in input order otherwise; integer inputs (token ids,
  timesteps) get none. Parameter gradients are *accumulated* (``+=``); ``zero_grad()`` clears them.
* ``named_parameters()`` / ``named_grads()`` yield ``(dotted_name, array)`` with state-dict names;
  after a backward every parameter has a gradient (zeros for one the forward did not use).
* ``state_dict()`` / ``load_state_dict(d, strict=True)``; ``to(dtype)``; ``train()`` / ``eval()``.
* Gradient checkpointing: ``module.gradient_checkpointing = True`` makes a training-mode call keep
  only its inputs; its backward first recomputes the forward (keeping caches), then runs as usual.
  Exact, and it trades compute for memory. Modules must call children (``self.conv(x)``), never
  ``self.conv.forward(x)``, so that checkpointing applies.
* Recording: ``with npdiffusion.nn.recorder.record(root) as rec:`` captures every named
  descendant's inputs, outputs and gradients by dotted name (docs/oracle.md); it costs one
  ``is None`` test per call when no recorder is active.

A subclass registers parameters with ``register_parameter`` (or ``register_buffer`` for
non-trainable state), stores its cache with ``self.save_for_backward(...)`` in ``forward`` and
reads it back with ``self.saved()`` in ``backward``, and hands parameter gradients over with
``self.accumulate_grad(name, grad)``.
"""
from __future__ import annotations

import contextlib
import functools
from collections import OrderedDict
from typing import Iterator

import numpy

from npdiffusion.backend import asarray, xp
from npdiffusion.checks import check_dtype
from npdiffusion.nn import recorder as _recorder

DTYPES = {"float16": numpy.float16, "float32": numpy.float32, "float64": numpy.float64}


def canonical_dtype(dtype) -> numpy.dtype:
    """``dtype`` (a NumPy dtype or its name) as a NumPy float dtype, or a clear TypeError."""
    return check_dtype("dtype", dtype, DTYPES)


_recording = {"on": True}


@contextlib.contextmanager
def no_cache():
    """Within this block, no module keeps anything for backward (even in training mode)."""
    previous = _recording["on"]
    _recording["on"] = False
    try:
        yield
    finally:
        _recording["on"] = previous


class StateDictError(ValueError):
    """A state dict that does not fit a module: lists missing, unexpected and mis-shaped keys."""


class Module:
    """Base class of every layer and model; see the module docstring for the protocol."""

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_grads", {})
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_persistent", set())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "_cache", None)
        object.__setattr__(self, "_checkpoint_inputs", None)
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "gradient_checkpointing", False)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "backward" in cls.__dict__:
            cls.backward = _recompute_if_checkpointed(cls.__dict__["backward"])

    # ----------------------------------------------------------------- registration
    def __setattr__(self, name, value):
        if isinstance(value, Module):
            self._modules[name] = value
            self.__dict__.pop(name, None)
        elif name in self._parameters:
            self._set_parameter(name, value)
        elif name in self._buffers:
            self._buffers[name] = value
        else:
            if name in self._modules:
                del self._modules[name]
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        # Only called when normal lookup fails: parameters, buffers and children live in dicts.
        d = self.__dict__
        for store in ("_parameters", "_buffers", "_modules"):
            if store in d and name in d[store]:
                return d[store][name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __delattr__(self, name):
        for store in (self._parameters, self._buffers, self._modules):
            if name in store:
                del store[name]
                self._grads.pop(name, None)
                return
        object.__delattr__(self, name)

    def register_parameter(self, name: str, value) -> None:
        """Add a trainable array called ``name`` (moved to the active backend)."""
        self._parameters[name] = asarray(value)
        self._grads[name] = None

    def register_buffer(self, name: str, value, persistent: bool = True) -> None:
        """Add non-trainable state (saved in the state dict when ``persistent``)."""
        self._buffers[name] = None if value is None else asarray(value)
        if persistent:
            self._persistent.add(name)
        else:
            self._persistent.discard(name)

    def _set_parameter(self, name, value):
        old = self._parameters[name]
        value = asarray(value)
        if old is not None and value.shape != old.shape:
            raise ValueError(f"parameter {name!r} has shape {old.shape}, cannot set one of shape {value.shape}")
        self._parameters[name] = value

    # ----------------------------------------------------------------- forward / backward
    def __call__(self, *args, **kwargs):
        if _recorder.active is not None and _recorder.active.wants(self):
            return _recorder.active.call(self, args, kwargs)   # re-enters __call__, unrecorded
        if self.gradient_checkpointing and self.training and _recording["on"]:
            with no_cache():
                out = self.forward(*args, **kwargs)
            object.__setattr__(self, "_checkpoint_inputs", (args, kwargs))
            return out
        return self.forward(*args, **kwargs)

    def forward(self, *inputs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward")

    def backward(self, *grad_outputs):
        raise NotImplementedError(f"{type(self).__name__} does not define backward")

    def save_for_backward(self, *cache) -> None:
        """Keep ``cache`` for the next backward, only in training mode."""
        object.__setattr__(self, "_cache", cache if self.training and _recording["on"] else None)

    def saved(self):
        """What the last training-mode forward kept (one object or a tuple), or a clear error."""
        cache = self._cache
        if cache is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward needs a forward in training mode first "
                "(call .train() before forward; eval() mode keeps nothing for backward)"
            )
        return cache[0] if len(cache) == 1 else cache

    def accumulate_grad(self, name: str, grad) -> None:
        """``grad_name += grad`` (the first gradient after ``zero_grad`` is stored as given).

        Op backwards return freshly allocated arrays, so the first one is taken without a copy.
        """
        if grad is None:
            return
        param = self._parameters[name]
        if grad.shape != param.shape:
            raise ValueError(f"gradient of {name!r} has shape {grad.shape}, parameter has {param.shape}")
        current = self._grads.get(name)
        if current is None:
            self._grads[name] = grad if grad.dtype == param.dtype else grad.astype(param.dtype)
        else:
            current += grad

    def zero_grad(self) -> None:
        """Forget every accumulated parameter gradient, in this module and its children."""
        for module in self.modules():
            for name in module._grads:
                module._grads[name] = None

    # ----------------------------------------------------------------- traversal
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        """Yield ``(dotted_name, module)`` for this module (name ``prefix``) and all descendants."""
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator["Module"]:
        for _, m in self.named_modules():
            yield m

    def children(self) -> Iterator["Module"]:
        yield from self._modules.values()

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, object]]:
        """Yield ``(state_dict_key, array)`` for every parameter."""
        for mod_name, module in self.named_modules(prefix):
            for name, p in module._parameters.items():
                yield (f"{mod_name}.{name}" if mod_name else name), p

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def named_grads(self, prefix: str = "") -> Iterator[tuple[str, object]]:
        """Yield ``(state_dict_key, gradient)``; zeros for a parameter no backward has reached."""
        for mod_name, module in self.named_modules(prefix):
            for name, p in module._parameters.items():
                g = module._grads.get(name)
                if g is None:
                    g = xp.zeros_like(p)
                    module._grads[name] = g
                yield (f"{mod_name}.{name}" if mod_name else name), g

    def num_parameters(self) -> int:
        return int(sum(p.size for p in self.parameters()))

    # ----------------------------------------------------------------- modes and dtype
    def train(self, mode: bool = True) -> "Module":
        """Training mode: forward keeps what backward needs. Returns self."""
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
            if not mode:
                object.__setattr__(m, "_cache", None)
                object.__setattr__(m, "_checkpoint_inputs", None)
        return self

    def eval(self) -> "Module":
        """Inference mode: forward keeps nothing (and dropout is off). Returns self."""
        return self.train(False)

    @property
    def dtype(self):
        for _, p in self.named_parameters():
            return p.dtype
        return numpy.dtype(numpy.float32)

    def to(self, dtype) -> "Module":
        """Cast every floating parameter, gradient and buffer to ``dtype``. Returns self."""
        dt = canonical_dtype(dtype)
        for m in self.modules():
            for name, p in m._parameters.items():
                m._parameters[name] = p.astype(dt, copy=False)
                g = m._grads.get(name)
                m._grads[name] = None if g is None else g.astype(dt, copy=False)
            for name, b in m._buffers.items():
                if b is not None and b.dtype.kind == "f":
                    m._buffers[name] = b.astype(dt, copy=False)
            object.__setattr__(m, "_cache", None)
        return self

    def half(self):
        return self.to(numpy.float16)

    def float(self):
        return self.to(numpy.float32)

    def double(self):
        return self.to(numpy.float64)

    # ----------------------------------------------------------------- state dicts
    def _named_state(self, prefix: str = ""):
        """(key, owning module, local name, kind) for every parameter and persistent buffer."""
        for mod_name, module in self.named_modules(prefix):
            base = f"{mod_name}." if mod_name else ""
            for name in module._parameters:
                yield base + name, module, name, "_parameters"
            for name in module._buffers:
                if name in module._persistent and module._buffers[name] is not None:
                    yield base + name, module, name, "_buffers"

    def state_dict(self) -> "OrderedDict[str, object]":
        """Parameters and persistent buffers by state-dict key (the live arrays, not copies)."""
        return OrderedDict((key, getattr(m, kind)[name]) for key, m, name, kind in self._named_state())

    def load_state_dict(self, state_dict, strict: bool = True):
        """Copy ``state_dict``'s arrays into this module, cast to each parameter's dtype.

        Raises one ``StateDictError`` naming every missing key, unexpected key and shape mismatch
        (missing and unexpected keys only count when ``strict``). Returns
        ``(missing_keys, unexpected_keys)``.
        """
        if not hasattr(state_dict, "items"):
            raise TypeError(f"state_dict must be a mapping of names to arrays, got {type(state_dict).__name__}")
        own = {key: (m, name, kind) for key, m, name, kind in self._named_state()}
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        mismatched = []
        for key, value in state_dict.items():
            if key in own:
                m, name, kind = own[key]
                target = getattr(m, kind)[name]
                shape = tuple(getattr(value, "shape", ()))
                if shape != tuple(target.shape):
                    mismatched.append(f"{key}: expected shape {tuple(target.shape)}, got {shape}")
        problems = []
        if strict and missing:
            problems.append("missing keys: " + ", ".join(missing))
        if strict and unexpected:
            problems.append("unexpected keys: " + ", ".join(unexpected))
        if mismatched:
            problems.append("shape mismatches: " + "; ".join(mismatched))
        if problems:
            raise StateDictError(f"cannot load state dict into {type(self).__name__}: " + " | ".join(problems))
        for key, value in state_dict.items():
            if key in own:
                m, name, kind = own[key]
                target = getattr(m, kind)[name]
                target[...] = asarray(value, dtype=target.dtype)
        return missing, unexpected

    def __repr__(self):
        lines = [f"{type(self).__name__}("]
        for name, child in self._modules.items():
            lines.append("  (" + name + "): " + repr(child).replace("\n", "\n  "))
        lines.append(")")
        return "\n".join(lines) if self._modules else f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self) -> str:
        return ""


def _recompute_if_checkpointed(backward):
    """Wrap a subclass's backward: a checkpointed call first recomputes its forward with caches."""

    @functools.wraps(backward)
    def wrapper(self, *grad_outputs, **kwargs):
        if _recorder.active is not None and _recorder.active.wants_backward(self):
            return _recorder.active.call_backward(self, wrapper, grad_outputs, kwargs)  # re-enters, unrecorded
        pending = self.__dict__.get("_checkpoint_inputs")
        if pending is not None:
            object.__setattr__(self, "_checkpoint_inputs", None)
            forward_args, forward_kwargs = pending
            self.forward(*forward_args, **forward_kwargs)
        return backward(self, *grad_outputs, **kwargs)

    return wrapper


class ModuleList(Module):
    """A list of modules whose state-dict names are their indices (``down_blocks.0.``...)."""

    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module: Module) -> "ModuleList":
        if not isinstance(module, Module):
            raise TypeError(f"ModuleList holds Modules, got {type(module).__name__}")
        self._modules[str(len(self._modules))] = module
        return self

    def __getitem__(self, i):
        if isinstance(i, slice):
            return list(self._modules.values())[i]
        n = len(self._modules)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for ModuleList of length {n}")
        return self._modules[str(i % n)]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())
