"""CLIP's layers: CLIPAttention (causal and additive masks), CLIPMLP (each hidden_act) and
CLIPEncoderLayer / CLIPEncoder — float64 gradient checks (Hypothesis shapes, non-contiguous inputs)
and parity with transformers' modules on shared random weights."""
import numpy as np
import pytest
import torch
import transformers
from hypothesis import given
from hypothesis import strategies as st
from transformers.models.clip import modeling_clip as hf

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.models.clip.attention import CLIPAttention
from npdiffusion.models.clip.encoder import CLIPEncoder, CLIPEncoderLayer, CLIPMLP
from npdiffusion.testing import gradcheck, noncontiguous, relative_error
from parity import assert_parity, randomize_

transformers.logging.set_verbosity_error()
ACTS = ["quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh"]


def redraw_(module, seed):
    """Parameters from a local generator (the global init generator's state depends on test order),
    on parity.randomize_'s scales: N(0, 0.25/fan_in) weights, norm gains near one."""
    rng = np.random.default_rng(seed)
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            v = rng.standard_normal(p.shape) * 0.5 / np.sqrt(p.shape[1])
        else:
            v = rng.standard_normal(p.shape) * 0.25 + (1.0 if "norm" in name and name.endswith("weight") else 0.0)
        p[...] = asarray(v, dtype=p.dtype)
    return module


def spread_rows(rng, shape, min_std=0.5):
    """Normal draws whose rows (last axis) are rescaled about their mean to a standard deviation of at
    least ``min_std``, plus a spread of row means: a LayerNorm on them stays far from its 1/std
    blow-up, so central differences see a gently curved function."""
    x = rng.standard_normal(shape)
    if shape[-1] > 1:
        mean, std = x.mean(axis=-1, keepdims=True), x.std(axis=-1, keepdims=True)
        x = mean + (x - mean) * np.maximum(std, min_std) / std
    return x + rng.standard_normal(shape[:-1] + (1,))


def hf_config(hidden, heads, inter=8, act="quick_gelu", impl="sdpa"):
    c = transformers.CLIPTextConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=inter,
                                    hidden_act=act, num_hidden_layers=2)
    c._attn_implementation = impl        # sdpa: float64 stays float64 (eager softmaxes in float32)
    return c


def causal_bias(t, dtype=torch.float64):
    """transformers' causal mask: the dtype's most negative number above the diagonal."""
    return torch.triu(torch.full((t, t), torch.finfo(dtype).min, dtype=dtype), diagonal=1)[None, None]


def k_bias_free_grads_match(ours, theirs, rtol):
    """Every parameter gradient vs torch; ``k_proj.bias`` (exactly zero in exact arithmetic: a shift
    shared by all keys of a row) is checked against the largest gradient instead."""
    t = {k: p.grad.numpy() for k, p in theirs.named_parameters()}
    scale = max(float(np.abs(g).max()) for g in t.values())
    for name, g in ours.named_grads():
        if name.endswith("k_proj.bias"):
            assert float(np.abs(to_numpy(g)).max()) <= rtol * scale, name
        else:
            assert relative_error(g, t[name], floor=1e-12) <= rtol, (name, relative_error(g, t[name]))


@given(heads=st.integers(1, 3), dh=st.integers(1, 3), t=st.integers(1, 5), causal=st.booleans(),
       masked=st.booleans())
def test_attention_gradcheck(backend, heads, dh, t, causal, masked):
    rng = np.random.default_rng(heads * 100 + dh * 10 + t)
    m = redraw_(CLIPAttention(heads * dh, heads).to("float64"), seed=t)
    x = noncontiguous(rng.standard_normal((2, t, heads * dh)))
    mask = None
    if masked:
        mask = rng.standard_normal((2, 1, 1, t))
        mask[1, ..., -1] = -np.inf if t > 1 else 0.0   # a removed key (key 0 always stays)
        mask = asarray(mask)
    # floor 1e-3: k_proj.bias's derivatives are exactly zero, so only round-off is compared there
    report = gradcheck(m, x, eps=1e-5, floor=1e-3, attention_mask=mask, causal=causal)
    assert report.passed, report


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
@pytest.mark.parametrize("heads,hidden", [(1, 4), (2, 6), (3, 9)])
@pytest.mark.parametrize("mode", ["causal", "padding+causal", "none"])
def test_attention_matches_transformers(backend, heads, hidden, mode, dtype, rtol):
    tdt = torch.float64 if dtype == "float64" else torch.float32
    theirs = randomize_(hf.CLIPAttention(hf_config(hidden, heads)), seed=heads)
    t = 6
    x = np.random.default_rng(hidden).standard_normal((2, t, hidden))
    t_mask, o_mask = None, None
    if mode != "none":
        t_mask = causal_bias(t, tdt).expand(2, 1, t, t).clone()
    if mode == "padding+causal":
        t_mask[1, :, :, 4:] = torch.finfo(tdt).min       # right padding of the second row
        o_mask = np.zeros((2, 1, 1, t))
        o_mask[1, ..., 4:] = -np.inf
    causal = mode != "none"
    ours = CLIPAttention(hidden, heads)
    assert_parity(ours, theirs, [x], dtype=dtype, rtol=rtol, check_param_grads=False,
                  their_forward=lambda m, a: m(a, t_mask)[0],
                  our_forward=lambda m, a: m(a, None if o_mask is None else asarray(o_mask.astype(dtype)), causal))
    k_bias_free_grads_match(ours, theirs, rtol)


