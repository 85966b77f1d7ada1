"""2-D convolution (cross-correlation, like ``torch.nn.functional.conv2d``) as GEMMs.

Shapes: B batch, C input channels, O output channels, H x W input, kh x kw kernel,
Ho x Wo output, K = C*kh*kw (the im2col depth), R rows of output in one chunk, L = Ho*Wo.
Tensors are NCHW like torch: x (B, C, H, W), weight (O, C, kh, kw), bias (O,), y (B, O, Ho, Wo).
Padding is zero padding; there is no dilation and no grouping (Stable Diffusion uses neither).

The im2col matrix is laid out channel-major, ``cols (C, kh, kw, B, R, Wo)`` viewed as the matrix
``(K, B*R*Wo)``, so that every GEMM is a plain 2-D matmul with no transposed copies:

* forward        y_t  (O, B*L) = W_col (O, K) @ cols(x) (K, B*L)           (then y = y_t^T + b)
* input grad     dx_t (C, B*H*W) = W_flip (C, O*kh*kw) @ cols(dy)          (stride 1: a "full"
  convolution of dy with the flipped kernel), or ``col2im(W_col^T @ dy_t)`` (stride > 1, or
  fewer input positions than channels, where copying the flipped kernel would dominate).
* weight grad    with the full convolution: G (O*kh*kw, C) = cols(dy) @ x_t^T (B*H*W, C), dW its
  rows un-flipped, so the backward builds no cols(x); otherwise
  dW^T (K, O) = cols(x) (K, B*L) @ dy_t^T (B*L, O).

``cols`` is filled by kh*kw slice copies (one per kernel offset; padding is never materialized:
each copy takes the in-bounds rectangle and zeroes the rest). It lives in a per-thread workspace
that is reused from call to call, so the forward caches only ``x`` and the backward builds what it
needs (``cols(dy)`` for stride 1, ``cols(x)`` otherwise). Everything runs in chunks of images /
output rows of about ``CHUNK_BYTES`` each, small enough to stay in cache between the copy and the
GEMM. The copies stay on one thread: OpenBLAS's idle thread spins on the second core after each
GEMM, so copies split over two threads make the convolution slower (docs/benchmarks.md, "Training
step"). For stride-1 "same"-width convolutions each slice copy moves whole (channel, image) planes
as one flat run (see ``_im2col``). A 1x1, stride-1, unpadded convolution is a batched matmul with
no im2col at all.

Derivation and measurements: docs/ops/convolution.md, docs/benchmarks.md.
"""
from __future__ import annotations

import threading
from typing import NamedTuple

from npdiffusion.backend import get_backend, xp
from npdiffusion.checks import check_pair, compute_dtype
from npdiffusion.ops.reductions import row_sum

#: Target size (bytes) of one im2col chunk, so that the GEMM reads the copies while they are in
#: cache; smaller chunks lose to per-GEMM thread start-up (the sweep: docs/benchmarks.md,
#: "Convolution: what was tried, predicted and measured").
CHUNK_BYTES = 8 * 2**20
#: The weight gradient is computed as (cols dy^T)^T from this many output positions B*Ho*Wo on.
TRANSPOSED_DW_MIN_POSITIONS = 1024
#: The same on the GPU (CuPy), where each chunk costs kernel launches and caches are no concern.
GPU_CHUNK_BYTES = 256 * 2**20

_local = threading.local()


# ----------------------------------------------------------------------------- arguments
def conv2d_output_size(size, kernel, stride=1, padding=0) -> tuple[int, int]:
    """(Ho, Wo) = floor((H + 2p - k) / s) + 1 per axis; a ValueError when the kernel does not fit."""
    kh, kw = check_pair("kernel_size", kernel, 1, "conv2d")
    sh, sw = check_pair("stride", stride, 1, "conv2d")
    ph, pw = check_pair("padding", padding, 0, "conv2d")
    h, w = size
    if h + 2 * ph < kh or w + 2 * pw < kw:
        raise ValueError(
            f"conv2d: padded input ({h + 2 * ph}, {w + 2 * pw}) is smaller than the kernel ({kh}, {kw}) "
            f"(input {h}x{w}, padding {(ph, pw)})"
        )
    return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1


