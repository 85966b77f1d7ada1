"""Multi-head scaled-dot-product attention as a forward/backward pair.

Shapes: B batch, H heads, Tq queries, Tk keys, D query/key width per head, Dv value width per head.
q (B, H, Tq, D), k (B, H, Tk, D), v (B, H, Tk, Dv) -> out (B, H, Tq, Dv).
S = scale * q k^T + mask (B, H, Tq, Tk) are the scores, P = softmax(S) over the keys the
probabilities, out = P v.
Derivation of the backward, the chunked recomputation and the masking rules: docs/ops/attention.md.

Numerics and memory:

* float16 inputs are computed in float32 (scores, softmax and the products with v), and the
  output and gradients are cast back to float16; float32 and float64 compute in their own dtype.
* The softmax is stable: the row maximum is subtracted, unless every score is provably small
  (|q.k| <= |q| |k| below 64 in float32, 600 in float64, and no mask), when exp cannot overflow
  or underflow and the shift changes nothing but rounding. The forward keeps the *unnormalized*
  E = exp(S - rowmax) and r = 1 / rowsum(E), so P = E * r is never formed: the normalization is
  applied to the small (Tq, Dv) side instead (out = (E v) * r), which saves one pass over the
  (Tq, Tk) matrix in the forward and costs nothing in the backward.
* ``chunk_size=n`` processes n query rows at a time, so at most a (B, H, n, Tk) block of scores
  exists at once. The cache then holds q, k, v, out and the row log-sum-exp, and the backward
  recomputes each block of probabilities. Results equal the plain path to rounding.
* A query row whose scores are all ``-inf`` (every key masked out) gets a zero output row and zero
  gradients, as torch's ``scaled_dot_product_attention`` does, instead of NaNs.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

from npdiffusion.backend import get_backend, xp
from npdiffusion.checks import compute_dtype
from npdiffusion.ops.reductions import row_dot


def _check_inputs(q, k, v):
    for name, a in (("q", q), ("k", k), ("v", v)):
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise TypeError(f"attention: {name} must be an array, got {type(a).__name__}")
        if a.ndim != 4:
            raise ValueError(f"attention: {name} must have 4 dimensions (B, heads, T, d), got shape {tuple(a.shape)}")
        if a.dtype.kind != "f":
            raise TypeError(f"attention: {name} must be a floating array, got dtype {a.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"attention: q, k and v must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]:
        raise ValueError(
            "attention: q, k and v must agree on (B, heads), got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"attention: k and v must have the same number of keys (axis 2), got shapes "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: q and k must have the same width (axis 3), got shapes "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    if k.shape[2] == 0:
        raise ValueError(f"attention: k must have at least one key (axis 2), got shape {tuple(k.shape)}")


def _prepare_mask(mask, full_shape, cdt):
    """``mask`` as a 4-d additive array of the compute dtype, broadcastable to ``full_shape``."""
    if mask is None:
        return None
    if not hasattr(mask, "shape") or not hasattr(mask, "dtype"):
        raise TypeError(f"attention: mask must be an array or None, got {type(mask).__name__}")
    shape = tuple(mask.shape)
    ok = len(shape) <= 4 and all(m in (1, f) for m, f in zip(shape[::-1], full_shape[::-1]))
    if not ok:
        raise ValueError(f"attention: mask must be broadcastable to (B, heads, Tq, Tk) = {full_shape}, "
                         f"got shape {shape}")
    if mask.dtype.kind == "b":  # torch's convention: True takes part in attention, False is masked
        mask = xp.where(mask, 0.0, -xp.inf).astype(cdt)
    elif mask.dtype.kind == "f":
        mask = mask.astype(cdt, copy=False)
    else:
        raise TypeError(f"attention: mask must be an additive float array (or bool), got dtype {mask.dtype}")
    return mask.reshape((1,) * (4 - len(shape)) + shape)


def _causal_bias(r0, r1, tk, cdt):
    """(r1 - r0, Tk) additive mask: -inf where key j > query i (torch's top-left alignment)."""
    rows = xp.arange(r0, r1)[:, None]
    cols = xp.arange(tk)[None, :]
    return xp.where(cols > rows, -xp.inf, 0.0).astype(cdt)


def _check_options(scale, causal, chunk_size, d):
    if scale is None:
        scale = float(d) ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"attention: scale must be a real number or None, got {scale!r}")
    if not isinstance(causal, (bool, numbers.Integral)) or causal not in (0, 1):
        raise TypeError(f"attention: causal must be a bool, got {causal!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size <= 0):
        raise ValueError(f"attention: chunk_size must be a positive int or None, got {chunk_size!r}")
    return float(scale), bool(causal)


def _row_max(s):
    """max over the last axis, keepdims. NumPy reduces a short last axis (16-32 keys) one row at a
    time, ~10x slower than Tk element-wise maxima of strided columns, so short rows use those."""
    tk = s.shape[-1]
    if tk > 32:
        return xp.max(s, axis=-1, keepdims=True)
    m = s[..., :1].copy()
    for j in range(1, tk):
        xp.maximum(m, s[..., j:j + 1], out=m)
    return m


def _row_sum(s):
    """sum over the last axis, keepdims, as a product with a ones vector (a GEMV: much faster than
    NumPy's reduction over short rows; docs/benchmarks.md, "Figures behind the code's constants")."""
    return xp.matmul(s, xp.ones((s.shape[-1], 1), dtype=s.dtype))


# |score| bound below which exp(score) neither overflows (even summed over 1e9 keys) nor leaves
# the normal range, so the softmax need not subtract the row maximum (exp(64) = 6e27).
_EXP_SAFE = {4: 64.0, 8: 600.0}


def _small_scores(qs, kT):
    """Whether every score q.k (scale folded into q) is below ``_EXP_SAFE`` in absolute value, by
    Cauchy-Schwarz: |q_i . k_j| <= max_i |q_i| max_j |k_j|. Two reductions over q and k instead of
    a row maximum over the (Tq, Tk) scores, which NumPy computes one short row at a time
    (docs/ops/attention.md, "When the row maximum is skipped").

    On CuPy: False, without looking. The test would wait for the device (two host
    synchronizations per call), and a GPU computes the row maximum at memory speed, so CuPy always
    subtracts it (issue #18; NumPy is unchanged)."""
    if get_backend() != "numpy":
        return False
    q2 = xp.einsum("...d,...d->...", qs, qs).max()
    k2 = xp.einsum("...dk,...dk->...k", kT, kT).max()
    return float(q2) * float(k2) < _EXP_SAFE.get(qs.dtype.itemsize, 64.0) ** 2


def _scores(qs, kT, mask, causal, r0, r1, shift=True):
    """E = exp(S - rowmax(S)) in place of the fresh score block, and the row sums l and maxima m.

    qs (B, H, n, D) is the (scaled) query block of rows r0..r1, kT (B, H, D, Tk).
    Returns (e (B, H, n, Tk), m (B, H, n, 1), l (B, H, n, 1)); rows with every score -inf get
    m = 0, e = 0 and l = 0. ``shift=False`` (only when ``_small_scores`` holds and there is no
    mask): m = 0, E = exp(S), the same softmax without the row maximum.
    """
    s = xp.matmul(qs, kT)                                   # (B, H, n, Tk)
    if mask is not None:
        s += mask if mask.shape[2] == 1 else mask[:, :, r0:r1]
    if causal:
        s += _causal_bias(r0, r1, kT.shape[-1], s.dtype)
    if shift:
        m = _row_max(s)
        m = xp.where(m == -xp.inf, 0.0, m)                  # fully masked row: keep -inf - 0 = -inf
        s -= m
    else:
        m = xp.zeros(s.shape[:-1] + (1,), dtype=s.dtype)
    xp.exp(s, out=s)
    return s, m, _row_sum(s)


def _row_dots(a, b):
    """sum(a * b) over the last axis, keepdims: (B, H, T, D) -> (B, H, T, 1), without the product's
    temporary or NumPy's per-row reduction (docs/benchmarks.md, "Figures behind the code's
    constants")."""
    return row_dot(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])).reshape(a.shape[:-1] + (1,))


