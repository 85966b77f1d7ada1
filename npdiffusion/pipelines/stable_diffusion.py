"""``StableDiffusionPipeline``: text to image with a CLIP text encoder, a U-Net, a scheduler and a VAE.

Shapes: P prompts, n = num_images_per_prompt, B = P n images, T = 77 tokens, D = the text width
(768 in SD 1.x), f = the VAE's downsampling factor (8 in SD), h x w = H/f x W/f latents, 4 latent
channels; "2B" is the guidance batch [unconditional | conditional].

    1. tokenize     prompts -> ids (P, T) (padded with the end token, cut to T)
    2. encode       ids -> CLIPTextModel -> last hidden state (P, T, D), repeated n times -> (B, T, D);
                    with guidance the negative prompt ("" by default) the same way; context (2B, T, D)
                    = [negative | positive]
    3. timesteps    scheduler.set_timesteps(S) -> t_0 > t_1 > ... (S of them; PNDM S + 1, Heun 2S - 1)
    4. latents      x ~ N(0, I) (B, 4, h, w) times scheduler.init_noise_sigma
    5. denoise      for each t: x_in = scale_model_input([x | x], t) (2B, 4, h, w);
                    eps = unet(x_in, t, context) (2B, 4, h, w); eps = eps_u + w (eps_c - eps_u)
                    (optionally rescaled, guidance_rescale); x = scheduler.step(eps, t, x)
    6. decode       image = vae.decode(x / scaling_factor) (B, 3, H, W)
    7. postprocess  clip(image / 2 + 0.5, 0, 1) -> (B, H, W, 3) float32 or PIL images

This is diffusers' ``StableDiffusionPipeline.__call__`` (diffusers/pipelines/stable_diffusion/
pipeline_stable_diffusion.py) operation for operation, so from the same initial latents the images
agree with diffusers' to float32 rounding. Everything runs with no caches kept (eval mode and
``no_cache``), so memory stays flat over any number of steps. Walk-through: docs/pipeline.md.
"""
from __future__ import annotations

import inspect
import logging
import numbers
import os

import numpy

from npdiffusion.backend import asarray, is_array, to_numpy, xp
from npdiffusion.checks import check_int, check_real
from npdiffusion.diffusion.guidance import guided_prediction
from npdiffusion.io.atomic_folder import atomic_folder
from npdiffusion.io.pretrained import read_config
from npdiffusion.memory import check_memory, sampling_bytes
from npdiffusion.models.clip.text_model import CLIPTextModel
from npdiffusion.models.clip.tokenizer import CLIPTokenizer
from npdiffusion.models.unet.unet_2d_condition import UNet2DConditionModel
from npdiffusion.models.vae.autoencoder_kl import AutoencoderKL
from npdiffusion.nn.attention import Attention
from npdiffusion.nn.module import canonical_dtype, no_cache
from npdiffusion.pipelines.image_utils import OUTPUT_TYPES, postprocess_image, preprocess_image
from npdiffusion.pipelines.img2img import get_timesteps, prepare_image_latents
from npdiffusion.pipelines.loading import (
    PipelineFolderError,
    load_tokenizer,
    read_model_index,
    scheduler_class,
    write_model_index,
)
from npdiffusion.pipelines.noise import NoiseSource
from npdiffusion.pipelines.nonfinite import NonFiniteError, check_image, check_step
from npdiffusion.pipelines.output import StableDiffusionPipelineOutput

logger = logging.getLogger(__name__)

#: the height and width of every image must be a multiple of this (diffusers checks 8)
SIZE_MULTIPLE = 8


def _is_str_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _version_tuple(text) -> tuple:
    parts = []
    for piece in str(text).split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece else ""
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


