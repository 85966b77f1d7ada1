"""The layer recorder (npdiffusion/nn/recorder.py): key names and order, recorded values against
independent recomputation, tuple outputs and gradients, repeated calls, checkpointing, copies,
zero effect on results, no nesting."""
import numpy as np
import pytest

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.models.unet.transformer_2d import Transformer2DModel
from npdiffusion.models.unet.unet_blocks import CrossAttnDownBlock2D
from npdiffusion.nn.linear import Linear
from npdiffusion.nn.module import Module
from npdiffusion.nn.recorder import record
from toy_modules import TwoLayer


class Pair(Module):
    """Returns (a, (b, c)) from two inputs and calls one child twice (a protocol exception on purpose)."""

    def __init__(self):
        super().__init__()
        self.fc = Linear(3, 3)
        self.inner = Linear(3, 3)

    def forward(self, x, z):
        a = self.fc(x)
        b = self.inner(z)
        c = self.inner(a)      # second call: recorded as inner#1
        self.save_for_backward(None)
        return a, (b, c + 0.0)

    def backward(self, ga, gbc):
        gb, gc = gbc
        da = ga + self.inner.backward(gc)
        return self.fc.backward(da), np.zeros((2, 3))


def _rng_arrays(rng, *shapes):
    return [rng.standard_normal(s) for s in shapes]


def test_keys_order_and_values_of_a_chain(backend):
    m = TwoLayer().to("float64")
    rng = np.random.default_rng(0)
    x, dy = _rng_arrays(rng, (5, 3), (5, 2))
    with record(m) as rec:
        y = m(asarray(x))
        m.zero_grad()
        dx = m.backward(asarray(dy))
    assert list(rec.forward) == ["act/blocks.0/input.0", "act/blocks.0/output",
                                 "act/blocks.1/input.0", "act/blocks.1/output"]
    assert list(rec.backward) == ["grad/blocks.1/output", "grad/blocks.1/input.0", "param_grad/blocks.1.weight",
                                  "param_grad/blocks.1.bias", "grad/blocks.0/output", "grad/blocks.0/input.0",
                                  "param_grad/blocks.0.weight", "param_grad/blocks.0.bias"]
    assert rec.layers == ["blocks.0", "blocks.1"]
    # values against a plain NumPy recomputation
    w0, b0 = to_numpy(m.blocks[0].weight), to_numpy(m.blocks[0].bias)
    w1, b1 = to_numpy(m.blocks[1].weight), to_numpy(m.blocks[1].bias)
    h = x @ w0.T + b0
    np.testing.assert_allclose(rec.forward["act/blocks.0/output"], h, rtol=1e-12)
    np.testing.assert_allclose(rec.forward["act/blocks.1/input.0"], h * h, rtol=1e-12)
    np.testing.assert_allclose(rec.forward["act/blocks.1/output"], (h * h) @ w1.T + b1, rtol=1e-12)
    dhh = dy @ w1
    np.testing.assert_allclose(rec.backward["grad/blocks.1/input.0"], dhh, rtol=1e-12)
    np.testing.assert_allclose(rec.backward["grad/blocks.0/output"], 2 * h * dhh, rtol=1e-12)
    np.testing.assert_allclose(rec.backward["grad/blocks.0/input.0"], to_numpy(dx), rtol=1e-12)
    np.testing.assert_allclose(rec.backward["param_grad/blocks.1.weight"], dy.T @ (h * h), rtol=1e-12)
    assert to_numpy(y).shape == (5, 2)


def test_recording_changes_nothing_and_costs_nothing_outside(backend):
    rng = np.random.default_rng(1)
    m = TwoLayer().to("float64")
    x, dy = _rng_arrays(rng, (4, 3), (4, 2))
    y0 = to_numpy(m(asarray(x))).copy()
    m.zero_grad()
    dx0 = to_numpy(m.backward(asarray(dy))).copy()
    g0 = {k: to_numpy(g).copy() for k, g in m.named_grads()}
    with record(m):
        y1 = m(asarray(x))
        m.zero_grad()
        dx1 = m.backward(asarray(dy))
    assert np.array_equal(to_numpy(y1), y0) and np.array_equal(to_numpy(dx1), dx0)
    assert all(np.array_equal(to_numpy(g), g0[k]) for k, g in m.named_grads())
    import npdiffusion.nn.recorder as recorder
    assert recorder.active is None


