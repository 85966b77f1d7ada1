"""What a pipeline call returns: ``StableDiffusionPipelineOutput`` with ``.images``.

Shapes: B images, H x W pixels. ``images`` is a list of B PIL images (``output_type="pil"``), a float32
array (B, H, W, 3) in [0, 1] (``"np"``), or the final latents (B, 4, H/f, W/f) (``"latent"``), as
diffusers returns them. Docs: docs/pipeline.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from npdiffusion.outputs import BaseOutput


@dataclass
class StableDiffusionPipelineOutput(BaseOutput):
    """``images`` and ``nsfw_content_detected`` (always None: npdiffusion has no safety checker).

    Behaves like diffusers' ``BaseOutput``: ``out.images``, ``out["images"]``, ``out[0]`` (indexing
    runs over the fields that are not None) and ``to_tuple()``.
    """

    images: Any
    nsfw_content_detected: Any = None
