"""CLIP's contrastive objective: float64 gradient checks of the InfoNCE loss with respect to both
embeddings and logit_scale, of the logits and of L2 normalization; equality with transformers'
``image_text_contrastive_loss`` under torch autograd; errors."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers.models.clip.modeling_clip import _get_vector_norm, image_text_contrastive_loss

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.models.clip.contrastive import (
    clip_logits_backward,
    clip_logits_forward,
    contrastive_loss_backward,
    contrastive_loss_forward,
    l2_normalize_backward,
    l2_normalize_forward,
    symmetric_cross_entropy_backward,
    symmetric_cross_entropy_forward,
)
from npdiffusion.testing import gradcheck_op, noncontiguous, relative_error


def unit_rows(rng, n, e):
    x = rng.standard_normal((n, e))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@given(n=st.integers(1, 5), e=st.integers(1, 6), scale=st.floats(-1.0, 3.0))
def test_contrastive_loss_gradcheck(backend, n, e, scale):
    """Loss and logits_per_text, each with a random upstream gradient, against central differences
    in the text embeddings, the image embeddings and logit_scale (a 0-d array)."""
    rng = np.random.default_rng(n * 10 + e)
    t = noncontiguous(unit_rows(rng, n, e))
    v = noncontiguous(unit_rows(rng, n, e))
    s = asarray(np.asarray(scale))
    report = gradcheck_op(contrastive_loss_forward, contrastive_loss_backward, [t, v, s], full_max=30)
    assert report.passed, report
    assert set(report.errors) == {"input[0]", "input[1]", "input[2]"}


@given(n=st.integers(1, 4), m=st.integers(1, 4), e=st.integers(1, 5))
def test_clip_logits_gradcheck_rectangular(backend, n, m, e):
    rng = np.random.default_rng(n * 100 + m * 10 + e)
    inputs = [noncontiguous(rng.standard_normal((n, e))), noncontiguous(rng.standard_normal((m, e))),
              asarray(np.asarray(0.4))]
    report = gradcheck_op(clip_logits_forward, clip_logits_backward, inputs, full_max=20)
    assert report.passed, report


@given(n=st.integers(1, 5))
def test_symmetric_cross_entropy_gradcheck(backend, n):
    z = noncontiguous(np.random.default_rng(n).standard_normal((n, n)) * 3)
    # entry by entry, a logit far below its row's maximum has a derivative near e^-10: the floor
    # (1e-4 of the O(1) loss gradient) keeps round-off of the differences from counting as error
    report = gradcheck_op(symmetric_cross_entropy_forward, symmetric_cross_entropy_backward, [z], full_max=25,
                          floor=1e-4)
    assert report.passed, report


@given(lead=st.lists(st.integers(1, 4), min_size=1, max_size=2), e=st.integers(1, 6))
def test_l2_normalize_gradcheck(backend, lead, e):
    rng = np.random.default_rng(len(lead) * 10 + e)
    x = rng.standard_normal((*lead, e))
    x += np.sign(x) * 0.2                      # keep norms away from zero, where 1/||x|| blows up
    report = gradcheck_op(l2_normalize_forward, l2_normalize_backward, [noncontiguous(x)], full_max=24)
    assert report.passed, report


@pytest.mark.parametrize("n,e,scale", [(1, 3, 2.6592), (4, 5, 2.6592), (6, 2, 4.6052), (3, 8, -0.3)])
def test_contrastive_loss_equals_transformers_with_autograd(backend, n, e, scale):
    """Normalize raw embeddings, then the loss, as CLIPModel does; loss, logits and the gradients of
    both raw embeddings and logit_scale against torch autograd through transformers' functions."""
    rng = np.random.default_rng(n + e)
    t_raw, v_raw = rng.standard_normal((n, e)), rng.standard_normal((n, e))
    up = rng.standard_normal((n, n))
    tt, tv = torch.tensor(t_raw, requires_grad=True), torch.tensor(v_raw, requires_grad=True)
    ts = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    tn, vn = tt / _get_vector_norm(tt), tv / _get_vector_norm(tv)
    logits = tn @ vn.t() * ts.exp()
    loss = image_text_contrastive_loss(logits)
    (loss + (logits * torch.tensor(up)).sum()).backward()

    tn_o, c_t = l2_normalize_forward(asarray(t_raw))
    vn_o, c_v = l2_normalize_forward(asarray(v_raw))
    (loss_o, logits_o), cache = contrastive_loss_forward(tn_o, vn_o, asarray(np.asarray(scale)))
    dt, dv, ds = contrastive_loss_backward((1.0, asarray(up)), cache)
    assert relative_error(loss_o, loss.detach().numpy()) <= 1e-12
    assert relative_error(logits_o, logits.detach().numpy()) <= 1e-12
    assert relative_error(l2_normalize_backward(dt, c_t), tt.grad.numpy()) <= 1e-12
    assert relative_error(l2_normalize_backward(dv, c_v), tv.grad.numpy()) <= 1e-12
    assert relative_error(ds, ts.grad.numpy()) <= 1e-12
    assert to_numpy(ds).shape == ()


