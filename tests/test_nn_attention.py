"""Attention module: gradient check, parity with diffusers' Attention (AttnProcessor2_0), errors."""
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention as DiffusersAttention
from hypothesis import given
from hypothesis import strategies as st

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.nn.attention import Attention
from npdiffusion.nn.module import StateDictError
from npdiffusion.testing import gradcheck, noncontiguous, relative_error
from parity import assert_parity, randomize_


def _assert_param_grads(ours, theirs, rtol):
    """Every parameter gradient against torch's. ``to_k.bias`` is special: softmax over the keys
    ignores a shift that is the same for every key, so its true gradient is exactly zero and both
    sides hold only rounding; it is checked against the scale of the other gradients."""
    t_grads = {k: p.grad.numpy() for k, p in theirs.named_parameters()}
    ours_grads = dict(ours.named_grads())
    assert set(ours_grads) == set(t_grads)
    scale = max(float(np.abs(g).max()) for g in t_grads.values())
    for name, g in ours_grads.items():
        if name == "to_k.bias":
            assert float(np.abs(to_numpy(g)).max()) <= rtol * scale, name
            assert float(np.abs(t_grads[name]).max()) <= rtol * scale, name
        else:
            assert relative_error(g, t_grads[name], floor=1e-12) <= rtol, (name, relative_error(g, t_grads[name]))


@given(heads=st.integers(1, 3), dim_head=st.integers(1, 3), tq=st.integers(1, 4), tk=st.integers(1, 4),
       cross=st.booleans(), bias=st.booleans(), residual=st.booleans(), chunk=st.sampled_from([None, 2]))
def test_attention_module_gradcheck(backend, heads, dim_head, tq, tk, cross, bias, residual, chunk):
    rng = np.random.default_rng(heads * 100 + dim_head * 10 + tq + tk)
    c, cc = 4, 3
    m = Attention(c, cross_attention_dim=cc if cross else None, heads=heads, dim_head=dim_head, bias=bias,
                  residual_connection=residual, rescale_output_factor=1.5 if residual else 1.0,
                  chunk_size=chunk).to("float64")
    x = noncontiguous(rng.standard_normal((2, tq, c)))
    inputs = [x, noncontiguous(rng.standard_normal((2, tk, cc)))] if cross else [x]
    # floor 1e-3 at eps 1e-5: central differences carry up to ~1e-10 absolute round-off, so smaller
    # derivatives (to_k.bias's are exactly zero, see _assert_param_grads) are checked to 1e-9 absolute
    report = gradcheck(m, *inputs, eps=1e-5, floor=1e-3)
    assert report.passed, report


CONFIGS = {
    "self": dict(query_dim=6, heads=3, dim_head=2),
    "self-bias": dict(query_dim=6, heads=2, dim_head=4, bias=True),
    "cross": dict(query_dim=6, cross_attention_dim=5, heads=2, dim_head=3),
    "cross-bias-no-out-bias": dict(query_dim=4, cross_attention_dim=7, heads=3, dim_head=2, bias=True,
                                   out_bias=False),
    "vae-mid": dict(query_dim=8, heads=1, dim_head=8, bias=True, residual_connection=True,
                    rescale_output_factor=1.7, upcast_softmax=True),
}


@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
def test_attention_matches_diffusers(backend, config, dtype, rtol, chunk):
    kw = CONFIGS[config]
    theirs = randomize_(DiffusersAttention(**kw), seed=len(config))
    ours = Attention(**kw, chunk_size=chunk)
    rng = np.random.default_rng(len(config))
    inputs = [rng.standard_normal((2, 7, kw["query_dim"]))]
    if "cross_attention_dim" in kw:
        inputs.append(rng.standard_normal((2, 5, kw["cross_attention_dim"])))
    assert_parity(ours, theirs, inputs, dtype=dtype, rtol=rtol, check_param_grads=False)
    _assert_param_grads(ours, theirs, rtol)


@pytest.mark.parametrize("mask_shape", [(2, 5), (2, 1, 5), (2, 7, 5), (4, 1, 5), (4, 7, 5)])
def test_attention_mask_matches_diffusers(backend, mask_shape):
    kw = dict(query_dim=6, cross_attention_dim=3, heads=2, dim_head=3, bias=True)
    theirs = randomize_(DiffusersAttention(**kw), seed=1)
    rng = np.random.default_rng(9)
    x, ctx, mask = rng.standard_normal((2, 7, 6)), rng.standard_normal((2, 5, 3)), rng.standard_normal(mask_shape)
    mask[..., 1] = -10000.0                                        # diffusers' "masked out" bias
    assert_parity(Attention(**kw), theirs, [x, ctx, mask], grad_inputs=[0, 1], check_param_grads=False,
                  their_forward=lambda m, a, c, msk: m(a, c, attention_mask=msk),
                  our_forward=lambda m, a, c, msk: m(a, c, attention_mask=msk))


def test_self_attention_sums_qkv_gradients(backend):
    """The same x feeds q, k and v: dx must hold all three contributions (checked against passing x
    as an explicit context, where they come back separately)."""
    rng = np.random.default_rng(3)
    m = Attention(4, heads=2, dim_head=2, bias=True).to("float64")
    x = asarray(rng.standard_normal((2, 3, 4)))
    g = asarray(rng.standard_normal((2, 3, 4)))
    y_self = m(x)
    dx_self, no_context = m.backward(g)
    assert no_context is None                                  # self-attention: no context input
    y_cross = m(x, x)
    dx, dctx = m.backward(g)
    assert relative_error(y_self, y_cross) == 0.0
    assert relative_error(dx_self, dx + dctx) <= 1e-14


