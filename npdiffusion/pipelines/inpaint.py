"""``StableDiffusionInpaintPipeline``: repaint the masked part of an image under a prompt.

Shapes: P prompts, n = num_images_per_prompt, B = P n, Bi input images, Bm masks, f the VAE factor,
image (Bi, 3, H, W) in [-1, 1], mask (Bm, 1, H, W) of 0 / 1 (1 = repaint), latents (B, 4, h, w),
h x w = H/f x W/f; "2B" is the guidance batch.

diffusers' ``StableDiffusionInpaintPipeline.__call__`` (diffusers/pipelines/stable_diffusion/
pipeline_stable_diffusion_inpaint.py), operation for operation and draw for draw:

    1-2. prompts -> context (2B, T, D), as text to image (no guidance_rescale)
    3.   scheduler.set_timesteps(S); keep the last k = min(int(S strength), S) timesteps (img2img)
    4.   padding_mask_crop p: crop box = mask's box grown by p, widened to the output's aspect
         (PIL image and mask only), then resized "fill"; else plain resizing
         image -> (Bi, 3, H, W) in [-1, 1]; mask -> (Bm, 1, H, W) binarised at 0.5
    5.   z0 = vae.encode(image).sample() * scaling  (an ordinary U-Net, or strength < 1)   draw 1
         eps ~ N(0, I) (B, 4, h, w)                                                       draw 2
         x = eps * init_noise_sigma at strength 1, else scheduler.add_noise(z0, eps, t_0)
    6.   masked image = image * (mask < 0.5); z_m = vae.encode(it).sample() * scaling    draw 3
         (or ``masked_image_latents``); m = nearest(mask, h x w) (B, 1, h, w)
    7.   the loop (``masked_sampling.inpaint_denoise``): an inpainting U-Net (2L + 1 input channels,
         9 in SD) sees [x | m | z_m]; an ordinary one (L = 4 in SD) gets the known region (1 - m)
         back at each step's noise level
    8.   decode, postprocess; with padding_mask_crop the result is pasted into the original image

So with ``noise="torch"`` a seed gives diffusers' image. On an ordinary model ``jump_n_sample > 1``
adds RePaint's resampling (npdiffusion's option, not diffusers'). Docs: docs/inpainting.md.
"""
from __future__ import annotations

import numpy
from PIL import Image

from npdiffusion.backend import asarray, to_numpy, xp
from npdiffusion.checks import check_int, check_real
from npdiffusion.nn.module import no_cache
from npdiffusion.pipelines.image_utils import preprocess_image, resize_nearest
from npdiffusion.pipelines.img2img import get_timesteps
from npdiffusion.pipelines.mask_processing import MaskProcessor, apply_overlay, crop_and_resize, preprocess_mask
from npdiffusion.pipelines.masked_sampling import check_resampling, inpaint_denoise, repeat_rows
from npdiffusion.pipelines.noise import NoiseSource
from npdiffusion.pipelines.output import StableDiffusionPipelineOutput
from npdiffusion.pipelines.stable_diffusion import StableDiffusionPipeline, _init_noise_sigma


def encode_image(pipe, pixels, source: NoiseSource, dtype):
    """diffusers' ``_encode_vae_image``: vae.encode(pixels).sample() * scaling (Bi, 4, h, w); with one
    seed per image, image i is encoded alone and sampled with generator i (as diffusers)."""
    pixels = asarray(pixels).astype(dtype, copy=False)
    if source.per_image:
        parts = []
        for i in range(pixels.shape[0]):
            posterior = pipe.vae.encode(pixels[i:i + 1])
            parts.append(posterior.sample(noise=asarray(source.for_image(i).randn(posterior.shape, dtype))))
        latents = xp.concatenate(parts, axis=0)
    else:
        posterior = pipe.vae.encode(pixels)
        latents = posterior.sample(noise=asarray(source.randn(posterior.shape, dtype)))
    return pipe.vae.config["scaling_factor"] * latents


