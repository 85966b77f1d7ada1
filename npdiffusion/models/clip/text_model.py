"""``CLIPTextModel``: CLIP's causal text transformer (transformers 5.x ``CLIPTextModel``), with its
hand-written backward. It turns token ids into the context Stable Diffusion's U-Net attends to.

Shapes: B prompts, T tokens (<= max_position_embeddings, 77), D = hidden_size, V = vocab_size,
P = max_position_embeddings, L = num_hidden_layers.

    x0 = token_embedding.weight[ids] + position_embedding.weight[:T]        (B, T, D)
    x_L, (x_0..x_L) = encoder(x0, causal)                                   L pre-LN layers
    last_hidden_state = final_layer_norm(x_L)                               (B, T, D)
    pooler_output = last_hidden_state[b, pos_b]                             (B, D)

The pooled position (``pooled_positions``) is chosen as the installed transformers chooses it:
with ``eos_token_id == 2`` (the legacy value of the OpenAI and Stable Diffusion 1.x configs) the
first position of the row's largest id; otherwise the first position holding ``eos_token_id``
(0 when the row has none).

Clip skip: ``forward(ids, clip_skip=k)`` runs only the first L - k layers and normalizes their
output, i.e. returns ``final_layer_norm(hidden_states[-(k + 1)])`` as diffusers' ``clip_skip``
does (and pools from it); the backward goes through exactly that.

State-dict keys equal transformers 5.x's (``embeddings.token_embedding.weight``,
``embeddings.position_embedding.weight``, ``encoder.layers.N...``, ``final_layer_norm.*``);
checkpoints with the ``text_model.`` prefix (every published one) load too (pretrained.py).
Docs: docs/clip.md. Source mirrored: transformers/models/clip/modeling_clip.py.
"""
from __future__ import annotations

import numbers

import numpy

from npdiffusion.backend import asarray, is_array, xp
from npdiffusion.checks import check_positive_int
from npdiffusion.memory import check_model, clip_text_parameters
from npdiffusion.models.clip.config import CLIPTextConfig
from npdiffusion.models.clip.encoder import (
    CLIPEncoder,
    check_no_attention_dropout,
    init_encoder_weights_,
    keyword_backward,
    last_hidden_grad,
    tower_outputs,
)
from npdiffusion.models.clip.pretrained import TowerFolders
from npdiffusion.nn.embedding import Embedding
from npdiffusion.nn.init import normal
from npdiffusion.nn.module import Module
from npdiffusion.nn.norm import LayerNorm


class CLIPTextEmbeddings(Module):
    """Token plus learned position embeddings: ids (B, T) -> (B, T, D)."""

    def __init__(self, vocab_size: int, hidden_size: int, max_position_embeddings: int):
        super().__init__()
        self.token_embedding = Embedding(vocab_size, hidden_size)
        self.position_embedding = Embedding(check_positive_int("max_position_embeddings", max_position_embeddings),
                                            hidden_size)

    def forward(self, input_ids):
        """input_ids (B, T) integers in [0, V) -> token_embedding[ids] + position_embedding[:T]."""
        t = input_ids.shape[-1]
        x = self.token_embedding(input_ids)                               # (B, T, D), fresh
        x += self.position_embedding.weight[:t]
        self.save_for_backward(t)
        return x

    def backward(self, grad):
        """grad (B, T, D) -> None (ids get no gradient); accumulates both tables' gradients."""
        t = self.saved()
        self.token_embedding.backward(grad)
        w = self.position_embedding.weight
        dpos = xp.zeros(w.shape, dtype=w.dtype)                          # (P, D); rows >= T unused
        dpos[:t] = grad.reshape(-1, t, w.shape[1]).sum(axis=0)
        self.position_embedding.accumulate_grad("weight", dpos)
        return None


