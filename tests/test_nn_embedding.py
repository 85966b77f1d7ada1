"""Embedding module: gradient check, parity with torch.nn.Embedding (repeated ids), init, errors."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.nn.embedding import Embedding
from npdiffusion.nn.module import Module
from npdiffusion.random import manual_seed
from npdiffusion.testing import gradcheck
from parity import assert_parity, randomize_


class Lookup(Module):
    """Embedding behind a backward that returns an empty tuple: the gradcheck utility counts the
    returned input gradients, and integer ids have none (Embedding.backward itself returns None)."""

    def __init__(self, v, d):
        super().__init__()
        self.emb = Embedding(v, d)

    def forward(self, ids):
        return self.emb(ids)

    def backward(self, dy):
        assert self.emb.backward(dy) is None
        return ()


@given(ids_shape=st.lists(st.integers(1, 4), min_size=1, max_size=2), v=st.integers(1, 6), d=st.integers(1, 4))
def test_embedding_module_gradcheck(backend, ids_shape, v, d):
    ids = np.random.default_rng(v + d).integers(0, v, size=ids_shape)
    report = gradcheck(Lookup(v, d).to("float64"), asarray(ids), full_max=24)
    assert set(report.errors) == {"emb.weight"} and report.passed, report


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
def test_embedding_parity_with_torch_repeated_ids(backend, dtype, rtol):
    theirs = randomize_(torch.nn.Embedding(11, 6), seed=2)
    ids = np.array([[1, 4, 4, 0, 10], [4, 4, 1, 7, 7]])           # repeats must accumulate
    errors = assert_parity(Embedding(11, 6), theirs, [ids], dtype=dtype, rtol=rtol)
    assert "grad weight" in errors


def test_embedding_accepts_host_ids_and_returns_no_input_gradient(backend):
    m = Embedding(5, 3)
    y = m(np.array([0, 4, 4]))
    np.testing.assert_array_equal(to_numpy(y), to_numpy(m.weight)[[0, 4, 4]])
    assert m.backward(asarray(np.ones((3, 3), np.float32))) is None
    np.testing.assert_array_equal(to_numpy(dict(m.named_grads())["weight"])[:, 0], [1, 0, 0, 0, 2])


def test_embedding_init_matches_torch_distribution():
    manual_seed(0)
    m = Embedding(1000, 64)
    w = to_numpy(m.weight)
    assert w.dtype == np.float32 and list(m.state_dict()) == list(torch.nn.Embedding(2, 2).state_dict())
    assert abs(w.mean()) < 0.01 and abs(w.std() - 1.0) < 0.01     # N(0, 1), as torch


def test_embedding_errors(backend):
    m = Embedding(5, 3)
    with pytest.raises(ValueError, match=r"Embedding: ids must lie in \[0, 5\) \(the rows of weight\), got .* 0 to 5"):
        m(asarray(np.array([0, 5])))
    with pytest.raises(TypeError, match="Embedding: ids must be an integer array, got float32"):
        m(asarray(np.array([0.0, 1.0], np.float32)))
    with pytest.raises(TypeError, match="Embedding: ids must be an integer array, got list"):
        m([0, 1])
    with pytest.raises(ValueError, match="embedding_dim must be a positive int, got 0"):
        Embedding(3, 0)
