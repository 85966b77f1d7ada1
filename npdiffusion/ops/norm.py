"""Group normalization and layer normalization, as forward/backward pairs.

Shape legend: B batch, C channels, G groups, Cg = C/G channels per group, S the product of the
spatial sides (any number of spatial axes, zero included), M the size of one normalized set
(Cg*S for group norm, the product of the normalized axes for layer norm), N the number of
normalized sets (rows) of layer norm.

Both ops share one notation (derivation: docs/ops/normalization.md):

    mu = mean(x),  var = mean((x - mu)^2),  r = 1/sqrt(var + eps)     per normalized set
    xhat = (x - mu) * r,   y = gamma * xhat + beta
    g = dy * gamma
    dx = r * (g - mean(g) - xhat * mean(g * xhat))                    means over the set
    dgamma = sum(dy * xhat),   dbeta = sum(dy)                        sums over everything else

Numerics and speed:

* Group norm works per cache block of samples: each block's statistics pass reads it from
  memory and the passes after it find it in cache (torch's fused kernel reads x once; NumPy
  makes one pass per ufunc, so this is how we get close).
* Statistics in one pass over x: the row sums and the sums of squares (a batched dot product),
  so no centered temporary is made. One-pass variance (E[x^2] - mu^2) cancels badly when
  |mu| >> sigma, so every set whose mu^2 exceeds ``_ONE_PASS_MAX_RATIO * var`` is redone with
  the corrected two-pass formula, and group norm then keeps x - mu instead of x so that its
  per-channel form does not cancel either. Both paths are exercised by the tests.
* float16 inputs are computed in float32 and the results cast back (torch does the same on CPU).
* Group norm never materializes xhat: y = x * a + b with per-(batch, channel) coefficients
  a = r * gamma, b = beta - mu * a, and the backward is written the same way,
  dx = dy * a + x * k + k0, with per-(batch, group) k, k0 (two passes fewer than via xhat).
* Layer norm caches xhat itself (gamma varies along the normalized axes, so per-row coefficients
  do not help there).
"""
from __future__ import annotations

from typing import NamedTuple

from npdiffusion.backend import get_backend, xp
from npdiffusion.checks import check_float_array, check_int, compute_dtype
from npdiffusion.ops.reductions import column_sum, row_dot, row_sum
from npdiffusion.parallel import cache_blocks, parallel_for

# Largest mu^2 / var for which the one-pass variance is trusted (a loss of at most ~4 bits
# relative to the two-pass formula); sets above it are recomputed with the two-pass formula.
_ONE_PASS_MAX_RATIO = 16.0


def _compute_dtype(x, op):
    check_float_array("x", x, op)
    return compute_dtype(x.dtype, op)


def _check_param(op, name, p, shape):
    if p is None:
        return
    if tuple(p.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(p.shape)}")


def _prod(sides):
    out = 1
    for side in sides:
        out *= int(side)
    return out


def _two_pass(rows, mean, m):
    """The corrected two-pass variance of each row, and ``mean`` corrected in place (the
    correction also repairs the rounding of mu itself)."""
    centered = rows - mean[:, None]                                   # (R, M)
    corr = row_sum(centered) * (1.0 / m)
    var = row_dot(centered, centered) * (1.0 / m) - corr * corr
    mean += corr
    return var


def _moments(rows, eps):
    """(mean, rstd, cancels) of each row of ``rows`` (R, M): one pass, two passes for the rows
    where it cancels; ``cancels`` says whether any row did (|mu| >> sigma somewhere).

    On CuPy every row takes the two-pass formula and ``cancels`` is True: deciding which rows
    cancel would need the device's answer on the host (a synchronization per norm call), and the
    GPU's extra pass over the rows costs less than that wait (issue #18; NumPy is unchanged)."""
    m = max(rows.shape[-1], 1)
    mean = row_sum(rows)
    mean *= 1.0 / m
    if get_backend() != "numpy":
        var = _two_pass(rows, mean, m)
        return mean, _rstd(var, eps), True
    var = row_dot(rows, rows)
    var *= 1.0 / m
    var -= mean * mean
    bad = mean * mean > _ONE_PASS_MAX_RATIO * var
    cancels = bool(bad.any())
    if cancels:
        # Corrected two-pass formula: the correction also repairs the rounding of mu itself.
        centered = rows[bad] - mean[bad][:, None]                     # (R_bad, M)
        corr = row_sum(centered) * (1.0 / m)
        var[bad] = row_dot(centered, centered) * (1.0 / m) - corr * corr
        mean[bad] += corr
    return mean, _rstd(var, eps), cancels


def _rstd(var, eps):
    """1/sqrt(max(var, 0) + eps), in var's memory."""
    xp.maximum(var, 0.0, out=var)
    var += eps
    rstd = xp.sqrt(var, out=var)
    return xp.reciprocal(rstd, out=rstd)