def test_loss_gradient_is_the_closed_form():
    """dZ = (softmax_rows(Z) - I + softmax_cols(Z) - I) / (2N), dlambda = sum(dZ * Z)."""
    rng = np.random.default_rng(0)
    t, v = unit_rows(rng, 4, 3), unit_rows(rng, 4, 3)
    (loss, z), cache = contrastive_loss_forward(asarray(t), asarray(v), asarray(np.asarray(1.2)))
    _, _, ds = contrastive_loss_backward(1.0, cache)
    z = to_numpy(z)
    rows = np.exp(z - z.max(1, keepdims=True))
    rows /= rows.sum(1, keepdims=True)
    cols = np.exp(z - z.max(0, keepdims=True))
    cols /= cols.sum(0, keepdims=True)
    dz = (rows + cols - 2 * np.eye(4)) / 8
    assert relative_error(ds, np.sum(dz * z)) <= 1e-12
    dz_o = symmetric_cross_entropy_backward(1.0, symmetric_cross_entropy_forward(asarray(z))[1])
    assert relative_error(dz_o, dz) <= 1e-12


def test_float32_stays_float32(backend):
    rng = np.random.default_rng(1)
    t, v = (asarray(unit_rows(rng, 3, 4).astype(np.float32)) for _ in range(2))
    (loss, z), cache = contrastive_loss_forward(t, v, asarray(np.asarray(2.0, dtype=np.float32)))
    grads = contrastive_loss_backward((1.0, None), cache)
    assert loss.dtype == z.dtype == np.float32
    assert all(g.dtype == np.float32 for g in grads)


def test_contrastive_errors(backend):
    t = asarray(np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"logits_per_text must be square and non-empty .* got shape \(3, 2\)"):
        contrastive_loss_forward(t, asarray(np.ones((2, 4))), asarray(np.asarray(1.0)))
    with pytest.raises(ValueError, match="text_embeds and image_embeds must have the same width"):
        clip_logits_forward(t, asarray(np.ones((3, 5))), asarray(np.asarray(1.0)))
    with pytest.raises(ValueError, match=r"logit_scale must be a 0-d array \(a scalar\), got shape \(1,\)"):
        clip_logits_forward(t, t, asarray(np.ones(1)))
    with pytest.raises(TypeError, match="text_embeds must be a floating array"):
        clip_logits_forward(asarray(np.ones((3, 4), dtype=np.int64)), t, asarray(np.asarray(1.0)))
    _, cache = contrastive_loss_forward(t, t, asarray(np.asarray(1.0)))
    with pytest.raises(ValueError, match=r"dlogits_per_text must have shape \(3, 3\), got \(3, 4\)"):
        contrastive_loss_backward((1.0, asarray(np.ones((3, 4)))), cache)
