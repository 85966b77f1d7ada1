"""Stable Diffusion's denoiser: diffusers' ``UNet2DConditionModel`` with a hand-written backward.

* ``unet_2d_condition.UNet2DConditionModel``: the model (config keys, forward/backward, folders).
* ``unet_blocks``: down, mid and up blocks with the skip bookkeeping.
* ``transformer_2d``: ``Transformer2DModel`` and ``BasicTransformerBlock``.
* ``embeddings``: ``Timesteps`` and ``TimestepEmbedding``.
* ``npdiffusion.models.blocks``: ``ResnetBlock2D``, ``Downsample2D``, ``Upsample2D`` (shared with the VAE).

Architecture, shapes and the backward of each block: docs/unet.md.
"""
from npdiffusion.models.unet.unet_2d_condition import UNet2DConditionModel

__all__ = ["UNet2DConditionModel"]
