"""Text to image with gradient guidance: the pipeline's steps, with classifier or CLIP guidance terms
added to the guided prediction at every step (docs/guidance.md).

Shapes: P prompts, n images per prompt, B = P n; latents (B, 4, h, w); context (2B, T, D) with
classifier-free guidance, else (B, T, D); ``text_ids`` (B, T_clip) for the CLIP tower.

    1-2. prompts -> context, exactly as ``StableDiffusionPipeline.text_context``
    4.   x ~ N(0, I) (B, 4, h, w) from the seed's ``NoiseSource``, as the plain pipeline draws it
    5.   for each t: eps = guided_prediction(unet([x | x], t, context)) (classifier-free guidance, then
         rescale), then every term (scale s, grad_fn): eps <- eps - s sqrt(1 - abar_t) grad
         (``guidance.classifier_guidance.guided_sample``); x = scheduler.step(eps, t, x)
    6-7. decode and postprocess as the pipeline

A term is ``(scale, grad_fn)`` with ``grad_fn(x_t, t, model_output)`` -> grad_x log p(... | x_t):
``classifier_term`` (a noise-aware classifier's log p(y | x_t, t)) and ``clip_term`` (the CLIP
similarity of the prompt and the decoded x0 prediction) build them from loaded models.
"""
from __future__ import annotations

import numpy

from npdiffusion.backend import asarray, to_numpy, xp
from npdiffusion.diffusion.guidance import guided_prediction
from npdiffusion.pipelines.noise import NoiseSource


def classifier_term(classifier, targets, scale: float):
    """``(scale, grad_fn)``: guidance towards the classes ``targets`` (B,) of a ``NoiseAwareClassifier``
    on the pipeline's latents."""
    from npdiffusion.guidance.classifier_guidance import classifier_gradient_fn  # noqa: PLC0415

    return scale, classifier_gradient_fn(classifier.eval(), numpy.asarray(targets))


def clip_term(pipe, clip, text_ids, scale: float, image_input):
    """``(scale, grad_fn)``: guidance along the gradient of the CLIP similarity of the prompts (token ids
    ``text_ids`` (B, T_clip) for ``clip``'s text tower) and the decoded x0 prediction, fed to the vision
    tower through ``image_input`` (a ``CLIPImageInput``)."""
    from npdiffusion.guidance.clip_guidance import clip_gradient_fn, clip_text_embeds  # noqa: PLC0415

    text_embeds = clip_text_embeds(clip, asarray(text_ids))
    prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
    return scale, clip_gradient_fn(clip, text_embeds, to_numpy(pipe.scheduler.alphas_cumprod), vae=pipe.vae,
                                   image_input=image_input, prediction_type=prediction_type)


def guided_text_to_image(pipe, prompts, terms, num_images_per_prompt: int = 1, num_inference_steps: int = 50,
                         guidance_scale: float = 7.5, guidance_rescale: float = 0.0, negative_prompt=None,
                         height: int | None = None, width: int | None = None, seed=None, noise: str = "numpy",
                         output_type: str = "pil"):
    """``pipe``'s text to image with the gradient guidance ``terms`` (module docstring); the same initial
    noise and step noise as ``pipe(...)`` for a seed. Returns the images (``output_type`` as the pipeline's)."""
    from npdiffusion.guidance.classifier_guidance import guided_sample  # noqa: PLC0415

    if not height or not width:
        height, width = pipe.default_height_width()
    prompts = list(prompts)
    n = num_images_per_prompt
    context = pipe.text_context(prompts, n, guidance_scale, negative_prompt)
    do_cfg = guidance_scale > 1.0
    b = len(prompts) * n
    shape = (b, pipe.unet.config["in_channels"], height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    source = NoiseSource(noise, seed, b)
    latents = source.randn(shape, numpy.dtype(context.dtype))

    def model_fn(x, t):                                   # as the pipeline's loop: CFG, then rescale
        x_in = xp.concatenate([x, x], axis=0) if do_cfg else x
        eps = pipe.unet(x_in, pipe._unet_timestep(t), context)
        return guided_prediction(eps, guidance_scale, guidance_rescale) if do_cfg else eps

    x = guided_sample(model_fn, pipe.scheduler, shape, num_inference_steps, source.scheduler_rng(), guidance=terms,
                      dtype=numpy.dtype(context.dtype), latents=to_numpy(latents))
    return pipe.decode_latents(x, output_type)
