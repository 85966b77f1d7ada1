"""CLIP guidance: the gradient of the CLIP similarity between a prompt and the decoded prediction of
x0, back through the CLIP vision tower and the VAE decoder (both hand-written). Derivation:
docs/guidance.md ("CLIP guidance").

Shapes: B batch; x_t, eps, x0_hat (B, L, h, w) (scaled latents of a latent model, or (B, 3, H, W)
pixels in [-1, 1] of a pixel model, then ``vae`` is None); image (B, 3, H, W) the decoded x0_hat in
[-1, 1]; S = the vision tower's image_size; pixel_values (B, 3, S, S); E = projection_dim;
text_embeds (1 or B, E), L2-normalized.

Forward (every step is undone by hand in reverse):

    x0_hat = (x_t - s eps) / a                   a = sqrt(abar_t), s = sqrt(1 - abar_t), eps held fixed
    image  = vae.decode(unscale_latents(x0_hat)) = decode(x0_hat / scaling_factor [+ shift])
    u      = clip(image / 2 + 1/2, 0, 1)         the [0, 1] picture CLIP's image processor rescales to
    r      = R_h u R_w^T                         resize (shortest edge to S) and center crop to S x S,
                                                 PIL's bicubic (or bilinear) filter as matrices
    pixel_values = (r - mean_c) / std_c          the image processor's normalization
    image_embeds = normalize(visual_projection(vision_model(pixel_values).pooler_output))   (B, E)
    sim_b  = <image_embeds_b, text_embeds_b>     cosine similarity (B,)

Backward for upstream d sim (B,) (``clip_similarity_backward``): d image_embeds = d sim text_embeds,
the L2 normalization's, projection's and vision tower's backwards, d r = d pixel_values / std_c,
d u = R_h^T d r R_w, the clip's mask, d image = d u / 2, ``vae.decode_backward``, / scaling_factor,
and / a for x_t. Each sample depends only on its own x_t, so one backward of sum_b sim_b gives
every per-sample gradient. ``clip_gradient_fn`` plugs this into ``guided_sample`` as the term
eps_hat = eps - S s grad_x sim.

The modules run frozen (input gradients only: their parameter gradients are untouched and no
weight-gradient product is computed) and their train/eval modes are restored around each gradient,
so guidance can run with models that are being trained (as ``log_prob_grad`` does).
"""
from __future__ import annotations

import math
import numbers
import os

import numpy

from npdiffusion.backend import asarray, to_numpy, xp
from npdiffusion.checks import read_json_object
from npdiffusion.guidance.classifier_guidance import abar_at
from npdiffusion.models.clip.clip_model import CLIPModel
from npdiffusion.models.clip.contrastive import l2_normalize_backward, l2_normalize_forward
from npdiffusion.models.vae.autoencoder_kl import AutoencoderKL
from npdiffusion.nn.module import frozen

__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "CLIPImageInput", "resize_matrix", "clip_text_embeds",
           "clip_similarity_forward", "clip_similarity_backward", "clip_similarity_grad", "predicted_x0",
           "clip_gradient_fn", "read_image_processor_config"]

#: CLIPImageProcessor's defaults (OpenAI's ImageNet-like statistics of the CLIP training images)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESAMPLE = {"bilinear": 1.0, "bicubic": 2.0}          # filter -> support (PIL's filters)
PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}          # PIL.Image.Resampling codes in preprocessor configs


# ------------------------------------------------------------------------------------------ resize
def _filter(name: str, x: numpy.ndarray) -> numpy.ndarray:
    ax = numpy.abs(x)
    if name == "bilinear":
        return numpy.maximum(1.0 - ax, 0.0)
    a = -0.5                                           # PIL's (and torch's antialiased) bicubic
    return numpy.where(ax < 1.0, ((a + 2.0) * ax - (a + 3.0)) * ax * ax + 1.0,
                       numpy.where(ax < 2.0, (((ax - 5.0) * ax + 8.0) * ax - 4.0) * a, 0.0))


