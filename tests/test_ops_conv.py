"""conv2d op pair: float64 gradient checks, agreement with torch.nn.functional.conv2d, the chunked
and 1x1 paths, workspace safety, clear errors."""
import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.ops import conv as conv_ops
from npdiffusion.ops.conv import conv2d_backward, conv2d_forward, conv2d_output_size
from npdiffusion.testing import gradcheck_op, noncontiguous, relative_error

KERNELS = [(1, 1), (2, 2), (3, 3), (1, 3), (3, 1), (2, 3)]


@st.composite
def conv_configs(draw):
    kh, kw = draw(st.sampled_from(KERNELS))
    stride = draw(st.sampled_from([1, 2, (1, 2), (2, 1)]))
    padding = draw(st.sampled_from([0, 1, 2, (0, 1), (2, 0)]))
    h, w = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    sp = (padding, padding) if isinstance(padding, int) else padding
    assume(h + 2 * sp[0] >= kh and w + 2 * sp[1] >= kw)   # the kernel must fit the padded input
    return dict(k=(kh, kw), stride=stride, padding=padding, h=h, w=w,
                b=draw(st.integers(1, 2)), c=draw(st.integers(1, 4)), o=draw(st.integers(1, 4)),
                bias=draw(st.booleans()), contiguous=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


# The full-Jacobian probes (unit directions, full_max) see single entries; one whose gradient is
# ~1e-4 (a 1x1 kernel on zero padding sums few terms) shows ~4e-6 relative round-off at step 1e-6,
# which is noise, not error (the same entries equal torch's to 0). Step 1e-5 and a floor of 1e-3
# on the denominator, as in test_ops_losses.py: round-off stays near 1e-7, a wrong entry still shows.
EPS, FLOOR = 1e-5, 1e-3


@given(cfg=conv_configs())
def test_conv2d_op_gradcheck(backend, cfg):
    rng = np.random.default_rng(cfg["seed"])
    x = rng.standard_normal((cfg["b"], cfg["c"], cfg["h"], cfg["w"]))
    x = asarray(x) if cfg["contiguous"] else noncontiguous(x)      # contiguous rows take the flat im2col
    w = noncontiguous(rng.standard_normal((cfg["o"], cfg["c"], *cfg["k"])))
    inputs = [x, w] + ([asarray(rng.standard_normal(cfg["o"]))] if cfg["bias"] else [])
    report = gradcheck_op(conv2d_forward, conv2d_backward, inputs, full_max=40, eps=EPS, floor=FLOOR,
                          stride=cfg["stride"], padding=cfg["padding"])
    assert report.passed, f"{cfg}\n{report}"


def _torch_conv(x, w, b, stride, padding, dy_seed=0):
    """Forward and all gradients from torch for upstream gradient dy (float64)."""
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    bt = None if b is None else torch.tensor(b, requires_grad=True)
    yt = torch.nn.functional.conv2d(xt, wt, bt, stride=stride, padding=padding)
    dy = np.random.default_rng(dy_seed).standard_normal(tuple(yt.shape)).astype(x.dtype)
    yt.backward(torch.tensor(dy))
    return yt.detach().numpy(), dy, xt.grad.numpy(), wt.grad.numpy(), None if b is None else bt.grad.numpy()


CASES = [  # (B, C, O, H, W, kernel, stride, padding)
    (2, 3, 4, 9, 7, (3, 3), 1, 1),
    (2, 3, 4, 9, 7, (3, 3), 2, 1),
    (1, 5, 2, 6, 6, (3, 3), 2, 0),        # the VAE downsampler after its pad
    (2, 4, 3, 5, 8, (1, 1), 1, 0),        # the 1x1 matmul path
    (2, 4, 3, 5, 8, (1, 1), 2, 1),        # 1x1 but strided and padded: the im2col path
    (1, 2, 3, 4, 4, (3, 3), 1, 3),        # padding > kernel - 1: dx reads a cropped dy
    (2, 2, 3, 8, 9, (3, 2), 3, (2, 1)),
    (3, 2, 2, 1, 1, (3, 3), 1, 1),        # 1x1 image, 3x3 kernel
    (1, 6, 3, 2, 2, (3, 3), 1, 1),        # fewer positions (4) than channels (6): stride-1 col2im
    (1, 9, 2, 2, 3, (2, 2), 1, 2),        # the same with padding > kernel - 1
]


@pytest.mark.parametrize("chunk_bytes", [None, 1, 300])
@pytest.mark.parametrize("case", CASES)
def test_conv2d_op_matches_torch_float64(backend, monkeypatch, case, chunk_bytes):
    """Every path (single chunk, one output row per chunk, a few rows per chunk; dW direct and
    transposed) against torch."""
    monkeypatch.setattr(conv_ops, "TRANSPOSED_DW_MIN_POSITIONS", 1 if chunk_bytes == 300 else 10**9)
    if chunk_bytes is not None:
        monkeypatch.setattr(conv_ops, "CHUNK_BYTES", chunk_bytes)
        monkeypatch.setattr(conv_ops, "GPU_CHUNK_BYTES", chunk_bytes)
    B, C, O, H, W, k, s, p = case
    rng = np.random.default_rng(sum(case[:5]))
    x, w, b = rng.standard_normal((B, C, H, W)), rng.standard_normal((O, C, *k)), rng.standard_normal(O)
    y_t, dy, dx_t, dw_t, db_t = _torch_conv(x, w, b, s, p)
    y, cache = conv2d_forward(asarray(x), asarray(w), asarray(b), s, p)
    dx, dw, db = conv2d_backward(asarray(dy), cache)
    for name, ours, theirs in [("y", y, y_t), ("dx", dx, dx_t), ("dw", dw, dw_t), ("db", db, db_t)]:
        assert relative_error(ours, theirs) <= 1e-12, name


@pytest.mark.parametrize("k,s,p", [((3, 3), 1, 1), ((3, 3), 2, 1), ((1, 1), 1, 0)])
def test_conv2d_op_float32_keeps_dtype_and_matches_torch(backend, k, s, p):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 6, 10, 10)).astype(np.float32)
    w = (rng.standard_normal((5, 6, *k)) * 0.3).astype(np.float32)
    y_t, dy, dx_t, dw_t, _ = _torch_conv(x, w, None, s, p)
    y, cache = conv2d_forward(asarray(x), asarray(w), None, s, p)
    dx, dw, db = conv2d_backward(asarray(dy), cache)
    assert db is None
    assert y.dtype == dx.dtype == dw.dtype == np.float32
    for ours, theirs in [(y, y_t), (dx, dx_t), (dw, dw_t)]:
        assert relative_error(ours, theirs) <= 1e-5