# ----------------------------------------------------------------------------- workspace
def _workspace(slot: str, shape, dtype):
    """A reusable scratch array of ``shape`` (contents undefined), one per thread, slot and dtype.

    Never returned to callers and never cached across calls: only used inside one op call.
    """
    buffers = _local.__dict__.setdefault("buffers", {})
    n = 1
    for s in shape:
        n *= int(s)
    key = (slot, get_backend(), xp.dtype(dtype).str)
    buf = buffers.get(key)
    if buf is None or buf.size < n:
        buf = None
        buffers.pop(key, None)  # free the old one before allocating the bigger one
        buf = xp.empty(max(n, 1), dtype=dtype)
        buffers[key] = buf
    return buf[:n].reshape(shape)


def clear_workspace() -> None:
    """Free this thread's convolution scratch buffers (they are rebuilt on the next call)."""
    _local.__dict__.pop("buffers", None)


def _chunks(batch: int, rows: int, bytes_per_row: int):
    """Split the (image, output row) grid into chunks (b0, b1, r0, r1) of about ``CHUNK_BYTES``:
    runs of whole images, or row ranges of one image when a single image is bigger than that.
    An empty batch has no chunks: forward gives an empty y and backward zero dW/db, as torch."""
    if batch == 0:
        return []
    target = CHUNK_BYTES if get_backend() == "numpy" else GPU_CHUNK_BYTES
    per = max(1, target // max(bytes_per_row, 1))
    if per >= rows:
        nb = per // rows
        nb = -(-batch // -(-batch // nb))          # as many chunks, of equal size: 16 + 16, not 28 + 4
        return [(b0, min(batch, b0 + nb), 0, rows) for b0 in range(0, batch, nb)]
    return [(b, b + 1, r0, min(rows, r0 + per)) for b in range(batch) for r0 in range(0, rows, per)]


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def _valid_range(lo: int, hi: int, offset: int, stride: int, size: int) -> tuple[int, int]:
    """The outputs r in [lo, hi) whose input index r*stride + offset lies in [0, size)."""
    return max(lo, _ceil_div(-offset, stride)), min(hi, (size - 1 - offset) // stride + 1)


# ----------------------------------------------------------------------------- im2col / col2im
def _im2col(src, kh, kw, sh, sw, ph, pw, r0, r1, Wo, out):
    """Fill ``out (Ch, kh, kw, B, R, Wo)`` with ``src (Ch, B, H, W)`` (any strides):

    out[c, i, j, b, r - r0, w] = src[c, b, r*sh + i - ph, w*sw + j - pw], zero outside src.
    One slice copy per kernel offset (i, j); negative padding (a crop) is allowed.

    Fast path ("same" width, stride 1, rows of src contiguous): then output row r of offset
    (i, j) is source row r + i - ph shifted by d = j - pw columns, so a block of rows is one flat
    run of each (c, b) plane, copied in a single slice (long contiguous runs instead of one short
    run per row); the |d| entries per row that wrapped around from the neighbouring row are
    zeroed afterwards.
    """
    H, W = src.shape[2], src.shape[3]
    item = src.dtype.itemsize
    flat = (sh == 1 and sw == 1 and Wo == W and src.strides[3] == item and src.strides[2] == W * item)
    if flat:
        src_f = src.reshape(src.shape[0], src.shape[1], H * W)      # (Ch, B, H*W), a view
        out_f = out.reshape(out.shape[0], kh, kw, out.shape[3], (r1 - r0) * Wo)
    for i in range(kh):
        lo, hi = _valid_range(r0, r1, i - ph, sh, H)
        for j in range(kw):
            wlo, whi = _valid_range(0, Wo, j - pw, sw, W)
            dst = out[:, i, j]                                  # (Ch, B, R, Wo)
            if lo >= hi or wlo >= whi:
                dst[...] = 0
                continue
            a, b = lo - r0, hi - r0
            if a > 0:
                dst[:, :, :a] = 0
            if b < r1 - r0:
                dst[:, :, b:] = 0
            if flat:
                d, base, n = j - pw, (lo + i - ph) * W, (b - a) * W
                if d >= 0:
                    out_f[:, i, j, :, a * W:b * W - d] = src_f[:, :, base + d:base + n]
                else:
                    out_f[:, i, j, :, a * W - d:b * W] = src_f[:, :, base:base + n + d]
            if wlo > 0:
                dst[:, :, a:b, :wlo] = 0
            if whi < Wo:
                dst[:, :, a:b, whi:] = 0
            if not flat:
                dst[:, :, a:b, wlo:whi] = src[:, :, lo * sh + i - ph:(hi - 1) * sh + i - ph + 1:sh,
                                              wlo * sw + j - pw:(whi - 1) * sw + j - pw + 1:sw]


def _col2im_add(dcols, kh, kw, sh, sw, ph, pw, r0, r1, Wo, dst):
    """The adjoint of ``_im2col``: ``dst (Ch, B, H, W)`` (a view) += each offset's slice of
    ``dcols (Ch, kh, kw, B, R, Wo)``; contributions that fell on the zero padding are dropped."""
    H, W = dst.shape[2], dst.shape[3]
    for i in range(kh):
        lo, hi = _valid_range(r0, r1, i - ph, sh, H)
        for j in range(kw):
            wlo, whi = _valid_range(0, Wo, j - pw, sw, W)
            if lo >= hi or wlo >= whi:
                continue
            target = dst[:, :, lo * sh + i - ph:(hi - 1) * sh + i - ph + 1:sh,
                         wlo * sw + j - pw:(whi - 1) * sw + j - pw + 1:sw]
            xp.add(target, dcols[:, i, j, :, lo - r0:hi - r0, wlo:whi], out=target)


# ----------------------------------------------------------------------------- conv2d
def _check_shapes(x, weight, bias):
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"conv2d: x must have shape (B, C, H, W), got shape {tuple(getattr(x, 'shape', ()))}")
    if getattr(weight, "ndim", None) != 4:
        raise ValueError(
            f"conv2d: weight must have shape (O, C, kh, kw), got shape {tuple(getattr(weight, 'shape', ()))}"
        )
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"conv2d: x must have {weight.shape[1]} channels on axis 1 (weight {tuple(weight.shape)}), "
            f"got shape {tuple(x.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"conv2d: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def _cast(a, dtype):
    return None if a is None else a.astype(dtype, copy=False)


def _is_pointwise(kh, kw, stride, padding):
    return kh == 1 and kw == 1 and stride == (1, 1) and padding == (0, 0)


def _conv_gemm(src, wmat, kh, kw, stride, padding, out_hw, out_view, bias=None, on_cols=None):
    """``out_view (O, B, Ho, Wo)`` = wmat (O, K) @ cols(src) (+ bias), one cache-sized chunk at a time.

    ``src`` is (Ch, B, H, W) with any strides, ``wmat`` a contiguous (O, Ch*kh*kw) matrix.
    ``on_cols(cols, b0, b1, r0, r1)``, if given, also gets each chunk's im2col matrix (K, n) for the
    images [b0, b1) and output rows [r0, r1).
    """
    ch, batch = src.shape[0], src.shape[1]
    (sh, sw), (ph, pw), (Ho, Wo) = stride, padding, out_hw
    O, K = wmat.shape
    dtype = wmat.dtype                                                 # the compute dtype
    bias4 = None if bias is None else bias.reshape(O, 1, 1, 1)
    for b0, b1, r0, r1 in _chunks(batch, Ho, K * Wo * dtype.itemsize):
        nb, R = b1 - b0, r1 - r0
        cols = _workspace("cols", (K, nb * R * Wo), dtype)
        _im2col(src[:, b0:b1], kh, kw, sh, sw, ph, pw, r0, r1, Wo, cols.reshape(ch, kh, kw, nb, R, Wo))
        if on_cols is not None:
            on_cols(cols, b0, b1, r0, r1)
        yt = _workspace("gemm", (O, nb * R * Wo), dtype)
        xp.matmul(wmat, cols, out=yt)
        yt = yt.reshape(O, nb, R, Wo)
        if bias4 is None:
            out_view[:, b0:b1, r0:r1] = yt
        else:
            xp.add(yt, bias4, out=out_view[:, b0:b1, r0:r1])


class ConvCache(NamedTuple):
    """What ``conv2d_backward`` needs from the forward (not the im2col matrix: it is rebuilt)."""
    x: object             # (B, C, H, W)
    weight: object        # (O, C, kh, kw)
    has_bias: bool
    stride: tuple         # (rows, columns)
    padding: tuple        # (rows, columns)


def conv2d_forward(x, weight, bias=None, stride=1, padding=0):
    """y = conv2d(x, weight) + bias, torch's cross-correlation, NCHW.

    x (B, C, H, W), weight (O, C, kh, kw), bias (O,) or None; stride and padding are an int or a
    pair (rows, columns). Returns ``(y (B, O, Ho, Wo), cache)``; the cache keeps x and weight (not
    the im2col matrix, which backward rebuilds). See docs/ops/convolution.md.
    """
    _check_shapes(x, weight, bias)
    stride = check_pair("stride", stride, 1, "conv2d")
    padding = check_pair("padding", padding, 0, "conv2d")
    B, C, H, W = x.shape
    O, _, kh, kw = weight.shape
    Ho, Wo = conv2d_output_size((H, W), (kh, kw), stride, padding)
    dtype = xp.result_type(x, weight)
    cdt = compute_dtype(dtype, "conv2d")
    cache = ConvCache(x, weight, bias is not None, stride, padding)
    if _is_pointwise(kh, kw, stride, padding):
        # 1x1: y[b] = W (O, C) @ x[b] (C, H*W), a batched matmul straight into NCHW.
        y = xp.matmul(weight.reshape(O, C).astype(cdt, copy=False),
                      x.reshape(B, C, H * W).astype(cdt, copy=False)).reshape(B, O, H, W)
        if bias is not None:
            y += bias.reshape(O, 1, 1)
        return y.astype(dtype, copy=False), cache
    wmat = xp.ascontiguousarray(weight.reshape(O, C * kh * kw), dtype=cdt)       # (O, K)
    y = xp.empty((B, O, Ho, Wo), dtype=dtype)
    _conv_gemm(x.transpose(1, 0, 2, 3), wmat, kh, kw, stride, padding, (Ho, Wo),
               y.transpose(1, 0, 2, 3), bias)
    return y, cache


def conv2d_backward(dy, cache, weight_grad: bool = True):
    """Returns ``(dx, dweight, dbias)`` for dy (B, O, Ho, Wo); dbias is None without a bias, and
    dweight and dbias are None with ``weight_grad=False`` (frozen parameters: no dW product).

    db = sum of dy over B, Ho, Wo. Stride 1 with B*H*W >= C: dx = full convolution of dy with the
    flipped, transposed kernel, and dW from that convolution's im2col matrix cols(dy) and x (no
    cols(x) needed). Otherwise dW = dy_t cols(x)^T and dx = col2im(W_col^T dy_t).
    Derivation: docs/ops/convolution.md.
    """
    x, weight, has_bias, stride, padding = cache
    B, C, H, W = x.shape
    O, _, kh, kw = weight.shape
    Ho, Wo = dy.shape[2], dy.shape[3]
    dtype = xp.result_type(x, dy, weight)
    cdt = compute_dtype(dtype, "conv2d")
    if _is_pointwise(kh, kw, stride, padding):
        dy3 = dy.reshape(B, O, H * W).astype(cdt, copy=False)
        w2 = weight.reshape(O, C).astype(cdt, copy=False)
        dx = xp.matmul(w2.T, dy3).reshape(B, C, H, W)
        if not weight_grad:
            return _cast(dx, dtype), None, None
        x3 = x.reshape(B, C, H * W).astype(cdt, copy=False)
        # One GEMM over all images (tensordot), not B small ones and a sum: 2x at 4x4 maps.
        dweight = xp.tensordot(dy3, x3, axes=([0, 2], [0, 2])).reshape(O, C, 1, 1)
        dbias = xp.einsum("bop->o", dy3) if has_bias else None          # 4-5x NumPy's sum here
        return _cast(dx, dtype), _cast(dweight, dtype), _cast(dbias, dtype)

    (sh, sw), (ph, pw) = stride, padding
    K = C * kh * kw
    # dy_t (O, B, Ho, Wo): one transposing copy makes every dy operand a plain 2-D matrix.
    dy_t = xp.empty((O, B, Ho, Wo), dtype=cdt)
    dy_t[...] = dy.transpose(1, 0, 2, 3)
    dbias = row_sum(dy_t.reshape(O, -1)) if has_bias and weight_grad else None

    itemsize = xp.dtype(cdt).itemsize
    if stride == (1, 1) and B * H * W >= C:
        # dx[b, c, h, w] = sum_{o,i,j} W[o, c, i, j] dy[b, o, h + ph - i, w + pw - j]: a stride-1
        # convolution of dy, padded by k-1-p, with W_flip[c, o, i, j] = W[o, c, kh-1-i, kw-1-j].
        # Its im2col matrix cols(dy) (O*kh*kw, B*H*W) also gives dW without cols(x):
        # dW[o, c, i, j] = sum_{b,q} cols(dy)[(o, kh-1-i, kw-1-j), (b, q)] x[b, c, q]
        # (docs/ops/convolution.md), one GEMM per chunk with x_t (C, B*H*W).
        dx = xp.empty((B, C, H, W), dtype=dtype)
        x_t = xp.empty((C, B, H, W), dtype=cdt)
        x_t[...] = x.transpose(1, 0, 2, 3)
        acc = xp.zeros((O * kh * kw, C), dtype=cdt)

        def accumulate_dw(cols, b0, b1, r0, r1):                              # G += cols x_c^T
            part = _workspace("gemm_dw", acc.shape, cdt)
            xp.matmul(cols, x_t[:, b0:b1, r0:r1].reshape(C, -1).T, out=part)
            xp.add(acc, part, out=acc)

        wflip = xp.ascontiguousarray(weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3), dtype=cdt)
        _conv_gemm(dy_t, wflip.reshape(C, O * kh * kw), kh, kw, (1, 1), (kh - 1 - ph, kw - 1 - pw),
                   (H, W), dx.transpose(1, 0, 2, 3), on_cols=accumulate_dw if weight_grad else None)
        if not weight_grad:
            return _cast(dx, dtype), None, None
        dweight = xp.ascontiguousarray(
            acc.reshape(O, kh, kw, C)[:, ::-1, ::-1].transpose(0, 3, 1, 2))   # (O, C, kh, kw)
        return _cast(dx, dtype), _cast(dweight, dtype), _cast(dbias, dtype)

    # dW (O, K) = sum over chunks of dy_t[:, images, rows] (O, n) @ cols(x)^T (n, K)
    src = x.transpose(1, 0, 2, 3)                                              # (C, B, H, W)
    # With many output positions the transposed product dW^T = cols dy_t^T (K, O) is the faster
    # GEMM (measured), and its final (K, O) -> (O, K) copy is negligible; with few positions and
    # many channels that copy would cost as much as the GEMM, so dW is computed directly.
    transposed = B * Ho * Wo >= TRANSPOSED_DW_MIN_POSITIONS
    acc = xp.zeros((K, O) if transposed else (O, K), dtype=cdt)
    for b0, b1, r0, r1 in (_chunks(B, Ho, K * Wo * itemsize) if weight_grad else ()):
        nb, R = b1 - b0, r1 - r0
        cols = _workspace("cols", (K, nb * R * Wo), cdt)
        _im2col(src[:, b0:b1], kh, kw, sh, sw, ph, pw, r0, r1, Wo, cols.reshape(C, kh, kw, nb, R, Wo))
        dyc = dy_t[:, b0:b1, r0:r1].reshape(O, -1)                             # (O, n)
        part = _workspace("gemm", acc.shape, cdt)
        if transposed:
            xp.matmul(cols, dyc.T, out=part)
        else:
            xp.matmul(dyc, cols.T, out=part)
        acc += part
    dweight = (xp.ascontiguousarray(acc.T) if transposed else acc).reshape(O, C, kh, kw) if weight_grad else None

    # dx = col2im(W_col^T dy_t): each chunk's dcols (K, n) is scattered back by slice adds.
    # Used for stride > 1, and for stride 1 when there are fewer input positions B*H*W than
    # channels C: then the flipped kernel's copy (C*O*kh*kw) would outweigh the col2im work.
    dx = xp.zeros((B, C, H, W), dtype=cdt)                                 # accumulated in cdt
    dx_t = dx.transpose(1, 0, 2, 3)                                        # (C, B, H, W) view
    wcolT = xp.ascontiguousarray(weight.reshape(O, K).T, dtype=cdt)        # (K, O)
    for b0, b1, r0, r1 in _chunks(B, Ho, K * Wo * itemsize):
        nb, R = b1 - b0, r1 - r0
        dcols = _workspace("cols", (K, nb * R * Wo), cdt)
        xp.matmul(wcolT, dy_t[:, b0:b1, r0:r1].reshape(O, -1), out=dcols)
        _col2im_add(dcols.reshape(C, kh, kw, nb, R, Wo), kh, kw, sh, sw, ph, pw, r0, r1, Wo,
                    dx_t[:, b0:b1])
    return _cast(dx, dtype), _cast(dweight, dtype), _cast(dbias, dtype)
