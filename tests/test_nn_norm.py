"""GroupNorm and LayerNorm modules: gradient checks, parity with torch.nn, init, clear errors."""
import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.nn.norm import GroupNorm, LayerNorm
from npdiffusion.testing import gradcheck, noncontiguous
from parity import assert_parity, randomize_
from test_ops_norm import EPS, draw_grouped


def _randomize_ours(m, rng):
    for name, p in m.named_parameters():
        p[...] = asarray(rng.standard_normal(p.shape) * 0.5 + (1.0 if name == "weight" else 0.0))
    return m


@given(g=st.integers(1, 3), cg=st.integers(1, 3), spatial=st.lists(st.integers(1, 3), min_size=0, max_size=2),
       affine=st.booleans())
def test_group_norm_module_gradcheck(backend, g, cg, spatial, affine):
    assume(cg * int(np.prod(spatial)) >= 3)
    rng = np.random.default_rng(g * 10 + cg + 100 * len(spatial))
    m = _randomize_ours(GroupNorm(g, g * cg, affine=affine).to("float64"), rng)
    x = noncontiguous(draw_grouped(rng, (2, g * cg, *spatial), g))
    report = gradcheck(m, x, full_max=30, eps=EPS)
    assert report.passed, report


@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
       norm_shape=st.lists(st.integers(1, 4), min_size=1, max_size=2), affine=st.booleans())
def test_layer_norm_module_gradcheck(backend, lead, norm_shape, affine):
    assume(int(np.prod(norm_shape)) >= 3)
    rng = np.random.default_rng(len(lead) * 10 + int(np.prod(norm_shape)))
    m = _randomize_ours(LayerNorm(tuple(norm_shape), elementwise_affine=affine).to("float64"), rng)
    x = noncontiguous(draw_grouped(rng, (*lead, *norm_shape), 1, axis_from=len(lead)))
    report = gradcheck(m, x, full_max=30, eps=EPS)
    assert report.passed, report


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
@pytest.mark.parametrize("groups,channels,shape,eps,affine", [
    (2, 6, (3, 6, 5, 4), 1e-5, True),
    (4, 8, (2, 8, 3), 1e-6, True),
    (3, 6, (2, 6, 2, 3, 2), 1e-5, False),
    (1, 4, (5, 4), 1e-5, True),
])
def test_group_norm_parity_with_torch(backend, dtype, rtol, groups, channels, shape, eps, affine):
    theirs = randomize_(torch.nn.GroupNorm(groups, channels, eps=eps, affine=affine), seed=1)
    x = np.random.default_rng(2).standard_normal(shape) * 1.5 + 0.3
    assert_parity(GroupNorm(groups, channels, eps=eps, affine=affine), theirs, [x], dtype=dtype, rtol=rtol)


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
@pytest.mark.parametrize("normalized_shape,shape,affine", [
    (8, (2, 5, 8), True),
    ((3, 4), (2, 3, 4), True),
    (6, (6,), False),
    ([2, 3], (4, 2, 3), True),
])
def test_layer_norm_parity_with_torch(backend, dtype, rtol, normalized_shape, shape, affine):
    theirs = randomize_(torch.nn.LayerNorm(normalized_shape, elementwise_affine=affine), seed=4)
    x = np.random.default_rng(5).standard_normal(shape) * 2.0 - 0.5
    assert_parity(LayerNorm(normalized_shape, elementwise_affine=affine), theirs, [x], dtype=dtype, rtol=rtol)


def test_parameters_match_torch_names_and_init():
    for ours, theirs in [(GroupNorm(2, 4), torch.nn.GroupNorm(2, 4)), (LayerNorm((2, 3)), torch.nn.LayerNorm((2, 3)))]:
        sd = ours.state_dict()
        assert list(sd) == list(theirs.state_dict())
        for k, v in theirs.state_dict().items():
            np.testing.assert_array_equal(to_numpy(sd[k]), v.numpy())
            assert sd[k].dtype == np.float32
    assert list(GroupNorm(2, 4, affine=False).state_dict()) == []
    assert list(LayerNorm(3, elementwise_affine=False).state_dict()) == []


def test_eval_keeps_nothing_and_grads_accumulate(backend):
    m = GroupNorm(2, 4).to("float64")
    x = asarray(np.random.default_rng(0).standard_normal((2, 4, 3)))
    dy = asarray(np.random.default_rng(1).standard_normal((2, 4, 3)))
    m(x)
    m.backward(dy)
    first = to_numpy(dict(m.named_grads())["weight"]).copy()
    m(x)
    m.backward(dy)
    np.testing.assert_allclose(to_numpy(dict(m.named_grads())["weight"]), 2 * first, rtol=1e-12)
    m.eval()
    m(x)
    with pytest.raises(RuntimeError, match="needs a forward in training mode"):
        m.backward(dy)


def test_norm_module_errors(backend):
    with pytest.raises(ValueError, match=r"num_channels \(10\) must be divisible by num_groups \(4\)"):
        GroupNorm(4, 10)
    with pytest.raises(ValueError, match="num_groups must be a positive int, got 0"):
        GroupNorm(0, 4)
    gn = GroupNorm(2, 4)
    with pytest.raises(ValueError, match=r"x must have 4 channels on axis 1, got shape \(2, 6, 3\)"):
        gn(asarray(np.zeros((2, 6, 3), np.float32)))
    with pytest.raises(ValueError, match=r"at least 2 dimensions, got shape \(4,\)"):
        gn(asarray(np.zeros(4, np.float32)))
    with pytest.raises(TypeError, match="GroupNorm: x must be a floating array, got dtype int64"):
        gn(asarray(np.zeros((2, 4), np.int64)))
    with pytest.raises(TypeError, match="GroupNorm: x must be a floating array, got list"):
        gn([[0.0] * 4])
    ln = LayerNorm((3, 4))
    with pytest.raises(ValueError, match=r"x must end with the normalized shape \(3, 4\), got shape \(2, 4, 3\)"):
        ln(asarray(np.zeros((2, 4, 3), np.float32)))
    with pytest.raises(ValueError, match="normalized_shape must be a positive int or a non-empty tuple"):
        LayerNorm(())
    with pytest.raises(ValueError, match=r"LayerNorm: eps must be >= 0.0, got -1.0"):
        LayerNorm(3, eps=-1.0)