def _reciprocal(l):
    """1 / l, with 0 for the empty rows (l = 0)."""
    empty = l == 0
    return xp.where(empty, 0.0, xp.reciprocal(xp.where(empty, 1.0, l)))


class PlainAttentionCache(NamedTuple):
    """What ``attention_backward`` needs from the plain (one block) forward."""
    qs: object            # scale * q (B, H, Tq, D) in the compute dtype
    k: object             # (B, H, Tk, D)
    v: object             # (B, H, Tk, Dv)
    e: object             # E = exp(S - rowmax) (B, H, Tq, Tk), unnormalized: P = E * r
    r: object             # 1 / rowsum(E) (B, H, Tq, 1), 0 for a fully masked row
    out: object           # (B, H, Tq, Dv) in the compute dtype
    scale: float
    dtype: object         # q's dtype (the gradients are cast back to it)


class ChunkedAttentionCache(NamedTuple):
    """What ``attention_backward`` needs from the chunked forward (it recomputes P per block)."""
    qs: object            # scale * q (B, H, Tq, D) in the compute dtype
    k: object             # (B, H, Tk, D)
    v: object             # (B, H, Tk, Dv)
    out: object           # (B, H, Tq, Dv) in the compute dtype
    lse: object           # row log-sum-exp of S (B, H, Tq, 1), +inf for a fully masked row
    mask: object          # the additive mask in the compute dtype, or None
    causal: bool
    chunk_size: int
    scale: float
    dtype: object         # q's dtype (the gradients are cast back to it)


