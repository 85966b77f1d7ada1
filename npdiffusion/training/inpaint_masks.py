"""The inputs of an inpainting U-Net in training: random masks, the masked image's latents, the mask.

Shapes: B rows of the batch, S the image side, L latent channels, h = S / f the latent side.

The masks follow the Stable Diffusion inpainting recipe (runwayml/stable-diffusion-inpainting's
model card: "we generate synthetic masks and in 25% mask everything"), the synthetic masks drawn as
diffusers' research example ``dreambooth_inpaint/train_dreambooth_inpaint.py::random_mask`` draws
them: a rectangle or an ellipse (even odds) of width and height uniform in {0, ..., S}, centred
uniformly where it fits. 1 marks the pixels to repaint, as in ``StableDiffusionInpaintPipeline``.

Per step, for the U-Net's 2L + 1 input channels (the pipeline's layout)::

    m       (B, 1, S, S)   the random mask, 0 / 1
    x_m     = x * (m < 0.5)                         the masked image (repainted pixels at 0, mid grey)
    z_m     = vae.encode(x_m).sample() * scaling    (B, L, h, h)
    m_h     = nearest(m, h)                         (B, 1, h, h), torch's 'nearest' interpolation
    input   = [z_t | m_h | z_m]                     (B, 2L + 1, h, h)

Every draw comes from the batch's ``BatchDraws`` (one value per sample of the global batch), so a
resumed or data-parallel run draws the same masks. Docs: docs/inpainting.md ("Training").
"""
from __future__ import annotations

import numpy

#: the share of rows whose whole image is masked (the SD inpainting recipe)
FULL_MASK_SHARE = 0.25


def random_masks(draws, side: int) -> numpy.ndarray:
    """float32 (B, 1, side, side) of 0 / 1: a quarter whole, the rest a random rectangle or ellipse."""
    full = draws.random() < FULL_MASK_SHARE                                  # (B,)
    ellipse = draws.random() < 0.5
    w = numpy.minimum(numpy.floor(draws.random() * (side + 1)), side)        # size in {0..S}
    h = numpy.minimum(numpy.floor(draws.random() * (side + 1)), side)
    cx = w // 2 + numpy.floor(draws.random() * (side - 2 * (w // 2) + 1))    # centre where it fits
    cy = h // 2 + numpy.floor(draws.random() * (side - 2 * (h // 2) + 1))
    y, x = numpy.mgrid[0:side, 0:side].astype(numpy.float64)                 # (S, S)
    dx = x[None] - cx[:, None, None]                                         # (B, S, S)
    dy = y[None] - cy[:, None, None]
    hw, hh = (w // 2)[:, None, None], (h // 2)[:, None, None]
    in_rect = (numpy.abs(dx) <= hw) & (numpy.abs(dy) <= hh)
    in_ellipse = (dx / numpy.maximum(hw, 0.5)) ** 2 + (dy / numpy.maximum(hh, 0.5)) ** 2 <= 1.0
    inside = numpy.where(ellipse[:, None, None], in_ellipse, in_rect) | full[:, None, None]
    return inside[:, None].astype(numpy.float32)


def inpainting_channels(vae, images, draws, scaling_factor: float, dtype):
    """The extra input channels [m_h | z_m] (B, L + 1, h, h) for pixel ``images`` (B, 3, S, S) in [-1, 1]."""
    from npdiffusion.backend import asarray, xp  # noqa: PLC0415
    from npdiffusion.nn.module import no_cache  # noqa: PLC0415
    from npdiffusion.pipelines.image_utils import resize_nearest  # noqa: PLC0415

    mask = random_masks(draws, images.shape[-1])                             # (B, 1, S, S)
    masked = asarray((images * (mask < 0.5)).astype(dtype, copy=False))
    with no_cache():
        posterior = vae.encode(masked)
    eps = draws.standard_normal(tuple(posterior.shape[1:])).astype(dtype)
    z_masked = posterior.sample(noise=asarray(eps)) * dtype.type(scaling_factor)          # (B, L, h, h)
    side = z_masked.shape[-1]
    mask_small = asarray(resize_nearest(mask, side, side).astype(dtype))                 # (B, 1, h, h)
    return xp.concatenate([mask_small, z_masked.astype(dtype, copy=False)], axis=1)
