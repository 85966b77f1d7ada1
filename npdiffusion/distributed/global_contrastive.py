"""CLIP's symmetric contrastive loss over the **global** batch of N ranks: all-gather forward,
reduce-scatter backward.

Shape legend: N ranks, b rows per rank, B = N b the global batch, E the embedding width.
On rank r: t, v (b, E) its unit text and image embeddings (global rows ``[r b, (r + 1) b)``),
lambda = logit_scale (0-d), s = exp(lambda); T = allgather(t), V = allgather(v) (B, E).

    Z_t = s t V^T       (b, B)   rank r's rows of logits_per_text  Z = s T V^T
    Z_v = s v T^T       (b, B)   rank r's rows of logits_per_image Z^T
    loss_r = (CE_rows(Z_t, r b + i) + CE_rows(Z_v, r b + i)) / 2       CE the mean over the b rows

The mean of loss_r over the ranks is one process's loss on the B pairs (contrastive.py); each rank
reports its loss_r and the trainer averages it. Backward, for an upstream ``dloss`` on every rank
(the objective is sum_r dloss loss_r):

    dZ_t, dZ_v = CE's gradients; (dt_own, dV_r) and (dv_own, dT_r) from clip_logits_backward
    G_r = [dT_r; dV_r] (2, B, E), with dt_own and dv_own added to rank r's rows
    G = sum_r G_r  (one all-reduce);  dt = G[0, rows of r],  dv = G[1, rows of r]
    dlambda = rank r's own sum(dZ_t * Z_t) + sum(dZ_v * Z_v)

Every rank's parameter gradients are then its share: their sum over the ranks is the gradient of
the objective, N dloss L, which the trainer's average (a sum divided by N) turns into one process's
gradient. Derivation: docs/distributed.md, "CLIP's loss over the global batch". Embeddings of
float16 (mixed precision) are computed in float32 and their gradients cast back, as in CLIPModel.
"""
from __future__ import annotations

import numpy

from npdiffusion.backend import asarray, xp
from npdiffusion.models.clip.contrastive import clip_logits_backward, clip_logits_forward
from npdiffusion.ops.losses import cross_entropy_backward, cross_entropy_forward


def global_contrastive_loss_forward(text_embeds, image_embeds, logit_scale, comm):
    """This rank's ``loss_r`` (0-d) of the global-batch loss (module docstring).

    text_embeds, image_embeds (b, E) unit rows, logit_scale 0-d, ``comm`` a ``Communicator``.
    Returns ``(loss_r, cache)``.
    """
    if tuple(text_embeds.shape) != tuple(image_embeds.shape) or text_embeds.ndim != 2:
        raise ValueError(f"global_contrastive_loss: text_embeds and image_embeds must both be (b, E) (text i "
                         f"pairs with image i), got shapes {tuple(text_embeds.shape)} and "
                         f"{tuple(image_embeds.shape)}")
    dtype = text_embeds.dtype
    if dtype.itemsize < 4:       # float16 towers: the logits, the loss and its gradient in float32
        text_embeds, image_embeds = text_embeds.astype(xp.float32), image_embeds.astype(xp.float32)
        logit_scale = logit_scale.astype(xp.float32)
    b = text_embeds.shape[0]
    t_all = asarray(comm.allgather(comm.to_buffer(text_embeds)))       # T (B, E)
    v_all = asarray(comm.allgather(comm.to_buffer(image_embeds)))      # V (B, E)
    labels = numpy.arange(comm.rank * b, (comm.rank + 1) * b)          # host labels: checked without a sync
    z_t, c_t = clip_logits_forward(text_embeds, v_all, logit_scale)   # (b, B)
    z_v, c_v = clip_logits_forward(image_embeds, t_all, logit_scale)  # (b, B)
    l_t, ce_t = cross_entropy_forward(z_t, labels)
    l_v, ce_v = cross_entropy_forward(z_v, labels)
    loss = xp.asarray((l_t + l_v) * 0.5, dtype=z_t.dtype)
    return loss, (comm, b, dtype, c_t, c_v, ce_t, ce_v)


def global_contrastive_loss_backward(dloss, cache):
    """``(dtext_embeds, dimage_embeds, dlogit_scale)`` of this rank (module docstring), in the
    embeddings' dtype; ``dloss`` is this rank's upstream gradient of its ``loss_r``."""
    comm, b, dtype, c_t, c_v, ce_t, ce_v = cache
    half = asarray(dloss) * 0.5
    dz_t, _ = cross_entropy_backward(half, ce_t)
    dz_v, _ = cross_entropy_backward(half, ce_v)
    dt_own, dv_all, ds_t = clip_logits_backward(dz_t, c_t)            # (b, E), (B, E), 0-d
    dv_own, dt_all, ds_v = clip_logits_backward(dz_v, c_v)
    rows = slice(comm.rank * b, (comm.rank + 1) * b)
    grads = xp.stack([dt_all, dv_all])                                  # G_r (2, B, E)
    grads[0, rows] += dt_own
    grads[1, rows] += dv_own
    grads = comm.to_buffer(grads)
    comm.allreduce_sum_(grads)                                          # G = sum over the ranks
    grads = asarray(grads)
    dt, dv, ds = grads[0, rows], grads[1, rows], ds_t + ds_v
    if dt.dtype != dtype:                        # float16 towers: one cast, inf past float16's range
        with numpy.errstate(over="ignore"):
            dt, dv, ds = dt.astype(dtype), dv.astype(dtype), ds.astype(dtype)
    return dt, dv, ds
