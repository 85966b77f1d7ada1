"""NoiseAwareClassifier: float64 gradient check of x and every parameter, the input gradient of
log p(y | x_t, t) against central differences, parity with a twin built from diffusers' blocks, errors."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.ops.embedding import timestep_embedding
from npdiffusion.guidance.classifier import NoiseAwareClassifier, log_prob_grad
from npdiffusion.testing import gradcheck, noncontiguous
from parity import assert_parity, randomize_


def _randomize(m, rng):
    """Deterministic weights of torch-test scale (parity.randomize_'s recipe), norm gains near one."""
    for name, p in m.named_parameters():
        fan_in = int(np.prod(p.shape[1:])) if p.ndim > 1 else 1
        v = rng.standard_normal(p.shape) * (0.5 / fan_in ** 0.5 if p.ndim > 1 else 0.25)
        if p.ndim == 1 and "norm" in name and name.endswith("weight"):
            v += 1.0
        p[...] = asarray(v, dtype=p.dtype)
    return m


def _x(rng, shape):
    return noncontiguous(rng.standard_normal(shape))


# Measured limits of float64 central differences on this network (not of its backward): the scalar
# checked is about 10 in size, so rounding costs ~1e-16 * 10 / eps in each directional derivative,
# and some parameter gradients (a GroupNorm gain over a 6x6 map, a timestep-MLP bias) are ~5e-5. So:
# eps = 1e-5 (rounding 1e-10, truncation still below it), floor 1e-4 on the scale of a derivative
# (absolute error <= 1e-9 accepted for tiny ones), tolerance 1e-5. Exactness of every gradient is
# pinned by test_classifier_parity_with_diffusers_blocks (torch autograd, float64, 1e-10).
@settings(max_examples=8)
@given(b=st.integers(1, 2), c=st.integers(1, 4), side=st.integers(3, 6), k=st.integers(2, 4),
       levels=st.integers(1, 2), layers=st.integers(1, 2))
def test_classifier_gradcheck(backend, b, c, side, k, levels, layers):
    rng = np.random.default_rng(b * 1000 + c * 100 + side * 10 + k)
    m = _randomize(NoiseAwareClassifier(c, k, (4, 8)[:levels], layers, 2).to("float64"), rng)
    t = rng.integers(0, 1000, b)
    report = gradcheck(m, _x(rng, (b, c, side, side)), t, directions=2, eps=1e-5, floor=1e-4, tolerance=1e-5,
                       full_max=27 if b * c * side * side <= 27 else 0)
    assert report.passed, report


@settings(max_examples=5)
@given(b=st.integers(1, 3), side=st.integers(3, 6))
def test_log_prob_grad_is_the_input_gradient(backend, b, side):
    """Central differences of sum_b log p(y_b | x_b, t_b) along random directions and along single
    entries equal <grad, direction>; the per-sample gradients really are per sample."""
    rng = np.random.default_rng(b * 10 + side)
    m = _randomize(NoiseAwareClassifier(3, 4, (4, 8), 1, 2).to("float64"), rng)
    x = asarray(rng.standard_normal((b, 3, side, side)))
    t = rng.uniform(0, 999, b)                                   # float timesteps, as Euler gives
    y = rng.integers(0, 4, b)
    logp, grad = log_prob_grad(m, x, t, y)
    assert logp.shape == (b,) and grad.shape == x.shape
    assert np.all(to_numpy(logp) <= 0)
    eps = 1e-6
    dirs = [rng.standard_normal(x.shape) for _ in range(3)]
    one = np.zeros(x.shape)
    one[b - 1, 1, side // 2, side - 1] = 1.0                     # a single entry of the last sample
    for d in dirs + [one]:
        plus = to_numpy(log_prob_grad(m, x + eps * asarray(d), t, y)[0])
        minus = to_numpy(log_prob_grad(m, x - eps * asarray(d), t, y)[0])
        numeric = (plus - minus) / (2 * eps)                    # (B,): each sample's own derivative
        analytic = (to_numpy(grad) * d).reshape(b, -1).sum(axis=1)
        assert np.allclose(numeric, analytic, rtol=1e-5, atol=1e-9), (numeric, analytic)


def test_log_prob_grad_keeps_parameter_grads_and_mode(backend):
    rng = np.random.default_rng(0)
    m = _randomize(NoiseAwareClassifier(3, 3, (4,), 1, 2).to("float64"), rng)
    x = asarray(rng.standard_normal((2, 3, 4, 4)))
    m.zero_grad()
    m(x, np.array([1, 2]))
    m.backward(asarray(rng.standard_normal((2, 3))))
    before = {k: to_numpy(v).copy() for k, v in m.named_grads()}
    m.eval()
    log_prob_grad(m, x, 5, 1)
    assert not m.training
    after = dict(m.named_grads())
    assert all(np.array_equal(before[k], to_numpy(after[k])) for k in before)


class _TorchClassifier(torch.nn.Module):
    """The same network from diffusers' blocks (diffusers' names), differentiated by autograd."""

    def __init__(self, c, k, boc, layers, groups):
        super().__init__()
        from diffusers.models.downsampling import Downsample2D
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps
        from diffusers.models.resnet import ResnetBlock2D
        te = 4 * boc[0]
        self.time_proj = Timesteps(boc[0], True, 0)
        self.time_embedding = TimestepEmbedding(boc[0], te)
        self.conv_in = torch.nn.Conv2d(c, boc[0], 3, padding=1)
        self.down_blocks = torch.nn.ModuleList()
        for i, co in enumerate(boc):
            blk = torch.nn.Module()
            blk.resnets = torch.nn.ModuleList(
                ResnetBlock2D(in_channels=boc[max(i - 1, 0)] if j == 0 else co, out_channels=co, temb_channels=te,
                              groups=groups, eps=1e-5) for j in range(layers))
            if i < len(boc) - 1:
                blk.downsamplers = torch.nn.ModuleList([Downsample2D(co, use_conv=True, padding=1, name="op")])
            self.down_blocks.append(blk)
        self.norm_out = torch.nn.GroupNorm(groups, boc[-1], eps=1e-5)
        self.head = torch.nn.Linear(boc[-1], k)

    def forward(self, x, t):
        # The float32 sinusoid: ours is correctly rounded, torch's sin/cos are not (a few ulps apart,
        # tested in the embedding op's own tests); feed both networks the same features.
        t_emb = torch.from_numpy(to_numpy(timestep_embedding(t.numpy(), self.time_proj.num_channels,
                                                             flip_sin_to_cos=True, downscale_freq_shift=0)))
        temb = self.time_embedding(t_emb.to(x.dtype))
        h = self.conv_in(x)
        for blk in self.down_blocks:
            for r in blk.resnets:
                h = r(h, temb)
            if hasattr(blk, "downsamplers"):
                h = blk.downsamplers[0](h)
        return self.head(torch.nn.functional.silu(self.norm_out(h)).mean(dim=(2, 3)))


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-4)])
def test_classifier_parity_with_diffusers_blocks(backend, dtype, rtol):
    theirs = randomize_(_TorchClassifier(3, 5, (8, 16), 2, 4), seed=1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 8))
    t = np.array([3, 811])
    assert_parity(NoiseAwareClassifier(3, 5, (8, 16), 2, 4), theirs, [x, t], dtype=dtype, rtol=rtol)


def test_classifier_errors():
    with pytest.raises(ValueError, match="norm_num_groups"):
        NoiseAwareClassifier(3, 3, (6, 8), 1, 4)
    with pytest.raises(ValueError, match="block_out_channels"):
        NoiseAwareClassifier(3, 3, (), 1, 4)
    with pytest.raises(ValueError, match="labels"):
        NoiseAwareClassifier(3, 3, (4,), 1, 2, labels=["a", "b"])
    m = NoiseAwareClassifier(3, 3, (4,), 1, 2)
    with pytest.raises(ValueError, match="x must have 3 entries on axis 1"):
        m(np.zeros((1, 4, 4, 4), np.float32), 0)
    with pytest.raises(ValueError, match="t must be a scalar or have shape"):
        m(np.zeros((2, 3, 4, 4), np.float32), np.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"y must hold class indices in \[0, 3\)"):
        log_prob_grad(m, np.zeros((2, 3, 4, 4), np.float32), 0, np.array([0, 3]))
    with pytest.raises(TypeError, match="classifier must be a NoiseAwareClassifier"):
        log_prob_grad(object(), np.zeros((2, 3, 4, 4), np.float32), 0, 0)
