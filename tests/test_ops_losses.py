"""Losses: gradient checks and equality with torch (F.mse_loss, F.cross_entropy,
torch.distributions' Normal-Normal KL), stability, errors."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.ops.losses import (
    cross_entropy,
    cross_entropy_backward,
    gaussian_kl,
    gaussian_kl_backward,
    mse_loss,
    mse_loss_backward,
)
from npdiffusion.testing import gradcheck_op, noncontiguous, relative_error

shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3)

# Central differences resolve a derivative to ~1e-10 absolute; softmax entries of ~1e-6 (logits
# spread by 3 sigma) then show ~1e-4 relative noise. Step 1e-5 and a floor of 1e-3 on the error's
# denominator keep round-off near 1e-7 while a wrong entry still shows (see test_ops_activations).
EPS, FLOOR = 1e-5, 1e-3


@given(shape=shapes, reduction=st.sampled_from(["mean", "sum", "none"]))
def test_mse_gradcheck(backend, shape, reduction):
    rng = np.random.default_rng(len(shape))
    pred, target = noncontiguous(rng.standard_normal(shape)), noncontiguous(rng.standard_normal(shape))
    report = gradcheck_op(lambda p, t: mse_loss(p, t, reduction), mse_loss_backward, [pred, target],
                          grad_inputs=[0], full_max=24, eps=EPS, floor=FLOOR)
    assert report.passed, report


@given(lead=st.lists(st.integers(1, 4), min_size=0, max_size=2), k=st.integers(1, 6), ignore=st.booleans())
def test_cross_entropy_gradcheck(backend, lead, k, ignore):
    rng = np.random.default_rng(len(lead) * 10 + k)
    logits = noncontiguous(rng.standard_normal((*lead, k)) * 3.0)
    labels = rng.integers(0, k, size=lead)
    if ignore and labels.size > 1:
        labels.reshape(-1)[0] = -100
    report = gradcheck_op(cross_entropy, cross_entropy_backward, [logits, asarray(labels)], full_max=24,
                          eps=EPS, floor=FLOOR)
    assert report.passed, report


kl_shapes = st.sampled_from([((2, 3), (2, 3), (2, 3), (2, 3)), ((2, 3), (2, 3), (3,), (1, 3)),
                             ((4,), (1,), (), (4,)), ((2, 1, 3), (2, 4, 3), (4, 1), (3,))])


@given(shapes=kl_shapes, seed=st.integers(0, 5))
def test_gaussian_kl_gradcheck(backend, shapes, seed):
    rng = np.random.default_rng(seed)
    args = [noncontiguous(rng.standard_normal(s)) if s else asarray(rng.standard_normal(s)) for s in shapes]
    report = gradcheck_op(gaussian_kl, gaussian_kl_backward, args, full_max=24, eps=EPS, floor=FLOOR)
    assert report.passed, report


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-10), (np.float32, 1e-5)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_equals_torch(backend, dtype, rtol, reduction):
    rng = np.random.default_rng(0)
    pred, target = (rng.standard_normal((3, 4, 5)).astype(dtype) for _ in range(2))
    tp = torch.tensor(pred, requires_grad=True)
    tl = torch.nn.functional.mse_loss(tp, torch.tensor(target), reduction=reduction)
    dl = rng.standard_normal(tuple(tl.shape)).astype(dtype)
    tl.backward(torch.tensor(dl))
    loss, cache = mse_loss(asarray(pred), asarray(target), reduction)
    dpred, dtarget = mse_loss_backward(asarray(dl), cache)
    assert dtarget is None and loss.dtype == dpred.dtype == dtype and loss.shape == tuple(tl.shape)
    assert relative_error(loss, tl.detach().numpy()) <= rtol
    assert relative_error(dpred, tp.grad.numpy()) <= rtol


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-10), (np.float32, 1e-5)])
def test_cross_entropy_equals_torch(backend, dtype, rtol):
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((3, 5, 7)) * 4.0).astype(dtype)
    labels = rng.integers(0, 7, size=(3, 5))
    labels[1, 2] = labels[2, 0] = -100                           # ignored, as torch's default
    tz = torch.tensor(logits, requires_grad=True)
    tl = torch.nn.functional.cross_entropy(tz.reshape(-1, 7), torch.tensor(labels).reshape(-1))
    tl.backward(torch.tensor(1.3, dtype=tz.dtype))
    loss, cache = cross_entropy(asarray(logits), asarray(labels))
    dz, dlabels = cross_entropy_backward(1.3, cache)
    assert dlabels is None and loss.shape == () and loss.dtype == dz.dtype == dtype
    assert relative_error(loss, tl.detach().numpy()) <= rtol
    assert relative_error(dz, tz.grad.numpy()) <= rtol
    assert not np.any(to_numpy(dz)[1, 2])


def test_cross_entropy_is_stable_for_huge_logits(backend):
    logits = np.array([[1e4, 0.0, -1e4], [-5e3, 5e3, 5e3]], dtype=np.float32)
    labels = np.array([1, 2])
    loss, cache = cross_entropy(asarray(logits), asarray(labels))
    expected = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(labels)).item()
    assert np.isfinite(to_numpy(loss)) and abs(float(loss) - expected) <= 1e-5 * abs(expected)
    assert np.all(np.isfinite(to_numpy(cross_entropy_backward(1.0, cache)[0])))


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-10), (np.float32, 1e-5)])
def test_gaussian_kl_equals_torch(backend, dtype, rtol):
    rng = np.random.default_rng(2)
    m1, lv1 = (rng.standard_normal((2, 3, 4)).astype(dtype) for _ in range(2))
    m2, lv2 = rng.standard_normal((3, 4)).astype(dtype), rng.standard_normal((1, 4)).astype(dtype)
    ts = [torch.tensor(a, requires_grad=True) for a in (m1, lv1, m2, lv2)]
    normal = torch.distributions.Normal
    tk = torch.distributions.kl_divergence(normal(ts[0], torch.exp(0.5 * ts[1])), normal(ts[2], torch.exp(0.5 * ts[3])))
    dk = rng.standard_normal((2, 3, 4)).astype(dtype)
    tk.backward(torch.tensor(dk))
    kl, cache = gaussian_kl(*(asarray(a) for a in (m1, lv1, m2, lv2)))
    grads = gaussian_kl_backward(asarray(dk), cache)
    assert kl.dtype == dtype and relative_error(kl, tk.detach().numpy()) <= rtol
    for name, g, t in zip(("mean1", "logvar1", "mean2", "logvar2"), grads, ts):
        assert g.shape == tuple(t.shape) and relative_error(g, t.grad.numpy()) <= rtol, name


def test_gaussian_kl_to_standard_normal_is_the_vae_kl(backend):
    """KL(N(mu, e^lv) || N(0, 1)) = (mu^2 + e^lv - 1 - lv) / 2, with floats for the prior."""
    rng = np.random.default_rng(3)
    mu, lv = rng.standard_normal((2, 4, 3, 3)), rng.standard_normal((2, 4, 3, 3))
    kl, cache = gaussian_kl(asarray(mu), asarray(lv), 0.0, 0.0)
    np.testing.assert_allclose(to_numpy(kl), 0.5 * (mu**2 + np.exp(lv) - 1 - lv), rtol=1e-13)
    dmu, dlv, dm2, dlv2 = gaussian_kl_backward(asarray(np.ones_like(mu)), cache)
    assert dm2 is None and dlv2 is None
    np.testing.assert_allclose(to_numpy(dmu), mu, rtol=1e-13)
    np.testing.assert_allclose(to_numpy(dlv), 0.5 * (np.exp(lv) - 1), rtol=1e-13)


def test_loss_errors(backend):
    a, b = asarray(np.zeros((2, 3))), asarray(np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"pred and target must have the same shape, got \(2, 3\) and \(3, 2\)"):
        mse_loss(a, b)
    with pytest.raises(ValueError, match="reduction must be one of .*, got 'avg'"):
        mse_loss(a, a, "avg")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\) or equal ignore_index=-100, got 3"):
        cross_entropy(a, asarray(np.array([0, 3])))
    with pytest.raises(TypeError, match="labels must be an integer array, got float64"):
        cross_entropy(a, asarray(np.zeros(2)))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        cross_entropy(a, asarray(np.zeros(3, np.int64)))
    with pytest.raises(ValueError, match="must broadcast together"):
        gaussian_kl(a, a, b, b)
    with pytest.raises(TypeError, match="at least one of mean1, logvar1, mean2, logvar2 must be an array"):
        gaussian_kl(0.0, 0.0, 0.0, 0.0)
