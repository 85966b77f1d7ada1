"""Contiguous ("flat") training storage: a module's parameters and gradients as views of one buffer per dtype.

Shape legend: P the number of entries of one dtype's parameters together, p_i = size of parameter i,
o_i its offset (o_0 = 0, o_{i+1} = o_i + p_i).

Why: an optimizer step, an EMA update, the gradient norm, the clipping, zero_grad and the
data-parallel all-reduce are element-wise over *every* parameter. Run per parameter they cost a
dozen ufunc calls (plus a Python loop) per array, ~210 arrays for the demo's U-Net, and every rank
repeats them whatever the number of ranks. On one buffer each is a few calls (docs/optim.md, "Flat
training storage"), as DeepSpeed's and apex's contiguous gradient buffers do.

Layout (``flatten_parameters(module)``): the parameters are taken in ``named_parameters()`` order
and grouped by dtype (groups in order of first appearance). Group k owns two buffers, ``params`` (P,)
and ``grads`` (P,); parameter i of the group is ``params[o_i : o_i + p_i].reshape(shape_i)``, its
gradient the same slice of ``grads``. The module's ``_parameters[name]`` and ``_grads[name]`` are
re-pointed to those views (values copied, missing gradients as zeros), so every layer keeps reading
and accumulating into its own arrays and never knows. ``zero_grad`` then fills the gradient buffers
with zeros instead of dropping the arrays; a frozen module accumulates nothing into its zeros.

What keeps the views honest:

* ``_parameters`` / ``_modules`` of every Module are ``Registry`` dicts that bump a global counter on
  any change (a new parameter or child, an array replaced, ``to(dtype)``'s casts). ``current(target)``
  re-checks a storage whose counter is stale (every parameter still the view, in order) and, when
  the module changed, flattens it again (values and gradients copied): the flat paths never see a
  parameter they do not cover. ``Module.to(dtype)`` on the flattened module re-flattens at once.
* Setting a parameter attribute (``layer.weight = w``) of a flattened module copies into the view.

Objects other than Modules (``MasterWeights``) build a ``FlatParameters`` of their own arrays with
``FlatParameters(named_arrays)`` and expose it as the attribute ``flat_parameters`` (a property may
bring the gradients up to date first); ``current`` returns it as it is.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy

from npdiffusion.backend import xp

#: bumped by every change of a Registry (module structure or parameter arrays)
_version = [0]


def structure_changed() -> None:
    _version[0] += 1


class Registry(OrderedDict):
    """A Module's ``_parameters`` / ``_modules``: an OrderedDict that reports every change to
    ``structure_changed`` (module docstring)."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        _version[0] += 1

    def __delitem__(self, key):
        super().__delitem__(key)
        _version[0] += 1

    def pop(self, *args):
        _version[0] += 1
        return super().pop(*args)

    def popitem(self, last=True):
        _version[0] += 1
        return super().popitem(last)

    def clear(self):
        _version[0] += 1
        super().clear()

    def setdefault(self, key, default=None):
        _version[0] += 1
        return super().setdefault(key, default)


class FlatGroup:
    """The parameters of one dtype: ``params`` and ``grads`` (P,), ``names``, ``shapes``, ``offsets``
    (len n + 1), and the per-parameter views ``param_views`` / ``grad_views``."""

    def __init__(self, dtype, names, shapes):
        self.dtype = numpy.dtype(dtype)
        self.names = list(names)
        self.shapes = [tuple(s) for s in shapes]
        sizes = [int(numpy.prod(s, dtype=numpy.int64)) for s in self.shapes]
        self.offsets = [0]
        for n in sizes:
            self.offsets.append(self.offsets[-1] + n)
        self.size = self.offsets[-1]
        self.params = xp.empty(self.size, dtype=self.dtype)
        self.grads = xp.zeros(self.size, dtype=self.dtype)
        self.param_views = self.views(self.params)
        self.grad_views = self.views(self.grads)

    def views(self, buffer) -> list:
        """Parameter i's slice of ``buffer`` (P,), in its shape, for every i."""
        return [buffer[lo:hi].reshape(shape)
                for lo, hi, shape in zip(self.offsets[:-1], self.offsets[1:], self.shapes)]

    def runs(self, key) -> list:
        """``[(lo, hi, k)]``: the maximal runs of consecutive parameters with equal ``key(name)``, as
        entry ranges of the buffers (e.g. one run per learning rate)."""
        out = []
        for i, name in enumerate(self.names):
            k = key(name)
            if out and out[-1][2] == k:
                out[-1] = (out[-1][0], self.offsets[i + 1], k)
            else:
                out.append((self.offsets[i], self.offsets[i + 1], k))
        return out


