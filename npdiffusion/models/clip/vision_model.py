"""``CLIPVisionModel``: CLIP's image tower, a ViT (transformers 5.x ``CLIPVisionModel``), with its
hand-written backward.

Shapes: B images, C = num_channels, S = image_size, p = patch_size, g = S // p patches per side,
N = g^2 patches, D = hidden_size.

    patches = patch_embedding(pixel_values)       Conv2d C -> D, kernel p, stride p, no bias (B, D, g, g)
    x0 = [class_embedding ; patches as (B, N, D)] + position_embedding.weight    (B, N + 1, D)
    x  = pre_layrnorm(x0)                          (transformers' spelling)
    last_hidden_state = encoder(x)                 no mask                        (B, N + 1, D)
    pooler_output = post_layernorm(last_hidden_state[:, 0])                       (B, D)

Backward: the class token's gradient is the sum over the batch of the first row's gradient, the
position table's the sum over the batch, the patch rows go back through the convolution.
State-dict keys equal transformers 5.x's (``embeddings.class_embedding``,
``embeddings.patch_embedding.weight``, ``embeddings.position_embedding.weight``, ``pre_layrnorm.*``,
``encoder.layers.N...``, ``post_layernorm.*``); ``vision_model.``-prefixed checkpoints load too.
Position-embedding interpolation to other image sizes is not supported (images must be S x S).
Docs: docs/clip.md. Source mirrored: transformers/models/clip/modeling_clip.py.
"""
from __future__ import annotations

from npdiffusion.backend import asarray, is_array, xp
from npdiffusion.models.clip.config import CLIPVisionConfig
from npdiffusion.models.clip.encoder import (
    CLIPEncoder,
    check_no_attention_dropout,
    init_encoder_weights_,
    keyword_backward,
    last_hidden_grad,
    tower_outputs,
)
from npdiffusion.models.clip.pretrained import TowerFolders
from npdiffusion.nn.conv import Conv2d
from npdiffusion.nn.embedding import Embedding
from npdiffusion.nn.init import normal
from npdiffusion.nn.module import Module
from npdiffusion.nn.norm import LayerNorm