@pytest.mark.parametrize("k,s,p", [((3, 3), 1, 1), ((3, 3), 2, 1), ((1, 1), 1, 0)])
def test_conv2d_op_float16_is_computed_in_float32(backend, k, s, p):
    """float16 in, float16 out; the GEMMs run in float32, so the result is float32's, rounded once."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 4, 6, 6)).astype(np.float16)
    w = (rng.standard_normal((3, 4, *k)) * 0.3).astype(np.float16)
    b = rng.standard_normal(3).astype(np.float16)
    dy = rng.standard_normal(conv2d_forward(asarray(x.astype(np.float32)), asarray(w.astype(np.float32)), None, s, p)[0].shape)
    y16, c16 = conv2d_forward(asarray(x), asarray(w), asarray(b), s, p)
    y32, c32 = conv2d_forward(*(asarray(a.astype(np.float32)) for a in (x, w, b)), s, p)
    g16 = conv2d_backward(asarray(dy.astype(np.float16)), c16)
    g32 = conv2d_backward(asarray(dy.astype(np.float16).astype(np.float32)), c32)
    for ours, ref in zip((y16, *g16), (y32, *g32)):
        assert ours.dtype == np.float16
        np.testing.assert_array_equal(to_numpy(ours), to_numpy(ref).astype(np.float16))


def test_conv2d_results_do_not_alias_the_workspace(backend):
    """A later call reuses the scratch buffers; earlier outputs and gradients must not change."""
    rng = np.random.default_rng(3)
    x, w = asarray(rng.standard_normal((2, 3, 6, 6))), asarray(rng.standard_normal((4, 3, 3, 3)))
    y, cache = conv2d_forward(x, w, None, 1, 1)
    grads = conv2d_backward(asarray(rng.standard_normal(y.shape)), cache)
    kept = [to_numpy(a).copy() for a in (y, grads[0], grads[1])]
    y2, cache2 = conv2d_forward(x * 2.0, w * 3.0, None, 1, 1)
    conv2d_backward(y2, cache2)
    for before, now in zip(kept, (y, grads[0], grads[1])):
        np.testing.assert_array_equal(before, to_numpy(now))


def test_conv2d_clear_workspace_frees_and_rebuilds(backend):
    x, w = asarray(np.ones((1, 2, 4, 4))), asarray(np.ones((1, 2, 3, 3)))
    y1, _ = conv2d_forward(x, w, None, 1, 1)
    conv_ops.clear_workspace()
    y2, _ = conv2d_forward(x, w, None, 1, 1)
    np.testing.assert_array_equal(to_numpy(y1), to_numpy(y2))
    assert to_numpy(y1)[0, 0, 1, 1] == 18.0 and to_numpy(y1)[0, 0, 0, 0] == 8.0


def test_conv2d_output_size():
    assert conv2d_output_size((32, 32), 3, 1, 1) == (32, 32)
    assert conv2d_output_size((33, 33), 3, 2, 0) == (16, 16)
    assert conv2d_output_size((5, 8), (1, 3), (2, 1), (0, 1)) == (3, 8)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(stride=0), ValueError, "conv2d: stride must be a positive int or a pair of positive ints, got 0"),
    (dict(stride=(1, 2, 3)), TypeError, r"stride must be a positive int or a pair of positive ints, got \(1, 2, 3\)"),
    (dict(padding=-1), ValueError, "padding must be a non-negative int or a pair of non-negative ints, got -1"),
    (dict(padding=1.5), TypeError, "padding must be a non-negative int or a pair of non-negative ints, got 1.5"),
])
def test_conv2d_op_rejects_bad_hyperparameters(backend, kwargs, exc, match):
    x, w = asarray(np.zeros((1, 2, 4, 4))), asarray(np.zeros((3, 2, 3, 3)))
    with pytest.raises(exc, match=match):
        conv2d_forward(x, w, None, **kwargs)


def test_conv2d_op_rejects_bad_shapes(backend):
    x, w = asarray(np.zeros((1, 2, 4, 4))), asarray(np.zeros((3, 2, 3, 3)))
    with pytest.raises(ValueError, match=r"x must have shape \(B, C, H, W\), got shape \(2, 4, 4\)"):
        conv2d_forward(x[0], w)
    with pytest.raises(ValueError, match="x must have 2 channels on axis 1"):
        conv2d_forward(asarray(np.zeros((1, 5, 4, 4))), w)
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        conv2d_forward(x, w, asarray(np.zeros(2)))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        conv2d_forward(asarray(np.zeros((1, 2, 2, 4))), w)