def attention_forward(q, k, v, mask=None, causal=False, scale=None, chunk_size=None):
    """out = softmax(scale * q k^T + mask) v over the keys, per batch item and head.

    q (B, H, Tq, D), k (B, H, Tk, D), v (B, H, Tk, Dv) -> out (B, H, Tq, Dv).

    ``mask``: additive float mask broadcastable to (B, H, Tq, Tk) (``-inf`` or a large negative
    number removes a key; a bool mask is accepted too, True = attend, as in torch). It gets no
    gradient. ``causal``: also removes every key j > query i. ``scale`` defaults to D**-0.5.
    ``chunk_size``: compute n query rows at a time (see the module docstring).

    Returns ``(out, cache)``: a ``PlainAttentionCache`` (keeps E and r), or with ``chunk_size`` a
    ``ChunkedAttentionCache`` (keeps the row log-sum-exp and the mask instead). ``out`` itself is kept: do not modify it in place before backward.
    """
    _check_inputs(q, k, v)
    B, H, Tq, D = q.shape
    Tk, Dv = v.shape[2], v.shape[3]
    scale, causal = _check_options(scale, causal, chunk_size, D)
    cdt = compute_dtype(q.dtype, "attention", "q")
    mask = _prepare_mask(mask, (B, H, Tq, Tk), cdt)
    qs = xp.multiply(q, scale, dtype=cdt)                   # scale folded into q: (Tq, D), not (Tq, Tk)
    k = k.astype(cdt, copy=False)
    v = v.astype(cdt, copy=False)
    # k^T as its own contiguous (B, H, D, Tk) array: NumPy's batched matmul with a small transposed
    # view takes a slow path that costs more than the copy (docs/benchmarks.md, "Figures behind
    # the code's constants"); the large e and ds take their transposed views fine.
    kT = xp.ascontiguousarray(k.swapaxes(-1, -2))           # (B, H, D, Tk)

    shift = mask is not None or causal or not _small_scores(qs, kT)
    if chunk_size is None or chunk_size >= Tq:
        e, _, l = _scores(qs, kT, mask, causal, 0, Tq, shift)
        r = _reciprocal(l)
        out = xp.matmul(e, v)                               # (B, H, Tq, Dv)
        out *= r
        cache = PlainAttentionCache(qs, k, v, e, r, out, scale, q.dtype)
    else:
        out = xp.empty((B, H, Tq, Dv), dtype=cdt)
        lse = xp.empty((B, H, Tq, 1), dtype=cdt)
        for r0 in range(0, Tq, chunk_size):
            r1 = min(r0 + chunk_size, Tq)
            e, m, l = _scores(qs[:, :, r0:r1], kT, mask, causal, r0, r1, shift)
            o = xp.matmul(e, v)
            o *= _reciprocal(l)
            out[:, :, r0:r1] = o
            empty = l == 0
            lse_c = xp.log(xp.where(empty, 1.0, l))
            lse_c += m
            lse[:, :, r0:r1] = xp.where(empty, xp.inf, lse_c)   # exp(S - inf) = 0: the zero row again
        cache = ChunkedAttentionCache(qs, k, v, out, lse, mask, causal, chunk_size, scale, q.dtype)
    return out.astype(q.dtype, copy=False), cache