class CLIPVisionEmbeddings(Module):
    """pixel_values (B, C, S, S) -> class token and patch embeddings plus positions (B, N + 1, D)."""

    def __init__(self, hidden_size: int, num_channels: int, image_size: int, patch_size: int):
        super().__init__()
        self.embed_dim, self.image_size, self.patch_size = hidden_size, image_size, patch_size
        self.num_patches = (image_size // patch_size) ** 2
        self.num_positions = self.num_patches + 1
        # attribute order = transformers' state-dict order
        self.register_parameter("class_embedding", normal((hidden_size,), std=1.0))
        self.patch_embedding = Conv2d(num_channels, hidden_size, patch_size, stride=patch_size, bias=False)
        self.position_embedding = Embedding(self.num_positions, hidden_size)

    def forward(self, pixel_values):
        x = pixel_values
        s = self.image_size
        if not is_array(x) or x.dtype.kind != "f":
            got = getattr(x, "dtype", type(x).__name__)
            raise TypeError(f"CLIPVisionModel: pixel_values must be a floating array (B, C, {s}, {s}), got {got}")
        x = asarray(x)
        c = self.patch_embedding.in_channels
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(f"CLIPVisionModel: pixel_values must have shape (B, {c}, {s}, {s}) (num_channels, "
                             f"image_size), got {tuple(x.shape)}")
        w = self.class_embedding
        b, d = x.shape[0], self.embed_dim
        patches = self.patch_embedding(x.astype(w.dtype, copy=False))   # (B, D, g, g), as transformers casts
        out = xp.empty((b, self.num_positions, d), dtype=w.dtype)
        out[:, 0] = w
        out[:, 1:] = patches.reshape(b, d, -1).transpose(0, 2, 1)        # (B, N, D)
        out += self.position_embedding.weight
        self.save_for_backward(tuple(patches.shape), x.dtype)
        return out

    def backward(self, grad):
        """grad (B, N + 1, D) -> d pixel_values (B, C, S, S); accumulates the three tables' gradients."""
        pshape, in_dtype = self.saved()
        self.accumulate_grad("class_embedding", grad[:, 0].sum(axis=0))
        self.position_embedding.accumulate_grad("weight", grad.sum(axis=0))
        b, d, gh, gw = pshape
        dpatch = xp.ascontiguousarray(grad[:, 1:].transpose(0, 2, 1)).reshape(pshape)   # (B, D, g, g)
        return self.patch_embedding.backward(dpatch).astype(in_dtype, copy=False)


@keyword_backward
class CLIPVisionModel(TowerFolders, Module):
    """CLIP's image tower. ``CLIPVisionModel(config)`` (a ``CLIPVisionConfig`` or a dict) or
    ``CLIPVisionModel(**config_keys)``; ``self.config`` is the CLIPVisionConfig.

    ``forward(pixel_values, output_hidden_states=False)`` -> ``(last_hidden_state, pooler_output)``
    (+ hidden states); ``backward(grad_last_hidden_state, grad_pooler_output=None,
    grad_hidden_states=None)`` -> d pixel_values, accumulating every parameter gradient.
    Folders and state dicts: ``TowerFolders`` (keys prefixed ``vision_model.``).
    """

    config_class, state_prefix, clip_config_key = CLIPVisionConfig, "vision_model.", "vision_config"

    def __init__(self, config: CLIPVisionConfig | dict | None = None, **kwargs):
        super().__init__()
        cfg = CLIPVisionConfig.with_overrides(config, kwargs)
        self.config = cfg
        self.embeddings = CLIPVisionEmbeddings(cfg.hidden_size, cfg.num_channels, cfg.image_size, cfg.patch_size)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = CLIPEncoder(cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
                                   cfg.num_attention_heads, cfg.hidden_act, cfg.layer_norm_eps)
        self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self._init_weights()

    def _init_weights(self, factor=None):
        """transformers' init; ``factor`` overrides config.initializer_factor (CLIPModel passes its own)."""
        c, e = self.config, self.embeddings
        f = c.initializer_factor if factor is None else factor
        e.class_embedding = normal(e.class_embedding.shape, std=c.hidden_size ** -0.5 * f)
        e.patch_embedding.weight = normal(e.patch_embedding.weight.shape, std=c.initializer_range * f)
        e.position_embedding.weight = normal(e.position_embedding.weight.shape, std=c.initializer_range * f)
        init_encoder_weights_(self.encoder, f)

    def forward(self, pixel_values, output_hidden_states: bool = False):
        """pixel_values (B, C, S, S) -> ``(last_hidden_state (B, N + 1, D), pooler_output (B, D))``,
        plus the hidden states (embeddings after pre_layrnorm, then each layer's output) when asked."""
        check_no_attention_dropout("CLIPVisionModel", self)
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        last, states = self.encoder(x, None, False, None, output_hidden_states)
        pooled = self.post_layernorm(last[:, 0])                          # (B, D)
        self.save_for_backward(tuple(last.shape), bool(output_hidden_states))
        return tower_outputs(last, pooled, states, output_hidden_states)

    def backward(self, grad_last_hidden_state, grad_pooler_output=None, grad_hidden_states=None):
        """Gradients of last_hidden_state (or None), pooler_output (or None) and the hidden states
        (after an ``output_hidden_states`` forward) -> d pixel_values (B, C, S, S)."""
        shape, had_states = self.saved()
        g = last_hidden_grad("CLIPVisionModel", grad_last_hidden_state, grad_pooler_output, grad_hidden_states,
                             shape, had_states, self.post_layernorm.weight.dtype)
        if grad_pooler_output is not None:
            g[:, 0] += self.post_layernorm.backward(grad_pooler_output)
        g = self.encoder.backward(g, grad_hidden_states)
        return self.embeddings.backward(self.pre_layrnorm.backward(g))

    def extra_repr(self):
        c = self.config
        return (f"image_size={c.image_size}, patch_size={c.patch_size}, hidden_size={c.hidden_size}, "
                f"layers={c.num_hidden_layers}, heads={c.num_attention_heads}")
