"""``CLIPModel``: the text and image towers, their projections into one embedding space and the
symmetric contrastive loss (transformers 5.x ``CLIPModel``), with the hand-written backward.

Shapes: N texts and M images (N = M for the loss), T tokens, C x S x S images, Dt / Dv the towers'
widths, E = projection_dim.

    text_embeds  = normalize(text_projection(text_model(input_ids).pooler_output))      (N, E)
    image_embeds = normalize(visual_projection(vision_model(pixel_values).pooler_output)) (M, E)
    logits_per_text = exp(logit_scale) text_embeds image_embeds^T                      (N, M)
    logits_per_image = logits_per_text^T
    loss = (CE(logits_per_text, diag) + CE(logits_per_image, diag)) / 2

``backward()`` back-propagates the loss (and optionally upstream gradients of the logits and the
embeddings) into every parameter, ``logit_scale`` included, and returns d pixel_values.
transformers applies no clamp; OpenAI's and open_clip's training clamp logit_scale to [0, ln 100]
after every optimizer step: ``clamp_logit_scale_()``.

State-dict keys equal transformers' (``logit_scale``, ``text_model.*``, ``vision_model.*``,
``visual_projection.weight``, ``text_projection.weight``; the projections have no bias).
Docs: docs/clip.md. Source mirrored: transformers/models/clip/modeling_clip.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy

from npdiffusion.backend import xp
from npdiffusion.models.clip.config import LOGIT_SCALE_MAX, CLIPConfig
from npdiffusion.models.clip.contrastive import (
    clip_logits_backward,
    clip_logits_forward,
    contrastive_loss_backward,
    contrastive_loss_forward,
    l2_normalize_backward,
    l2_normalize_forward,
)
from npdiffusion.models.clip.encoder import check_grad, keyword_backward
from npdiffusion.models.clip.pretrained import drop_position_ids, read_folder, write_folder
from npdiffusion.models.clip.text_model import CLIPTextModel
from npdiffusion.models.clip.vision_model import CLIPVisionModel
from npdiffusion.nn.init import normal
from npdiffusion.nn.linear import Linear
from npdiffusion.nn.module import Module, canonical_dtype

_DEFAULT = object()


@dataclass
class CLIPOutput:
    """What ``CLIPModel.forward`` returns (transformers' ``CLIPOutput`` fields).

    loss: 0-d (None without ``return_loss``); logits_per_image (M, N); logits_per_text (N, M);
    text_embeds (N, E) and image_embeds (M, E), L2-normalized; text_model_output and
    vision_model_output: the towers' ``(last_hidden_state, pooler_output)``.
    """

    loss: object = None
    logits_per_image: object = None
    logits_per_text: object = None
    text_embeds: object = None
    image_embeds: object = None
    text_model_output: tuple = None
    vision_model_output: tuple = None


@keyword_backward
class CLIPModel(Module):
    """CLIP: ``CLIPModel(config)`` with a ``CLIPConfig`` or a dict in transformers' layout
    (text_config, vision_config, projection_dim, logit_scale_init_value), or keyword arguments."""

    def __init__(self, config: CLIPConfig | dict | None = None, **kwargs):
        super().__init__()
        if config is None:
            cfg = CLIPConfig.from_dict(kwargs)
        elif kwargs:
            cfg = CLIPConfig.from_dict({**CLIPConfig.from_dict(config).to_dict(), **kwargs})
        else:
            cfg = CLIPConfig.from_dict(config)
        self.config = cfg
        self.register_parameter("logit_scale", numpy.asarray(cfg.logit_scale_init_value, dtype=numpy.float32))
        self.text_model = CLIPTextModel(cfg.text_config)
        self.vision_model = CLIPVisionModel(cfg.vision_config)
        self.visual_projection = Linear(cfg.vision_config.hidden_size, cfg.projection_dim, bias=False)
        self.text_projection = Linear(cfg.text_config.hidden_size, cfg.projection_dim, bias=False)
        self._init_weights()

    def _init_weights(self):
        """transformers' init: CLIPModel's initializer_factor applies to both towers."""
        f = self.config.initializer_factor
        for tower in (self.text_model, self.vision_model):
            if tower.config.initializer_factor != f:
                tower._init_weights(f)
        for lin in (self.visual_projection, self.text_projection):
            lin.weight = normal(lin.weight.shape, std=lin.in_features ** -0.5 * f)

    # ------------------------------------------------------------------ forward / backward
    def get_text_features(self, input_ids, attention_mask=None):
        """text_projection(pooler_output) (N, E), not normalized (transformers' get_text_features).
        An inference helper: it overwrites the text tower's backward cache."""
        return self.text_projection(self.text_model(input_ids, attention_mask)[1])

    def get_image_features(self, pixel_values):
        """visual_projection(pooler_output) (M, E), not normalized; an inference helper like
        ``get_text_features``."""
        return self.visual_projection(self.vision_model(pixel_values)[1])

    def forward(self, input_ids, pixel_values, attention_mask=None, return_loss: bool = True) -> CLIPOutput:
        """input_ids (N, T), pixel_values (M, C, S, S) -> ``CLIPOutput``. The loss (computed when
        ``return_loss``) needs N = M: text i and image i are a pair."""
        text_out = self.text_model(input_ids, attention_mask)
        vision_out = self.vision_model(pixel_values)
        text_embeds, text_norm_cache = l2_normalize_forward(self.text_projection(text_out[1]))        # (N, E)
        image_embeds, image_norm_cache = l2_normalize_forward(self.visual_projection(vision_out[1]))  # (M, E)
        if return_loss:
            if text_embeds.shape[0] != image_embeds.shape[0]:
                raise ValueError(f"CLIPModel: the contrastive loss pairs text i with image i, so input_ids and "
                                 f"pixel_values need the same batch size, got {text_embeds.shape[0]} and "
                                 f"{image_embeds.shape[0]} (pass return_loss=False for logits only)")
            if text_embeds.dtype.itemsize < 4:
                # float16 towers (mixed precision): the logits, the loss and its gradient in float32;
                # backward casts the embeddings' gradients back to float16 once, after dloss scaled them
                (loss, z), cache = contrastive_loss_forward(text_embeds.astype(xp.float32),
                                                            image_embeds.astype(xp.float32),
                                                            self.logit_scale.astype(xp.float32))
            else:
                (loss, z), cache = contrastive_loss_forward(text_embeds, image_embeds, self.logit_scale)
        else:
            loss = None
            z, cache = clip_logits_forward(text_embeds, image_embeds, self.logit_scale)
        self.save_for_backward(cache, text_norm_cache, image_norm_cache, bool(return_loss), tuple(z.shape),
                               tuple(text_embeds.shape), tuple(image_embeds.shape))
        return CLIPOutput(loss=loss, logits_per_image=z.T.copy(), logits_per_text=z, text_embeds=text_embeds,
                          image_embeds=image_embeds, text_model_output=text_out, vision_model_output=vision_out)

    def backward(self, grad_loss=_DEFAULT, grad_logits_per_text=None, grad_logits_per_image=None,
                 grad_text_embeds=None, grad_image_embeds=None):
        """Back-propagate into every parameter (logit_scale included); returns d pixel_values.

        ``grad_loss`` defaults to 1 after a forward with the loss (plain ``backward()`` is the
        gradient of the loss) and must stay unset without it. The other arguments are optional
        upstream gradients of the forward's other outputs, added to the loss's.
        """
        cache, text_norm_cache, image_norm_cache, had_loss, zshape, tshape, ishape = self.saved()
        if grad_loss is _DEFAULT:
            grad_loss = 1.0 if had_loss else None
        elif grad_loss is not None and not had_loss:
            raise ValueError("CLIPModel: grad_loss needs a forward with return_loss=True")
        check_grad("CLIPModel", "grad_logits_per_text", grad_logits_per_text, zshape)
        check_grad("CLIPModel", "grad_logits_per_image", grad_logits_per_image, zshape[::-1])
        check_grad("CLIPModel", "grad_text_embeds", grad_text_embeds, tshape)
        check_grad("CLIPModel", "grad_image_embeds", grad_image_embeds, ishape)
        dtype = self.logit_scale.dtype
        dz = None
        if grad_logits_per_text is not None:
            dz = grad_logits_per_text.astype(dtype, copy=True)
        if grad_logits_per_image is not None:
            dz = grad_logits_per_image.T.astype(dtype, copy=True) if dz is None else dz + grad_logits_per_image.T
        if had_loss:
            d_text_embeds, d_image_embeds, dscale = contrastive_loss_backward((grad_loss, dz), cache)
        else:
            if dz is None:
                dz = xp.zeros(zshape, dtype=dtype)
            d_text_embeds, d_image_embeds, dscale = clip_logits_backward(dz, cache)
        if d_text_embeds.dtype != dtype:                  # the float32 loss of a float16 model
            with numpy.errstate(over="ignore"):          # past float16's range: inf, for the loss scaler
                d_text_embeds = d_text_embeds.astype(dtype)
                d_image_embeds = d_image_embeds.astype(dtype)
                dscale = dscale.astype(dtype)
        if grad_text_embeds is not None:
            d_text_embeds += grad_text_embeds
        if grad_image_embeds is not None:
            d_image_embeds += grad_image_embeds
        self.accumulate_grad("logit_scale", dscale)
        d_text_pooled = self.text_projection.backward(l2_normalize_backward(d_text_embeds, text_norm_cache))
        d_image_pooled = self.visual_projection.backward(l2_normalize_backward(d_image_embeds, image_norm_cache))
        self.text_model.backward(None, d_text_pooled)
        return self.vision_model.backward(None, d_image_pooled)

    def clamp_logit_scale_(self, min_value: float = 0.0, max_value: float = LOGIT_SCALE_MAX) -> "CLIPModel":
        """Clamp logit_scale in place to [min_value, max_value] = [0, ln 100] by default, as OpenAI's and
        open_clip's training do after every optimizer step (``logit_scale.clamp_(0, math.log(100))``),
        so the softmax temperature 1/exp(logit_scale) never drops below 0.01. Returns self."""
        if not (math.isfinite(min_value) and math.isfinite(max_value)) or min_value > max_value:
            raise ValueError(f"CLIPModel.clamp_logit_scale_: need finite min_value <= max_value, got "
                             f"{min_value!r} and {max_value!r}")
        xp.clip(self.logit_scale, float(min_value), float(max_value), out=self.logit_scale)
        return self

    # ------------------------------------------------------------------ state dicts and folders
    def load_state_dict(self, state_dict, strict: bool = True):
        """Module.load_state_dict, ignoring the ``position_ids`` buffers older checkpoints stored."""
        return super().load_state_dict(drop_position_ids(state_dict), strict=strict)

    @classmethod
    def from_config(cls, config) -> "CLIPModel":
        return cls(CLIPConfig.from_dict(config))

    @classmethod
    def from_pretrained(cls, folder, subfolder: str | None = None, dtype=None) -> "CLIPModel":
        """Load a transformers CLIPModel folder (``config.json`` + ``model.safetensors``). Returns the
        model in eval() mode."""
        config, state = read_folder(folder, subfolder)
        model = cls(CLIPConfig.from_dict(config))
        model.to(canonical_dtype("float32" if dtype is None else dtype))
        model.load_state_dict(state)
        return model.eval()

    def save_pretrained(self, folder) -> str:
        """Write ``config.json`` and ``model.safetensors`` as transformers' save_pretrained does."""
        return write_folder(folder, self.config.to_dict(), "CLIPModel", CLIPConfig.model_type, self.state_dict(),
                            self.dtype)

    def extra_repr(self):
        return f"projection_dim={self.config.projection_dim}"