# --------------------------------------------------------------------------------- group norm
# Samples per block: about this many entries (2 MB of float32, a core's L2 cache), so that the
# passes after the statistics pass find the block in cache; larger blocks also mean fewer GIL
# hand-offs between the threads (docs/benchmarks.md, "2026-11-27: GIL hand-offs").
_GROUP_NORM_BLOCK = 1 << 19
# Within a block, the backward's element-wise passes run per sub-block of about this many entries
# (512 KB of float32 per array), so that the temporary x * k + k0 stays in the L2 cache
# (docs/benchmarks.md, "2026-11-27, morning"); on CuPy one sub-block (parallel.py's policy).
_CACHE_ENTRIES = 1 << 17


def _per_channel(per_group, cg):
    """(n, G) per-group values -> (n, G*cg) per-channel values (each repeated cg times)."""
    return xp.repeat(per_group, cg, axis=1)


def _affine(mean, rstd, cg, gamma, beta):
    """Per-(sample, channel) a, shift with y = x * a + shift: a = r * gamma, shift = beta - mu * a;
    (n, C)."""
    a = _per_channel(rstd, cg)
    if gamma is not None:
        a *= gamma
    shift = _per_channel(mean, cg)
    shift *= a
    xp.negative(shift, out=shift)
    if beta is not None:
        shift += beta
    return a, shift


def _scale_shift(x, a, shift, out):
    """out = x * a + shift for x, out (n, C, S) and per-(sample, channel) a, shift (n, C)."""
    xp.multiply(x, a[:, :, None], out=out)
    out += shift[:, :, None]


class GroupNormCache(NamedTuple):
    """What ``group_norm_backward`` needs from the forward."""
    x: object             # x as (B, C, S) in the compute dtype; x - mu when ``centered``
    mean: object          # mu (B, G)
    rstd: object          # r = 1/sqrt(var + eps) (B, G)
    centered: bool        # x holds x - mu (some group had |mu| >> sigma)
    weight: object        # gamma (C,) as given, or None
    has_bias: bool
    in_dtype: object      # x's dtype (dx is cast back to it)
    in_shape: tuple       # x's shape (B, C, *spatial)


def group_norm_forward(x, num_groups, weight=None, bias=None, eps=1e-5):
    """Group normalization of x (B, C, *spatial) over groups of C/G consecutive channels.

    weight (gamma) and bias (beta) are per channel (C,), each optional. Equals
    torch.nn.functional.group_norm. Returns ``(y, cache)`` with y of x's shape and dtype and
    cache a ``GroupNormCache``. Everything runs per block of samples (the statistics, then y = x * a + shift,
    while the block is in cache), the blocks spread over the CPU's threads
    (npdiffusion/parallel.py). Derivation: docs/ops/normalization.md.
    """
    op = "group_norm"
    cdt = _compute_dtype(x, op)
    if x.ndim < 2:
        raise ValueError(f"{op}: x must have shape (B, C, *spatial), got shape {tuple(x.shape)}")
    num_groups = check_int("num_groups", num_groups, where=op)
    b, c = x.shape[0], x.shape[1]
    if c % num_groups:
        raise ValueError(f"{op}: the {c} channels of x (shape {tuple(x.shape)}) are not divisible "
                         f"into num_groups={num_groups} groups")
    _check_param(op, "weight", weight, (c,))
    _check_param(op, "bias", bias, (c,))
    g, cg = num_groups, c // num_groups
    s = _prod(x.shape[2:])
    eps = float(eps)
    x_bcs = x.astype(cdt, copy=False).reshape(b, c, s)                 # (B, C, S), copy if strided
    gamma = None if weight is None else weight.astype(cdt, copy=False)
    beta = None if bias is None else bias.astype(cdt, copy=False)
    mean, rstd = xp.empty((b, g), dtype=cdt), xp.empty((b, g), dtype=cdt)
    y = xp.empty((b, c, s), dtype=cdt)

    def block(lo, hi):                                                 # samples [lo, hi)
        m, r, cancels = _moments(x_bcs[lo:hi].reshape((hi - lo) * g, cg * s), eps)
        mean[lo:hi], rstd[lo:hi] = m.reshape(hi - lo, g), r.reshape(hi - lo, g)
        if not cancels:
            _scale_shift(x_bcs[lo:hi], *_affine(mean[lo:hi], rstd[lo:hi], cg, gamma, beta), y[lo:hi])
        return cancels

    centered = any(parallel_for(block, b, c * s, _GROUP_NORM_BLOCK, row_length=s))
    x_saved = x_bcs                                                    # what the backward reads
    if centered:
        # |mu| >> sigma somewhere: x * a - mu * a would cancel, so keep x - mu instead of x (one
        # more pass, only then); y, the backward's sums and its x * k + k0 all use it with mu = 0.
        x_saved = x_bcs - _per_channel(mean, cg)[:, :, None]
        a, shift = _affine(xp.zeros_like(mean), rstd, cg, gamma, beta)   # (B, C)
        parallel_for(lambda lo, hi: _scale_shift(x_saved[lo:hi], a[lo:hi], shift[lo:hi], y[lo:hi]),
                     b, c * s, row_length=s)
    y = y.reshape(x.shape).astype(x.dtype, copy=False)
    return y, GroupNormCache(x_saved, mean, rstd, centered, weight, bias is not None, x.dtype, x.shape)