class StableDiffusionPipeline:
    """Text-to-image with diffusers' semantics (module docstring; docs/pipeline.md).

    ``StableDiffusionPipeline(vae, text_encoder, tokenizer, unet, scheduler)`` from npdiffusion models
    (``AutoencoderKL``, ``CLIPTextModel``, ``CLIPTokenizer``, ``UNet2DConditionModel``, any npdiffusion
    scheduler); ``from_pretrained(folder)`` reads a diffusers folder, ``save_pretrained(folder)`` writes
    one that diffusers loads. Schedulers swap as in diffusers:
    ``pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)``.

    As diffusers does at construction, a scheduler config with ``steps_offset`` other than 1 is set
    to 1 and ``clip_sample=True`` to False (old SD configs; diffusers warns and fixes them).
    ``safety_checker`` / ``feature_extractor`` must be None: npdiffusion has no safety checker.
    """

    #: the ``_class_name`` save_pretrained writes into model_index.json
    pipeline_class_name = "StableDiffusionPipeline"

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None,
                 feature_extractor=None, image_encoder=None, requires_safety_checker: bool = False):
        for name, value, cls in (("vae", vae, AutoencoderKL), ("text_encoder", text_encoder, CLIPTextModel),
                                 ("tokenizer", tokenizer, CLIPTokenizer), ("unet", unet, UNet2DConditionModel)):
            if not isinstance(value, cls):
                raise TypeError(f"StableDiffusionPipeline: {name} must be an npdiffusion {cls.__name__}, "
                                f"got {type(value).__name__}")
        for name, value in (("safety_checker", safety_checker), ("feature_extractor", feature_extractor),
                            ("image_encoder", image_encoder)):
            if value is not None:
                raise ValueError(f"StableDiffusionPipeline: {name} must be None (npdiffusion has no {name}), "
                                 f"got {type(value).__name__}")
        self.vae = vae.eval()
        self.text_encoder = text_encoder.eval()
        self.tokenizer = tokenizer
        self.unet = unet.eval()
        self.scheduler = scheduler
        self.requires_safety_checker = bool(requires_safety_checker)
        self.vae_scale_factor = 2 ** (len(vae.config["block_out_channels"]) - 1)
        self.default_sample_size = unet.config["sample_size"]
        self._progress_config = {}
        self._fix_scheduler_config()

    # ------------------------------------------------------------------ components
    @property
    def scheduler(self):
        return self._scheduler

    @scheduler.setter
    def scheduler(self, value):
        for attr in ("set_timesteps", "step", "scale_model_input", "config"):
            if not hasattr(value, attr):
                raise TypeError(f"StableDiffusionPipeline: scheduler must be an npdiffusion scheduler (with "
                                f"set_timesteps, step, scale_model_input, config), got {type(value).__name__}")
        self._scheduler = value

    @property
    def components(self) -> dict:
        """The five components by their diffusers names."""
        return {"vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer,
                "unet": self.unet, "scheduler": self.scheduler}

    @property
    def dtype(self):
        return self.unet.dtype

    def _fix_scheduler_config(self):
        """diffusers' StableDiffusionPipeline.__init__: steps_offset -> 1, clip_sample True -> False."""
        cfg = self.scheduler.config
        if "steps_offset" in cfg and cfg["steps_offset"] != 1:
            logger.info("scheduler config has steps_offset=%s; set to 1 as diffusers does", cfg["steps_offset"])
            self.scheduler._update_config(steps_offset=1)
        if cfg.get("clip_sample", False) is True:
            logger.info("scheduler config has clip_sample=True; set to False as diffusers does")
            self.scheduler._update_config(clip_sample=False)

    def set_progress_bar_config(self, **kwargs) -> None:
        """Options for the tqdm bar over the steps, e.g. ``disable=True`` (as diffusers)."""
        self._progress_config = dict(kwargs)

    def _progress_bar(self, total: int):
        from tqdm.auto import tqdm  # noqa: PLC0415 - only when generating

        options = {"desc": "denoising", "unit": "step", "dynamic_ncols": True, **self._progress_config}
        return tqdm(total=total, **options)

    # ------------------------------------------------------------------ folders
    @classmethod
    def from_pretrained(cls, folder, dtype=None) -> "StableDiffusionPipeline":
        """Load a diffusers pipeline folder (model_index.json; unet/, vae/, text_encoder/, tokenizer/,
        scheduler/; safetensors weights only). ``dtype``: the models' parameter dtype (default float32).

        Components set to null (safety_checker, feature_extractor...) are ignored; the scheduler class
        named in model_index.json must be one of npdiffusion's. Any problem raises an error naming the
        folder and the component (PipelineFolderError, a ValueError; FileNotFoundError; the
        safetensors reader's error for a corrupt file).
        """
        folder = os.fspath(folder)
        index = read_model_index(folder)
        dt = canonical_dtype("float32" if dtype is None else dtype)

        def load(name, loader):
            path = os.path.join(folder, name)
            try:
                return loader(path)
            except FileNotFoundError as exc:
                raise FileNotFoundError(f"cannot load {name} from {path!r}: {exc}") from None
            except Exception as exc:  # noqa: BLE001 - a malformed user folder: one message naming it
                raise PipelineFolderError(f"cannot load {name} from {path!r}: {type(exc).__name__}: {exc}") from exc

        unet = load("unet", lambda p: UNet2DConditionModel.from_pretrained(p, dtype=dt))
        vae = load("vae", lambda p: AutoencoderKL.from_pretrained(p, dtype=dt))
        text_encoder = load("text_encoder", lambda p: CLIPTextModel.from_pretrained(p, dtype=dt))
        tokenizer = load("tokenizer", load_tokenizer)
        sched_cls = scheduler_class(index["scheduler"][1])
        scheduler = load("scheduler", lambda p: sched_cls.from_pretrained(p))
        pipe = cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        # diffusers: a U-Net saved before diffusers 0.9 with sample_size < 64 is an SD 1.x model whose
        # config was wrong; it generates at sample_size 64.
        raw = read_config(os.path.join(folder, "unet"))
        if _version_tuple(raw.get("_diffusers_version", "1.0.0")) < (0, 9, 0) \
                and isinstance(pipe.default_sample_size, int) and pipe.default_sample_size < 64:
            pipe.default_sample_size = 64
        return pipe

    def save_pretrained(self, folder) -> str:
        """Write a diffusers pipeline folder (safetensors weights, model_index.json last) that
        ``diffusers.StableDiffusionPipeline.from_pretrained`` loads. The whole folder is built beside
        ``folder`` and swapped in atomically (``io.atomic_folder``): a kill at any moment leaves the
        complete old folder or the complete new one. Returns the folder."""
        folder = os.fspath(folder)
        if os.path.isfile(folder):
            raise ValueError(f"save_pretrained: {folder!r} is a file, expected a folder")
        with atomic_folder(folder) as tmp:
            self.unet.save_pretrained(os.path.join(tmp, "unet"))
            self.vae.save_pretrained(os.path.join(tmp, "vae"))
            self.text_encoder.save_pretrained(os.path.join(tmp, "text_encoder"))
            self.tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
            self.scheduler.save_pretrained(os.path.join(tmp, "scheduler"))
            write_model_index(tmp, type(self.scheduler).__name__, self.pipeline_class_name)
        return folder

    @classmethod
    def from_single_file(cls, path, config=None, original_config=None, prediction_type=None, tokenizer=None,
                         scheduler=None, extract_ema: bool = False, dtype=None) -> "StableDiffusionPipeline":
        """Load an original single-file checkpoint (one .safetensors in the CompVis layout, SD 1.x or 2.x).

        ``config``: a diffusers folder giving the model configs, tokenizer and scheduler; else
        ``original_config`` (a YAML path or dict; default: ``<name>.yaml`` beside the file when there is one)
        or the tensor shapes give the configs, and ``tokenizer`` (a CLIPTokenizer or its folder) is needed.
        ``prediction_type`` overrides the scheduler's (default as diffusers: v_prediction for SD 2.x, else
        epsilon, unless the YAML says). ``extract_ema`` loads the U-Net's ``model_ema.*`` copy.
        Docs: docs/checkpoints.md ("Original single-file checkpoints")."""
        from npdiffusion.pipelines.single_file import load_pipeline  # noqa: PLC0415 - single files only

        return load_pipeline(cls, path, config, original_config, prediction_type, tokenizer, scheduler,
                             extract_ema, dtype)

    def save_single_file(self, path, text_encoder_format: str | None = None, ema_unet=None) -> str:
        """Write the pipeline as one original-layout .safetensors file (tensor by tensor, atomically) and
        ``<name>.yaml`` beside it. ``text_encoder_format``: "clip" (SD 1.x) or "open_clip" (SD 2.x; the
        default for a GELU text encoder). ``ema_unet``: EMA U-Net weights (a U-Net or state dict), written
        as ``model_ema.*``. Returns the path."""
        from npdiffusion.pipelines.single_file import save_pipeline  # noqa: PLC0415

        return save_pipeline(self, path, text_encoder_format, ema_unet)

    # ------------------------------------------------------------------ prompt encoding
    def _tokenize(self, texts, max_length):
        """ids (P, T) padded and cut to ``max_length``; warns (as diffusers) about text that was cut off."""
        ids = self.tokenizer(texts, max_length=max_length, padding="max_length", truncation=True)   # (P, T)
        for text in texts:
            content = self.tokenizer.tokenize_ids(text)
            if len(content) + 2 > max_length:
                removed = self.tokenizer.decode(content[max_length - 2:])
                logger.warning("The following part of your input was truncated because CLIP can only handle "
                               "sequences up to %d tokens: %s", max_length, removed)
        return ids

    def encode_prompt(self, prompt, num_images_per_prompt: int = 1, do_classifier_free_guidance: bool = True,
                      negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None, clip_skip=None):
        """(prompt_embeds (B, T, D), negative_prompt_embeds (B, T, D) or None), as diffusers' ``encode_prompt``.

        Each prompt's embedding is repeated ``num_images_per_prompt`` times in a row. With guidance the
        negative prompt defaults to "" for every prompt; a str negative prompt needs a str prompt and a
        list needs a list of the same length (diffusers' rules). ``clip_skip`` applies to the prompt
        only, not to the negative prompt, as in diffusers.
        """
        n = check_int("num_images_per_prompt", num_images_per_prompt)
        if prompt is not None and isinstance(prompt, str):
            batch = 1
        elif prompt is not None and isinstance(prompt, list):
            batch = len(prompt)
        else:
            batch = prompt_embeds.shape[0]
        dt = self.text_encoder.dtype
        if prompt_embeds is None:
            texts = [prompt] if isinstance(prompt, str) else list(prompt)
            ids = self._tokenize(texts, self.tokenizer.model_max_length)
            prompt_embeds = self.text_encoder(ids, clip_skip=clip_skip)[0]   # (P, T, D); host ids: no device sync
        prompt_embeds = asarray(prompt_embeds).astype(dt, copy=False)
        prompt_embeds = xp.repeat(prompt_embeds, n, axis=0)                                  # (B, T, D)

        if do_classifier_free_guidance and negative_prompt_embeds is None:
            if negative_prompt is None:
                uncond = [""] * batch
            elif prompt is not None and type(prompt) is not type(negative_prompt):
                raise TypeError(f"negative_prompt should be the same type as prompt, but got "
                                f"{type(negative_prompt).__name__} != {type(prompt).__name__}")
            elif isinstance(negative_prompt, str):
                uncond = [negative_prompt]
            elif batch != len(negative_prompt):
                raise ValueError(f"negative_prompt has batch size {len(negative_prompt)}, but prompt has batch "
                                 f"size {batch}; give one negative prompt per prompt")
            else:
                uncond = list(negative_prompt)
            ids = self._tokenize(uncond, prompt_embeds.shape[1])
            negative_prompt_embeds = self.text_encoder(ids)[0]
        if do_classifier_free_guidance:
            negative_prompt_embeds = asarray(negative_prompt_embeds).astype(dt, copy=False)
            negative_prompt_embeds = xp.repeat(negative_prompt_embeds, n, axis=0)
        return prompt_embeds, negative_prompt_embeds

    # ------------------------------------------------------------------ checks
    def default_height_width(self) -> tuple[int, int]:
        """(height, width) in pixels when none is given: the U-Net's sample_size times the VAE factor."""
        size = self.default_sample_size
        h, w = (size, size) if isinstance(size, int) else (size[0], size[1])
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    def check_inputs(self, prompt, height, width, negative_prompt=None, prompt_embeds=None,
                     negative_prompt_embeds=None):
        """diffusers' ``check_inputs``: sizes multiples of 8 (and of the VAE factor), prompt xor embeddings."""
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        multiple = int(numpy.lcm(SIZE_MULTIPLE, self.vae_scale_factor))
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple} (the VAE downsamples by "
                             f"{self.vae_scale_factor}; diffusers requires multiples of 8), got {height} x {width}")
        self.check_prompt_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)

    def check_prompt_inputs(self, prompt, negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None):
        """The prompt half of ``check_inputs``: prompt xor prompt_embeds, types, matching shapes."""
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass prompt or prompt_embeds, not both")
        if prompt is None and prompt_embeds is None:
            raise ValueError("pass a prompt (a str or a list of str) or prompt_embeds")
        if prompt is not None and not (isinstance(prompt, str) or _is_str_list(prompt)):
            raise TypeError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt must hold at least one prompt, got an empty list")
        if negative_prompt is not None and not (isinstance(negative_prompt, str) or _is_str_list(negative_prompt)):
            raise TypeError(f"negative_prompt must be a str, a list of str or None, got {type(negative_prompt).__name__}")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass negative_prompt or negative_prompt_embeds, not both")
        for name, emb in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if emb is not None and (not is_array(emb) or emb.ndim != 3):
                raise ValueError(f"{name} must be an array (B, T, D), got {getattr(emb, 'shape', type(emb).__name__)}")
        if prompt_embeds is not None and negative_prompt_embeds is not None \
                and tuple(prompt_embeds.shape) != tuple(negative_prompt_embeds.shape):
            raise ValueError(f"prompt_embeds and negative_prompt_embeds must have the same shape, got "
                             f"{tuple(prompt_embeds.shape)} and {tuple(negative_prompt_embeds.shape)}")

    def check_memory(self, batch: int, height: int, width: int, guidance: bool, encode_batch: int = 0) -> None:
        """Refuse (MemoryLimitError, a ValueError) generating ``batch`` images of height x width when the
        estimate of ``npdiffusion.memory.sampling_bytes`` is over the memory limit (docs/pipeline.md)."""
        def chunk(model):                                   # the attention chunk size set on every attention
            sizes = [m.chunk_size for m in model.modules() if isinstance(m, Attention)]
            return None if not sizes or None in sizes else max(sizes)

        need = sampling_bytes(self.unet.config, self.vae.config, batch, height, width, guidance, encode_batch,
                              chunk(self.unet), chunk(self.vae))
        check_memory(f"generating {batch} image(s) of {width}x{height}", need,
                     "lower height and width or num_images_per_prompt (or set attention chunk sizes)")

    # ------------------------------------------------------------------ what both calls share
    @staticmethod
    def _check_call_options(num_inference_steps, guidance_scale, eta, num_images_per_prompt, output_type):
        """(S, w, eta, n) checked: S and n ints >= 1, w a finite number, eta >= 0, a known output_type."""
        steps = check_int("num_inference_steps", num_inference_steps)
        guidance_scale = check_real("guidance_scale", guidance_scale)
        eta = check_real("eta", eta, minimum=0.0)
        n = check_int("num_images_per_prompt", num_images_per_prompt)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        return steps, guidance_scale, eta, n

    @staticmethod
    def _num_prompts(prompt, prompt_embeds) -> int:
        """P: the number of prompts (or of prompt embeddings) given."""
        if prompt is None:
            return prompt_embeds.shape[0]
        return 1 if isinstance(prompt, str) else len(prompt)

    def text_context(self, prompt, num_images_per_prompt: int, guidance_scale: float, negative_prompt=None,
                     prompt_embeds=None, negative_prompt_embeds=None, clip_skip=None):
        """Steps 1-2: the U-Net's context, [negative | positive] (2B, T, D) with guidance (w > 1), else (B, T, D)."""
        do_cfg = guidance_scale > 1.0
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, num_images_per_prompt, do_cfg, negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip)
        return xp.concatenate([negative_prompt_embeds, prompt_embeds], axis=0) if do_cfg else prompt_embeds

    # ------------------------------------------------------------------ denoising (steps 5)
    def _unet_timestep(self, t):
        """A scheduler timestep (a NumPy scalar) as the (1,) array the U-Net takes, keeping int / float."""
        return numpy.asarray(t).reshape(1)

    def step_kwargs(self, noise: NoiseSource | None, eta: float) -> dict:
        """diffusers' ``prepare_extra_step_kwargs``: ``eta`` and the noise stream, where scheduler.step takes them."""
        accepted = inspect.signature(self.scheduler.step).parameters
        kwargs = {}
        if "eta" in accepted:
            kwargs["eta"] = eta
        if noise is not None and "rng" in accepted:
            kwargs["rng"] = noise.scheduler_rng()
        return kwargs

    def predict_noise(self, latents, t, prompt_embeds, guidance_scale: float, guidance_rescale: float = 0.0,
                      extra_channels=None):
        """One U-Net prediction at ``t``: (guided eps (B, 4, h, w), raw output (2B or B, 4, h, w)).

        ``extra_channels`` (2B or B, E, h, w), if given, are appended to the scaled model input along the
        channels (the inpainting U-Net's mask and masked-image latents)."""
        do_cfg = guidance_scale > 1.0
        x_in = xp.concatenate([latents, latents], axis=0) if do_cfg else latents        # (2B, 4, h, w)
        x_in = self.scheduler.scale_model_input(x_in, t)
        if extra_channels is not None:
            x_in = xp.concatenate([x_in, extra_channels], axis=1)                       # (2B, 4 + E, h, w)
        eps = raw = self.unet(x_in, self._unet_timestep(t), prompt_embeds)             # (2B, 4, h, w)
        if do_cfg:
            eps = guided_prediction(raw, guidance_scale, guidance_rescale)             # (B, 4, h, w)
        return eps, raw

    @numpy.errstate(over="ignore", invalid="ignore", divide="ignore")     # check_step reports NaN/inf instead
    def denoise(self, latents, timesteps, prompt_embeds, guidance_scale: float, guidance_rescale: float,
                noise: NoiseSource | None, num_inference_steps: int, eta: float = 0.0,
                callback_on_step_end=None, progress: bool = True):
        """The loop of step 5: latents (B, 4, h, w), context (2B, T, D) with guidance else (B, T, D) -> latents."""
        scheduler = self.scheduler
        step_kwargs = self.step_kwargs(noise, eta)
        order = getattr(scheduler, "order", 1)
        num_warmup = len(timesteps) - num_inference_steps * order
        bar = self._progress_bar(num_inference_steps) if progress else None
        try:
            for i, t in enumerate(timesteps):
                eps, raw = self.predict_noise(latents, t, prompt_embeds, guidance_scale, guidance_rescale)
                before, latents = latents, scheduler.step(eps, t, latents, return_dict=False, **step_kwargs)[0]
                check_step(latents, i, len(timesteps), t, before, raw, eps, guidance_scale)  # NaN: stop here
                if callback_on_step_end is not None:
                    out = callback_on_step_end(self, i, t, {"latents": latents})
                    if out and "latents" in out:
                        latents = out["latents"]
                        check_step(latents, i, len(timesteps), t, cause="callback_on_step_end returned them")
                if bar is not None and (i == len(timesteps) - 1 or ((i + 1) > num_warmup and (i + 1) % order == 0)):
                    bar.update()
        finally:
            if bar is not None:
                bar.close()
        return latents

    @numpy.errstate(over="ignore", invalid="ignore", divide="ignore")     # check_image reports NaN/inf instead
    def decode_latents(self, latents, output_type: str = "pil"):
        """Steps 6 and 7: vae.decode(latents / scaling_factor) (B, 3, H, W) -> postprocessed images."""
        if output_type == "latent":
            return latents
        image = to_numpy(self.vae.decode(latents / self.vae.config["scaling_factor"]))   # the one read (B, 3, H, W)
        check_image(image, latents, self.vae.config["scaling_factor"])     # NaN would become black pixels
        return postprocess_image(image, output_type)

    # ------------------------------------------------------------------ text to image
    def __call__(self, prompt=None, negative_prompt=None, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 guidance_rescale: float = 0.0, height: int | None = None, width: int | None = None,
                 num_images_per_prompt: int = 1, latents=None, seed=None, noise: str = "numpy",
                 output_type: str = "pil", eta: float = 0.0, prompt_embeds=None, negative_prompt_embeds=None,
                 clip_skip: int | None = None, return_dict: bool = True, callback_on_step_end=None,
                 progress: bool = True):
        """Generate images from ``prompt`` (a str or a list of str); diffusers' arguments and semantics.

        Args:
            negative_prompt: what to steer away from (str or one per prompt); "" when None.
            num_inference_steps: S denoising steps. guidance_scale: w; guidance is on when w > 1.
            guidance_rescale: phi of Lin et al. (2023), 0 = off.
            height, width: image size, multiples of 8; default U-Net sample_size x VAE factor.
            num_images_per_prompt: n images per prompt (B = P n).
            latents: initial latents (B, 4, h, w) (they are multiplied by init_noise_sigma, as in
                diffusers); drawn when None.
            seed: an int, a list of B ints (one generator per image) or None (a fresh random seed).
            noise: "numpy" (numpy.random.default_rng(seed)) or "torch" (torch's CPU generator
                reproduced bit for bit: the same image as diffusers with
                ``generator=torch.Generator().manual_seed(seed)``). The stochastic schedulers draw
                their step noise from the same stream.
            output_type: "pil" (list of PIL images), "np" (float32 (B, H, W, 3) in [0, 1]) or "latent".
            eta: DDIM's eta (ignored by the other schedulers, as in diffusers).
            prompt_embeds, negative_prompt_embeds: precomputed text embeddings (B, T, D) instead of prompts.
            clip_skip: use the output of the layer clip_skip layers before the last (prompt only).
            return_dict: False returns (images, None) like diffusers.
            callback_on_step_end: f(pipe, i, t, {"latents": x}) -> dict, after each step; a returned
                "latents" replaces them.
            progress: show the tqdm bar over the steps.

        Returns: ``StableDiffusionPipelineOutput`` with ``images`` (and ``nsfw_content_detected`` None).
        """
        default_h, default_w = self.default_height_width()
        if not height or not width:
            height, width = default_h, default_w
        self.check_inputs(prompt, height, width, negative_prompt, prompt_embeds, negative_prompt_embeds)
        steps, guidance_scale, eta, n = self._check_call_options(num_inference_steps, guidance_scale, eta,
                                                                 num_images_per_prompt, output_type)
        guidance_rescale = check_real("guidance_rescale", guidance_rescale, minimum=0.0)
        batch = self._num_prompts(prompt, prompt_embeds)
        self.check_memory(batch * n, height, width, guidance_scale > 1.0)
        source = NoiseSource(noise, seed, batch * n)

        with no_cache():
            # 1-2. text encoding: context (2B, T, D) = [negative | positive] with guidance
            context = self.text_context(prompt, n, guidance_scale, negative_prompt, prompt_embeds,
                                        negative_prompt_embeds, clip_skip)
            # 3. timesteps
            self.scheduler.set_timesteps(steps)
            timesteps = self.scheduler.timesteps
            # 4. initial latents (B, 4, h, w) x init_noise_sigma
            shape = (batch * n, self.unet.config["in_channels"], height // self.vae_scale_factor,
                     width // self.vae_scale_factor)
            dtype = numpy.dtype(context.dtype)
            if latents is None:
                latents = asarray(source.randn(shape, dtype))
            else:
                if not hasattr(latents, "shape") or tuple(latents.shape) != shape:
                    raise ValueError(f"latents must have shape {shape} (B, in_channels, height/{self.vae_scale_factor}, "
                                     f"width/{self.vae_scale_factor}), got {getattr(latents, 'shape', type(latents).__name__)}")
                latents = asarray(latents).astype(dtype, copy=False)
            latents = latents * _init_noise_sigma(self.scheduler)
            # 5. denoising loop
            latents = self.denoise(latents, timesteps, context, guidance_scale, guidance_rescale, source, steps,
                                   eta=eta, callback_on_step_end=callback_on_step_end, progress=progress)
            # 6-7. decode and postprocess
            images = self.decode_latents(latents, output_type)
        if not return_dict:
            return images, None
        return StableDiffusionPipelineOutput(images=images)

    # ------------------------------------------------------------------ image to image
    def img2img(self, image, prompt=None, strength: float = 0.8, negative_prompt=None, num_inference_steps: int = 50,
                guidance_scale: float = 7.5, num_images_per_prompt: int = 1, seed=None, noise: str = "numpy",
                output_type: str = "pil", eta: float = 0.0, prompt_embeds=None, negative_prompt_embeds=None,
                clip_skip: int | None = None, height: int | None = None, width: int | None = None,
                return_dict: bool = True, callback_on_step_end=None, progress: bool = True):
        """Image-to-image (SDEdit), as diffusers' ``StableDiffusionImg2ImgPipeline.__call__``; its own steps
        are in ``npdiffusion.pipelines.img2img``.

        ``image``: a PIL image, a list of them, a float array (H, W, 3) / (B, H, W, 3) in [0, 1], or latents
        (B, 4, h, w). Its size is rounded down to multiples of the VAE factor (or resized to ``height`` x
        ``width`` when given). ``strength`` in [0, 1]: how far into the noise schedule the image is pushed;
        ``int(num_inference_steps * strength)`` steps are run (at least one is needed). The other
        arguments are those of ``__call__`` (no ``guidance_rescale``, as in diffusers). Returns a
        StableDiffusionPipelineOutput.
        """
        strength = check_real("strength", strength)
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must lie in [0.0, 1.0], got {strength}")
        steps, guidance_scale, eta, n = self._check_call_options(num_inference_steps, guidance_scale, eta,
                                                                 num_images_per_prompt, output_type)
        if image is None:
            raise ValueError("img2img: image is required (a PIL image, a list of them or a float array)")
        if int(steps * strength) < 1:
            raise ValueError(f"strength * num_inference_steps must be at least 1 so that a step runs, got "
                             f"{strength} * {steps} = {strength * steps:g}")
        self.check_prompt_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        batch = self._num_prompts(prompt, prompt_embeds)
        source = NoiseSource(noise, seed, batch * n)

        with no_cache():
            context = self.text_context(prompt, n, guidance_scale, negative_prompt, prompt_embeds,
                                        negative_prompt_embeds, clip_skip)                # 1-2
            f, do_cfg = self.vae_scale_factor, guidance_scale > 1.0
            pixels = preprocess_image(image, f, height, width,                             # 3: (Bi, 3, H, W)
                                      on_size=lambda bi, h, w: self.check_memory(batch * n, h, w, do_cfg,
                                                                                 1 if source.per_image else bi))
            if pixels.shape[1] == self.unet.config["in_channels"] != self.vae.in_channels:   # latents given
                self.check_memory(batch * n, pixels.shape[2] * f, pixels.shape[3] * f, do_cfg)
            self.scheduler.set_timesteps(steps)
            timesteps, steps_left = get_timesteps(self.scheduler, steps, strength)         # 4
            latents = prepare_image_latents(self, pixels, timesteps[:1], batch * n,         # 5
                                            numpy.dtype(context.dtype), source)
            latents = self.denoise(latents, timesteps, context, guidance_scale, 0.0, source, steps_left, eta=eta,
                                   callback_on_step_end=callback_on_step_end, progress=progress)
            images = self.decode_latents(latents, output_type)                              # 6
        if not return_dict:
            return images, None
        return StableDiffusionPipelineOutput(images=images)

    def __repr__(self):
        return (f"StableDiffusionPipeline(unet={self.unet.extra_repr()}, vae={self.vae.extra_repr()}, "
                f"scheduler={type(self.scheduler).__name__}, vae_scale_factor={self.vae_scale_factor})")


def _init_noise_sigma(scheduler):
    """The scheduler's init_noise_sigma as a Python float (a property on the sigma schedulers)."""
    value = scheduler.init_noise_sigma
    return float(to_numpy(value)) if hasattr(value, "shape") else float(value)


class StableDiffusionImg2ImgPipeline(StableDiffusionPipeline):
    """The same models with ``__call__`` = image to image (diffusers' StableDiffusionImg2ImgPipeline):
    ``pipe(prompt, image=..., strength=0.8, ...)``. Build it from a text-to-image pipeline with
    ``StableDiffusionImg2ImgPipeline(**pipe.components)`` or load a folder with ``from_pretrained``."""

    def __call__(self, prompt=None, image=None, strength: float = 0.8, **kwargs):
        return self.img2img(image, prompt, strength=strength, **kwargs)


def img2img(pipe: StableDiffusionPipeline, image, prompt=None, strength: float = 0.8, **kwargs):
    """``pipe.img2img(image, prompt, strength, **kwargs)`` (``StableDiffusionPipeline.img2img``)."""
    if not isinstance(pipe, StableDiffusionPipeline):
        raise TypeError(f"img2img: pipe must be a StableDiffusionPipeline, got {type(pipe).__name__}")
    return pipe.img2img(image, prompt, strength=strength, **kwargs)


__all__ = ["StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "img2img", "PipelineFolderError",
           "NonFiniteError"]
