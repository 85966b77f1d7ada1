"""Pipelines: text to image and image to image with diffusers' semantics (docs/pipeline.md).

    from npdiffusion.pipelines import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained("path/to/stable-diffusion-v1-5")   # a diffusers folder
    image = pipe("a photo of an astronaut riding a horse", seed=42, noise="torch").images[0]
    edited = pipe.img2img(image, "a watercolor painting", strength=0.6, seed=1).images[0]
    inpainted = StableDiffusionInpaintPipeline(**pipe.components)("a red sofa", image=image, mask_image=mask).images[0]

Modules: ``stable_diffusion`` (the pipeline: text to image and image to image), ``img2img`` (the
steps of image to image), ``guided`` (text to image with gradient guidance), ``loading`` (pipeline
folders), ``noise`` (seeds: NumPy's or torch's stream), ``image_utils`` (PIL <-> arrays, grids),
``output`` (the returned object), ``nonfinite`` (NaN/inf latents or images stop a run: NonFiniteError);
``inpaint`` (inpainting, docs/inpainting.md) with ``masked_sampling`` (its loop, RePaint) and
``mask_processing`` (masks as diffusers' VaeImageProcessor handles them).
"""
from npdiffusion.pipelines.inpaint import StableDiffusionInpaintPipeline
from npdiffusion.pipelines.loading import SCHEDULERS, PipelineFolderError
from npdiffusion.pipelines.nonfinite import NonFiniteError
from npdiffusion.pipelines.output import StableDiffusionPipelineOutput
from npdiffusion.pipelines.stable_diffusion import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline, img2img

__all__ = ["StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
           "StableDiffusionPipelineOutput", "img2img",
           "PipelineFolderError", "NonFiniteError", "SCHEDULERS"]