@given(act=st.sampled_from(ACTS), d=st.integers(1, 5), i=st.integers(1, 6))
def test_mlp_gradcheck(backend, act, d, i):
    m = redraw_(CLIPMLP(d, i, act).to("float64"), seed=d + i)
    x = noncontiguous(np.random.default_rng(d * 10 + i).standard_normal((2, 3, d)))
    # element by element some derivatives are ~1e-4 while the differences carry ~1e-9 round-off:
    # floor 1e-3 (absolute) keeps that from counting as error
    report = gradcheck(m, x, full_max=30, floor=1e-3)
    assert report.passed, report


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
@pytest.mark.parametrize("act", ACTS)
def test_mlp_matches_transformers(backend, act, dtype, rtol):
    theirs = randomize_(hf.CLIPMLP(hf_config(6, 2, inter=10, act=act)), seed=2)
    x = np.random.default_rng(1).standard_normal((2, 5, 6)) * 2
    assert_parity(CLIPMLP(6, 10, act), theirs, [x], dtype=dtype, rtol=rtol)


@given(heads=st.integers(1, 2), dh=st.integers(1, 3), t=st.integers(1, 4), causal=st.booleans(),
       act=st.sampled_from(ACTS))
def test_encoder_layer_gradcheck(backend, heads, dh, t, causal, act):
    rng = np.random.default_rng(heads * 100 + dh * 10 + t)
    m = redraw_(CLIPEncoderLayer(heads * dh, 5, heads, act).to("float64"), seed=t)
    x = spread_rows(rng, (2, t, heads * dh))
    report = gradcheck(m, noncontiguous(x), eps=1e-5, floor=1e-3, causal=causal)
    assert report.passed, report


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_encoder_layer_matches_transformers(backend, act, dtype, rtol):
    tdt = torch.float64 if dtype == "float64" else torch.float32
    theirs = randomize_(hf.CLIPEncoderLayer(hf_config(8, 2, inter=12, act=act)), seed=4)
    x = np.random.default_rng(3).standard_normal((3, 5, 8))
    ours = CLIPEncoderLayer(8, 12, 2, act)
    assert_parity(ours, theirs, [x], dtype=dtype, rtol=rtol, check_param_grads=False,
                  their_forward=lambda m, a: m(a, causal_bias(5, tdt)),
                  our_forward=lambda m, a: m(a, None, True))
    k_bias_free_grads_match(ours, theirs, rtol)


def test_encoder_hidden_state_gradients_enter_at_their_layer(backend):
    """Upstream gradients on intermediate hidden states: equal to torch autograd through the
    layer stack with the same states as extra outputs, and layers above a stopped stack get none."""
    theirs = randomize_(hf.CLIPEncoder(hf_config(4, 2, inter=6)), seed=6).double()
    ours = CLIPEncoder(4, 6, 2, 2).to("float64")
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4))
    tx = torch.tensor(x, requires_grad=True)
    states = [tx]
    for layer in theirs.layers:
        states.append(layer(states[-1], causal_bias(3)))
    grads = [rng.standard_normal((2, 3, 4)) for _ in states]
    grads[1] = None
    torch.autograd.backward([s for s, g in zip(states, grads) if g is not None],
                            [torch.tensor(g) for g in grads if g is not None])
    last, hs = ours(asarray(x), None, True, None, True)
    assert len(hs) == 3 and hs[-1] is last
    dx = ours.backward(None, [None if g is None else asarray(g) for g in grads])
    assert relative_error(dx, tx.grad.numpy()) <= 1e-10
    for name, g in ours.named_grads():
        tg = dict(theirs.named_parameters())[name].grad.numpy()
        if not name.endswith("k_proj.bias"):
            assert relative_error(g, tg, floor=1e-12) <= 1e-10, name

    ours.zero_grad()
    ours(asarray(x), None, True, 1, False)
    ours.backward(asarray(grads[0]))
    assert all(float(np.abs(to_numpy(g)).max()) == 0.0 for n, g in ours.named_grads() if n.startswith("layers.1."))


def test_layer_errors():
    with pytest.raises(ValueError, match=r"hidden_size \(6\) must be a multiple of num_heads \(4\)"):
        CLIPAttention(6, 4)
    with pytest.raises(ValueError, match="hidden_act must be one of"):
        CLIPMLP(4, 8, "relu")
    with pytest.raises(ValueError, match=r"hidden_states must have 4 entries on axis -1, got shape \(2, 3, 5\)"):
        CLIPAttention(4, 2)(asarray(np.zeros((2, 3, 5))))
    with pytest.raises(ValueError, match=r"mask must be broadcastable to \(B, heads, Tq, Tk\)"):
        CLIPAttention(4, 2)(asarray(np.zeros((2, 3, 4))), asarray(np.zeros((2, 1, 1, 4))))
    enc = CLIPEncoder(4, 6, 2, 2)
    with pytest.raises(ValueError, match=r"num_layers must be an int in \[0, 2\] or None, got 3"):
        enc(asarray(np.zeros((1, 3, 4), dtype=np.float32)), num_layers=3)
    enc(asarray(np.zeros((1, 3, 4), dtype=np.float32)))
    with pytest.raises(ValueError, match=r"CLIPEncoder: grad must have shape \(1, 3, 4\), got \(1, 3, 5\)"):
        enc.backward(asarray(np.zeros((1, 3, 5), dtype=np.float32)))
