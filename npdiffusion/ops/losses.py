"""Training losses with their gradients: mean squared error, cross-entropy, Gaussian KL.

Shape legend: any shape (...) for mse and KL inputs; logits (..., K) with K classes on the last
axis and labels (...) of integers for cross-entropy; N the number of labelled positions.
Derivations: docs/ops/losses.md.

Each ``<loss>_forward`` returns ``(loss, cache)`` (the loss as a 0-d array, or an array for
``reduction="none"`` and for the element-wise KL); each ``<loss>_backward(dloss, cache)`` returns
the gradients in the forward's argument order, None for an argument that gets none (targets and
integer labels). ``mse_loss``, ``cross_entropy`` and ``gaussian_kl`` are aliases of the forwards.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy

from npdiffusion.backend import asarray, xp
from npdiffusion.checks import check_float_array

_REDUCTIONS = ("mean", "sum", "none")


def _unbroadcast(g, shape):
    """Sum ``g`` over the axes that broadcasting added or stretched, back to ``shape``."""
    shape = tuple(shape)
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    g = g.sum(axis=tuple(range(lead))) if lead else g
    stretched = tuple(i for i, side in enumerate(shape) if side == 1 and g.shape[i] != 1)
    return g.sum(axis=stretched, keepdims=True) if stretched else g


# --------------------------------------------------------------------------------- MSE
def mse_loss_forward(pred, target, reduction: str = "mean"):
    """Mean squared error: mean((pred - target)^2) ("mean"), its sum ("sum") or the element-wise
    squares ("none"), like torch.nn.functional.mse_loss. pred and target have the same shape.
    Returns ``(loss, cache)``; cache = (pred - target, reduction)."""
    op = "mse_loss"
    check_float_array("pred", pred, op)
    check_float_array("target", target, op)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"{op}: pred and target must have the same shape, got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    diff = xp.subtract(pred, target)
    if reduction == "none":
        loss = diff * diff
    else:
        flat = diff.reshape(-1)
        loss = xp.dot(flat, flat)                                      # sum of squares, 0-d
        if reduction == "mean":
            loss = loss / diff.size if diff.size else xp.asarray(float("nan"), dtype=diff.dtype)
        loss = xp.asarray(loss, dtype=diff.dtype)
    return loss, (diff, reduction)


def mse_loss_backward(dloss, cache):
    """Returns ``(dpred, None)``: dpred = 2 (pred - target) dloss, divided by the element count
    for "mean" (dloss a scalar for "mean"/"sum", pred's shape for "none"). target gets none."""
    diff, reduction = cache
    scale = 2.0 / diff.size if reduction == "mean" and diff.size else 2.0
    dloss = asarray(dloss, dtype=diff.dtype)
    dpred = diff * dloss
    dpred *= scale
    return dpred, None


# --------------------------------------------------------------------------------- cross-entropy
class CrossEntropyCache(NamedTuple):
    """What ``cross_entropy_backward`` needs from the forward."""
    p: object             # softmax of the logits (N', K)
    safe_labels: object   # labels (N',), ignored rows read class 0
    keep: object          # bool (N',): the labelled rows
    n: int                # number of labelled rows
    logits_shape: tuple   # (..., K)


def cross_entropy_forward(logits, labels, ignore_index: int = -100):
    """Mean over labelled positions of -log softmax(logits)[label], classes on the last axis.

    logits (..., K) floating, labels (...) integers in [0, K) or ``ignore_index`` (skipped, as in
    torch). Equals torch.nn.functional.cross_entropy(logits.reshape(-1, K), labels.reshape(-1)).
    Stable: log-sum-exp with the row maximum subtracted. Returns ``(loss, cache)`` with loss a 0-d
    array (NaN when no position is labelled, as torch); cache a ``CrossEntropyCache``.
    """
    op = "cross_entropy"
    check_float_array("logits", logits, op)
    if logits.ndim < 1 or logits.shape[-1] == 0:
        raise ValueError(f"{op}: logits must have a non-empty class axis (..., K), got shape {tuple(logits.shape)}")
    if not hasattr(labels, "dtype") or labels.dtype.kind not in "iu":
        raise TypeError(f"{op}: labels must be an integer array, got {getattr(labels, 'dtype', type(labels).__name__)}")
    k = logits.shape[-1]
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"{op}: labels must have shape {tuple(logits.shape[:-1])} (logits without the "
                         f"class axis), got {tuple(labels.shape)}")
    z = logits.reshape(-1, k)                                           # (N', K)
    lab = labels.reshape(-1)
    keep = lab != ignore_index
    if lab.size:
        bad = keep & ((lab < 0) | (lab >= k))
        if bool(bad.any()):
            raise ValueError(f"{op}: labels must lie in [0, {k}) or equal ignore_index={ignore_index}, "
                             f"got {int(lab[bad][0])}")
    n = int(keep.sum())
    if isinstance(labels, numpy.ndarray):         # host labels: checked and counted above without a device
        lab, keep = asarray(lab), asarray(keep)   # sync, then moved (a no-op on NumPy)
    safe = xp.where(keep, lab, 0)                                       # ignored rows read class 0
    e = xp.subtract(z, z.max(axis=1, keepdims=True))                    # z - max     (N', K)
    picked = xp.take_along_axis(e, safe[:, None], axis=1)[:, 0]         # (z - max)[label]
    xp.exp(e, out=e)
    s = e.sum(axis=1)                                                   # sum exp     (N',)
    e /= s[:, None]                                                     # softmax p
    nll = xp.log(s) - picked                                            # lse - z[label]
    total = xp.sum(xp.where(keep, nll, 0.0))
    loss = xp.asarray(total / n if n else float("nan"), dtype=logits.dtype)
    return loss, CrossEntropyCache(e, safe, keep, n, logits.shape)


