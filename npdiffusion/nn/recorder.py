"""The opt-in layer recorder: every named module's inputs, outputs and gradients, by dotted name.

Shapes: whatever each module takes and returns; every recorded array is a host (NumPy) copy made
at the moment of the event, so later in-place updates (``y += x`` in a residual) cannot alter it.

Usage::

    with record(model) as rec:
        y = model(x)                 # forward events, in call order
        model.backward(dy)           # backward events, in backward order
    rec.forward    # OrderedDict key -> array:  act/<name>/input.<i>, act/<name>/output[.<path>]
    rec.backward   # OrderedDict key -> array:  grad/<name>/output[.<path>], grad/<name>/input.<i>,
                   #                            param_grad/<name>.<param>

The root passed to ``record`` names the modules (``root.named_modules()``); the root itself (name
"") is not recorded: its inputs and outputs are the caller's. Key rules (docs/oracle.md, "Key
names"), chosen so a torch implementation can reproduce them with hooks on same-named modules:

* inputs: positional argument i is ``input.<i>``, a keyword argument ``input.<keyword>``; tuples
  and lists nest (``input.1.0``); ``None``, Python numbers and integer arrays (token ids,
  timesteps) are not recorded as gradient targets, integer arrays are recorded as values.
* outputs: a module whose return value holds exactly one array records it as ``output``;
  otherwise each array at tuple path (i, j, ...) is ``output.i.j``; ``None`` entries are skipped.
* output gradients: the arguments of ``backward`` follow the output's structure (``grad/.../output``
  for a single array, ``output.<i>...`` otherwise); ``None`` gradients are skipped.
* input gradients: the k-th non-None entry a backward returns (an array or a tuple) belongs to the
  k-th floating input of the forward (``grad/<name>/input.<i>``); a bare array to the first one.
  (``None`` entries stand for inputs that were not given, which are not floating inputs.)
* ``NAME_backward`` of a module with a second forward/backward pair (``encode_backward``) is
  labelled ``<name>:NAME``, its output gradients ``output.<i>``, its results ``returned.<k>``.
* ``param_grad/<name>.<param>`` for each parameter the module owns directly, when its backward
  returns (so gradients sit in backward order next to the layer that finished them).
* a module called more than once while recording gets ``<name>#1``, ``<name>#2``... for its
  second, third... call (forward and backward counted separately).

Forward calls made *during* a backward (gradient checkpointing's recomputation) are not recorded.
Zero cost when not recording: ``Module.__call__`` and the backward wrapper test ``active`` only.
"""
from __future__ import annotations

import contextlib
from collections import Counter, OrderedDict

import numpy

from npdiffusion.backend import is_array, to_numpy

#: The Recorder receiving events, or None. Module.__call__ and the backward wrapper read it.
active = None


def _is_float_array(a) -> bool:
    return is_array(a) and a.dtype.kind in "fc"


def leaves(value, path=()):
    """Yield ``(path, array)`` for every array in ``value`` (nested tuples/lists), depth first."""
    if is_array(value):
        yield path, value
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from leaves(v, path + (i,))


def given_input_grads(result) -> list:
    """The gradients a backward returned for the inputs that were given: ``result``'s entries
    without the ``None`` ones (absent inputs), a bare array as a one-element list."""
    if isinstance(result, tuple):
        return [g for g in result if g is not None]
    return [] if result is None else [result]


def _has_float(value) -> bool:
    return any(_is_float_array(a) for _, a in leaves(value))


def _suffix(path) -> str:
    return "".join(f".{i}" for i in path)