def resize_matrix(n_in: int, n_out: int, resample: str = "bicubic") -> numpy.ndarray:
    """The (n_out, n_in) float64 matrix of a 1-D resize with PIL's filters (antialiased when
    shrinking: the filter is stretched by n_in / n_out), rows summing to 1. Resizing an image side
    is y = R x; its adjoint is dx = R^T dy. Equals torch's ``interpolate(..., antialias=True,
    align_corners=False)`` for "bilinear" and "bicubic" (which mirror PIL's coefficients)."""
    if resample not in RESAMPLE:
        raise ValueError(f"resample must be one of {sorted(RESAMPLE)}, got {resample!r}")
    for name, n in (("n_in", n_in), ("n_out", n_out)):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"resize_matrix: {name} must be a positive int, got {n!r}")
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    support = RESAMPLE[resample] * stretch
    out = numpy.zeros((n_out, n_in), dtype=numpy.float64)
    for i in range(n_out):                             # n_out rows, a handful of taps each (host, once)
        center = (i + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        j = numpy.arange(lo, hi)
        w = _filter(resample, (j - center + 0.5) / stretch)
        out[i, lo:hi] = w / w.sum()
    return out


class CLIPImageInput:
    """What CLIP's image processor does to an image, as a differentiable op pair.

    ``image`` (B, 3, H, W) in [-1, 1] (a VAE's output) -> pixel_values (B, 3, S, S):
    u = clip(image / 2 + 1/2, 0, 1); resize the shortest edge to S (the long one to
    int(S * long / short), as transformers' ``get_resize_output_image_size``), center crop S x S
    (top = (h' - S) // 2, left = (w' - S) // 2); (u - mean_c) / std_c.

    The processor works on uint8 images (PIL resize, then rescale by 1/255); the rounding to uint8
    has no gradient and is left out, so this is its exact float version.
    """

    def __init__(self, image_size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, resample: str = "bicubic"):
        if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 1:
            raise ValueError(f"CLIPImageInput: image_size must be a positive int, got {image_size!r}")
        if resample not in RESAMPLE:
            raise ValueError(f"CLIPImageInput: resample must be one of {sorted(RESAMPLE)}, got {resample!r}")
        m, s = (numpy.asarray(v, dtype=numpy.float64).reshape(-1) for v in (mean, std))
        if m.size < 1 or not numpy.all(numpy.isfinite(m)):
            raise ValueError(f"CLIPImageInput: mean must be finite numbers (one per channel), got {mean!r}")
        if s.size != m.size or not numpy.all(s > 0) or not numpy.all(numpy.isfinite(s)):
            raise ValueError(f"CLIPImageInput: std must be {m.size} positive finite numbers like mean, got {std!r}")
        self.image_size, self.resample = int(image_size), resample
        self.mean, self.std = tuple(m.tolist()), tuple(s.tolist())
        self._matrices = {}

    def __repr__(self):
        return f"CLIPImageInput(image_size={self.image_size}, mean={self.mean}, std={self.std}, resample={self.resample!r})"

    def _resize_crop(self, h: int, w: int):
        """(R_h (S, h), R_w (S, w)) float64 host matrices: shortest edge to S, then the center S x S."""
        key = (h, w)
        if key not in self._matrices:
            size = self.image_size
            short, long = min(h, w), max(h, w)
            new_long = int(size * long / short)
            nh, nw = (size, new_long) if h <= w else (new_long, size)
            top, left = (nh - size) // 2, (nw - size) // 2
            self._matrices[key] = (resize_matrix(h, nh, self.resample)[top:top + size],
                                   resize_matrix(w, nw, self.resample)[left:left + size])
        return self._matrices[key]

    def forward(self, image):
        """image (B, C, H, W) in [-1, 1] -> (pixel_values (B, C, S, S), cache)."""
        if not hasattr(image, "shape") or not hasattr(image, "dtype") or image.dtype.kind != "f":
            raise TypeError(f"CLIPImageInput: image must be a floating array (B, C, H, W), got "
                            f"{getattr(image, 'dtype', type(image).__name__)}")
        if image.ndim != 4 or image.shape[1] != len(self.mean):
            raise ValueError(f"CLIPImageInput: image must have shape (B, {len(self.mean)}, H, W) (one channel per "
                             f"mean/std entry), got {tuple(image.shape)}")
        dt = image.dtype
        u = image * 0.5 + 0.5
        inside = (u >= 0.0) & (u <= 1.0)                # torch's clamp passes the gradient at the bounds
        xp.clip(u, 0.0, 1.0, out=u)
        rh, rw = (asarray(m.astype(dt)) for m in self._resize_crop(image.shape[2], image.shape[3]))
        r = xp.matmul(xp.matmul(rh, u), rw.T)           # (B, C, S, S)
        mean = asarray(numpy.asarray(self.mean, dtype=dt)).reshape(1, -1, 1, 1)
        inv_std = asarray(1.0 / numpy.asarray(self.std, dtype=numpy.float64)).astype(dt).reshape(1, -1, 1, 1)
        r -= mean
        r *= inv_std
        return r, (inside, rh, rw, inv_std)

    @staticmethod
    def backward(grad, cache):
        """d pixel_values (B, C, S, S) -> d image (B, C, H, W)."""
        inside, rh, rw, inv_std = cache
        dr = grad * inv_std
        du = xp.matmul(xp.matmul(rh.T, dr), rw)          # the resize's adjoint
        du *= inside
        du *= 0.5
        return du


def read_image_processor_config(folder) -> dict:
    """Keyword arguments of ``CLIPImageInput`` from a transformers ``preprocessor_config.json`` in
    ``folder`` (image_mean, image_std, resample), or {} when there is none (the processor's defaults:
    OpenAI's mean and std, bicubic). The target side is always the vision tower's image_size."""
    path = os.path.join(os.fspath(folder), "preprocessor_config.json")
    if not os.path.isfile(path):
        return {}
    cfg = read_json_object(path, "image-processor config")
    out = {}
    if cfg.get("do_normalize", True) is False:
        out.update(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    else:
        if "image_mean" in cfg:
            out["mean"] = tuple(cfg["image_mean"])
        if "image_std" in cfg:
            out["std"] = tuple(cfg["image_std"])
    if "resample" in cfg:
        if cfg["resample"] not in PIL_RESAMPLE:
            raise ValueError(f"{path}: resample must be 2 (bilinear) or 3 (bicubic), got {cfg['resample']!r}")
        out["resample"] = PIL_RESAMPLE[cfg["resample"]]
    return out


# ------------------------------------------------------------------------------------- the prompt
def clip_text_embeds(clip_model: CLIPModel, input_ids, attention_mask=None):
    """L2-normalized text embeddings (N, E) of token ids (N, T): normalize(text_projection(pooled)).
    Inference only (no cache is needed; the text tower's cache is overwritten)."""
    if not isinstance(clip_model, CLIPModel):
        raise TypeError(f"clip_model must be a CLIPModel, got {type(clip_model).__name__}")
    was = clip_model.training
    clip_model.eval()
    try:
        feats = clip_model.get_text_features(asarray(numpy.asarray(to_numpy(input_ids))), attention_mask)
    finally:
        clip_model.train(was)
    return l2_normalize_forward(feats)[0]


# ----------------------------------------------------------------------------------- similarity
def _check_text_embeds(text_embeds, batch: int, width: int):
    shape = getattr(text_embeds, "shape", None)
    if shape is None or not hasattr(text_embeds, "dtype") or text_embeds.dtype.kind != "f":
        raise TypeError(f"text_embeds must be a floating array (1 or {batch}, {width}), got "
                        f"{getattr(text_embeds, 'dtype', type(text_embeds).__name__)}")
    if len(shape) != 2 or shape[1] != width or shape[0] not in (1, batch):
        raise ValueError(f"text_embeds must have shape (1, {width}) or ({batch}, {width}) (projection_dim {width}), "
                         f"got {tuple(shape)}")


def _check_models(clip_model, vae):
    if not isinstance(clip_model, CLIPModel):
        raise TypeError(f"clip_model must be a CLIPModel (with a vision tower), got {type(clip_model).__name__}")
    if vae is not None and not isinstance(vae, AutoencoderKL):
        raise TypeError(f"vae must be an AutoencoderKL or None (a pixel-space model), got {type(vae).__name__}")


def clip_similarity_forward(x0, clip_model: CLIPModel, text_embeds, vae: AutoencoderKL | None = None,
                            image_input: CLIPImageInput | None = None):
    """sim (B,) = cos(CLIP image embedding of the decoded x0, text_embeds), and a cache.

    x0 (B, L, h, w) scaled latents (decoded by ``vae``), or (B, C, H, W) pixels in [-1, 1] when
    ``vae`` is None. text_embeds (1 or B, E) normalized (``clip_text_embeds``). ``image_input``
    defaults to ``CLIPImageInput(vision image_size)`` (OpenAI's statistics, bicubic). The modules
    are put in training mode so that they keep their caches: call ``clip_similarity_backward`` next
    (or use ``clip_similarity_grad``, which also restores modes and parameter gradients).
    """
    _check_models(clip_model, vae)
    if not hasattr(x0, "shape") or not hasattr(x0, "dtype") or x0.dtype.kind != "f":
        raise TypeError(f"x0 must be a floating array (B, C, H, W), got {getattr(x0, 'dtype', type(x0).__name__)}")
    want = vae.latent_channels if vae is not None else clip_model.config.vision_config.num_channels
    if x0.ndim != 4 or x0.shape[1] != want:
        what = "latent_channels of the VAE" if vae is not None else "the vision tower's num_channels"
        raise ValueError(f"x0 must have shape (B, {want}, H, W) ({what}), got {tuple(x0.shape)}")
    _check_text_embeds(text_embeds, x0.shape[0], clip_model.config.projection_dim)
    if image_input is None:
        image_input = CLIPImageInput(clip_model.config.vision_config.image_size)
    elif not isinstance(image_input, CLIPImageInput):
        raise TypeError(f"image_input must be a CLIPImageInput or None, got {type(image_input).__name__}")
    elif image_input.image_size != clip_model.config.vision_config.image_size:
        raise ValueError(f"image_input.image_size must be the vision tower's image_size "
                         f"{clip_model.config.vision_config.image_size}, got {image_input.image_size}")
    if vae is not None:
        vae.train()
        image = vae.decode(vae.unscale_latents(x0.astype(vae.dtype, copy=False)))
    else:
        image = x0
    pixels, c_in = image_input.forward(image.astype(clip_model.dtype, copy=False))
    clip_model.train()
    _, pooled = clip_model.vision_model(pixels)
    ie, c_norm = l2_normalize_forward(clip_model.visual_projection(pooled))           # (B, E)
    te = text_embeds.astype(ie.dtype, copy=False)
    sim = xp.sum(ie * te, axis=1)
    return sim, (clip_model, vae, image_input, c_in, c_norm, te, x0.dtype, tuple(x0.shape))


def clip_similarity_backward(grad_sim, cache):
    """d sim (B,) -> d x0 (B, C, H, W) (accumulates the parameter gradients it passes, unless the
    models are frozen, as ``clip_similarity_grad`` does)."""
    clip_model, vae, image_input, c_in, c_norm, te, dtype, shape = cache
    g = asarray(grad_sim).astype(te.dtype, copy=False)
    if tuple(g.shape) != shape[:1]:
        raise ValueError(f"grad_sim must have shape {shape[:1]} (one per sample), got {tuple(g.shape)}")
    die = g[:, None] * te                                                              # (B, E)
    dpooled = clip_model.visual_projection.backward(l2_normalize_backward(die, c_norm))
    dpix = clip_model.vision_model.backward(None, dpooled)                             # (B, C, S, S)
    dimage = image_input.backward(dpix, c_in)                                          # (B, C, H, W)
    if vae is None:
        return dimage.astype(dtype, copy=False)
    dz = vae.decode_backward(dimage.astype(vae.dtype, copy=False))
    return (dz / vae.scaling_factor).astype(dtype, copy=False)   # unscale_latents: z = x0 / sf (+ shift)


def clip_similarity_grad(clip_model: CLIPModel, text_embeds, x0, vae: AutoencoderKL | None = None,
                         image_input: CLIPImageInput | None = None):
    """(sim (B,), grad_x0 sim (B, C, H, W)) with each sample's own gradient (one backward of sum_b sim_b).
    Parameter gradients and train/eval modes of ``clip_model`` and ``vae`` are left as they were."""
    _check_models(clip_model, vae)
    mods = [clip_model] + ([vae] if vae is not None else [])
    modes = [m.training for m in mods]
    try:
        with frozen(*mods):                               # input gradients only: no weight-gradient products
            sim, cache = clip_similarity_forward(x0, clip_model, text_embeds, vae, image_input)
            grad = clip_similarity_backward(xp.ones(sim.shape, dtype=sim.dtype), cache)
    finally:
        for m, was in zip(mods, modes):
            m.train(was)                                  # eval() also drops the caches this call left
    return sim, grad


# ----------------------------------------------------------------------------------- guidance
def predicted_x0(x_t, eps, abar: float):
    """x0_hat = (x_t - sqrt(1 - abar) eps) / sqrt(abar), all (B, C, H, W)."""
    a, s = math.sqrt(abar), math.sqrt(1.0 - abar)
    return (x_t - s * eps) / a


def _eps_of(model_output, x_t, a, s, prediction_type):
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return a * model_output + s * x_t
    if prediction_type == "sample":
        return (x_t - a * model_output) / s
    raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")


def clip_gradient_fn(clip_model: CLIPModel, text_embeds, alphas_cumprod, vae: AutoencoderKL | None = None,
                     image_input: CLIPImageInput | None = None, prediction_type: str = "epsilon"):
    """A guidance term for ``guided_sample``: (x_t, t, model_output) -> grad_{x_t} sim (B, C, H, W).

    sim is the cosine similarity of the prompt (``text_embeds`` (1 or B, E)) and the CLIP embedding
    of the decoded x0_hat = (x_t - s eps) / a, with eps the (guided so far) model prediction at x_t
    held fixed, so grad_{x_t} = grad_{x0_hat} / a (docs/guidance.md: the U-Net's Jacobian is left
    out). ``guided_sample`` adds it as eps - S s grad. ``fn.last_similarity`` holds the last sim (B,)
    (host floats), for logging.
    """
    _check_models(clip_model, vae)
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")
    width = clip_model.config.projection_dim
    if getattr(text_embeds, "ndim", None) != 2 or text_embeds.shape[1] != width:
        raise ValueError(f"text_embeds must have shape (1 or B, {width}) (projection_dim {width}), got "
                         f"{getattr(text_embeds, 'shape', type(text_embeds).__name__)}")
    table = numpy.asarray(to_numpy(alphas_cumprod), dtype=numpy.float64)
    if table.ndim != 1 or table.size < 1 or not numpy.all((table > 0) & (table <= 1)):
        raise ValueError(f"alphas_cumprod must be a 1-D table of values in (0, 1], got shape {table.shape}")

    def fn(x_t, t, model_output):
        if getattr(model_output, "shape", None) != getattr(x_t, "shape", None):
            raise ValueError(f"model_output must have x_t's shape {getattr(x_t, 'shape', None)}, got "
                             f"{getattr(model_output, 'shape', None)}")
        abar = abar_at(table, t)
        a, s = math.sqrt(abar), math.sqrt(1.0 - abar)
        eps = _eps_of(model_output, x_t, a, s, prediction_type)
        sim, grad = clip_similarity_grad(clip_model, text_embeds, predicted_x0(x_t, eps, abar), vae, image_input)
        fn.last_similarity = to_numpy(sim).astype(numpy.float64)
        return (grad / a).astype(x_t.dtype, copy=False)

    fn.last_similarity = None
    return fn