def cross_entropy_backward(dloss, cache):
    """Returns ``(dlogits, None)``: dlogits = (p - onehot(label)) dloss / N on labelled rows,
    zero on ignored rows; labels get none."""
    p, safe, keep, n, shape = cache
    dlogits = p.copy()
    rows = xp.arange(p.shape[0])
    dlogits[rows, safe] -= 1.0
    dlogits *= keep[:, None].astype(p.dtype)
    dlogits *= asarray(dloss, dtype=p.dtype) * (1.0 / n if n else float("nan"))
    return dlogits.reshape(shape), None


# --------------------------------------------------------------------------------- Gaussian KL
_KL_NAMES = ("mean1", "logvar1", "mean2", "logvar2")


class GaussianKLCache(NamedTuple):
    """What ``gaussian_kl_backward`` needs from the forward."""
    diff: object          # mean1 - mean2
    ratio: object         # exp(logvar1 - logvar2) = var1 / var2
    inv_var2: object      # exp(-logvar2)
    shapes: tuple         # each argument's shape, None for a float
    full_shape: tuple     # the broadcast shape (kl's)


def gaussian_kl_forward(mean1, logvar1, mean2, logvar2):
    """Element-wise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) of diagonal Gaussians:

        kl = (logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2) - 1) / 2

    in nats (guided-diffusion's ``normal_kl``). The four arguments broadcast together; Python
    floats are accepted for a fixed distribution (mean2 = 0.0, logvar2 = 0.0 gives the VAE's KL
    to N(0, 1)). Returns ``(kl, cache)`` with kl of the broadcast shape in the arrays' dtype;
    cache a ``GaussianKLCache``.
    """
    op = "gaussian_kl"
    args = (mean1, logvar1, mean2, logvar2)
    dtype = None
    for name, a in zip(_KL_NAMES, args):
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            continue
        check_float_array(name, a, op)
        dtype = dtype or a.dtype
    if dtype is None:
        raise TypeError(f"{op}: at least one of {', '.join(_KL_NAMES)} must be an array")
    shapes = tuple(None if isinstance(a, (int, float)) else tuple(a.shape) for a in args)
    try:
        full = numpy.broadcast_shapes(*(s for s in shapes if s is not None))
    except ValueError:
        raise ValueError(f"{op}: {', '.join(_KL_NAMES)} must broadcast together, got shapes "
                         f"{', '.join(str(s if s is not None else 'float') for s in shapes)}") from None
    mean1, logvar1, mean2, logvar2 = (xp.asarray(a, dtype=dtype) for a in args)
    diff = xp.subtract(mean1, mean2)                                   # m1 - m2
    ratio = xp.exp(xp.subtract(logvar1, logvar2))                      # var1 / var2
    inv_var2 = xp.exp(xp.negative(logvar2))                            # 1 / var2
    kl = xp.zeros(full, dtype=dtype)
    kl += diff
    kl *= diff
    kl *= inv_var2
    kl += ratio
    kl += logvar2
    kl -= logvar1
    kl -= 1.0
    kl *= 0.5
    return kl, GaussianKLCache(diff, ratio, inv_var2, shapes, full)


def gaussian_kl_backward(dkl, cache):
    """Returns ``(dmean1, dlogvar1, dmean2, dlogvar2)``, each summed back to its argument's
    shape (None for an argument given as a float):

        dmean1 = dkl (mean1 - mean2) exp(-logvar2),          dmean2 = -dmean1
        dlogvar1 = dkl (exp(logvar1 - logvar2) - 1) / 2
        dlogvar2 = dkl (1 - exp(logvar1 - logvar2) - (mean1 - mean2)^2 exp(-logvar2)) / 2
                 = -dlogvar1 - (mean1 - mean2) dmean1 / 2
    """
    diff, ratio, inv_var2, shapes, full = cache
    dkl = xp.broadcast_to(xp.asarray(dkl, dtype=diff.dtype), full)
    dm1 = dkl * diff
    dm1 *= inv_var2
    dlv1 = dkl * ratio
    dlv1 -= dkl
    dlv1 *= 0.5
    dlv2 = dm1 * diff
    dlv2 *= -0.5
    dlv2 -= dlv1
    grads = (dm1, dlv1, xp.negative(dm1), dlv2)
    return tuple(None if s is None else _unbroadcast(g, s) for g, s in zip(grads, shapes))


mse_loss = mse_loss_forward
cross_entropy = cross_entropy_forward
gaussian_kl = gaussian_kl_forward