class Recorder:
    """Collects the events of one root module's descendants (see the module docstring)."""

    def __init__(self, root, params: bool = True):
        self.params = bool(params)
        self._names = {}
        self._keep = []                          # the modules themselves, so their ids stay valid
        for name, module in root.named_modules():
            if name and id(module) not in self._names:
                self._names[id(module)] = name
                self._keep.append(module)
        self.forward = OrderedDict()
        self.backward = OrderedDict()
        self.layers = []                         # recorded layer labels in forward call order
        self._fwd_calls = Counter()
        self._bwd_calls = Counter()
        self._busy = set()                       # ids of modules whose event is in progress
        self._in_backward = 0
        self._signature = {}                     # id(module) -> (input names of floating inputs, output paths)

    # ------------------------------------------------------------------ called by Module
    def wants(self, module) -> bool:
        """Whether a forward call of ``module`` is to be recorded now."""
        return id(module) in self._names and id(module) not in self._busy and not self._in_backward

    def wants_backward(self, module) -> bool:
        return id(module) in self._names and id(module) not in self._busy

    def call(self, module, args, kwargs):
        """Record ``module(*args, **kwargs)``: inputs, then (after the children's events) outputs."""
        name = self._names[id(module)]
        label = self._label(name, self._fwd_calls)
        grad_inputs = []
        for i, a in enumerate(args):
            self._put_tree(self.forward, f"act/{label}/input.{i}", a)
            if _has_float(a):
                grad_inputs.append(f"input.{i}")
        for k, a in kwargs.items():
            self._put_tree(self.forward, f"act/{label}/input.{k}", a)
            if _has_float(a):
                grad_inputs.append(f"input.{k}")
        self._busy.add(id(module))
        try:
            out = module(*args, **kwargs)
        finally:
            self._busy.discard(id(module))
        out_leaves = list(leaves(out))
        single = len(out_leaves) == 1
        for path, a in out_leaves:
            self._put(self.forward, f"act/{label}/output" + ("" if single else _suffix(path)), a)
        self._signature[id(module)] = (grad_inputs, out_leaves[0][0] if single else None,
                                       isinstance(out, (tuple, list)))
        self.layers.append(label)
        return out

    def call_backward(self, module, backward, grad_outputs, kwargs=None, method=None):
        """Record ``backward(module, *grad_outputs, **kwargs)``: output gradients, then input and
        parameter ones (keyword gradients are passed through unrecorded). ``method``: the pair's
        name for a ``NAME_backward`` (labelled ``<module>:NAME``, its inputs ``returned.<k>``)."""
        name = self._names[id(module)]
        label = self._label(name if method is None else f"{name}:{method}", self._bwd_calls)
        no_signature = ([], None, False)
        grad_inputs, single_path, tuple_out = (self._signature.get(id(module), no_signature) if method is None
                                               else no_signature)
        for path, g in leaves(grad_outputs if tuple_out else grad_outputs[:1]):
            if not tuple_out:
                path = path[1:]                  # backward(g) for a single returned array
            suffix = "" if single_path is not None and path == single_path else _suffix(path)
            self._put(self.backward, f"grad/{label}/output{suffix}", g)
        self._busy.add(id(module))
        self._in_backward += 1
        try:
            result = backward(module, *grad_outputs, **(kwargs or {}))
        finally:
            self._in_backward -= 1
            self._busy.discard(id(module))
        returned = given_input_grads(result)
        names = grad_inputs if len(returned) <= len(grad_inputs) else [f"returned.{k}" for k in range(len(returned))]
        for input_name, g in zip(names, returned):
            self._put_tree(self.backward, f"grad/{label}/{input_name}", g)
        if self.params:
            for pname in module._parameters:
                g = module._grads.get(pname)
                if g is not None:
                    self._put(self.backward, f"param_grad/{name}.{pname}", g)
        return result

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _label(name, counter) -> str:
        k = counter[name]
        counter[name] += 1
        return name if k == 0 else f"{name}#{k}"

    def _put(self, store, key, a) -> None:
        store[key] = numpy.array(to_numpy(a), copy=True)

    def _put_tree(self, store, key, value) -> None:
        for path, a in leaves(value):
            self._put(store, key + _suffix(path), a)


@contextlib.contextmanager
def record(root, params: bool = True):
    """Record every named descendant of ``root`` while the block runs; yields the ``Recorder``.

    ``params``: also record ``param_grad/<name>.<param>`` when each module's backward returns.
    Recorders do not nest (a second ``record`` inside the block raises RuntimeError).
    """
    global active
    if active is not None:
        raise RuntimeError("record: a recorder is already active; recorders do not nest")
    rec = Recorder(root, params=params)
    active = rec
    try:
        yield rec
    finally:
        active = None