def group_norm_backward(dy, cache):
    """Returns ``(dx, dweight, dbias)`` (None for an absent weight or bias).

    With g = dy * gamma and means over each group:
    dx = r (g - mean(g) - xhat mean(g xhat)), dgamma = sum_{B,S} dy xhat, dbeta = sum_{B,S} dy.
    Expanded: dx = dy * (r gamma) + x * k + k0 with k, k0 per (sample, group)
    (docs/ops/normalization.md). Everything but the final sums over the batch runs per block of
    samples (the sums over S, then dx per sub-block while it is in cache), the blocks spread over
    the CPU's threads.
    """
    x_saved, mean, rstd, centered, weight, has_bias, in_dtype, in_shape = cache
    b, c, s = x_saved.shape
    g = mean.shape[1]
    cg = c // g
    inv_m = 1.0 / max(cg * s, 1)
    cdt = x_saved.dtype
    if centered:                                                       # x_saved holds x - mu
        mean = xp.zeros_like(mean)
    dyc = dy.astype(cdt, copy=False).reshape(b, c, s)                  # (B, C, S)
    gamma = None if weight is None else weight.astype(cdt, copy=False)
    sum_dy = xp.empty((b, c), dtype=cdt)                               # sum_S dy        (B, C)
    sum_dy_x = xp.empty((b, c), dtype=cdt)                             # sum_S dy x      (B, C)
    dx = xp.empty((b, c, s), dtype=cdt)
    rstd_c = _per_channel(rstd, cg)                                    # (B, C)
    a = rstd_c if gamma is None else rstd_c * gamma                    # dx = dy * a + ...

    def block(lo, hi):                                                 # samples [lo, hi)
        n = hi - lo
        dyb, xb = dyc[lo:hi], x_saved[lo:hi]
        sum_dy[lo:hi] = row_sum(dyb.reshape(n * c, s)).reshape(n, c)
        sum_dy_x[lo:hi] = row_dot(dyb.reshape(n * c, s), xb.reshape(n * c, s)).reshape(n, c)
        # Group sums of g = dy * gamma and of g * x, then the group means of g and g * xhat:
        # mean(g xhat) = r (sum g x - mu sum g) / M.                   (n, G)
        sum_g_ch = sum_dy[lo:hi] if gamma is None else sum_dy[lo:hi] * gamma           # (n, C)
        sum_gx_ch = sum_dy_x[lo:hi] if gamma is None else sum_dy_x[lo:hi] * gamma     # (n, C)
        sum_g, sum_gx = sum_g_ch.reshape(n, g, cg).sum(axis=2), sum_gx_ch.reshape(n, g, cg).sum(axis=2)
        mu, r = mean[lo:hi], rstd[lo:hi]
        # dx = r*gamma*dy - r*mean(g) - r^2 (x - mu) mean(g xhat) = dy*a + x*k + k0, where k and
        # k0 are per group: x * k + k0 runs on the (n, G, Cg*S) view of x.
        k = (sum_g * mu - sum_gx) * (r * r * r * inv_m)
        k0 = -(r * sum_g) * inv_m - k * mu
        k, k0 = k[:, :, None], k0[:, :, None]
        subs = cache_blocks(n, c * s, _CACHE_ENTRIES)
        tmp = xp.empty((subs[0][1], g, cg * s), dtype=cdt)             # x * k + k0 of one sub-block
        for i, j in subs:
            t = tmp[:j - i]
            xp.multiply(xb[i:j].reshape(j - i, g, cg * s), k[i:j], out=t)
            t += k0[i:j]
            out = dx[lo + i:lo + j]
            xp.multiply(dyb[i:j], a[lo + i:lo + j, :, None], out=out)
            out += t.reshape(j - i, c, s)

    parallel_for(block, b, c * s, _GROUP_NORM_BLOCK, row_length=s)
    # dgamma = sum_{B,S} dy xhat = sum_B r (sum_S dy x - mu sum_S dy); dbeta = sum_{B,S} dy.
    dweight = dbias = None
    if weight is not None:
        dxhat = (sum_dy_x - _per_channel(mean, cg) * sum_dy) * rstd_c
        dweight = dxhat.sum(axis=0).astype(weight.dtype, copy=False)
    if has_bias:
        dbias = sum_dy.sum(axis=0).astype(in_dtype if weight is None else weight.dtype, copy=False)
    dx = dx.reshape(in_shape).astype(in_dtype, copy=False)
    return dx, dweight, dbias


