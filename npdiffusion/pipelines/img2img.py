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
"""
from __future__ import annotations

import numpy

from npdiffusion.backend import asarray, xp
from npdiffusion.checks import check_int, check_real
from npdiffusion.nn.module import no_cache
from npdiffusion.pipelines.image_utils import OUTPUT_TYPES, preprocess_image
from npdiffusion.pipelines.noise import NoiseSource
from npdiffusion.pipelines.output import StableDiffusionPipelineOutput
from npdiffusion.pipelines.stable_diffusion import StableDiffusionPipeline, _is_str_list


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


def img2img(pipe: StableDiffusionPipeline, image, prompt=None, strength: float = 0.8, negative_prompt=None,
            num_inference_steps: int = 50, guidance_scale: float = 7.5, num_images_per_prompt: int = 1,
            seed=None, noise: str = "numpy", output_type: str = "pil", eta: float = 0.0, prompt_embeds=None,
            negative_prompt_embeds=None, clip_skip: int | None = None, height: int | None = None,
            width: int | None = None, return_dict: bool = True, callback_on_step_end=None, progress: bool = True):
    """Image-to-image with ``pipe``'s models, as diffusers' ``StableDiffusionImg2ImgPipeline.__call__``.

    ``image``: a PIL image, a list of them, a float array (H, W, 3) / (B, H, W, 3) in [0, 1], or latents
    (B, 4, h, w). Its size is rounded down to multiples of the VAE factor (or resized to ``height`` x
    ``width`` when given). ``strength`` in [0, 1]: how far into the noise schedule the image is pushed;
    ``int(num_inference_steps * strength)`` steps are run (at least one is needed). The other
    arguments are those of ``StableDiffusionPipeline.__call__``. Returns a StableDiffusionPipelineOutput.
    """
    if not isinstance(pipe, StableDiffusionPipeline):
        raise TypeError(f"img2img: pipe must be a StableDiffusionPipeline, got {type(pipe).__name__}")
    strength = check_real("strength", strength)
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must lie in [0.0, 1.0], got {strength}")
    steps = check_int("num_inference_steps", num_inference_steps)
    guidance_scale = check_real("guidance_scale", guidance_scale)
    eta = check_real("eta", eta, minimum=0.0)
    n = check_int("num_images_per_prompt", num_images_per_prompt)
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if image is None:
        raise ValueError("img2img: image is required (a PIL image, a list of them or a float array)")
    if int(steps * strength) < 1:
        raise ValueError(f"strength * num_inference_steps must be at least 1 so that a step runs, got "
                         f"{strength} * {steps} = {strength * steps:g}")
    if prompt is not None and not (isinstance(prompt, str) or _is_str_list(prompt)):
        raise TypeError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
    f = pipe.vae_scale_factor
    pipe.check_prompt_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
    do_cfg = guidance_scale > 1.0
    batch = (1 if isinstance(prompt, str) else len(prompt)) if prompt is not None else prompt_embeds.shape[0]
    source = NoiseSource(noise, seed, batch * n)

    with no_cache():
        prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(
            prompt, n, do_cfg, negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip)
        context = xp.concatenate([negative_prompt_embeds, prompt_embeds], axis=0) if do_cfg else prompt_embeds
        pixels = preprocess_image(image, f, height, width)                       # (Bi, 3, H, W) in [-1, 1]
        pipe.scheduler.set_timesteps(steps)
        timesteps, steps_left = get_timesteps(pipe.scheduler, steps, strength)
        latents = prepare_image_latents(pipe, pixels, timesteps[:1], batch * n, numpy.dtype(context.dtype), source)
        latents = pipe.denoise(latents, timesteps, context, guidance_scale, 0.0, source, steps_left, eta=eta,
                               callback_on_step_end=callback_on_step_end, progress=progress)
        images = pipe.decode_latents(latents, output_type)
    if not return_dict:
        return images, None
    return StableDiffusionPipelineOutput(images=images)


class StableDiffusionImg2ImgPipeline(StableDiffusionPipeline):
    """The same models with ``__call__`` = image to image (diffusers' StableDiffusionImg2ImgPipeline):
    ``pipe(prompt, image=..., strength=0.8, ...)``. Build it from a text-to-image pipeline with
    ``StableDiffusionImg2ImgPipeline(**pipe.components)`` or load a folder with ``from_pretrained``."""

    def __call__(self, prompt=None, image=None, strength: float = 0.8, **kwargs):
        return img2img(self, image, prompt, strength=strength, **kwargs)