class StableDiffusionInpaintPipeline(StableDiffusionPipeline):
    """Inpainting with diffusers' arguments (module docstring): ``pipe(prompt, image=..., mask_image=...)``.

    Loads and saves folders as ``StableDiffusionPipeline`` does (``from_pretrained`` / ``save_pretrained``;
    model_index.json names StableDiffusionInpaintPipeline). The U-Net has L input channels (the VAE's
    latent channels, 4 in SD: any model, masked sampling) or 2L + 1 (9 in SD: an inpainting model). ``pipe.mask_processor`` has diffusers' ``blur``,
    ``get_crop_region``, ``preprocess`` and ``apply_overlay``.
    """

    pipeline_class_name = "StableDiffusionInpaintPipeline"

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, **kwargs):
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, **kwargs)
        channels = unet.config["in_channels"]
        latent = vae.config["latent_channels"]
        if channels not in (latent, 2 * latent + 1):
            raise ValueError(f"StableDiffusionInpaintPipeline: the U-Net must have {latent} input channels (an "
                             f"ordinary model) or {2 * latent + 1} (latents + mask + masked-image latents), got "
                             f"{channels}")
        self.mask_processor = MaskProcessor(self.vae_scale_factor)

    @property
    def inpainting_unet(self) -> bool:
        """Whether the U-Net takes the mask and the masked image's latents (2L + 1 input channels)."""
        return self.unet.config["in_channels"] != self.vae.config["latent_channels"]

    def __call__(self, prompt=None, image=None, mask_image=None, masked_image_latents=None, height=None, width=None,
                 padding_mask_crop: int | None = None, strength: float = 1.0, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, negative_prompt=None, num_images_per_prompt: int = 1,
                 eta: float = 0.0, seed=None, noise: str = "numpy", latents=None, prompt_embeds=None,
                 negative_prompt_embeds=None, output_type: str = "pil", return_dict: bool = True,
                 clip_skip: int | None = None, callback_on_step_end=None, jump_length: int = 10,
                 jump_n_sample: int = 1, progress: bool = True):
        """Repaint the white part of ``mask_image`` in ``image`` under ``prompt``; diffusers' semantics.

        Args:
            image: a PIL image, a list of them, or a float array (H, W, 3) / (B, H, W, 3) in [0, 1].
            mask_image: a PIL image (white = repaint; blur it first with ``pipe.mask_processor.blur`` for
                soft seams), a list of them, or a float array (H, W) / (B, H, W) / (B, H, W, 1); binarised at 0.5.
            masked_image_latents: latents (B, 4, h, w) of the masked image, instead of encoding it.
            height, width: output size (multiples of 8); default the U-Net's sample_size x f (not the
                image's size, as in diffusers).
            padding_mask_crop: inpaint only the mask's box grown by this many pixels (widened to the
                output's aspect), then paste the result into the original; needs PIL image and mask and
                output_type "pil".
            strength: 1 starts from pure noise; below 1 from the image noised to the strength's timestep.
            jump_length, jump_n_sample: RePaint's resampling on an ordinary U-Net (DDPM / DDIM):
                jump_n_sample - 1 extra passes over every jump_length steps; 1 = off (diffusers' loop).
            The rest as ``StableDiffusionPipeline.__call__`` (seed / noise: "torch" gives diffusers'
            image for ``generator=torch.Generator().manual_seed(seed)``).
        """
        if not height or not width:
            height, width = self.default_height_width()
        self.check_inputs(prompt, height, width, negative_prompt, prompt_embeds, negative_prompt_embeds)
        steps, guidance_scale, eta, n = self._check_call_options(num_inference_steps, guidance_scale, eta,
                                                                 num_images_per_prompt, output_type)
        strength = check_real("strength", strength)
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must lie in [0.0, 1.0], got {strength}")
        if int(steps * strength) < 1:
            raise ValueError(f"strength * num_inference_steps must be at least 1 so that a step runs, got "
                             f"{strength} * {steps} = {strength * steps:g}")
        if image is None or mask_image is None:
            raise ValueError("inpainting needs image and mask_image (PIL images or float arrays)")
        if padding_mask_crop is not None:
            check_int("padding_mask_crop", padding_mask_crop, minimum=0)
            if not isinstance(image, Image.Image) or not isinstance(mask_image, Image.Image):
                raise ValueError(f"padding_mask_crop needs image and mask_image as PIL images, got "
                                 f"{type(image).__name__} and {type(mask_image).__name__}")
            if output_type != "pil":
                raise ValueError(f"padding_mask_crop needs output_type 'pil', got {output_type!r}")
        jump_length, jump_n_sample = check_resampling(self.scheduler, self.inpainting_unet, jump_length, jump_n_sample)
        batch = self._num_prompts(prompt, prompt_embeds) * n
        self.check_memory(batch, height, width, guidance_scale > 1.0, batch)
        source = NoiseSource(noise, seed, batch)

        with no_cache():
            context = self.text_context(prompt, n, guidance_scale, negative_prompt, prompt_embeds,
                                        negative_prompt_embeds, clip_skip)                     # 1-2
            dtype = numpy.dtype(context.dtype)
            self.scheduler.set_timesteps(steps)
            timesteps, steps_left = get_timesteps(self.scheduler, steps, strength)              # 3
            crop, mode = None, "default"                                                        # 4
            if padding_mask_crop is not None:
                crop, mode = self.mask_processor.get_crop_region(mask_image, width, height, pad=padding_mask_crop), "fill"
            pixels = self._preprocess(image, height, width, crop, mode)                         # (Bi, 3, H, W)
            mask = preprocess_mask(mask_image, self.vae_scale_factor, height, width, crop, mode)  # (Bm, 1, H, W)
            latents, eps, z0 = self._initial_latents(pixels, latents, batch, height, width, dtype, source,
                                                     timesteps[:1], strength == 1.0,
                                                     not self.inpainting_unet)             # 5
            mask_small, masked = self._mask_latents(pixels, mask, masked_image_latents, batch, height, width,
                                                    dtype, source)                              # 6
            loop = dict(eta=eta, jump_length=jump_length, jump_n_sample=jump_n_sample,
                        callback_on_step_end=callback_on_step_end, progress=progress)
            if not self.inpainting_unet:
                loop.update(mask=mask_small, image_latents=z0, noise=eps)
            else:
                extra = xp.concatenate([mask_small, masked], axis=1)                           # (B, 5, h, w)
                loop.update(extra=xp.concatenate([extra, extra], axis=0) if guidance_scale > 1.0 else extra)
            latents = inpaint_denoise(self, latents, timesteps, context, guidance_scale, source, steps_left, **loop)
            images = self.decode_latents(latents, output_type)                                  # 8
        if padding_mask_crop is not None:
            images = [apply_overlay(mask_image, image, im, crop) for im in images]
        if not return_dict:
            return images, None
        return StableDiffusionPipelineOutput(images=images)

    # ------------------------------------------------------------------ steps 4-6
    def _preprocess(self, image, height, width, crop, mode):
        """Step 4 for the image: crop and resize ("fill" when cropping) then [-1, 1] (Bi, 3, H, W)."""
        if isinstance(image, Image.Image) and crop is not None:
            image = crop_and_resize([image], self.vae_scale_factor, height, width, crop, mode)[0]
        pixels = preprocess_image(image, self.vae_scale_factor, height, width)
        if pixels.shape[1] != 3:
            raise ValueError(f"image must be RGB pixels (B, H, W, 3) or PIL images, got shape {tuple(pixels.shape)}")
        return pixels

    def _initial_latents(self, pixels, latents, batch, height, width, dtype, source, t0, is_strength_max,
                         needs_image_latents):
        """Step 5 (diffusers' ``prepare_latents``): (x (B, 4, h, w), eps, z0 repeated to B or None)."""
        f = self.vae_scale_factor
        shape = (batch, self.vae.config["latent_channels"], height // f, width // f)
        z0 = None
        if needs_image_latents or (latents is None and not is_strength_max):
            z0 = repeat_rows(encode_image(self, pixels, source, dtype), batch, "images")
        if latents is None:
            eps = asarray(source.randn(shape, dtype))
            if is_strength_max:
                return eps * _init_noise_sigma(self.scheduler), eps, z0
            return self.scheduler.add_noise(z0, eps, numpy.repeat(numpy.asarray(t0).reshape(1), batch)), eps, z0
        if not hasattr(latents, "shape") or tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} (B, 4, height/{f}, width/{f}), got "
                             f"{getattr(latents, 'shape', type(latents).__name__)}")
        eps = asarray(latents).astype(dtype, copy=False)
        return eps * _init_noise_sigma(self.scheduler), eps, z0

    def _mask_latents(self, pixels, mask, masked_image_latents, batch, height, width, dtype, source):
        """Step 6 (diffusers' ``prepare_mask_latents``): (m (B, 1, h, w), z_m (B, 4, h, w) or None)."""
        f = self.vae_scale_factor
        if mask.shape[2:] != tuple(pixels.shape[2:]):
            raise ValueError(f"mask_image and image must have the same size after preprocessing, got "
                             f"{mask.shape[3]}x{mask.shape[2]} and {pixels.shape[3]}x{pixels.shape[2]}")
        small = asarray(resize_nearest(mask, height // f, width // f).astype(dtype))            # (Bm, 1, h, w)
        if masked_image_latents is not None:
            masked = asarray(masked_image_latents).astype(dtype, copy=False)
        elif not self.inpainting_unet:
            masked = None                      # not used by an ordinary U-Net, but diffusers encodes it: draw 3
            encode_image(self, _masked_pixels(pixels, mask), source, dtype)
        else:
            masked = encode_image(self, _masked_pixels(pixels, mask), source, dtype)
        small = repeat_rows(small, batch, "masks")
        return small, None if masked is None else repeat_rows(masked, batch, "masked images")

    def __repr__(self):
        return super().__repr__().replace("StableDiffusionPipeline(", "StableDiffusionInpaintPipeline(", 1)


def _masked_pixels(pixels, mask):
    """image * (mask < 0.5): the pixels to repaint set to 0 (mid grey); mask rows repeat as torch broadcasts."""
    return pixels * asarray((to_numpy(mask) < 0.5).astype(numpy.float32))


__all__ = ["StableDiffusionInpaintPipeline"]