# --------------------------------------------------------------------------------- layer norm
def _normalized_ndim(x, normalized_shape, weight, bias, op):
    if normalized_shape is None:
        ref = weight if weight is not None else bias
        if ref is None:
            raise ValueError(f"{op}: give normalized_shape, or a weight or bias whose shape is it")
        normalized_shape = tuple(ref.shape)
    elif isinstance(normalized_shape, int) and not isinstance(normalized_shape, bool):
        normalized_shape = (normalized_shape,)
    else:
        normalized_shape = tuple(normalized_shape)
    k = len(normalized_shape)
    if k == 0 or x.ndim < k or tuple(x.shape[x.ndim - k:]) != normalized_shape:
        raise ValueError(f"{op}: x must end with the normalized shape {normalized_shape}, "
                         f"got shape {tuple(x.shape)}")
    _check_param(op, "weight", weight, normalized_shape)
    _check_param(op, "bias", bias, normalized_shape)
    return normalized_shape


class LayerNormCache(NamedTuple):
    """What ``layer_norm_backward`` needs from the forward."""
    xhat: object          # (x - mu) * r as (N, M) in the compute dtype
    rstd: object          # r (N,)
    weight: object        # gamma (normalized shape) as given, or None
    has_bias: bool
    normalized_shape: tuple
    in_dtype: object      # x's dtype (dx is cast back to it)
    in_shape: tuple       # x's shape (..., *normalized_shape)


def layer_norm_forward(x, normalized_shape=None, weight=None, bias=None, eps=1e-5):
    """Layer normalization of x (..., *normalized_shape) over its last len(normalized_shape) axes.

    ``normalized_shape`` is an int or a tuple (default: the shape of weight, else of bias);
    weight (gamma) and bias (beta) have that shape, each optional. Equals
    torch.nn.functional.layer_norm. Returns ``(y, cache)``; cache a ``LayerNormCache``.
    Derivation: docs/ops/normalization.md.
    """
    op = "layer_norm"
    cdt = _compute_dtype(x, op)
    shape = _normalized_ndim(x, normalized_shape, weight, bias, op)
    msize = _prod(shape)
    rows = x.astype(cdt, copy=False).reshape(_prod(x.shape[:x.ndim - len(shape)]), msize)  # (N, M)
    mean, rstd, _ = _moments(rows, float(eps))                        # (N,); xhat is centered
    xhat = xp.subtract(rows, mean[:, None])
    xhat *= rstd[:, None]
    if weight is not None:
        y = xp.multiply(xhat, weight.astype(cdt, copy=False).reshape(-1))
        if bias is not None:
            y += bias.astype(cdt, copy=False).reshape(-1)
    elif bias is not None:
        y = xp.add(xhat, bias.astype(cdt, copy=False).reshape(-1))
    else:
        y = xhat.copy()
    y = y.reshape(x.shape).astype(x.dtype, copy=False)
    return y, LayerNormCache(xhat, rstd, weight, bias is not None, shape, x.dtype, x.shape)


def layer_norm_backward(dy, cache):
    """Returns ``(dx, dweight, dbias)`` (None for an absent weight or bias).

    With g = dy * gamma and means over each row: dx = r (g - mean(g) - xhat mean(g xhat)),
    dgamma = sum_N dy xhat, dbeta = sum_N dy (docs/ops/normalization.md).
    """
    xhat, rstd, weight, has_bias, shape, in_dtype, in_shape = cache
    n, m = xhat.shape
    cdt = xhat.dtype
    dyr = dy.astype(cdt, copy=False).reshape(n, m)                     # (N, M)
    pdt = in_dtype if weight is None else weight.dtype
    dweight = None
    if weight is not None:
        dweight = xp.einsum("nm,nm->m", dyr, xhat).reshape(shape).astype(pdt, copy=False)  # sum_N dy xhat
    dbias = column_sum(dyr).reshape(shape).astype(pdt, copy=False) if has_bias else None  # sum_N dy
    gr = dyr * weight.astype(cdt, copy=False).reshape(-1) if weight is not None else dyr.copy()
    mean_g = row_sum(gr) * (1.0 / max(m, 1))                          # (N,)
    mean_gx = row_dot(gr, xhat) * (1.0 / max(m, 1))                   # (N,)
    gr -= mean_g[:, None]
    mean_gx = mean_gx[:, None]
    gr -= xhat * mean_gx
    gr *= rstd[:, None]
    dx = gr.reshape(in_shape).astype(in_dtype, copy=False)
    return dx, dweight, dbias
