"""``BaseOutput``: the behaviour of diffusers' output objects, for the dataclasses that schedulers and
pipelines return (``SchedulerOutput``, ``StableDiffusionPipelineOutput``).

A field reads as an attribute (``out.images``) or by name (``out["images"]``); an int or slice indexes
the fields that are not None (``out[0]``), as ``to_tuple()`` lists them.
"""
from __future__ import annotations

from dataclasses import fields


class BaseOutput:
    """Mix into a ``@dataclass``: ``out.name``, ``out["name"]``, ``out[i]`` and ``to_tuple()`` over the fields
    that are not None, ``len(out)``."""

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, key):
        if isinstance(key, str):
            names = [f.name for f in fields(self)]
            if key not in names:
                raise KeyError(f"{type(self).__name__} has no field {key!r}; it has "
                               f"{' and '.join(repr(n) for n in names)}")
            return getattr(self, key)
        return self.to_tuple()[key]

    def __len__(self) -> int:
        return len(self.to_tuple())