def pooled_positions(input_ids, eos_token_id):
    """The token position pooled in each row of input_ids (B, T), as transformers 5.x picks it.

    ``eos_token_id == 2`` (legacy configs): argmax of the ids (first maximum), computed on the ids
    cast to int32 as transformers does. Otherwise the first position equal to ``eos_token_id``
    (0 for a row without one, argmax's answer on an all-zero row). Returns int (B,).
    """
    if eos_token_id is None:
        raise ValueError("CLIPTextModel: config.eos_token_id is None, but the pooled output needs it "
                         "(set eos_token_id to the end-of-text id, 49407 for CLIP's vocabulary)")
    if eos_token_id == 2:
        return xp.argmax(input_ids.astype(xp.int32), axis=-1)
    return xp.argmax((input_ids == eos_token_id).astype(xp.int32), axis=-1)


@keyword_backward
class CLIPTextModel(TowerFolders, Module):
    """CLIP's text tower. Build with ``CLIPTextModel(config)`` (a ``CLIPTextConfig`` or a dict) or
    ``CLIPTextModel(**config_keys)``; ``self.config`` is the CLIPTextConfig.

    ``forward(input_ids, attention_mask=None, output_hidden_states=False, clip_skip=None)``
    -> ``(last_hidden_state, pooler_output)``, plus the tuple of hidden states when asked.
    ``backward(grad_last_hidden_state, grad_pooler_output=None, grad_hidden_states=None)``
    accumulates every parameter gradient and returns None (token ids get no gradient).
    Parameters are initialized as transformers does (normal, std from ``initializer_range`` and
    ``initializer_factor``). Folders and state dicts: ``TowerFolders`` (keys prefixed ``text_model.``).
    """

    config_class, state_prefix, clip_config_key = CLIPTextConfig, "text_model.", "text_config"

    def __init__(self, config: CLIPTextConfig | dict | None = None, **kwargs):
        super().__init__()
        cfg = CLIPTextConfig.with_overrides(config, kwargs)
        check_model("CLIPTextModel", clip_text_parameters(cfg), "lower num_hidden_layers, hidden_size, "
                    "intermediate_size or vocab_size")
        self.config = cfg
        self.embeddings = CLIPTextEmbeddings(cfg.vocab_size, cfg.hidden_size, cfg.max_position_embeddings)
        self.encoder = CLIPEncoder(cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
                                   cfg.num_attention_heads, cfg.hidden_act, cfg.layer_norm_eps)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self._init_weights()

    @classmethod
    def from_single_file(cls, path, config=None, dtype=None):
        """The text encoder of an original single-file checkpoint: SD 1.x's CLIP
        (``cond_stage_model.transformer.*``) or SD 2.x's OpenCLIP (``cond_stage_model.model.*``, fused q/k/v
        split). ``config``: a diffusers (pipeline or text_encoder) folder, else the config is read off the
        shapes. Docs: docs/checkpoints.md ("Original single-file checkpoints")."""
        from npdiffusion.pipelines.single_file import load_component  # noqa: PLC0415

        return load_component("text_encoder", path, config, None, dtype)

    @property
    def eos_token_id(self):
        return self.config.eos_token_id

    def _init_weights(self, factor=None):
        """transformers' init; ``factor`` overrides config.initializer_factor (CLIPModel passes its own)."""
        f = self.config.initializer_factor if factor is None else factor
        for emb in (self.embeddings.token_embedding, self.embeddings.position_embedding):
            emb.weight = normal(emb.weight.shape, std=0.02 * f)
        init_encoder_weights_(self.encoder, f)

    # ------------------------------------------------------------------ forward / backward
    def _check_ids(self, input_ids):
        if not is_array(input_ids) or input_ids.dtype.kind not in "iu":
            got = getattr(input_ids, "dtype", type(input_ids).__name__)
            raise TypeError(f"CLIPTextModel: input_ids must be an integer array (B, T), got {got}")
        ids = asarray(input_ids)
        p = self.config.max_position_embeddings
        if ids.ndim != 2 or not 1 <= ids.shape[1] <= p:
            raise ValueError(f"CLIPTextModel: input_ids must have shape (B, T) with 1 <= T <= "
                             f"max_position_embeddings = {p}, got shape {tuple(ids.shape)}")
        return ids

    def _padding_mask(self, attention_mask, ids):
        """(B, T) keep-mask (1 = token, 0 = padding) -> additive (B, 1, 1, T) in the model's dtype."""
        if attention_mask is None:
            return None
        if not is_array(attention_mask):
            raise TypeError(f"CLIPTextModel: attention_mask must be an array (B, T) of 0/1 or None, "
                            f"got {type(attention_mask).__name__}")
        m = asarray(attention_mask)
        if tuple(m.shape) != tuple(ids.shape):
            raise ValueError(f"CLIPTextModel: attention_mask must have input_ids' shape {tuple(ids.shape)}, "
                             f"got {tuple(m.shape)}")
        dt = self.final_layer_norm.weight.dtype
        return xp.where(m.astype(bool), 0.0, -xp.inf).astype(dt)[:, None, None, :]

    def forward(self, input_ids, attention_mask=None, output_hidden_states: bool = False, clip_skip=None):
        """input_ids (B, T) -> ``(last_hidden_state (B, T, D), pooler_output (B, D))``, and
        ``hidden_states`` (a tuple of (B, T, D): the embeddings, then each layer's output) when
        ``output_hidden_states``.

        ``attention_mask`` (B, T): 1 for tokens, 0 for padding keys, combined with the causal
        mask (Stable Diffusion passes none). ``clip_skip=k`` (0 <= k <= L): stop after L - k
        layers, so last_hidden_state = final_layer_norm(hidden_states[-(k + 1)]) of the full model
        and hidden_states holds the L - k + 1 states computed.
        """
        check_no_attention_dropout("CLIPTextModel", self)
        ids = self._check_ids(input_ids)
        n_layers = len(self.encoder.layers)
        if clip_skip is None:
            clip_skip = 0
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, numbers.Integral) \
                or not 0 <= clip_skip <= n_layers:
            raise ValueError(f"CLIPTextModel: clip_skip must be None or an int in [0, {n_layers}] "
                             f"(num_hidden_layers), got {clip_skip!r}")
        mask = self._padding_mask(attention_mask, ids)
        pos = pooled_positions(ids, self.config.eos_token_id)            # (B,)
        # host ids when given: their range is checked before they move, without waiting (issue #18)
        x = self.embeddings(input_ids if isinstance(input_ids, numpy.ndarray) else ids)  # (B, T, D)
        h, states = self.encoder(x, mask, True, n_layers - int(clip_skip), output_hidden_states)
        last = self.final_layer_norm(h)                                   # (B, T, D)
        rows = xp.arange(ids.shape[0])
        pooled = last[rows, pos]                                          # (B, D), a copy
        self.save_for_backward(rows, pos, tuple(last.shape), bool(output_hidden_states))
        return tower_outputs(last, pooled, states, output_hidden_states)

    def backward(self, grad_last_hidden_state, grad_pooler_output=None, grad_hidden_states=None):
        """Gradients of last_hidden_state (B, T, D) (or None), pooler_output (B, D) (or None) and,
        after an ``output_hidden_states`` forward, of each hidden state (a sequence of arrays or
        None) -> None. Accumulates every parameter gradient."""
        rows, pos, shape, had_states = self.saved()
        g = last_hidden_grad("CLIPTextModel", grad_last_hidden_state, grad_pooler_output, grad_hidden_states,
                             shape, had_states, self.final_layer_norm.weight.dtype)
        if grad_pooler_output is not None:
            g[rows, pos] += grad_pooler_output                            # one position per row
        g = self.final_layer_norm.backward(g)
        g = self.encoder.backward(g, grad_hidden_states)
        self.embeddings.backward(g)
        return None

    def extra_repr(self):
        c = self.config
        return (f"vocab_size={c.vocab_size}, hidden_size={c.hidden_size}, layers={c.num_hidden_layers}, "
                f"heads={c.num_attention_heads}, act={c.hidden_act}")
