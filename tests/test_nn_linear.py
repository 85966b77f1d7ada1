"""Linear: gradient check, parity with torch.nn.Linear, clear errors."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from npdiffusion.backend import asarray
from npdiffusion.nn import Linear
from npdiffusion.ops.linear import linear_backward, linear_forward
from npdiffusion.testing import gradcheck, gradcheck_op, noncontiguous
from parity import assert_parity, randomize_


@given(lead=st.lists(st.integers(1, 4), min_size=0, max_size=2), i=st.integers(1, 6), o=st.integers(1, 6),
       bias=st.booleans())
def test_linear_op_gradcheck(backend, lead, i, o, bias):
    rng = np.random.default_rng(len(lead) * 100 + i * 10 + o)
    x = noncontiguous(rng.standard_normal((*lead, i)))
    w = asarray(rng.standard_normal((o, i)))
    b = asarray(rng.standard_normal(o)) if bias else None
    report = gradcheck_op(linear_forward, linear_backward, [x, w, b] if bias else [x, w], full_max=24)
    assert report.passed, report


@given(i=st.integers(1, 5), o=st.integers(1, 5), bias=st.booleans())
def test_linear_module_gradcheck(backend, i, o, bias):
    m = Linear(i, o, bias=bias).to("float64")
    x = noncontiguous(np.random.default_rng(i * o).standard_normal((2, 3, i)))
    report = gradcheck(m, x, full_max=30)
    assert report.passed, report


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_parity_with_torch(backend, dtype, rtol, bias):
    theirs = randomize_(torch.nn.Linear(7, 5, bias=bias), seed=3)
    x = np.random.default_rng(0).standard_normal((4, 3, 7))
    assert_parity(Linear(7, 5, bias=bias), theirs, [x], dtype=dtype, rtol=rtol)


def test_linear_state_dict_keys_match_torch():
    assert list(Linear(3, 2).state_dict()) == list(torch.nn.Linear(3, 2).state_dict())


def test_linear_rejects_wrong_feature_count(backend):
    with pytest.raises(ValueError, match="x must have 3 entries on axis -1, got shape"):
        Linear(3, 2)(asarray(np.zeros((2, 4), dtype=np.float32)))
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        Linear(0, 2)
