"""Image to image (SDEdit): encode an image, noise it to the strength's timestep, denoise it under a prompt.

Shapes: P prompts, n = num_images_per_prompt, B = P n, Bi input images, f the VAE factor, image
(Bi, 3, H, W) in [-1, 1], latents (B, 4, H/f, W/f), context (2B, T, D) with guidance.

    1-2. prompts -> context, exactly as text to image (no guidance_rescale, as in diffusers)
    3.   image -> preprocess (resize to multiples of f, [0, 1] -> [-1, 1]) (Bi, 3, H, W)
    4.   scheduler.set_timesteps(S); keep the last k = min(int(S strength), S) timesteps:
         t_start = S - k; timesteps = timesteps[t_start * order:]
    5.   z0 = vae.encode(image).latent_dist.sample() * scaling_factor (Bi, 4, h, w), repeated to B;
         x = scheduler.add_noise(z0, eps, timesteps[0]), eps ~ N(0, I) (B, 4, h, w)
    6.   the denoising loop over the k remaining timesteps, then decode and postprocess

strength 1 starts from (almost) pure noise and keeps nothing of the image but what survives at the
first timestep; strength near 0 changes little. The posterior sample and eps are drawn from the
seed's generator in that order, as diffusers' StableDiffusionImg2ImgPipeline does
(diffusers/pipelines/stable_diffusion/pipeline_stable_diffusion_img2img.py), so with
``noise="torch"`` a seed gives diffusers' image. Docs: docs/pipeline.md ("Image to image").

The steps of their own (4 and 5) are here; ``StableDiffusionPipeline.img2img`` runs them in order with
the steps text to image shares (this module does not import the pipeline, so the two do not import
each other).
"""
from __future__ import annotations

import numpy

from npdiffusion.backend import asarray, xp
from npdiffusion.pipelines.noise import NoiseSource


def get_timesteps(scheduler, num_inference_steps: int, strength: float):
    """(timesteps to run, how many steps that is): the last min(int(S strength), S) of the S steps."""
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    t_start = max(num_inference_steps - init_timestep, 0)
    order = getattr(scheduler, "order", 1)
    timesteps = scheduler.timesteps[t_start * order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * order)
    return timesteps, num_inference_steps - t_start


def prepare_image_latents(pipe, image, timestep, batch: int, dtype, source: NoiseSource):
    """Step 5: image (Bi, 3, H, W) in [-1, 1] (or latents (Bi, 4, h, w)) -> noised latents (B, 4, h, w)."""
    image = asarray(image).astype(dtype, copy=False)
    if image.shape[1] == pipe.unet.config["in_channels"] and image.shape[1] != pipe.vae.in_channels:
        init = image                                                      # already latents, as diffusers
    else:
        if source.per_image:
            if image.shape[0] < batch and batch % image.shape[0] == 0:
                image = xp.concatenate([image] * (batch // image.shape[0]), axis=0)
            elif image.shape[0] != batch:
                raise ValueError(f"cannot repeat {image.shape[0]} images to {batch} (one seed per image)")
            parts = []
            for i in range(batch):                                        # one encode per generator, as diffusers
                posterior = pipe.vae.encode(image[i:i + 1])
                draw = source.for_image(i).randn(posterior.shape, dtype)
                parts.append(posterior.sample(noise=asarray(draw)))
            init = xp.concatenate(parts, axis=0)
        else:
            posterior = pipe.vae.encode(image)
            init = posterior.sample(noise=asarray(source.randn(posterior.shape, dtype)))
        init = pipe.vae.config["scaling_factor"] * init
    if batch > init.shape[0] and batch % init.shape[0] == 0:
        init = xp.concatenate([init] * (batch // init.shape[0]), axis=0)  # [a, b, a, b]: torch.cat order
    elif batch > init.shape[0]:
        raise ValueError(f"cannot repeat {init.shape[0]} images to {batch} images (prompts x num_images_per_prompt); "
                         "give one image, or a number of images that divides it")
    elif batch < init.shape[0]:
        raise ValueError(f"got {init.shape[0]} images for {batch} images to make (prompts x num_images_per_prompt)")
    eps = asarray(source.randn(tuple(init.shape), dtype))
    timesteps = numpy.repeat(numpy.asarray(timestep).reshape(1), batch)
    return pipe.scheduler.add_noise(init, eps, timesteps)
