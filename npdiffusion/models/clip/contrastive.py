"""CLIP's contrastive objective as forward/backward pairs: L2 normalization, the scaled cosine logits
and the symmetric InfoNCE loss, with the gradients for both embeddings and ``logit_scale``.

Shapes: N texts, M images (N = M for the loss: pair i is text i with image i), E embedding width.
t (N, E), v (M, E) unit rows; lambda = logit_scale (a 0-d array); s = exp(lambda).

    l2_normalize:           u = x / ||x||                                 (..., E)
    clip_logits:            Z = s t v^T = logits_per_text                 (N, M)
                            logits_per_image = Z^T
    symmetric_cross_entropy loss = (CE_rows(Z) + CE_rows(Z^T)) / 2, labels 0..N-1 (the diagonal)
    contrastive_loss        the last two together: (loss, Z) from (t, v, lambda)

Gradients (derivation: docs/clip.md, "The contrastive objective and its gradient"):

    dZ = (softmax_rows(Z) - I + softmax_cols(Z) - I) / (2N) * dloss  (+ the upstream dZ)
    dt = s dZ v,   dv = s dZ^T t,   dlambda = sum(dZ * Z)
    dx = (du - u (u . du)) / ||x||

``||x||`` has no epsilon, as in transformers (a zero row gives NaN there and here). Cross-entropy
comes from ``npdiffusion.ops.losses`` (stable log-sum-exp). Each forward returns ``(y, cache)``;
each backward returns one gradient per array argument, in order.
Source mirrored: transformers/models/clip/modeling_clip.py (``clip_loss``, ``_get_vector_norm``).
"""
from __future__ import annotations

import numpy

from npdiffusion.backend import asarray, xp
from npdiffusion.checks import check_float_array
from npdiffusion.ops.losses import cross_entropy_backward, cross_entropy_forward


# ------------------------------------------------------------------------------ normalization
def l2_normalize_forward(x):
    """u = x / ||x|| over the last axis (x (..., E)). Returns ``(u, cache)``; cache = (u, ||x||)."""
    check_float_array("x", x, "l2_normalize")
    if x.ndim == 0:
        raise ValueError("l2_normalize: x must have at least one dimension, got a 0-d array")
    norm = xp.sqrt(xp.sum(x * x, axis=-1, keepdims=True))              # (..., 1)
    u = x / norm
    return u, (u, norm)


def l2_normalize_backward(du, cache):
    """dx = (du - u (u . du)) / ||x||: the projection of du off u, scaled by 1/||x||."""
    u, norm = cache
    dx = du - u * xp.sum(u * du, axis=-1, keepdims=True)
    dx /= norm
    return dx


# ------------------------------------------------------------------------------ logits
def clip_logits_forward(text_embeds, image_embeds, logit_scale):
    """logits_per_text Z = exp(logit_scale) * text_embeds @ image_embeds^T.

    text_embeds (N, E), image_embeds (M, E), logit_scale 0-d (or a Python float, then it gets no
    gradient) -> Z (N, M). Returns ``(Z, cache)``; cache = (t, v, s, Z).
    """
    op = "clip_logits"
    check_float_array("text_embeds", text_embeds, op, 2)
    check_float_array("image_embeds", image_embeds, op, 2)
    if text_embeds.shape[1] != image_embeds.shape[1]:
        raise ValueError(f"{op}: text_embeds and image_embeds must have the same width, got shapes "
                         f"{tuple(text_embeds.shape)} and {tuple(image_embeds.shape)}")
    dt = text_embeds.dtype
    is_array = hasattr(logit_scale, "shape")
    if is_array and tuple(logit_scale.shape) != ():
        raise ValueError(f"{op}: logit_scale must be a 0-d array (a scalar), got shape {tuple(logit_scale.shape)}")
    s = xp.exp(asarray(logit_scale, dtype=dt))                          # 0-d
    z = xp.matmul(text_embeds, image_embeds.T)                          # (N, M)
    z *= s
    return z, (text_embeds, image_embeds, s, z, is_array)


def clip_logits_backward(dz, cache):
    """Returns ``(dtext, dimage, dlogit_scale)``: s dZ v, s dZ^T t, sum(dZ * Z) (None for a float scale)."""
    t, v, s, z, is_array = cache
    dz = dz.astype(t.dtype, copy=False)
    dt = xp.matmul(dz, v)
    dt *= s
    dv = xp.matmul(dz.T, t)
    dv *= s
    ds = xp.asarray(xp.vdot(dz, z), dtype=t.dtype) if is_array else None   # dZ/dlambda = Z
    return dt, dv, ds


# ------------------------------------------------------------------------------ loss
def symmetric_cross_entropy_forward(logits_per_text):
    """(CE(Z, arange N) + CE(Z^T, arange N)) / 2 for square Z (N, N) (transformers' ``clip_loss``).

    Returns ``(loss, cache)`` with loss a 0-d array.
    """
    op = "symmetric_cross_entropy"
    check_float_array("logits_per_text", logits_per_text, op, 2)
    n, m = logits_per_text.shape
    if n != m or n == 0:
        raise ValueError(f"{op}: logits_per_text must be square and non-empty (N texts paired with N images), "
                         f"got shape {(n, m)}")
    labels = numpy.arange(n)                  # host labels: cross_entropy checks them without a device sync
    l_text, c_text = cross_entropy_forward(logits_per_text, labels)
    l_image, c_image = cross_entropy_forward(logits_per_text.T, labels)
    loss = (l_text + l_image) * 0.5
    return xp.asarray(loss, dtype=logits_per_text.dtype), (c_text, c_image)


def symmetric_cross_entropy_backward(dloss, cache):
    """dZ = (softmax_rows(Z) - I) / (2N) + (softmax_cols(Z) - I) / (2N), times dloss."""
    c_text, c_image = cache
    half = asarray(dloss) * 0.5
    dz, _ = cross_entropy_backward(half, c_text)
    dzt, _ = cross_entropy_backward(half, c_image)
    dz += dzt.T
    return dz


def contrastive_loss_forward(text_embeds, image_embeds, logit_scale):
    """The symmetric InfoNCE loss of N paired, L2-normalized embeddings.

    text_embeds (N, E), image_embeds (N, E), logit_scale 0-d -> ``((loss, logits_per_text), cache)``
    with loss 0-d and logits_per_text (N, N) = exp(logit_scale) t v^T (logits_per_image is its
    transpose).
    """
    z, c_logits = clip_logits_forward(text_embeds, image_embeds, logit_scale)
    loss, c_loss = symmetric_cross_entropy_forward(z)
    return (loss, z), (c_logits, c_loss)


def contrastive_loss_backward(grads, cache):
    """``grads`` = (dloss, dlogits_per_text) (either may be None; a lone array is dloss) ->
    ``(dtext_embeds, dimage_embeds, dlogit_scale)``."""
    c_logits, c_loss = cache
    if isinstance(grads, (tuple, list)):
        dloss, dz_up = grads
    else:
        dloss, dz_up = grads, None
    z = c_logits[3]
    dz = xp.zeros_like(z) if dloss is None else symmetric_cross_entropy_backward(dloss, c_loss)
    if dz_up is not None:
        if tuple(dz_up.shape) != tuple(z.shape):
            raise ValueError(f"contrastive_loss_backward: dlogits_per_text must have shape {tuple(z.shape)}, "
                             f"got {tuple(dz_up.shape)}")
        dz += dz_up
    return clip_logits_backward(dz, c_logits)
