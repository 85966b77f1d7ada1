"""FeedForward / GEGLU / GELU modules: gradient checks, parity with diffusers, keys, errors."""
import numpy as np
import pytest
from diffusers.models.activations import GEGLU as DiffusersGEGLU
from diffusers.models.attention import FeedForward as DiffusersFeedForward
from hypothesis import given
from hypothesis import strategies as st

from npdiffusion.backend import asarray
from npdiffusion.nn.feedforward import GEGLU, FeedForward
from npdiffusion.testing import gradcheck, noncontiguous, relative_error
from parity import assert_parity, randomize_


@given(dim=st.integers(1, 4), mult=st.integers(1, 3), dim_out=st.one_of(st.none(), st.integers(1, 4)),
       act=st.sampled_from(["geglu", "gelu", "gelu-approximate"]), bias=st.booleans())
def test_feedforward_gradcheck(backend, dim, mult, dim_out, act, bias):
    m = FeedForward(dim, dim_out=dim_out, mult=mult, activation_fn=act, bias=bias).to("float64")
    x = noncontiguous(np.random.default_rng(dim * 10 + mult).standard_normal((2, 3, dim)) * 2.0)
    # floor 1e-3 at eps 1e-5: central differences carry up to ~1e-10 absolute round-off, and a
    # strongly negative gate has derivatives of ~1e-6: those are checked to 1e-9 absolute
    report = gradcheck(m, x, eps=1e-5, floor=1e-3, full_max=12)
    assert report.passed, report


CONFIGS = {
    "geglu": dict(dim=6),
    "geglu-dim-out": dict(dim=5, dim_out=3, mult=2),
    "gelu": dict(dim=4, activation_fn="gelu", mult=3),
    "gelu-approximate-no-bias": dict(dim=4, activation_fn="gelu-approximate", bias=False),
    "inner-dim-final-dropout": dict(dim=4, inner_dim=7, final_dropout=True),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
def test_feedforward_matches_diffusers(backend, config, dtype, rtol):
    kw = CONFIGS[config]
    theirs = randomize_(DiffusersFeedForward(**kw), seed=len(config))
    x = np.random.default_rng(len(config)).standard_normal((2, 5, kw["dim"])) * 2.0
    assert_parity(FeedForward(**kw), theirs, [x], dtype=dtype, rtol=rtol)


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
def test_geglu_module_matches_diffusers(backend, dtype, rtol):
    theirs = randomize_(DiffusersGEGLU(5, 3), seed=2)
    x = np.random.default_rng(2).standard_normal((4, 5)) * 2.0
    assert_parity(GEGLU(5, 3), theirs, [x], dtype=dtype, rtol=rtol)


def test_dropout_masks_the_inner_activation(backend):
    """net.1 drops entries of net.0's output with one mask in forward and backward; eval: identity."""
    rng = np.random.default_rng(6)
    x, g = asarray(rng.standard_normal((2, 3, 4))), asarray(rng.standard_normal((2, 3, 4)))
    m = FeedForward(4, mult=2, dropout=0.25).to("float64")
    m.net[1].rng = np.random.default_rng(1)
    keep = asarray((np.random.default_rng(1).random((2, 3, 8)) >= 0.25) / 0.75)
    y, dx = m(x), m.backward(g)
    ref = FeedForward(4, mult=2).to("float64")
    ref.load_state_dict(m.state_dict())
    h = ref.net[0](x)
    expected = ref.net[2](h * keep)
    expected_dx = ref.net[0].backward(ref.net[2].backward(g) * keep)
    assert relative_error(y, expected) <= 1e-14 and relative_error(dx, expected_dx) <= 1e-14
    for (name, a), (_, b) in zip(m.named_grads(), ref.named_grads()):
        assert relative_error(a, b) <= 1e-14, name
    m.eval()
    assert relative_error(m(x), ref.net[2](ref.net[0](x))) <= 1e-14


def test_state_dict_keys_match_diffusers():
    for kw in CONFIGS.values():
        assert list(FeedForward(**kw).state_dict()) == list(DiffusersFeedForward(**kw).state_dict())
    assert list(FeedForward(4).state_dict()) == ["net.0.proj.weight", "net.0.proj.bias", "net.2.weight", "net.2.bias"]


def test_feedforward_errors(backend):
    with pytest.raises(ValueError, match=r"FeedForward: hidden_states must have 4 entries on axis -1, got shape \(2, 3\)"):
        FeedForward(4)(asarray(np.zeros((2, 3))))
    with pytest.raises(ValueError, match="activation_fn must be one of .*, got 'swish'"):
        FeedForward(4, activation_fn="swish")
    with pytest.raises(ValueError, match=r"Dropout: p must be a probability in \[0, 1\], got -0.1"):
        FeedForward(4, dropout=-0.1)
    with pytest.raises(ValueError, match="mult must be a positive number, got 0"):
        FeedForward(4, mult=0)
    with pytest.raises(ValueError, match="dim_out must be a positive int"):
        FeedForward(4, dim_out=0)
    with pytest.raises(ValueError, match=r"GEGLU: hidden_states must have 5 entries on axis -1, got shape \(3, 4\)"):
        GEGLU(5, 2)(asarray(np.zeros((3, 4))))