def test_tuple_outputs_repeated_calls_and_returned_gradients():
    m = Pair().to("float64")
    rng = np.random.default_rng(2)
    x, z, ga, gb, gc = _rng_arrays(rng, (2, 3), (2, 3), (2, 3), (2, 3), (2, 3))
    with record(m) as rec:
        m(x, z)
        m.zero_grad()
        m.backward(ga, (gb, gc))
    # `Pair` is the root (not recorded); its children: fc once, inner twice
    assert rec.layers == ["fc", "inner", "inner#1"]
    assert "act/inner#1/input.0" in rec.forward and "act/inner#1/output" in rec.forward
    np.testing.assert_array_equal(rec.forward["act/inner#1/input.0"], rec.forward["act/fc/output"])
    # the second call's backward is the first backward of inner: it is labelled by backward count
    assert "grad/inner/output" in rec.backward and "grad/inner#1/output" not in rec.backward


def test_down_block_names_nested_outputs_and_their_gradients():
    """A block returning (h, (s0, s1)) records output.0, output.1.0, output.1.1 and takes one
    gradient per position; its inputs (x, temb, ctx) get grad/.../input.0, .1, .2."""
    blk = CrossAttnDownBlock2D(4, 4, temb_channels=3, num_layers=1, resnet_groups=2, num_attention_heads=2,
                               cross_attention_dim=5).to("float64")
    rng = np.random.default_rng(3)
    x, temb, ctx = _rng_arrays(rng, (2, 4, 4, 4), (2, 3), (2, 2, 5))

    class Root(Module):
        def __init__(self):
            super().__init__()
            self.block = blk

        def forward(self, x, t, c):
            return self.block(x, t, c)

        def backward(self, *g):
            return self.block.backward(*g)

    root = Root()
    with record(root) as rec:
        h, states = root(x, temb, ctx)
        g = rng.standard_normal(h.shape)
        gs = [rng.standard_normal(s.shape) for s in states]
        dx, dt, dc = root.backward(g, gs)
    for k in ("act/block/output.0", "act/block/output.1.0", "act/block/output.1.1", "act/block/input.0",
              "act/block/input.1", "act/block/input.2"):
        assert k in rec.forward, k
    np.testing.assert_array_equal(rec.backward["grad/block/output.0"], g)
    np.testing.assert_array_equal(rec.backward["grad/block/output.1.1"], gs[1])
    np.testing.assert_array_equal(rec.backward["grad/block/input.0"], to_numpy(dx))
    np.testing.assert_array_equal(rec.backward["grad/block/input.1"], to_numpy(dt))
    np.testing.assert_array_equal(rec.backward["grad/block/input.2"], to_numpy(dc))


def test_values_are_copies_taken_at_the_event():
    """BasicTransformerBlock adds the residual into attn1's returned array in place: the recorded
    output must be attn1's own result."""
    m = Transformer2DModel(2, 4, in_channels=8, norm_num_groups=2, cross_attention_dim=6).to("float64")
    rng = np.random.default_rng(4)
    x, c = _rng_arrays(rng, (2, 8, 3, 3), (2, 5, 6))
    with record(m) as rec:
        m(x, c)
    attn = m.transformer_blocks[0].attn1
    again = attn(rec.forward["act/transformer_blocks.0.attn1/input.0"])
    np.testing.assert_allclose(rec.forward["act/transformer_blocks.0.attn1/output"], to_numpy(again), rtol=1e-12)
    assert not np.allclose(rec.forward["act/transformer_blocks.0.attn1/output"],
                           rec.forward["act/transformer_blocks.0.norm2/input.0"])


def test_checkpointing_recomputation_is_not_recorded_twice():
    m = Transformer2DModel(2, 4, in_channels=8, norm_num_groups=2, cross_attention_dim=6).to("float64")
    m.transformer_blocks[0].gradient_checkpointing = True
    rng = np.random.default_rng(5)
    x, c = _rng_arrays(rng, (2, 8, 3, 3), (2, 5, 6))
    with record(m) as rec:
        y = m(x, c)
        m.zero_grad()
        m.backward(rng.standard_normal(y.shape))
    assert not any("#" in k for k in list(rec.forward) + list(rec.backward))
    assert "grad/transformer_blocks.0.attn1.to_q/input.0" in rec.backward


def test_recorders_do_not_nest():
    m = TwoLayer()
    with record(m):
        with pytest.raises(RuntimeError, match="already active"):
            with record(m):
                pass
