"""U-Net and VAE building blocks: gradient checks, parity with diffusers' twins on randomized
weights (forward, input gradients, every parameter gradient), state-dict keys, errors.

Shared blocks (npdiffusion/models/blocks): ResnetBlock2D, Downsample2D, Upsample2D.
"""
import numpy as np
import pytest
import torch
from diffusers.models.downsampling import Downsample2D as TorchDownsample2D
from diffusers.models.resnet import ResnetBlock2D as TorchResnetBlock2D
from diffusers.models.upsampling import Upsample2D as TorchUpsample2D
from hypothesis import given
from hypothesis import strategies as st

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.models.blocks.resnet import ResnetBlock2D
from npdiffusion.models.blocks.sampling import Downsample2D, Upsample2D
from npdiffusion.testing import gradcheck, noncontiguous, relative_error
from parity import assert_parity, randomize_, redraw_parameters_


def _state_keys(module):
    return set(module.state_dict())


# ============================================================================ ResnetBlock2D
@given(cin=st.sampled_from([4, 6]), cout=st.sampled_from([4, 6]), temb=st.sampled_from([None, 3]),
       h=st.integers(2, 4), w=st.integers(1, 4), scale=st.sampled_from([1.0, 2.0]),
       shortcut=st.sampled_from([None, True]))
def test_resnet_block_gradcheck(backend, cin, cout, temb, h, w, scale, shortcut):
    # Two groups of >= 2 channels: a group of one channel would remove conv1.bias and the time
    # projection exactly (their true gradients are 0, leaving central differences pure round-off).
    rng = np.random.default_rng(cin * 1000 + cout * 100 + h * 10 + w)
    m = ResnetBlock2D(cin, cout, temb_channels=temb, groups=2, eps=1e-5, output_scale_factor=scale,
                      use_in_shortcut=shortcut).to("float64")
    redraw_parameters_(m, rng)
    x = noncontiguous(rng.standard_normal((2, cin, h, w)))
    inputs = [x] if temb is None else [x, noncontiguous(rng.standard_normal((2, temb)))]
    # temb and conv1.bias add per-channel constants that norm2 removes up to the spread within each
    # group, so their derivatives can be tiny: those below 1e-4 are checked to 1e-10 absolute (floor)
    report = gradcheck(m, *inputs, eps=1e-6, floor=1e-4)
    assert report.passed, report


RESNET_CONFIGS = {
    "same-channels": dict(in_channels=4, out_channels=4, temb_channels=6, groups=2, eps=1e-5),
    "shortcut": dict(in_channels=4, out_channels=6, temb_channels=5, groups=2, eps=1e-5),
    "forced-shortcut-no-bias": dict(in_channels=4, out_channels=4, temb_channels=3, groups=2,
                                    use_in_shortcut=True, conv_shortcut_bias=False),
    "vae-no-temb": dict(in_channels=6, out_channels=4, temb_channels=None, groups=2, eps=1e-6),
    "scaled-output": dict(in_channels=6, out_channels=6, temb_channels=4, groups=3, output_scale_factor=1.7),
}


@pytest.mark.parametrize("config", sorted(RESNET_CONFIGS))
@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
def test_resnet_block_matches_diffusers(backend, config, dtype, rtol):
    kw = RESNET_CONFIGS[config]
    theirs = randomize_(TorchResnetBlock2D(**kw), seed=len(config))
    ours = ResnetBlock2D(**kw)
    assert _state_keys(ours) == set(theirs.state_dict())
    rng = np.random.default_rng(len(config))
    x = rng.standard_normal((2, kw["in_channels"], 5, 3))
    if kw["temb_channels"] is None:
        assert_parity(ours, theirs, [x], dtype=dtype, rtol=rtol, their_forward=lambda m, a: m(a, None))
    else:
        temb = rng.standard_normal((2, kw["temb_channels"]))
        assert_parity(ours, theirs, [x, temb], dtype=dtype, rtol=rtol)


