"""attention op: gradient checks, chunked == plain, parity with torch's SDPA, masks, float16, errors."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.ops.attention import (ChunkedAttentionCache, PlainAttentionCache, _small_scores, attention_backward,
                                       attention_forward)
from npdiffusion.testing import gradcheck_op, noncontiguous, relative_error


def _qkv(rng, b, h, tq, tk, d, dv, dtype="float64"):
    return [rng.standard_normal(s).astype(dtype) for s in ((b, h, tq, d), (b, h, tk, d), (b, h, tk, dv))]


def _mask_shape(draw, full):
    """A random shape broadcastable to ``full`` (some axes 1, some leading axes dropped)."""
    shape = tuple(n if draw(st.booleans()) else 1 for n in full)
    return shape[draw(st.integers(0, 2)):]


@given(b=st.integers(1, 2), h=st.integers(1, 3), tq=st.integers(1, 5), tk=st.integers(1, 5),
       d=st.integers(1, 4), dv=st.integers(1, 4), kind=st.sampled_from(["none", "mask", "causal", "both"]),
       chunk=st.one_of(st.none(), st.integers(1, 3)), data=st.data())
def test_attention_gradcheck(backend, b, h, tq, tk, d, dv, kind, chunk, data):
    rng = np.random.default_rng(b * 1000 + h * 100 + tq * 10 + tk + d + dv)
    q, k, v = (noncontiguous(a) for a in _qkv(rng, b, h, tq, tk, d, dv))
    kwargs = {"causal": kind in ("causal", "both"), "chunk_size": chunk}
    if kind in ("mask", "both"):
        mask = rng.standard_normal(_mask_shape(data.draw, (b, h, tq, tk)))
        if data.draw(st.booleans(), label="some -inf"):
            mask[rng.random(mask.shape) < 0.3] = -np.inf    # may mask whole rows: zeros, no NaN
        kwargs["mask"] = asarray(mask)
    if data.draw(st.booleans(), label="explicit scale"):
        kwargs["scale"] = 0.7
    # Central differences of this O(1)..O(10) loss carry up to ~1e-10 absolute round-off, so only
    # derivatives above ~1e-3 can be checked to 1e-6 relative: some are exactly zero (one key: P = 1
    # whatever q and k are) and single entries of dq, dk can be tiny. floor 1e-3 (the gradients
    # here are O(1)): larger derivatives are checked to 1e-6 relative, smaller ones to 1e-9 absolute.
    report = gradcheck_op(attention_forward, attention_backward, [q, k, v], full_max=40, eps=1e-5,
                          floor=1e-3, **kwargs)
    assert report.passed, report


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
@pytest.mark.parametrize("kind", ["none", "mask", "causal", "both"])
def test_chunked_equals_plain(backend, chunk, kind):
    rng = np.random.default_rng(chunk)
    q, k, v = (asarray(a) for a in _qkv(rng, 2, 3, 7, 6, 4, 5))
    mask = None
    if kind in ("mask", "both"):
        m = rng.standard_normal((2, 1, 7, 6))
        m[0, 0, 2] = -np.inf                                # one fully masked query row
        m[1, 0, :, 3] = -np.inf
        mask = asarray(m)
    causal = kind in ("causal", "both")
    dout = asarray(rng.standard_normal((2, 3, 7, 5)))
    out_p, cache_p = attention_forward(q, k, v, mask=mask, causal=causal)
    out_c, cache_c = attention_forward(q, k, v, mask=mask, causal=causal, chunk_size=chunk)
    assert isinstance(cache_c, ChunkedAttentionCache) and isinstance(cache_p, PlainAttentionCache)
    assert relative_error(out_c, out_p) <= 1e-12
    for gc, gp in zip(attention_backward(dout, cache_c), attention_backward(dout, cache_p)):
        assert relative_error(gc, gp) <= 1e-12


def _sdpa(q, k, v, dout, mask=None, causal=False, scale=None, dtype=torch.float64):
    tq, tk, tv = (torch.tensor(a, dtype=dtype, requires_grad=True) for a in (q, k, v))
    tm = None if mask is None else torch.tensor(mask) if mask.dtype == bool else torch.tensor(mask, dtype=dtype)
    out = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=tm, is_causal=causal, scale=scale)
    out.backward(torch.tensor(dout, dtype=dtype))
    return [out.detach().numpy(), tq.grad.numpy(), tk.grad.numpy(), tv.grad.numpy()]


CASES = {
    "self": dict(shape=(2, 3, 6, 6, 4, 4)),
    "cross": dict(shape=(2, 2, 5, 7, 3, 6)),
    "mask": dict(shape=(2, 3, 5, 7, 4, 4), mask=(2, 1, 5, 7)),
    "key-padding": dict(shape=(2, 3, 5, 7, 4, 4), mask=(2, 1, 1, 7)),
    "bool-mask": dict(shape=(2, 2, 4, 6, 4, 4), mask=(2, 2, 4, 6), bool_mask=True),
    "causal": dict(shape=(1, 2, 6, 6, 4, 4), causal=True),
    "causal-cross": dict(shape=(1, 2, 4, 6, 4, 4), causal=True),
    "scale": dict(shape=(2, 1, 3, 4, 5, 2), scale=0.3),
}


@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
def test_attention_matches_torch_sdpa(backend, case, dtype, rtol, chunk):
    cfg = CASES[case]
    b, h, tq, tk, d, dv = cfg["shape"]
    rng = np.random.default_rng(len(case))
    q, k, v = _qkv(rng, b, h, tq, tk, d, dv, dtype)
    dout = rng.standard_normal((b, h, tq, dv)).astype(dtype)
    mask = None
    if "mask" in cfg:
        mask = rng.random(cfg["mask"]) < 0.7 if cfg.get("bool_mask") else rng.standard_normal(cfg["mask"]) * 2
        if mask.dtype == bool:
            mask[..., 0] = True                              # every row keeps a key (torch: NaN otherwise)
        else:
            mask = mask.astype(dtype)
    kw = dict(mask=None if mask is None else asarray(mask), causal=cfg.get("causal", False),
              scale=cfg.get("scale"))
    out, cache = attention_forward(*(asarray(a) for a in (q, k, v)), chunk_size=chunk, **kw)
    ours = [out, *attention_backward(asarray(dout), cache)]
    theirs = _sdpa(q, k, v, dout, mask, kw["causal"], kw["scale"], dtype=getattr(torch, dtype))
    for name, o, t in zip(["out", "dq", "dk", "dv"], ours, theirs):
        assert o.dtype == np.dtype(dtype), name
        assert relative_error(o, t) <= rtol, (name, relative_error(o, t))


@pytest.mark.parametrize("case", ["self", "cross"])
def test_small_scores_skip_the_row_max(backend, case):
    """The unmasked torch-parity cases above take the softmax without the row maximum on NumPy; on
    CuPy the row maximum is always subtracted (the bound would wait for the device)."""
    b, h, tq, tk, d, dv = CASES[case]["shape"]
    q, k, _ = _qkv(np.random.default_rng(len(case)), b, h, tq, tk, d, dv)
    assert _small_scores(asarray(q * d ** -0.5), asarray(k).swapaxes(-1, -2)) == (backend == "numpy")


@pytest.mark.parametrize("chunk", [None, 2])
def test_large_scores_subtract_the_row_max_and_match_torch(backend, monkeypatch, chunk):
    """|q||k| up to 87 (scores up to 47) above the bound: the row maximum is subtracted, as torch
    does. In float64 with the bound lowered from 600 to 50 (float32's own bound, 64, takes the same
    branch, but at such scores the softmax saturates and float32 gradients are rounding noise)."""
    from npdiffusion.ops import attention

    monkeypatch.setitem(attention._EXP_SAFE, 8, 50.0)
    b, h, tq, tk, d, dv = 2, 2, 5, 7, 4, 4
    rng = np.random.default_rng(11)
    q, k, v = _qkv(rng, b, h, tq, tk, d, dv)
    q, k = 4 * q, 4 * k
    assert not _small_scores(asarray(q * d ** -0.5), asarray(k).swapaxes(-1, -2))
    dout = rng.standard_normal((b, h, tq, dv))
    out, cache = attention_forward(*(asarray(a) for a in (q, k, v)), chunk_size=chunk)
    ours = [out, *attention_backward(asarray(dout), cache)]
    for name, o, t in zip(["out", "dq", "dk", "dv"], ours, _sdpa(q, k, v, dout)):
        assert relative_error(o, t) <= 1e-10, name


def test_fully_masked_rows_are_zero_like_torch(backend):
    rng = np.random.default_rng(5)
    q, k, v = _qkv(rng, 1, 2, 3, 4, 3, 3)
    mask = np.zeros((1, 1, 3, 4))
    mask[0, 0, 1] = -np.inf                                  # query row 1 sees no key at all
    dout = rng.standard_normal((1, 2, 3, 3))
    for chunk in (None, 1):
        out, cache = attention_forward(*(asarray(a) for a in (q, k, v)), mask=asarray(mask), chunk_size=chunk)
        dq, dk, dv = attention_backward(asarray(dout), cache)
        out, dq = to_numpy(out), to_numpy(dq)
        assert np.array_equal(out[:, :, 1], np.zeros((1, 2, 3))) and np.array_equal(dq[:, :, 1], np.zeros((1, 2, 3)))
        assert all(np.all(np.isfinite(to_numpy(g))) for g in (dq, dk, dv))
        theirs = _sdpa(q, k, v, dout, mask)                   # torch >= 2.5 also gives zeros here
        for o, t in zip([out, dq, dk, dv], theirs):
            assert relative_error(o, t) <= 1e-12


def test_head_split_views_match_contiguous(backend):
    """The layout the Attention module passes: (B, T, H, D) memory seen as (B, H, T, D)."""
    rng = np.random.default_rng(11)
    q, k, v = _qkv(rng, 2, 3, 5, 4, 4, 4)
    dout = asarray(rng.standard_normal((2, 3, 5, 4)))
    views = [asarray(np.ascontiguousarray(a.transpose(0, 2, 1, 3))).transpose(0, 2, 1, 3) for a in (q, k, v)]
    out_v, cache_v = attention_forward(*views)
    out_c, cache_c = attention_forward(*(asarray(a) for a in (q, k, v)))
    assert relative_error(out_v, out_c) <= 1e-14
    for gv, gc in zip(attention_backward(dout, cache_v), attention_backward(dout, cache_c)):
        assert relative_error(gv, gc) <= 1e-14


@pytest.mark.parametrize("big", [False, True])
def test_float16_is_computed_in_float32(backend, big):
    rng = np.random.default_rng(2)
    q, k, v = _qkv(rng, 1, 2, 5, 6, 64, 8, "float32")
    if big:  # q.k ~ 102400 overflows float16 (max 65504); the softmax itself is not saturated
        q, k = 40.0 + 0.1 * q, 40.0 + 0.1 * k
    q, k, v = (a.astype(np.float16) for a in (q, k, v))
    dout = rng.standard_normal((1, 2, 5, 8)).astype(np.float16)
    out, cache = attention_forward(*(asarray(a) for a in (q, k, v)))
    grads = attention_backward(asarray(dout), cache)
    assert out.dtype == np.float16 and all(g.dtype == np.float16 for g in grads)
    # reference: the same float16 values in float32 (one float16 rounding of the result apart)
    theirs = _sdpa(*(a.astype(np.float32) for a in (q, k, v)), dout.astype(np.float32), dtype=torch.float32)
    for name, o, t in zip(["out", "dq", "dk", "dv"], [out, *grads], theirs):
        assert np.all(np.isfinite(to_numpy(o))), name
        assert relative_error(o, t) <= 2e-3, (name, relative_error(o, t))


def test_bench_signature(backend):
    """tools/bench_ops.py calls exactly attention_forward(q, k, v) and attention_backward(dout, cache)."""
    q, k, v = (asarray(a) for a in _qkv(np.random.default_rng(0), 1, 1, 2, 3, 2, 2, "float32"))
    out, cache = attention_forward(q, k, v)
    dq, dk, dv = attention_backward(out, cache)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert out.dtype == dq.dtype == np.float32


def test_attention_errors(backend):
    q, k, v = (asarray(a) for a in _qkv(np.random.default_rng(0), 2, 3, 4, 5, 6, 7))
    with pytest.raises(ValueError, match=r"q must have 4 dimensions \(B, heads, T, d\), got shape \(3, 4, 6\)"):
        attention_forward(q[0], k, v)
    with pytest.raises(TypeError, match="q, k and v must share one dtype"):
        attention_forward(q.astype(np.float32), k, v)
    with pytest.raises(ValueError, match="must agree on \\(B, heads\\)"):
        attention_forward(q[:, :2], k, v)
    with pytest.raises(ValueError, match="k and v must have the same number of keys"):
        attention_forward(q, k, v[:, :, :4])
    with pytest.raises(ValueError, match="q and k must have the same width"):
        attention_forward(q, k[..., :5], v)
    with pytest.raises(ValueError, match=r"mask must be broadcastable to \(B, heads, Tq, Tk\) = \(2, 3, 4, 5\), got shape \(4, 4\)"):
        attention_forward(q, k, v, mask=asarray(np.zeros((4, 4))))
    with pytest.raises(TypeError, match="mask must be an additive float array"):
        attention_forward(q, k, v, mask=asarray(np.zeros((4, 5), dtype=np.int64)))
    with pytest.raises(ValueError, match="chunk_size must be a positive int or None, got 0"):
        attention_forward(q, k, v, chunk_size=0)
    with pytest.raises(TypeError, match="scale must be a real number"):
        attention_forward(q, k, v, scale="0.5")
    with pytest.raises(TypeError, match="q must be an array, got list"):
        attention_forward([1.0], k, v)
    with pytest.raises(ValueError, match="cache was not made by attention_forward"):
        attention_backward(q, ("other",))
    out, cache = attention_forward(q, k, v)
    with pytest.raises(ValueError, match=r"dout must have the output's shape \(2, 3, 4, 7\), got \(2, 3, 4, 6\)"):
        attention_backward(out[..., :6], cache)
