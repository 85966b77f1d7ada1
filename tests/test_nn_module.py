"""The module protocol: registration, state dicts, dtype casts, modes, checkpointing."""
import numpy as np
import pytest

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.nn.linear import Linear
from npdiffusion.nn.module import ModuleList, StateDictError, no_cache
from npdiffusion.testing import gradcheck
from toy_modules import TwoLayer


def test_parameter_names_are_dotted_state_dict_keys():
    assert list(TwoLayer().state_dict()) == ["blocks.0.weight", "blocks.0.bias", "blocks.1.weight", "blocks.1.bias"]


def test_load_state_dict_lists_every_problem():
    m = TwoLayer()
    sd = {k: to_numpy(v).copy() for k, v in m.state_dict().items()}
    sd["blocks.1.weight"] = np.zeros((3, 3))
    del sd["blocks.0.bias"]
    sd["extra.weight"] = np.zeros(1)
    with pytest.raises(StateDictError) as err:
        m.load_state_dict(sd)
    msg = str(err.value)
    assert "missing keys: blocks.0.bias" in msg and "unexpected keys: extra.weight" in msg
    assert "blocks.1.weight: expected shape (2, 4), got (3, 3)" in msg


def test_load_state_dict_copies_and_casts_in_place(backend):
    m = TwoLayer().to("float64")
    w = m.blocks[0].weight
    new = {k: np.full(v.shape, 0.5, dtype=np.float32) for k, v in m.state_dict().items()}
    m.load_state_dict(new)
    assert m.blocks[0].weight is w and w.dtype == np.float64 and float(w[0, 0]) == 0.5


def test_to_casts_parameters_and_gradients(backend):
    m = TwoLayer()
    x = asarray(np.ones((2, 3), dtype=np.float32))
    m(x)
    m.backward(asarray(np.ones((2, 2), dtype=np.float32)))
    m.to("float64")
    assert all(p.dtype == np.float64 for p in m.parameters())
    assert all(g.dtype == np.float64 for _, g in m.named_grads())
    with pytest.raises(TypeError, match="dtype must be one of"):
        m.to("int8")


def test_eval_keeps_nothing_and_backward_then_fails(backend):
    m = TwoLayer().eval()
    m(asarray(np.ones((2, 3), dtype=np.float32)))
    assert all(not sub._caches for sub in m.modules())
    with pytest.raises(RuntimeError, match="forward in training mode"):
        m.backward(asarray(np.ones((2, 2), dtype=np.float32)))


def test_no_cache_context_keeps_nothing_in_training_mode(backend):
    m = TwoLayer()
    with no_cache():
        m(asarray(np.ones((2, 3), dtype=np.float32)))
    assert all(not sub._caches for sub in m.modules())


def test_gradients_accumulate_and_zero_grad_clears(backend):
    m = TwoLayer().to("float64")
    x = asarray(np.random.default_rng(0).standard_normal((2, 3)))
    dy = asarray(np.random.default_rng(1).standard_normal((2, 2)))
    m(x)
    m.backward(dy)
    once = {k: to_numpy(g).copy() for k, g in m.named_grads()}
    m(x)
    m.backward(dy)
    for k, g in m.named_grads():
        np.testing.assert_allclose(to_numpy(g), 2 * once[k], rtol=1e-12)
    m.zero_grad()
    assert all(float(abs(g).max()) == 0 for _, g in m.named_grads())


def test_composite_gradcheck(backend):
    m = TwoLayer().to("float64")
    report = gradcheck(m, asarray(np.random.default_rng(2).standard_normal((2, 3))), full_max=12)
    assert report.passed, report


@pytest.mark.parametrize("where", ["outer", "inner", "both"])
def test_gradient_checkpointing_is_exact(backend, where):
    rng = np.random.default_rng(3)
    x = asarray(rng.standard_normal((5, 3)))
    dy = asarray(rng.standard_normal((5, 2)))
    plain = TwoLayer().to("float64")
    ckpt = TwoLayer().to("float64")
    ckpt.load_state_dict(plain.state_dict())
    if where in ("outer", "both"):
        ckpt.gradient_checkpointing = True
    if where in ("inner", "both"):
        ckpt.blocks[0].gradient_checkpointing = True
    y0, y1 = plain(x), ckpt(x)
    if where in ("outer", "both"):
        assert all(not sub._caches for sub in ckpt.modules())
    dx0, dx1 = plain.backward(dy), ckpt.backward(dy)
    np.testing.assert_array_equal(to_numpy(y0), to_numpy(y1))
    np.testing.assert_allclose(to_numpy(dx1), to_numpy(dx0), rtol=1e-12, atol=0)
    for (k, g0), (_, g1) in zip(plain.named_grads(), ckpt.named_grads()):
        np.testing.assert_allclose(to_numpy(g1), to_numpy(g0), rtol=1e-12, atol=0, err_msg=k)


def test_modulelist_indexing_errors():
    ml = ModuleList([Linear(1, 1)])
    with pytest.raises(IndexError):
        ml[1]
    with pytest.raises(TypeError, match="ModuleList holds Modules"):
        ml.append("not a module")
