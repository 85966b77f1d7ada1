"""SiLU, GELU, QuickGELU and Dropout modules: gradient checks, parity with torch twins, dropout
modes, reproducibility and exact gradient checkpointing."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.nn.activations import GELU, QuickGELU, SiLU
from npdiffusion.nn.dropout import Dropout
from npdiffusion.nn.linear import Linear
from npdiffusion.nn.module import Module
from npdiffusion.random import manual_seed
from npdiffusion.testing import gradcheck, noncontiguous
from parity import assert_parity
from test_ops_activations import EPS, FLOOR

def quick_gelu_twin():
    from transformers.activations import QuickGELUActivation  # slow import: only when used

    return QuickGELUActivation()


MODULES = {
    "silu": (SiLU, torch.nn.SiLU),
    "gelu": (GELU, torch.nn.GELU),
    "gelu_tanh": (lambda: GELU(approximate="tanh"), lambda: torch.nn.GELU(approximate="tanh")),
    "quick_gelu": (QuickGELU, quick_gelu_twin),
}


@pytest.mark.parametrize("name", list(MODULES))
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3))
def test_activation_module_gradcheck(backend, name, shape):
    x = noncontiguous(np.random.default_rng(len(shape)).standard_normal(shape) * 3.0)
    report = gradcheck(MODULES[name][0](), x, full_max=24, eps=EPS, floor=FLOOR)
    assert report.passed, report


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
@pytest.mark.parametrize("name", list(MODULES))
def test_activation_parity_with_torch(backend, name, dtype, rtol):
    ours, theirs = MODULES[name]
    x = np.random.default_rng(1).standard_normal((3, 4, 5)) * 3.0
    assert_parity(ours(), theirs(), [x], dtype=dtype, rtol=rtol)


def test_gelu_rejects_unknown_flavour():
    with pytest.raises(ValueError, match="GELU: approximate must be 'none' or 'tanh', got 'fast'"):
        GELU("fast")


# --------------------------------------------------------------------------------- Dropout
def test_dropout_module_gradcheck(backend):
    # gradcheck calls forward many times: give every call the same generator state.
    class Fixed(Dropout):
        def forward(self, x):
            self.rng = np.random.default_rng(3)
            return super().forward(x)

    x = noncontiguous(np.random.default_rng(0).standard_normal((3, 5)))
    report = gradcheck(Fixed(0.4), x, full_max=15)
    assert report.passed, report


def test_dropout_modes_and_parity_when_inactive(backend):
    x = asarray(np.random.default_rng(0).standard_normal((4, 6)))
    m = Dropout(0.5).eval()
    assert m(x) is x                                              # eval: identity, as torch
    assert_parity(Dropout(0.0), torch.nn.Dropout(0.0), [to_numpy(x)], dtype="float64", rtol=0)
    m.train()
    y = to_numpy(m(x))
    assert 0 < np.count_nonzero(y) < y.size
    dy = asarray(np.ones((4, 6)))
    np.testing.assert_array_equal(to_numpy(m.backward(dy)) != 0, y != 0)


def test_dropout_generator_seeding(backend):
    x = asarray(np.ones((8, 16)))
    manual_seed(5)
    a = to_numpy(Dropout(0.5)(x))
    manual_seed(5)
    b = to_numpy(Dropout(0.5)(x))
    np.testing.assert_array_equal(a, b)                           # manual_seed fixes the masks
    m = Dropout(0.5)
    assert not np.array_equal(to_numpy(m(x)), to_numpy(m(x)))     # the stream advances per call
    c = to_numpy(Dropout(0.5, rng=np.random.default_rng(1))(x))
    d = to_numpy(Dropout(0.5, rng=np.random.default_rng(1))(x))
    np.testing.assert_array_equal(c, d)
    with pytest.raises(ValueError, match=r"Dropout: p must be a probability in \[0, 1\], got -0.1"):
        Dropout(-0.1)
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator or None, got int"):
        Dropout(0.5, rng=3)


class Block(Module):
    """fc2(dropout(fc1(x))): a parent whose checkpointed recompute must redraw the same mask."""

    def __init__(self, rng):
        super().__init__()
        self.fc1 = Linear(4, 6)
        self.drop = Dropout(0.5, rng=rng)
        self.fc2 = Linear(6, 3)

    def forward(self, x):
        return self.fc2(self.drop(self.fc1(x)))

    def backward(self, dy):
        return self.fc1.backward(self.drop.backward(self.fc2.backward(dy)))


def test_dropout_is_exact_under_gradient_checkpointing(backend):
    rng = np.random.default_rng(0)
    x = asarray(rng.standard_normal((5, 4)))
    dy = asarray(rng.standard_normal((5, 3)))
    results = []
    for checkpoint in (False, True):
        manual_seed(0)
        m = Block(np.random.default_rng(42)).to("float64")
        m.gradient_checkpointing = checkpoint
        y = m(x)
        dx = m.backward(dy)
        after = m.drop.rng.random()                               # the stream continues identically
        results.append([to_numpy(y), to_numpy(dx)] + [to_numpy(g) for _, g in m.named_grads()] + [after])
    for plain, ckpt in zip(*results):
        np.testing.assert_array_equal(plain, ckpt)
