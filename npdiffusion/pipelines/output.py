"""What a pipeline call returns: ``StableDiffusionPipelineOutput`` with ``.images``.

Shapes: B images, H x W pixels. ``images`` is a list of B PIL images (``output_type="pil"``), a float32
array (B, H, W, 3) in [0, 1] (``"np"``), or the final latents (B, 4, H/f, W/f) (``"latent"``), as
diffusers returns them. Docs: docs/pipeline.md.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass
class StableDiffusionPipelineOutput:
    """``images`` and ``nsfw_content_detected`` (always None: npdiffusion has no safety checker).

    Behaves like diffusers' ``BaseOutput``: ``out.images``, ``out["images"]``, ``out[0]`` (indexing
    runs over the fields that are not None) and ``to_tuple()``.
    """

    images: Any
    nsfw_content_detected: Any = None

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in {f.name for f in fields(self)}:
                raise KeyError(f"StableDiffusionPipelineOutput has no field {key!r}; it has 'images' and "
                               "'nsfw_content_detected'")
            return getattr(self, key)
        return self.to_tuple()[key]

    def __len__(self) -> int:
        return len(self.to_tuple())