def attention_backward(dout, cache):
    """Gradients ``(dq, dk, dv)`` of the forward's q, k, v (the mask gets none).

    With P = E * r, dO = dout and Dsum = rowsum(dO * out) (= rowsum(dP * P)):
    dV = P^T dO, dP = dO V^T, dS = P * (dP - Dsum), dQ = scale dS K, dK = scale dS^T Q.
    Derivation: docs/ops/attention.md.
    """
    if not isinstance(cache, (PlainAttentionCache, ChunkedAttentionCache)):
        raise ValueError("attention_backward: cache was not made by attention_forward "
                         f"(got {type(cache).__name__})")
    if tuple(getattr(dout, "shape", ())) != tuple(cache.out.shape):
        raise ValueError(f"attention_backward: dout must have the output's shape {tuple(cache.out.shape)}, "
                         f"got {tuple(getattr(dout, 'shape', ()))}")
    if isinstance(cache, PlainAttentionCache):
        qs, k, v, e, r, out, scale, dtype = cache
        cdt = qs.dtype
        do = dout.astype(cdt, copy=False)
        dsum = _row_dots(do, out)                           # (B, H, Tq, 1) = rowsum(dP * P)
        dsum *= r
        dor = do * r                                        # dO * r: P^T dO = E^T (dO * r)
        dv = xp.matmul(e.swapaxes(-1, -2), dor)             # (B, H, Tk, Dv)
        ds = xp.matmul(dor, xp.ascontiguousarray(v.swapaxes(-1, -2)))   # r * dP (B, H, Tq, Tk)
        ds -= dsum
        ds *= e                                             # dS = P * (dP - Dsum)
        dq = xp.matmul(ds, k)                               # (B, H, Tq, D)
        dq *= scale
        dk = xp.matmul(ds.swapaxes(-1, -2), qs)             # dS^T (scale q)
    else:
        qs, k, v, out, lse, mask, causal, chunk_size, scale, dtype = cache
        cdt = qs.dtype
        do = dout.astype(cdt, copy=False)
        dsum = _row_dots(do, out)                           # (B, H, Tq, 1)
        kT, vT = (xp.ascontiguousarray(a.swapaxes(-1, -2)) for a in (k, v))
        Tq = qs.shape[2]
        dq = xp.empty(qs.shape, dtype=cdt)
        dk = xp.zeros(k.shape, dtype=cdt)
        dv = xp.zeros(v.shape, dtype=cdt)
        for r0 in range(0, Tq, chunk_size):
            r1 = min(r0 + chunk_size, Tq)
            qs_c, do_c = qs[:, :, r0:r1], do[:, :, r0:r1]
            p = xp.matmul(qs_c, kT)                         # recomputed scores (B, H, n, Tk)
            if mask is not None:
                p += mask if mask.shape[2] == 1 else mask[:, :, r0:r1]
            if causal:
                p += _causal_bias(r0, r1, kT.shape[-1], cdt)
            p -= lse[:, :, r0:r1]
            xp.exp(p, out=p)                                # P block
            dv += xp.matmul(p.swapaxes(-1, -2), do_c)
            ds = xp.matmul(do_c, vT)                        # dP block
            ds -= dsum[:, :, r0:r1]
            ds *= p                                         # dS block
            dq_c = xp.matmul(ds, k)
            dq_c *= scale
            dq[:, :, r0:r1] = dq_c
            dk += xp.matmul(ds.swapaxes(-1, -2), qs_c)
    return dq.astype(dtype, copy=False), dk.astype(dtype, copy=False), dv.astype(dtype, copy=False)