def test_resnet_block_checkpointing_is_exact(backend):
    rng = np.random.default_rng(5)
    x, temb = rng.standard_normal((2, 4, 5, 5)), rng.standard_normal((2, 3))
    dy = rng.standard_normal((2, 6, 5, 5))
    results = []
    for ckpt in (False, True):
        m = ResnetBlock2D(4, 6, temb_channels=3, groups=2).to("float64")
        m.load_state_dict({k: rng.standard_normal(v.shape) for k, v in m.state_dict().items()}
                          if not results else results[0][0])
        m.gradient_checkpointing = ckpt
        y = m(asarray(x), asarray(temb))
        dx, dt = m.backward(asarray(dy))
        results.append(({k: to_numpy(v).copy() for k, v in m.state_dict().items()}, y, dx, dt,
                        dict(m.named_grads())))
    (_, y0, dx0, dt0, g0), (_, y1, dx1, dt1, g1) = results
    assert relative_error(y1, y0) <= 1e-12 and relative_error(dx1, dx0) <= 1e-12 and relative_error(dt1, dt0) <= 1e-12
    for k in g0:
        assert relative_error(g1[k], g0[k]) <= 1e-12, k


def test_resnet_block_errors(backend):
    m = ResnetBlock2D(4, 4, temb_channels=3, groups=2)
    x = asarray(np.zeros((1, 4, 2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="x must have 4 entries on axis 1, got shape"):
        m(asarray(np.zeros((1, 3, 2, 2), dtype=np.float32)), asarray(np.zeros((1, 3), dtype=np.float32)))
    with pytest.raises(ValueError, match="temb .* is required"):
        m(x)
    with pytest.raises(ValueError, match="temb must have 3 entries on axis 1"):
        m(x, asarray(np.zeros((1, 5), dtype=np.float32)))
    with pytest.raises(ValueError, match="temb must have batch size 1"):
        m(x, asarray(np.zeros((2, 3), dtype=np.float32)))
    with pytest.raises(ValueError, match="temb must be None"):
        ResnetBlock2D(4, temb_channels=None, groups=2)(x, asarray(np.zeros((1, 3), dtype=np.float32)))
    with pytest.raises(ValueError, match="num_channels \\(4\\) must be divisible by num_groups \\(3\\)"):
        ResnetBlock2D(4, temb_channels=3, groups=3)
    with pytest.raises(ValueError, match="output_scale_factor must be a nonzero number"):
        ResnetBlock2D(4, groups=2, output_scale_factor=0)
    with pytest.raises(ValueError, match="in_channels must be a positive int"):
        ResnetBlock2D(0)


# ============================================================================ Down/Upsample2D
@given(c=st.integers(1, 3), h=st.integers(2, 6), w=st.integers(2, 6), mode=st.sampled_from(["p1", "p0", "pool"]))
def test_downsample_gradcheck(backend, c, h, w, mode):
    rng = np.random.default_rng(c * 100 + h * 10 + w)
    m = redraw_parameters_(Downsample2D(c, use_conv=mode != "pool", out_channels=None if mode == "pool" else 2,
                                     padding=0 if mode == "p0" else 1).to("float64"), rng)
    x = noncontiguous(rng.standard_normal((2, c, h, w)))
    # The weights are drawn from rng (the module's own init differs from call to call, which made
    # Hypothesis report flaky results). Full Jacobian: single entries of ~1e-4 show ~2e-6 round-off
    # at step 1e-6; step 1e-5 and floor 1e-3 as in test_ops_conv.py.
    report = gradcheck(m, x, full_max=60, eps=1e-5, floor=1e-3)
    assert report.passed, report


@given(c=st.integers(1, 3), h=st.integers(1, 4), w=st.integers(1, 4), conv=st.booleans(),
       size=st.sampled_from([None, (5, 7), (3, 2)]))
def test_upsample_gradcheck(backend, c, h, w, conv, size):
    rng = np.random.default_rng(c * 100 + h * 10 + w)
    m = redraw_parameters_(Upsample2D(c, use_conv=conv, out_channels=2 if conv else None).to("float64"), rng)
    x = noncontiguous(rng.standard_normal((2, c, h, w)))
    report = gradcheck(m, x, full_max=40, output_size=size, eps=1e-5, floor=1e-3)  # as the downsampler
    assert report.passed, report


@pytest.mark.parametrize("kw,shape", [
    (dict(channels=3, use_conv=True, out_channels=5, padding=1), (2, 3, 7, 6)),      # U-Net
    (dict(channels=3, use_conv=True, padding=0), (2, 3, 8, 5)),                      # VAE encoder
    (dict(channels=3, use_conv=True, out_channels=2, padding=2), (1, 3, 4, 4)),
    (dict(channels=3, use_conv=False), (2, 3, 7, 6)),                                # average pool
])
@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
def test_downsample_matches_diffusers(backend, kw, shape, dtype, rtol):
    theirs = randomize_(TorchDownsample2D(**kw, name="op"), seed=shape[2])
    ours = Downsample2D(**kw)
    assert _state_keys(ours) == set(theirs.state_dict())
    x = np.random.default_rng(1).standard_normal(shape)
    assert_parity(ours, theirs, [x], dtype=dtype, rtol=rtol)


@pytest.mark.parametrize("conv", [True, False])
@pytest.mark.parametrize("size", [None, (7, 9), (4, 5)])
@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
def test_upsample_matches_diffusers(backend, conv, size, dtype, rtol):
    kw = dict(channels=3, use_conv=conv, out_channels=4 if conv else None)
    theirs = randomize_(TorchUpsample2D(**kw), seed=3)
    ours = Upsample2D(**kw)
    assert _state_keys(ours) == set(theirs.state_dict())
    x = np.random.default_rng(2).standard_normal((2, 3, 3, 4))
    assert_parity(ours, theirs, [x], dtype=dtype, rtol=rtol,
                  our_forward=lambda m, a: m(a, size), their_forward=lambda m, a: m(a, size))


def test_sampling_errors(backend):
    x = asarray(np.zeros((1, 3, 4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="x must have 2 entries on axis 1, got shape"):
        Downsample2D(2)(x)
    with pytest.raises(ValueError, match="out_channels must equal channels"):
        Downsample2D(3, use_conv=False, out_channels=4)
    with pytest.raises(ValueError, match="padding must be a non-negative int"):
        Downsample2D(3, padding=-1)
    with pytest.raises(TypeError, match="use_conv must be a bool"):
        Upsample2D(3, use_conv="yes")
    with pytest.raises(ValueError, match="out_channels must equal channels"):
        Upsample2D(3, use_conv=False, out_channels=4)
    with pytest.raises(ValueError, match="output_size must be a pair of positive ints"):
        Upsample2D(3)(x, (0, 4))
    with pytest.raises(ValueError, match="at least 2x2"):
        Downsample2D(3, use_conv=False)(asarray(np.zeros((1, 3, 1, 4), dtype=np.float32)))


# ============================================================================ U-Net blocks
from diffusers.models.attention import BasicTransformerBlock as TorchBasicTransformerBlock  # noqa: E402
from diffusers.models.embeddings import TimestepEmbedding as TorchTimestepEmbedding  # noqa: E402
from diffusers.models.embeddings import Timesteps as TorchTimesteps  # noqa: E402
from diffusers.models.transformers.transformer_2d import Transformer2DModel as TorchTransformer2DModel  # noqa: E402
from diffusers.models.unets import unet_2d_blocks as torch_blocks  # noqa: E402

from npdiffusion.models.unet import unet_blocks  # noqa: E402
from npdiffusion.models.unet.embeddings import TimestepEmbedding, Timesteps  # noqa: E402
from npdiffusion.models.unet.transformer_2d import BasicTransformerBlock, Transformer2DModel  # noqa: E402
from npdiffusion.nn.module import Module  # noqa: E402


# ---------------------------------------------------------------------------- time embedding
def test_timestep_embedding_gradcheck_and_parity(backend):
    rng = np.random.default_rng(0)
    m = redraw_parameters_(TimestepEmbedding(6, 10).to("float64"), rng)
    report = gradcheck(m, noncontiguous(rng.standard_normal((3, 6))), full_max=20)
    assert report.passed, report
    for dtype, rtol in (("float64", 1e-10), ("float32", 1e-5)):
        theirs = randomize_(TorchTimestepEmbedding(6, 10), seed=1)
        assert set(TimestepEmbedding(6, 10).state_dict()) == set(theirs.state_dict())
        assert_parity(TimestepEmbedding(6, 10), theirs, [rng.standard_normal((3, 6))], dtype=dtype, rtol=rtol)


@pytest.mark.parametrize("flip,shift", [(True, 0), (False, 1)])
def test_timesteps_match_diffusers(backend, flip, shift):
    t = np.array([0, 1, 14, 37, 500, 999])
    ours = to_numpy(Timesteps(32, flip, shift)(asarray(t)))
    theirs = TorchTimesteps(32, flip, shift)(torch.tensor(t)).numpy()
    assert ours.dtype == np.float32 and ours.shape == (6, 32)
    # float32 sin/exp rounding differs from torch's by about one ulp of the argument t * freq
    assert np.abs(ours - theirs).max() <= 1e-4


# ---------------------------------------------------------------------------- transformers
@given(cross=st.sampled_from([None, 3]), only_cross=st.booleans(), tokens=st.integers(1, 4))
def test_basic_transformer_block_gradcheck(backend, cross, only_cross, tokens):
    only_cross = only_cross and cross is not None
    rng = np.random.default_rng(tokens * 10 + (cross or 0) + only_cross)
    m = redraw_parameters_(BasicTransformerBlock(8, 2, 4, cross_attention_dim=cross, only_cross_attention=only_cross)
                        .to("float64"), rng)
    x = noncontiguous(rng.standard_normal((2, tokens, 8)))
    inputs = [x] if cross is None else [x, noncontiguous(rng.standard_normal((2, 3, cross)))]
    # eps 1e-5, floor 1e-4: a softmax over 1-3 keys makes some derivatives small, and float64
    # round-off in the loss (~1e-15) divided by eps must stay well below 1e-6 of them
    report = gradcheck(m, *inputs, eps=1e-5, floor=1e-4)
    assert report.passed, report


@pytest.mark.parametrize("kw", [dict(cross_attention_dim=5), dict(cross_attention_dim=5, only_cross_attention=True),
                                dict(), dict(cross_attention_dim=8, upcast_attention=True)],
                         ids=["cross", "only-cross", "self-only", "upcast"])
@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
def test_basic_transformer_block_matches_diffusers(backend, kw, dtype, rtol):
    theirs = randomize_(TorchBasicTransformerBlock(8, 2, 4, **kw), seed=2)
    ours = BasicTransformerBlock(8, 2, 4, **kw)
    assert _state_keys(ours) == set(theirs.state_dict())
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 6, 8))
    if "cross_attention_dim" in kw:
        ctx = rng.standard_normal((2, 4, kw["cross_attention_dim"]))
        assert_parity(ours, theirs, [x, ctx], dtype=dtype, rtol=rtol,
                      their_forward=lambda m, a, c: m(a, encoder_hidden_states=c))
    else:
        assert_parity(ours, theirs, [x], dtype=dtype, rtol=rtol)


@given(linear=st.booleans(), layers=st.integers(1, 2), h=st.integers(1, 3), w=st.integers(2, 3))
def test_transformer_2d_gradcheck(backend, linear, layers, h, w):
    rng = np.random.default_rng(h * 10 + w + 100 * layers + linear)
    m = redraw_parameters_(Transformer2DModel(2, 4, in_channels=8, num_layers=layers, norm_num_groups=2,
                                           cross_attention_dim=3, use_linear_projection=linear).to("float64"), rng)
    x = noncontiguous(rng.standard_normal((2, 8, h, w)))
    ctx = noncontiguous(rng.standard_normal((2, 2, 3)))
    # Two stacked blocks curve more than one: at eps 1e-5 the central difference's own truncation
    # error reaches 1e-6 on the GEGLU projection (it falls as eps^2: 1e-4 at eps 1e-4, 4e-8 at
    # 3e-6), so a smaller step; round-off stays far below (see the BasicTransformerBlock check).
    report = gradcheck(m, x, ctx, eps=3e-6, floor=1e-4)
    assert report.passed, report


@pytest.mark.parametrize("linear", [False, True], ids=["conv-proj", "linear-proj"])
@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
def test_transformer_2d_matches_diffusers(backend, linear, dtype, rtol):
    kw = dict(num_attention_heads=2, attention_head_dim=4, in_channels=8, num_layers=2, norm_num_groups=4,
              cross_attention_dim=6, use_linear_projection=linear)
    theirs = randomize_(TorchTransformer2DModel(**kw), seed=4)
    ours = Transformer2DModel(**kw)
    assert _state_keys(ours) == set(theirs.state_dict())
    rng = np.random.default_rng(5)
    x, ctx = rng.standard_normal((2, 8, 3, 5)), rng.standard_normal((2, 4, 6))
    assert_parity(ours, theirs, [x, ctx], dtype=dtype, rtol=rtol,
                  their_forward=lambda m, a, c: m(a, encoder_hidden_states=c, return_dict=False)[0])


def test_transformer_errors(backend):
    with pytest.raises(ValueError, match="out_channels \\(4\\) must equal in_channels \\(8\\)"):
        Transformer2DModel(2, 4, in_channels=8, out_channels=4)
    with pytest.raises(ValueError, match="in_channels is required"):
        Transformer2DModel(2, 4)
    with pytest.raises(ValueError, match="only_cross_attention needs a cross_attention_dim"):
        BasicTransformerBlock(8, 2, 4, only_cross_attention=True)
    m = Transformer2DModel(2, 4, in_channels=8, norm_num_groups=2, cross_attention_dim=3)
    x = asarray(np.zeros((1, 8, 2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="encoder_hidden_states .* is required"):
        m(x)
    with pytest.raises(ValueError, match="hidden_states must have 8 entries on axis 1"):
        m(asarray(np.zeros((1, 6, 2, 2), dtype=np.float32)), asarray(np.zeros((1, 2, 3), dtype=np.float32)))


# ---------------------------------------------------------------------------- down / mid / up blocks
class _FlatDown(Module):
    """A down block as a module with flat outputs (h, *states) and flat gradients, for gradcheck."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, *inputs):
        h, states = self.block(*inputs)
        return (h, *states)

    def backward(self, grad, *state_grads):
        return self.block.backward(grad, list(state_grads))


class _FlatUp(Module):
    """An up block taking (h, *skips, temb[, ctx]) with gradients in that order, for gradcheck."""

    def __init__(self, block, n_skips, cross):
        super().__init__()
        self.block, self.n_skips, self.cross = block, n_skips, cross

    def forward(self, h, *rest):
        skips, tail = rest[:self.n_skips], rest[self.n_skips:]
        return self.block(h, tuple(skips), *tail)

    def backward(self, grad):
        dh, dstates, *tail = self.block.backward(grad)
        return (dh, *dstates, *tail)


DOWN_CASES = {
    "down": ("DownBlock2D", dict(in_channels=4, out_channels=6, temb_channels=5, num_layers=2, resnet_groups=2)),
    "down-last": ("DownBlock2D", dict(in_channels=4, out_channels=4, temb_channels=5, num_layers=1,
                                      resnet_groups=2, add_downsample=False)),
    "crossattn-down": ("CrossAttnDownBlock2D", dict(in_channels=4, out_channels=8, temb_channels=5, num_layers=2,
                                                    resnet_groups=2, num_attention_heads=2, cross_attention_dim=3)),
    "crossattn-down-linear": ("CrossAttnDownBlock2D", dict(
        in_channels=8, out_channels=8, temb_channels=5, num_layers=1, resnet_groups=4, num_attention_heads=4,
        cross_attention_dim=3, transformer_layers_per_block=2, use_linear_projection=True,
        only_cross_attention=True, add_downsample=False, downsample_padding=0)),
}


def _down_pair(case):
    kind, kw = DOWN_CASES[case]
    theirs = randomize_(getattr(torch_blocks, kind)(**kw), seed=len(case))
    return getattr(unet_blocks, kind)(**kw), theirs, kw


@pytest.mark.parametrize("case", sorted(DOWN_CASES))
@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
def test_down_blocks_match_diffusers(backend, case, dtype, rtol):
    ours, theirs, kw = _down_pair(case)
    assert _state_keys(ours) == set(theirs.state_dict())
    rng = np.random.default_rng(6)
    inputs = [rng.standard_normal((2, kw["in_channels"], 6, 5)), rng.standard_normal((2, 5))]
    cross = ours.has_cross_attention
    if cross:
        inputs.append(rng.standard_normal((2, 4, 3)))

    def their_forward(m, *a):
        h, states = m(a[0], a[1], encoder_hidden_states=a[2]) if cross else m(a[0], a[1])
        return (h, *states)

    assert_parity(ours, theirs, inputs, dtype=dtype, rtol=rtol, their_forward=their_forward,
                  our_forward=lambda m, *a: (lambda r: (r[0], *r[1]))(m(*a)),
                  our_backward=lambda m, g, *sg: m.backward(g, list(sg)))


@pytest.mark.parametrize("case", ["down", "crossattn-down"])
def test_down_blocks_gradcheck(backend, case):
    kind, kw = DOWN_CASES[case]
    rng = np.random.default_rng(7)
    m = _FlatDown(redraw_parameters_(getattr(unet_blocks, kind)(**kw).to("float64"), rng))
    inputs = [noncontiguous(rng.standard_normal((1, kw["in_channels"], 4, 4))),
              noncontiguous(rng.standard_normal((1, 5)))]
    if m.block.has_cross_attention:
        inputs.append(noncontiguous(rng.standard_normal((1, 2, 3))))
    report = gradcheck(m, *inputs, eps=1e-5, floor=1e-3, directions=2)
    assert report.passed, report


UP_CASES = {
    "up": ("UpBlock2D", dict(in_channels=4, prev_output_channel=6, out_channels=6, temb_channels=5, num_layers=2,
                             resnet_groups=2)),
    "up-last": ("UpBlock2D", dict(in_channels=4, prev_output_channel=6, out_channels=4, temb_channels=5,
                                  num_layers=3, resnet_groups=2, add_upsample=False)),
    "crossattn-up": ("CrossAttnUpBlock2D", dict(in_channels=4, prev_output_channel=8, out_channels=8,
                                                temb_channels=5, num_layers=2, resnet_groups=2,
                                                num_attention_heads=2, cross_attention_dim=3)),
    "crossattn-up-linear": ("CrossAttnUpBlock2D", dict(
        in_channels=8, prev_output_channel=8, out_channels=8, temb_channels=5, num_layers=2, resnet_groups=4,
        num_attention_heads=4, cross_attention_dim=3, transformer_layers_per_block=(1, 2),
        use_linear_projection=True, add_upsample=False)),
}


def _skip_shapes(kw, size=(3, 4)):
    """Skip states as the U-Net hands them over: the last resnet's skip has in_channels."""
    n = kw["num_layers"]
    return [(2, kw["in_channels"] if i == 0 else kw["out_channels"], *size) for i in range(n)]


@pytest.mark.parametrize("case", sorted(UP_CASES))
@pytest.mark.parametrize("size", [None, (7, 8)])
@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
def test_up_blocks_match_diffusers(backend, case, size, dtype, rtol):
    kind, kw = UP_CASES[case]
    theirs = randomize_(getattr(torch_blocks, kind)(**kw), seed=len(case))
    ours = getattr(unet_blocks, kind)(**kw)
    assert _state_keys(ours) == set(theirs.state_dict())
    rng = np.random.default_rng(8)
    n = kw["num_layers"]
    cross = ours.has_cross_attention
    inputs = [rng.standard_normal((2, kw["prev_output_channel"], 3, 4))]
    inputs += [rng.standard_normal(s) for s in _skip_shapes(kw)]
    inputs.append(rng.standard_normal((2, 5)))
    if cross:
        inputs.append(rng.standard_normal((2, 4, 3)))

    def their_forward(m, h, *rest):
        skips, temb = rest[:n], rest[n]
        if cross:
            return m(h, tuple(skips), temb, encoder_hidden_states=rest[n + 1], upsample_size=size)
        return m(h, tuple(skips), temb, upsample_size=size)

    def our_forward(m, h, *rest):
        return m(h, tuple(rest[:n]), *rest[n:], upsample_size=size)

    def our_backward(m, g):
        dh, dstates, *tail = m.backward(g)
        return (dh, *dstates, *tail)

    assert_parity(ours, theirs, inputs, dtype=dtype, rtol=rtol, their_forward=their_forward,
                  our_forward=our_forward, our_backward=our_backward)


@pytest.mark.parametrize("case", ["up", "crossattn-up"])
def test_up_blocks_gradcheck(backend, case):
    kind, kw = UP_CASES[case]
    rng = np.random.default_rng(9)
    block = redraw_parameters_(getattr(unet_blocks, kind)(**kw).to("float64"), rng)
    m = _FlatUp(block, kw["num_layers"], block.has_cross_attention)
    inputs = [noncontiguous(rng.standard_normal((1, kw["prev_output_channel"], 2, 3)))]
    inputs += [noncontiguous(rng.standard_normal((1, *s[1:]))) for s in _skip_shapes(kw, (2, 3))]
    inputs.append(noncontiguous(rng.standard_normal((1, 5))))
    if block.has_cross_attention:
        inputs.append(noncontiguous(rng.standard_normal((1, 2, 3))))
    report = gradcheck(m, *inputs, eps=1e-5, floor=1e-3, directions=2)
    assert report.passed, report


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
def test_mid_block_matches_diffusers(backend, dtype, rtol):
    kw = dict(in_channels=8, temb_channels=5, resnet_groups=4, num_attention_heads=2, cross_attention_dim=3,
              output_scale_factor=1.5, transformer_layers_per_block=2)
    theirs = randomize_(torch_blocks.UNetMidBlock2DCrossAttn(**kw), seed=11)
    ours = unet_blocks.UNetMidBlock2DCrossAttn(**kw)
    assert _state_keys(ours) == set(theirs.state_dict())
    rng = np.random.default_rng(12)
    inputs = [rng.standard_normal((2, 8, 3, 3)), rng.standard_normal((2, 5)), rng.standard_normal((2, 4, 3))]
    assert_parity(ours, theirs, inputs, dtype=dtype, rtol=rtol,
                  their_forward=lambda m, x, t, c: m(x, t, encoder_hidden_states=c))
    rng = np.random.default_rng(13)
    m = redraw_parameters_(unet_blocks.UNetMidBlock2DCrossAttn(**kw).to("float64"), rng)
    report = gradcheck(m, *[noncontiguous(rng.standard_normal((1, *a.shape[1:]))) for a in inputs],
                       eps=1e-5, floor=1e-3, directions=2)
    assert report.passed, report


def test_block_errors(backend):
    with pytest.raises(ValueError, match="8 channels must split evenly into num_attention_heads=3"):
        unet_blocks.CrossAttnDownBlock2D(4, 8, 5, resnet_groups=2, num_attention_heads=3, cross_attention_dim=3)
    with pytest.raises(ValueError, match="transformer_layers_per_block must be an int or have one entry per layer"):
        unet_blocks.CrossAttnDownBlock2D(4, 8, 5, num_layers=2, resnet_groups=2, num_attention_heads=2,
                                         cross_attention_dim=3, transformer_layers_per_block=(1, 1, 1))
    with pytest.raises(ValueError, match="act_fn must be one of"):
        unet_blocks.DownBlock2D(4, 8, 5, resnet_groups=2, resnet_act_fn="relu")
    up = unet_blocks.UpBlock2D(4, 6, 6, 5, num_layers=2, resnet_groups=2)
    h = asarray(np.zeros((1, 6, 2, 2), dtype=np.float32))
    t = asarray(np.zeros((1, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="must hold 2 skip states"):
        up(h, (h,), t)
    with pytest.raises(ValueError, match="skip state 0 has shape \\(1, 4, 3, 3\\)"):
        up(h, (asarray(np.zeros((1, 4, 3, 3), dtype=np.float32)), h), t)
    down = unet_blocks.DownBlock2D(4, 6, 5, resnet_groups=2)
    down(asarray(np.zeros((1, 4, 4, 4), dtype=np.float32)), t)
    with pytest.raises(ValueError, match="state_grads must hold one gradient \\(or None\\) per skip state \\(2\\)"):
        down.backward(asarray(np.zeros((1, 6, 2, 2), dtype=np.float32)), [None])