class FlatParameters:
    """One ``FlatGroup`` per dtype holding ``named_arrays`` ([(name, array, gradient or None)]),
    values copied in. ``root``: the Module whose parameters these are (None for other owners)."""

    def __init__(self, named_arrays, root=None):
        by_dtype: dict = OrderedDict()
        for name, array, grad in named_arrays:
            by_dtype.setdefault(numpy.dtype(array.dtype), []).append((name, array, grad))
        self.groups = []
        for dtype, members in by_dtype.items():
            group = FlatGroup(dtype, [m[0] for m in members], [m[1].shape for m in members])
            for (_, array, grad), p_view, g_view in zip(members, group.param_views, group.grad_views):
                p_view[...] = array
                if grad is not None:
                    g_view[...] = grad
            self.groups.append(group)
        self.order = [name for name, _, _ in named_arrays]
        self.root = root
        self.version = _version[0]

    def zero_grads(self) -> None:
        for group in self.groups:
            group.grads.fill(0)

    def named_views(self):
        """``{name: (param view, grad view)}``."""
        return {n: (p, g) for group in self.groups
                for n, p, g in zip(group.names, group.param_views, group.grad_views)}

    def intact(self) -> bool:
        """Whether ``root``'s parameters and gradients are still exactly these views, in this order
        (checked only when a Registry changed since the last check)."""
        if self.root is None or self.version == _version[0]:
            return True
        views = self.named_views()
        names = []
        for mod_name, module in self.root.named_modules():
            for name, p in module._parameters.items():
                key = f"{mod_name}.{name}" if mod_name else name
                names.append(key)
                pair = views.get(key)
                if pair is None or pair[0] is not p or module._grads.get(name) is not pair[1]:
                    return False
        if names != self.order:
            return False
        self.version = _version[0]
        return True

    def gather(self, arrays: dict, what: str) -> tuple[list, dict]:
        """``(buffers, views)``: one new buffer per group (its dtype, zeros) holding ``arrays``
        ({name: array}, e.g. an optimizer's moments; a missing name stays zero), and ``{name: view}``
        of them in the layout of the parameters. ``what`` names the arrays in errors."""
        buffers, views = [], {}
        for group in self.groups:
            buf = xp.zeros(group.size, dtype=group.dtype)
            for name, view in zip(group.names, group.views(buf)):
                old = arrays.get(name)
                if old is not None:
                    if tuple(old.shape) != tuple(view.shape):
                        raise ValueError(f"{what} of {name!r} has shape {tuple(old.shape)}, parameter has "
                                         f"{tuple(view.shape)}")
                    view[...] = old
                views[name] = view
            buffers.append(buf)
        return buffers, views


def flatten_parameters(module) -> FlatParameters:
    """Move ``module``'s parameters and gradients into flat storage (module docstring); returns it.

    Call it once the module is complete (built, cast, loaded): later changes are followed (``current``)
    at the cost of a copy. A module already flattened is flattened again from its current arrays. A
    parameter array that appears twice (a module shared by two parents, a tied weight) is refused with
    a ValueError.
    """
    owners, seen = [], set()
    for mod_name, m in module.named_modules():
        for name, p in m._parameters.items():
            key = f"{mod_name}.{name}" if mod_name else name
            if id(p) in seen:
                raise ValueError(f"flatten_parameters: parameter {key!r} appears twice in {type(module).__name__} "
                                 "(a shared module or tied weight); flat storage needs each array once")
            seen.add(id(p))
            owners.append((key, m, name, p, m._grads.get(name)))
    flat = FlatParameters([(key, p, g) for key, _, _, p, g in owners], root=module)
    views = flat.named_views()
    for key, m, name, _, _ in owners:
        p_view, g_view = views[key]
        dict.__setitem__(m._parameters, name, p_view)        # no version bump: the views are the parameters
        m._grads[name] = g_view
        object.__setattr__(m, "_flat_root", module)
    object.__setattr__(module, "flat_parameters", flat)
    structure_changed()             # another storage that held some of these arrays notices (``current``)
    flat.version = _version[0]
    return flat


def current(target):
    """``target``'s flat storage, re-flattened first when its module changed (module docstring);
    None when ``target`` has none."""
    flat = getattr(target, "flat_parameters", None)
    if flat is None or flat.intact():
        return flat
    return flatten_parameters(target)
