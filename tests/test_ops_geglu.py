"""GEGLU op: gradient check, parity with torch (value * F.gelu(gate)), float16, errors."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from npdiffusion.backend import asarray
from npdiffusion.ops.geglu import geglu_backward, geglu_forward
from npdiffusion.testing import gradcheck_op, noncontiguous, relative_error


@given(lead=st.lists(st.integers(1, 4), min_size=0, max_size=2), f=st.integers(1, 5))
def test_geglu_gradcheck(backend, lead, f):
    h = noncontiguous(np.random.default_rng(len(lead) * 10 + f).standard_normal((*lead, 2 * f)) * 2.0)
    # Central differences of this O(1)..O(10) loss carry up to ~1e-10 absolute round-off, so only
    # derivatives above ~1e-3 can be checked to 1e-6 relative (a very negative gate has one of
    # ~1e-6). floor 1e-3: larger ones are checked to 1e-6 relative, smaller ones to 1e-9 absolute.
    report = gradcheck_op(geglu_forward, geglu_backward, [h], full_max=40, eps=1e-5, floor=1e-3)
    assert report.passed, report


def _torch_geglu(h, dout, dtype):
    t = torch.tensor(h, dtype=dtype, requires_grad=True)
    value, gate = t.chunk(2, dim=-1)          # diffusers' GEGLU after its proj
    y = value * F.gelu(gate)
    y.backward(torch.tensor(dout, dtype=dtype))
    return y.detach().numpy(), t.grad.numpy()


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-12), ("float32", 1e-6)])
def test_geglu_matches_torch(backend, dtype, rtol):
    rng = np.random.default_rng(4)
    h = (rng.standard_normal((3, 5, 12)) * 3).astype(dtype)
    dout = rng.standard_normal((3, 5, 6)).astype(dtype)
    y, cache = geglu_forward(asarray(h))
    dh = geglu_backward(asarray(dout), cache)
    ty, tdh = _torch_geglu(h, dout, getattr(torch, dtype))
    assert y.dtype == dh.dtype == np.dtype(dtype)
    assert relative_error(y, ty) <= rtol
    assert relative_error(dh, tdh) <= rtol


def test_geglu_float16_is_computed_in_float32(backend):
    rng = np.random.default_rng(5)
    h = (rng.standard_normal((4, 10)) * 3).astype(np.float16)
    dout = rng.standard_normal((4, 5)).astype(np.float16)
    y, cache = geglu_forward(asarray(h))
    dh = geglu_backward(asarray(dout), cache)
    assert y.dtype == dh.dtype == np.float16
    ty, tdh = _torch_geglu(h.astype(np.float32), dout.astype(np.float32), torch.float32)
    assert relative_error(y, ty) <= 1e-3
    assert relative_error(dh, tdh) <= 1e-3


def test_geglu_errors(backend):
    with pytest.raises(ValueError, match=r"even number of entries on its last axis, got shape \(2, 5\)"):
        geglu_forward(asarray(np.zeros((2, 5))))
    with pytest.raises(TypeError, match="h must be a floating array, got dtype int64"):
        geglu_forward(asarray(np.zeros((2, 4), dtype=np.int64)))
    with pytest.raises(TypeError, match="h must be an array, got list"):
        geglu_forward([1.0, 2.0])
