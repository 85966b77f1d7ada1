"""The module protocol every layer and model of npdiffusion follows.

A ``Module`` owns named parameters (arrays of the active backend) and child modules, and chains
stateless op pairs (``npdiffusion.ops``). Attribute paths equal torch/diffusers state-dict keys:
``self.to_q = Linear(...)`` inside ``attn1`` gives the parameter ``attn1.to_q.weight``.

The protocol:

* ``forward(*inputs)`` (also ``__call__``). In training mode (``train()``, the default) a module
  keeps what its backward needs from the *last* forward; in ``eval()`` mode it keeps nothing, so a
  50-step sampler never grows memory.
* ``backward(*grad_outputs)`` takes one gradient per output array of the last forward and returns
  the gradients of forward's *array parameters*, in signature order, always in the same shape:
  one array when forward has one array parameter, otherwise a tuple (or a NamedTuple named after
  the parameters) with one entry per array parameter, ``None`` for an input that was not given
  (``temb=None``, a self-attention's absent context). Whatever forward was given, the length is
  the same. Parameters that are never differentiated (token ids, timesteps, masks, sizes) get no
  entry. Parameter gradients are *accumulated* (``+=``); ``zero_grad()`` clears them.
* Cache lifetime: a backward consumes its cache (torch's ``retain_graph=False``): once it returns,
  what its forward kept is freed, so a model's backward holds the activations of the layers not yet
  differentiated plus the temporaries of one layer. A second backward needs a new forward (or
  raises the clear "needs a forward" error).
* Frozen parameters: ``module.requires_grad_(False)`` (or ``with frozen(module):``) makes backward
  compute input gradients only: layers skip their weight-gradient products and accumulate nothing.
  This is what guidance and the GAN's adaptive weight need (a gradient with respect to an image,
  the model's own gradients untouched).
* ``named_parameters()`` / ``named_grads()`` yield ``(dotted_name, array)`` with state-dict names;
  after a backward every parameter has a gradient (zeros for one the forward did not use).
* ``state_dict()`` / ``load_state_dict(d, strict=True)``; ``to(dtype)``; ``train()`` / ``eval()``.
* Flat training storage: ``nn.flat_parameters.flatten_parameters(module)`` turns every parameter and
  gradient into a view of one buffer per dtype (the trainer does it); layers notice nothing, except
  that ``zero_grad`` then fills the gradients with zeros in place instead of dropping them.
* Gradient checkpointing: ``module.gradient_checkpointing = True`` makes a training-mode call keep
  only its inputs; its backward first recomputes the forward (keeping caches), then runs as usual.
  Exact, and it trades compute for memory. Modules must call children (``self.conv(x)``), never
  ``self.conv.forward(x)``, so that checkpointing applies.
* Recording: ``with npdiffusion.nn.recorder.record(root) as rec:`` captures every named
  descendant's inputs, outputs and gradients by dotted name (docs/oracle.md); it costs one
  ``is None`` test per call when no recorder is active.
* More than one forward/backward pair: a module may define ``NAME(...)`` / ``NAME_backward(...)``
  besides forward/backward (``AutoencoderKL.encode`` / ``encode_backward``). Each pair has its
  own cache slot, ``save_for_backward(..., slot="NAME")`` / ``saved("NAME")``, freed when
  ``NAME_backward`` returns like backward's; the recorder records ``NAME_backward`` as it does
  ``backward`` (under the label ``<module>:NAME``).

A subclass registers parameters with ``register_parameter`` (or ``register_buffer`` for
non-trainable state), stores its cache with ``self.save_for_backward(...)`` in ``forward`` and
reads it back with ``self.saved()`` in ``backward``, and hands parameter gradients over with
``self.accumulate_grad(name, grad)``; a layer whose backward computes a weight gradient by a
product asks ``self.requires_grad`` first, so a frozen layer skips it.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from collections import OrderedDict
from typing import Iterator

import numpy

from npdiffusion.backend import asarray, xp
from npdiffusion.checks import check_dtype
from npdiffusion.nn import recorder as _recorder
from npdiffusion.nn.flat_parameters import Registry, flatten_parameters

DTYPES = {"float16": numpy.float16, "float32": numpy.float32, "float64": numpy.float64}


def canonical_dtype(dtype) -> numpy.dtype:
    """``dtype`` (a NumPy dtype or its name) as a NumPy float dtype, or a clear TypeError."""
    return check_dtype("dtype", dtype, DTYPES)


_recording = {"on": True}


@contextlib.contextmanager
def frozen(*modules):
    """Within this block, ``modules`` compute input gradients only (``requires_grad_(False)``);
    each descendant's previous setting is restored afterwards."""
    previous = [(m, m.requires_grad) for root in modules for m in root.modules()]
    try:
        for root in modules:
            root.requires_grad_(False)
        yield
    finally:
        for m, flag in previous:
            object.__setattr__(m, "requires_grad", flag)


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
        object.__setattr__(self, "_parameters", Registry())
        object.__setattr__(self, "_grads", {})
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_persistent", set())
        object.__setattr__(self, "_modules", Registry())
        object.__setattr__(self, "_caches", {})
        object.__setattr__(self, "_checkpoint_inputs", None)
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "requires_grad", True)
        object.__setattr__(self, "gradient_checkpointing", False)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name, method in list(cls.__dict__.items()):
            pair = name[:-len("_backward")]
            if name == "backward" or (name.endswith("_backward") and pair.isidentifier() and not name.startswith("_")
                                      and inspect.isfunction(method) and callable(getattr(cls, pair, None))):
                setattr(cls, name, _protocol_backward(method, name))

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
        if self.__dict__.get("_flat_root") is not None and old is not None:
            old[...] = value                # a view of flat training storage stays one (nn/flat_parameters.py)
        else:
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

    def save_for_backward(self, *cache, slot: str = "forward") -> None:
        """Keep ``cache`` for the next backward (of the pair named ``slot``), only in training mode."""
        if self.training and _recording["on"]:
            self._caches[slot] = cache
        else:
            self._caches.pop(slot, None)

    def saved(self, slot: str = "forward"):
        """What the last training-mode forward (or ``slot`` method) kept, one object or a tuple, or a
        clear error."""
        cache = self._caches.get(slot)
        if cache is None:
            method, call = ("backward", "a forward") if slot == "forward" else \
                (f"{slot}_backward", f"{'an' if slot[0] in 'aeiou' else 'a'} {slot} call")
            raise RuntimeError(
                f"{type(self).__name__}.{method} needs {call} in training mode first, and one per backward "
                "(call .train() before it; eval() mode keeps nothing, and a backward frees what its forward kept)"
            )
        return cache[0] if len(cache) == 1 else cache

    def free_caches(self) -> None:
        """Drop every cache of this module and its descendants (parameters and gradients stay)."""
        for m in self.modules():
            m._caches.clear()
            object.__setattr__(m, "_checkpoint_inputs", None)

    def requires_grad_(self, requires_grad: bool = True) -> "Module":
        """Whether backward computes parameter gradients here and in every descendant (False: input
        gradients only, as torch's ``requires_grad_(False)``). Returns self."""
        if not isinstance(requires_grad, bool):
            raise TypeError(f"requires_grad must be a bool, got {requires_grad!r}")
        for m in self.modules():
            object.__setattr__(m, "requires_grad", requires_grad)
        return self

    def accumulate_grad(self, name: str, grad) -> None:
        """``grad_name += grad`` (the first gradient after ``zero_grad`` is stored as given); nothing
        when the module is frozen (``requires_grad_(False)``).

        Op backwards return freshly allocated arrays, so the first one is taken without a copy.
        """
        if grad is None or not self.requires_grad:
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
        """Forget every accumulated parameter gradient, in this module and its children.

        Gradients in flat training storage (``nn/flat_parameters.py``) are set to zero in place
        instead (one fill per buffer when called on the flattened module itself).
        """
        flat = self.__dict__.get("flat_parameters")
        if flat is not None and flat.intact():
            flat.zero_grads()
            return
        for module in self.modules():
            in_place = module.__dict__.get("_flat_root") is not None
            for name, g in module._grads.items():
                if in_place and g is not None:
                    g.fill(0)
                else:
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
                m._caches.clear()
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
        """Cast every floating parameter, gradient and buffer to ``dtype``. Returns self.

        A module in flat training storage (``nn/flat_parameters.py``) is flattened again in ``dtype``.
        """
        dt = canonical_dtype(dtype)
        flat = self.__dict__.get("flat_parameters")
        reflatten = flat is not None and any(group.dtype != dt for group in flat.groups)
        for m in self.modules():
            for name, p in m._parameters.items():
                m._parameters[name] = p.astype(dt, copy=False)
                g = m._grads.get(name)
                m._grads[name] = None if g is None else g.astype(dt, copy=False)
            for name, b in m._buffers.items():
                if b is not None and b.dtype.kind == "f":
                    m._buffers[name] = b.astype(dt, copy=False)
            m._caches.clear()
        if reflatten:
            flatten_parameters(self)
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


def _protocol_backward(backward, name):
    """Wrap a subclass's ``backward`` (or ``NAME_backward``): record it when a recorder wants it,
    recompute a checkpointed call's forward first, and free the pair's cache slot when it returns."""
    slot = "forward" if name == "backward" else name[:-len("_backward")]
    label = None if name == "backward" else slot

    @functools.wraps(backward)
    def wrapper(self, *grad_outputs, **kwargs):
        if _recorder.active is not None and _recorder.active.wants_backward(self):
            return _recorder.active.call_backward(self, wrapper, grad_outputs, kwargs, method=label)  # re-enters
        if slot == "forward":
            pending = self.__dict__.get("_checkpoint_inputs")
            if pending is not None:
                object.__setattr__(self, "_checkpoint_inputs", None)
                forward_args, forward_kwargs = pending
                self.forward(*forward_args, **forward_kwargs)
        result = backward(self, *grad_outputs, **kwargs)
        self._caches.pop(slot, None)
        return result

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