@pytest.mark.parametrize("call", ["positional", "keyword"])
def test_gradient_checkpointing_gives_the_same_gradients(backend, call):
    rng = np.random.default_rng(8)
    x, ctx, g = (asarray(rng.standard_normal(s)) for s in ((2, 4, 6), (2, 3, 5), (2, 4, 6)))
    results = []
    for checkpointed in (False, True):
        m = Attention(6, cross_attention_dim=5, heads=2, dim_head=3, bias=True, chunk_size=3).to("float64")
        m.load_state_dict({k: np.linspace(-1, 1, v.size).reshape(v.shape) for k, v in m.state_dict().items()})
        m.gradient_checkpointing = checkpointed
        y = m(x, ctx) if call == "positional" else m(x, encoder_hidden_states=ctx)
        results.append([y, *m.backward(g), *(gr for _, gr in m.named_grads())])
    for a, b in zip(*results):
        assert relative_error(a, b) == 0.0


def test_dropout_masks_the_output_projection(backend):
    """to_out.1 drops entries of to_out.0's output (before the residual), with the same mask in
    backward; in eval mode it is the identity. Reference: the p = 0 module without the residual
    (so its output is to_out.0's output / 2) and the mask drawn from an identically seeded generator."""
    rng = np.random.default_rng(4)
    x, g = asarray(rng.standard_normal((2, 5, 4))), asarray(rng.standard_normal((2, 5, 4)))
    m = Attention(4, heads=2, dim_head=2, dropout=0.5, residual_connection=True,
                  rescale_output_factor=2.0).to("float64")
    m.to_out[1].rng = np.random.default_rng(0)
    keep = asarray((np.random.default_rng(0).random((2, 5, 4)) >= 0.5) * 2.0)
    y, (dx, _) = m(x), m.backward(g)
    ref = Attention(4, heads=2, dim_head=2, rescale_output_factor=2.0).to("float64")
    ref.load_state_dict(m.state_dict())
    branch = ref(x)                                            # to_out.0(...) / 2
    assert relative_error(y, branch * keep + x / 2.0) <= 1e-14
    dx_branch, _ = ref.backward(g * keep)
    assert relative_error(dx, dx_branch + g / 2.0) <= 1e-14   # plus the residual's g / 2
    for (name, a), (_, b) in zip(m.named_grads(), ref.named_grads()):
        assert relative_error(a, b) <= 1e-14, name
    m.eval()
    assert relative_error(m(x), branch + x / 2.0) <= 1e-14


def test_state_dict_keys_match_diffusers():
    for kw in CONFIGS.values():
        assert list(Attention(**kw).state_dict()) == list(DiffusersAttention(**kw).state_dict())


def test_attention_eval_keeps_nothing(backend):
    m = Attention(4, heads=2, dim_head=2).eval()
    m(asarray(np.zeros((1, 3, 4), dtype=np.float32)))
    with pytest.raises(RuntimeError, match="needs a forward in training mode"):
        m.backward(asarray(np.zeros((1, 3, 4), dtype=np.float32)))


def test_attention_errors(backend):
    m = Attention(6, cross_attention_dim=5, heads=2, dim_head=3)
    x = asarray(np.zeros((2, 4, 6)))
    with pytest.raises(ValueError, match=r"hidden_states must have 6 entries on axis -1, got shape \(2, 4, 5\)"):
        m(asarray(np.zeros((2, 4, 5))), asarray(np.zeros((2, 3, 5))))
    with pytest.raises(ValueError, match=r"hidden_states must have 3 dimensions, got shape \(2, 6, 2, 2\)"):
        m(asarray(np.zeros((2, 6, 2, 2))), asarray(np.zeros((2, 3, 5))))
    with pytest.raises(ValueError, match=r"encoder_hidden_states must have 5 entries on axis -1, got shape \(2, 3, 6\)"):
        m(x, asarray(np.zeros((2, 3, 6))))
    with pytest.raises(ValueError, match="encoder_hidden_states must have batch size 2"):
        m(x, asarray(np.zeros((3, 3, 5))))
    with pytest.raises(ValueError, match="encoder_hidden_states \\(width 5\\) is required"):
        m(x)
    with pytest.raises(ValueError, match=r"attention_mask must have shape .* got shape \(3, 1, 3\)"):
        m(x, asarray(np.zeros((2, 3, 5))), attention_mask=asarray(np.zeros((3, 1, 3))))
    with pytest.raises(ValueError, match=r"attention_mask must have shape .* got shape \(2, 1, 4\)"):
        m(x, asarray(np.zeros((2, 3, 5))), attention_mask=asarray(np.zeros((2, 1, 4))))
    with pytest.raises(ValueError, match="heads must be a positive int, got 0"):
        Attention(6, heads=0)
    with pytest.raises(ValueError, match=r"Dropout: p must be a probability in \[0, 1\], got 1.5"):
        Attention(6, dropout=1.5)
    with pytest.raises(ValueError, match="rescale_output_factor must be a nonzero number"):
        Attention(6, rescale_output_factor=0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        Attention(6, chunk_size=0)


def test_heads_times_dim_head_mismatch_is_a_state_dict_error():
    theirs = DiffusersAttention(8, heads=2, dim_head=4)               # inner width 8
    with pytest.raises(StateDictError, match=r"to_q.weight: expected shape \(6, 8\), got \(8, 8\)"):
        Attention(8, heads=2, dim_head=3).load_state_dict(                # inner width 6
            {k: v.detach().numpy() for k, v in theirs.state_dict().items()})
