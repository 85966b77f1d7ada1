"""CLIP models: CLIPTextModel, CLIPVisionModel and CLIPModel against transformers on shared random
weights (outputs, loss and every gradient vs torch autograd), gradient checks, the pooled-token rule,
clip skip, state-dict keys, model folders both ways, logit_scale clamping, errors."""
import json

import numpy as np
import pytest
import torch
import transformers

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.models.clip.clip_model import CLIPModel
from npdiffusion.models.clip.config import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from npdiffusion.models.clip.text_model import CLIPTextModel, pooled_positions
from npdiffusion.models.clip.vision_model import CLIPVisionModel
from npdiffusion.nn.module import Module
from npdiffusion.optim import AdamW
from npdiffusion.random import manual_seed
from npdiffusion.testing import gradcheck, relative_error
from parity import assert_parity, randomize_, torch_state_to_numpy

transformers.logging.set_verbosity_error()

V = 64                      # vocabulary of the tiny text configs; 63 plays CLIP's 49407
TEXT_CONFIGS = {
    # legacy eos_token_id 2 (the pooled token is the argmax id), quick_gelu, as Stable Diffusion 1.x
    "legacy-quick_gelu-2x2": dict(hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
                                  eos_token_id=2, bos_token_id=0, hidden_act="quick_gelu"),
    # a newer eos id (first position holding it), exact GELU (OpenCLIP ViT-H, Stable Diffusion 2)
    "eos63-gelu-3x4": dict(hidden_size=8, intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
                           eos_token_id=63, bos_token_id=62, hidden_act="gelu"),
    # one head, one layer, the tanh GELU, eager attention on the torch side (in float32)
    "eos63-gelu_new-1x1": dict(hidden_size=6, intermediate_size=10, num_hidden_layers=1, num_attention_heads=1,
                               eos_token_id=63, bos_token_id=62, hidden_act="gelu_new", layer_norm_eps=1e-3),
    "legacy-gelu-4x2": dict(hidden_size=4, intermediate_size=8, num_hidden_layers=4, num_attention_heads=2,
                            eos_token_id=2, bos_token_id=0, hidden_act="gelu"),
}
VISION_CONFIGS = {
    "quick_gelu-2x2": dict(hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
                           image_size=8, patch_size=4),
    "gelu-1x3-rgba": dict(hidden_size=6, intermediate_size=10, num_hidden_layers=1, num_attention_heads=3,
                          image_size=6, patch_size=2, num_channels=4, hidden_act="gelu"),
    "gelu_new-3x1-uneven": dict(hidden_size=4, intermediate_size=6, num_hidden_layers=3, num_attention_heads=1,
                                image_size=7, patch_size=3, hidden_act="gelu_new"),
}
CLIP_CONFIGS = {
    "sd1-like": dict(text_config="legacy-quick_gelu-2x2", vision_config="quick_gelu-2x2", projection_dim=5),
    "newer-eos-gelu": dict(text_config="eos63-gelu-3x4", vision_config="gelu-1x3-rgba", projection_dim=4,
                           logit_scale_init_value=1.3),
    "mixed-depths": dict(text_config="legacy-gelu-4x2", vision_config="gelu_new-3x1-uneven", projection_dim=3),
}
TOL = {"float64": 1e-9, "float32": 1e-4}


def text_kw(name):
    return dict(TEXT_CONFIGS[name], vocab_size=V, max_position_embeddings=9)


def clip_kw(name):
    kw = dict(CLIP_CONFIGS[name])
    kw["text_config"] = text_kw(kw["text_config"])
    kw["vision_config"] = dict(VISION_CONFIGS[kw["vision_config"]])
    return kw


def torch_text(kw, seed=0, **extra):
    return randomize_(transformers.CLIPTextModel(transformers.CLIPTextConfig(**kw, **extra)), seed=seed)


def make_ids(kw, b=3, t=7, seed=0):
    """Token ids that exercise both pooled-token rules: rows with the eos id several times (the
    pad token is eos in SD), the largest id twice (legacy argmax takes the first), and a row
    without any eos (the newer rule then pools position 0)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, V - 2, (b, t))
    eos = kw["eos_token_id"]
    top = V - 1 if eos == 2 else eos
    ids[0, 3:] = top                         # end token then padding with it
    ids[1, 5] = top
    ids[1, 2] = V - 2 if eos == 2 else 4
    if b > 2:
        ids[2, 1] = ids[2, 4] = top           # two equal maxima / two eos: the first one counts
    if b > 3:
        ids[3] = rng.integers(3, V - 2, t)   # no eos at all
    ids[:, 0] = kw.get("bos_token_id", 0)
    return ids


def param_grads_match(ours, theirs, rtol):
    """Every parameter gradient against torch's. A ``k_proj.bias`` gradient is exactly zero in
    exact arithmetic (softmax over the keys ignores a shift shared by every key of a row, causal
    mask or not), so both sides hold only rounding: it is checked against the largest gradient."""
    t_grads = {k: (np.zeros(tuple(p.shape)) if p.grad is None else p.grad.numpy())
               for k, p in theirs.named_parameters()}
    o_grads = {k: to_numpy(g) for k, g in ours.named_grads()}
    assert set(o_grads) == set(t_grads)
    scale = max(float(np.abs(g).max()) for g in t_grads.values())
    for name, g in o_grads.items():
        if name.endswith("k_proj.bias"):
            assert float(np.abs(g).max()) <= rtol * scale, name
            assert float(np.abs(t_grads[name]).max()) <= rtol * scale, name
        else:
            err = relative_error(g, t_grads[name], floor=1e-12)
            assert err <= rtol, (name, err)


def text_forward_t(m, ids, **kw):
    o = m(ids, output_hidden_states=True, **kw)
    return (o.last_hidden_state, o.pooler_output, *o.hidden_states)


def text_forward_o(m, ids, **kw):
    last, pooled, states = m(ids, output_hidden_states=True, **kw)
    return (last, pooled, *states)


def text_backward_o(m, gl, gp, *gh):
    return m.backward(gl, gp, gh)


# ====================================================================== CLIPTextModel
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", sorted(TEXT_CONFIGS))
def test_text_model_matches_transformers(backend, name, dtype):
    """last_hidden_state, pooler_output and every hidden state; with random upstream gradients on
    all of them, every parameter gradient against torch autograd."""
    kw = text_kw(name)
    # transformers' eager attention takes its softmax in float32 even for a float64 model
    # (softmax(dtype=float32)), which caps its float64 agreement near 1e-8: float32 only there
    impl = "eager" if "gelu_new" in name and dtype == "float32" else "sdpa"
    theirs = torch_text(kw, seed=len(name), attn_implementation=impl)
    ids = make_ids(kw, b=4, seed=len(name))
    ours = CLIPTextModel(**kw)
    assert_parity(ours, theirs, [ids], dtype=dtype, rtol=TOL[dtype], check_param_grads=False,
                  their_forward=text_forward_t, our_forward=text_forward_o, our_backward=text_backward_o)
    param_grads_match(ours, theirs, TOL[dtype])


@pytest.mark.parametrize("name", ["legacy-quick_gelu-2x2", "eos63-gelu-3x4"])
def test_text_model_pooled_only_gradient(backend, name):
    """backward(None, grad_pooler_output): only the pooled token's gradient flows in."""
    kw = text_kw(name)
    theirs = torch_text(kw, seed=4)
    ids = make_ids(kw, b=4, seed=2)
    ours = CLIPTextModel(**kw)
    assert_parity(ours, theirs, [ids], check_param_grads=False, rtol=1e-9,
                  their_forward=lambda m, i: m(i).pooler_output, our_forward=lambda m, i: m(i)[1],
                  our_backward=lambda m, gp: m.backward(None, gp))
    param_grads_match(ours, theirs, 1e-9)


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
def test_clip_skip_is_final_layer_norm_of_earlier_hidden_state(backend, clip_skip):
    """clip_skip=k gives final_layer_norm(hidden_states[-(k + 1)]) of transformers' full model
    (diffusers' rule), pooled at transformers' position, with gradients to match."""
    kw = text_kw("eos63-gelu-3x4")
    theirs = torch_text(kw, seed=7)
    ids = make_ids(kw, b=3, seed=5)
    pos = torch.tensor(to_numpy(pooled_positions(asarray(ids), kw["eos_token_id"])))

    def their_forward(m, i):
        h = m.final_layer_norm(m(i, output_hidden_states=True).hidden_states[-(clip_skip + 1)])
        return h, h[torch.arange(h.shape[0]), pos]

    ours = CLIPTextModel(**kw)
    assert_parity(ours, theirs, [ids], rtol=1e-9, check_param_grads=False, their_forward=their_forward,
                  our_forward=lambda m, i: m(i, clip_skip=clip_skip))
    param_grads_match(ours, theirs, 1e-9)      # the skipped layers get zero gradients on both sides
    skipped = [f"encoder.layers.{i}." for i in range(3 - clip_skip, 3)]
    assert all(float(np.abs(to_numpy(g)).max()) == 0.0 for n, g in ours.named_grads()
               if any(n.startswith(s) for s in skipped))


def test_text_model_padding_attention_mask(backend):
    """A (B, T) keep-mask is combined with the causal mask as transformers does (right padding)."""
    kw = text_kw("eos63-gelu-3x4")
    theirs = torch_text(kw, seed=8)
    ids = make_ids(kw, b=3, seed=3)
    mask = np.ones(ids.shape, dtype=np.int64)
    mask[0, 4:] = 0
    mask[2, 6:] = 0
    ours = CLIPTextModel(**kw)
    assert_parity(ours, theirs, [ids, mask], rtol=1e-9, check_param_grads=False,
                  their_forward=lambda m, i, a: (lambda o: (o.last_hidden_state, o.pooler_output))(m(i, attention_mask=a)),
                  our_forward=lambda m, i, a: m(i, attention_mask=a))
    param_grads_match(ours, theirs, 1e-9)


def test_pooled_positions_follow_transformers_rules():
    ids = np.array([[0, 9, 63, 63, 5], [0, 63, 9, 63, 63], [0, 4, 5, 6, 7]])
    # legacy (eos 2): first maximum of the ids; newer: first eos, 0 when a row has none
    assert to_numpy(pooled_positions(asarray(ids), 2)).tolist() == [2, 1, 4]
    assert to_numpy(pooled_positions(asarray(ids), 63)).tolist() == [2, 1, 0]
    t = torch.tensor(ids)
    assert t.to(torch.int).argmax(-1).tolist() == [2, 1, 4]
    assert (t == 63).int().argmax(-1).tolist() == [2, 1, 0]


def randomize_ours_(model, seed=0):
    """Redraw our parameters on randomize_'s scales (the transformers init, std 0.02 embeddings feeding
    LayerNorms, makes the loss so curved that central differences need a tiny eps)."""
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            v = rng.standard_normal(p.shape) * 0.5 / np.sqrt(np.prod(p.shape[1:]))
        else:
            v = rng.standard_normal(p.shape) * 0.25 + (1.0 if "norm" in name and name.endswith("weight") else 0.0)
        p[...] = asarray(v, dtype=p.dtype)
    return model


class _Flat(Module):
    """Adapter for ``testing.gradcheck``: flattens the hidden-state tuple into the outputs and
    returns a tuple of input gradients (empty for token ids)."""

    def __init__(self, model, n_float_inputs=0):
        super().__init__()
        self.model = model
        self.n = n_float_inputs

    def forward(self, *inputs, **kw):
        out = self.model(*inputs, **kw)
        if isinstance(out, tuple) and isinstance(out[-1], tuple):
            return (*out[:-1], *out[-1])
        if hasattr(out, "logits_per_text"):
            return out.loss, out.logits_per_text, out.logits_per_image, out.text_embeds, out.image_embeds
        return out

    def backward(self, *grads):
        if isinstance(self.model, CLIPModel):
            r = self.model.backward(*grads)
        elif len(grads) > 2:
            r = self.model.backward(grads[0], grads[1], grads[2:])
        else:
            r = self.model.backward(*grads)
        return () if r is None else r


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_tiny_text_model_gradcheck(backend, clip_skip):
    """Central differences in float64 for every parameter of a tiny text model (all outputs, hidden
    states included, with random upstream gradients)."""
    kw = dict(vocab_size=12, hidden_size=4, intermediate_size=6, num_hidden_layers=2, num_attention_heads=2,
              max_position_embeddings=5, eos_token_id=11, bos_token_id=10, hidden_act="gelu")
    m = randomize_ours_(CLIPTextModel(**kw).to("float64"))
    ids = asarray(np.array([[10, 3, 11, 11, 11], [10, 4, 5, 6, 11]]))
    report = gradcheck(_Flat(m), ids, eps=1e-5, floor=1e-3, output_hidden_states=True, clip_skip=clip_skip)
    assert report.passed, report


# ====================================================================== CLIPVisionModel
def vision_forward_t(m, p):
    o = m(p, output_hidden_states=True)
    return (o.last_hidden_state, o.pooler_output, *o.hidden_states)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", sorted(VISION_CONFIGS))
def test_vision_model_matches_transformers(backend, name, dtype):
    kw = VISION_CONFIGS[name]
    theirs = randomize_(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**kw)), seed=len(name))
    s, c = kw["image_size"], kw.get("num_channels", 3)
    pix = np.random.default_rng(len(name)).standard_normal((3, c, s, s))
    ours = CLIPVisionModel(**kw)
    assert_parity(ours, theirs, [pix], dtype=dtype, rtol=TOL[dtype], check_param_grads=False,
                  their_forward=vision_forward_t, our_forward=text_forward_o, our_backward=text_backward_o)
    param_grads_match(ours, theirs, TOL[dtype])


def test_tiny_vision_model_gradcheck(backend):
    m = CLIPVisionModel(hidden_size=4, intermediate_size=6, num_hidden_layers=1, num_attention_heads=2,
                        image_size=4, patch_size=2, num_channels=2).to("float64")
    randomize_ours_(m, seed=1)
    pix = asarray(np.random.default_rng(0).standard_normal((2, 2, 4, 4)))
    report = gradcheck(_Flat(m), pix, eps=1e-5, floor=1e-3, output_hidden_states=True)
    assert report.passed, report


# ====================================================================== CLIPModel
def clip_forward_t(m, ids, pix):
    o = m(input_ids=ids, pixel_values=pix, return_loss=True)
    return o.loss, o.logits_per_text, o.logits_per_image, o.text_embeds, o.image_embeds


def clip_forward_o(m, ids, pix):
    o = m(ids, pix)
    return o.loss, o.logits_per_text, o.logits_per_image, o.text_embeds, o.image_embeds


def clip_inputs(kw, n=4, seed=0):
    ids = make_ids(kw["text_config"], b=n, seed=seed)
    v = kw["vision_config"]
    pix = np.random.default_rng(seed).standard_normal((n, v.get("num_channels", 3), v["image_size"], v["image_size"]))
    return ids, pix


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", sorted(CLIP_CONFIGS))
def test_clip_model_matches_transformers(backend, name, dtype):
    """loss, both logits and both embeddings; random upstream gradients on all five, then d pixels
    and every parameter gradient (logit_scale included) against torch autograd."""
    kw = clip_kw(name)
    theirs = randomize_(transformers.CLIPModel(transformers.CLIPConfig(**kw)), seed=len(name))
    ids, pix = clip_inputs(kw, seed=len(name))
    ours = CLIPModel(**kw)
    assert_parity(ours, theirs, [ids, pix], dtype=dtype, rtol=TOL[dtype], check_param_grads=False,
                  their_forward=clip_forward_t, our_forward=clip_forward_o,
                  our_backward=lambda m, *g: m.backward(*g))
    param_grads_match(ours, theirs, TOL[dtype])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", sorted(CLIP_CONFIGS))
def test_clip_model_loss_backward_matches_torch(backend, name, dtype):
    """Plain ``backward()`` is the gradient of the loss: against torch's ``loss.backward()``."""
    kw = clip_kw(name)
    theirs = randomize_(transformers.CLIPModel(transformers.CLIPConfig(**kw)), seed=3).to(
        torch.float64 if dtype == "float64" else torch.float32)
    ids, pix = clip_inputs(kw, n=3, seed=1)
    ours = CLIPModel(**kw).to(dtype)
    ours.load_state_dict(torch_state_to_numpy(theirs))
    tpix = torch.tensor(pix, dtype=theirs.logit_scale.dtype, requires_grad=True)
    t_loss = theirs(input_ids=torch.tensor(ids), pixel_values=tpix, return_loss=True).loss
    t_loss.backward()
    out = ours(ids, asarray(pix.astype(dtype)))
    dpix = ours.backward()
    assert relative_error(out.loss, t_loss.detach().numpy()) <= TOL[dtype]
    assert relative_error(dpix, tpix.grad.numpy()) <= TOL[dtype]
    assert relative_error(dict(ours.named_grads())["logit_scale"], theirs.logit_scale.grad.numpy()) <= TOL[dtype]
    param_grads_match(ours, theirs, TOL[dtype])


def test_clip_model_logits_only_with_unequal_batches(backend):
    """Without the loss, N texts and M images may differ; gradients of the logits still match."""
    kw = clip_kw("sd1-like")
    theirs = randomize_(transformers.CLIPModel(transformers.CLIPConfig(**kw)), seed=5)
    ids, _ = clip_inputs(kw, n=3, seed=2)
    _, pix = clip_inputs(kw, n=2, seed=3)
    ours = CLIPModel(**kw)
    assert_parity(ours, theirs, [ids, pix], rtol=1e-9, check_param_grads=False,
                  their_forward=lambda m, i, p: m(input_ids=i, pixel_values=p).logits_per_image,
                  our_forward=lambda m, i, p: m(i, p, return_loss=False).logits_per_image,
                  our_backward=lambda m, g: m.backward(grad_logits_per_image=g))
    param_grads_match(ours, theirs, 1e-9)


def test_tiny_clip_model_gradcheck(backend):
    kw = dict(text_config=dict(vocab_size=12, hidden_size=4, intermediate_size=6, num_hidden_layers=1,
                               num_attention_heads=2, max_position_embeddings=4, eos_token_id=2, bos_token_id=0),
              vision_config=dict(hidden_size=4, intermediate_size=6, num_hidden_layers=1, num_attention_heads=1,
                                 image_size=4, patch_size=2, hidden_act="gelu"),
              projection_dim=3, logit_scale_init_value=0.7)
    m = randomize_ours_(CLIPModel(**kw).to("float64"), seed=2)
    ids = asarray(np.array([[0, 5, 11, 3], [0, 11, 4, 4], [0, 7, 8, 11]]))
    pix = asarray(np.random.default_rng(1).standard_normal((3, 3, 4, 4)))
    report = gradcheck(_Flat(m), ids, pix, eps=1e-5, floor=1e-3)
    assert report.passed, report


def test_clamp_logit_scale_matches_open_clip():
    m = CLIPModel(clip_kw("sd1-like")).to("float64")
    for value, expected in [(7.0, np.log(100.0)), (-1.5, 0.0), (2.6592, 2.6592)]:
        m.logit_scale[...] = value
        assert m.clamp_logit_scale_() is m
        t = torch.tensor(value, dtype=torch.float64)
        t.clamp_(0, np.log(100.0))                   # open_clip_train/train.py
        assert float(m.logit_scale) == float(t) == pytest.approx(expected, abs=0)
    with pytest.raises(ValueError, match="min_value <= max_value"):
        m.clamp_logit_scale_(1.0, 0.5)


def test_training_steps_with_clamp_lower_the_loss():
    """AdamW steps on four image-text pairs lower the contrastive loss; the clamp keeps the scale in
    [0, ln 100] throughout."""
    kw = clip_kw("sd1-like")
    manual_seed(0)                                   # transformers' init, drawn from a fixed seed
    m = CLIPModel(**kw)
    ids, pix = clip_inputs(kw, n=4, seed=9)
    opt = AdamW(m, lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(20):
        m.zero_grad()
        losses.append(float(m(ids, pix.astype(np.float32)).loss))
        m.backward()
        opt.step()
        m.clamp_logit_scale_()
        assert 0.0 <= float(m.logit_scale) <= np.log(100.0) + 1e-6
    assert losses[-1] < 0.7 * losses[0], losses


# ====================================================================== keys and folders
def test_state_dict_keys_equal_transformers():
    for name in TEXT_CONFIGS:
        kw = text_kw(name)
        assert list(CLIPTextModel(**kw).state_dict()) == list(transformers.CLIPTextModel(
            transformers.CLIPTextConfig(**kw)).state_dict())
    for kw in VISION_CONFIGS.values():
        assert list(CLIPVisionModel(**kw).state_dict()) == list(transformers.CLIPVisionModel(
            transformers.CLIPVisionConfig(**kw)).state_dict())
    for name in CLIP_CONFIGS:
        kw = clip_kw(name)
        ours, theirs = CLIPModel(**kw).state_dict(), transformers.CLIPModel(transformers.CLIPConfig(**kw)).state_dict()
        assert list(ours) == list(theirs)
        assert all(tuple(ours[k].shape) == tuple(theirs[k].shape) for k in ours)
    # position_ids is a non-persistent buffer there, so absent from both
    assert not any("position_ids" in k for k in CLIPModel(**clip_kw("sd1-like")).state_dict())


def test_configs_match_transformers_defaults():
    for ours, theirs in [(CLIPTextConfig(), transformers.CLIPTextConfig()),
                         (CLIPVisionConfig(), transformers.CLIPVisionConfig())]:
        t = theirs.to_dict()
        for k, v in ours.to_dict().items():
            assert t[k] == v, k
    c = CLIPConfig()
    assert c.projection_dim == transformers.CLIPConfig().projection_dim == 512
    assert c.logit_scale_init_value == transformers.CLIPConfig().logit_scale_init_value == 2.6592


def _eval_text(model, ids):
    model.eval()
    last, pooled = model(ids)
    return to_numpy(last), to_numpy(pooled)


def test_from_pretrained_reads_transformers_folders(tmp_path):
    """Folders written by transformers' save_pretrained (5.x flat keys), the legacy layout of
    published checkpoints (``text_model.`` prefix and a stored position_ids), a CLIPModel folder
    read as a text model, and a CLIPModel folder."""
    kw = text_kw("legacy-quick_gelu-2x2")
    theirs = torch_text(kw, seed=11).eval()
    ids = make_ids(kw, b=3)
    with torch.no_grad():
        t_out = theirs(torch.tensor(ids))
    expected = (t_out.last_hidden_state.numpy(), t_out.pooler_output.numpy())
    theirs.save_pretrained(tmp_path / "flat")
    from safetensors.numpy import load_file, save_file
    state = load_file(tmp_path / "flat" / "model.safetensors")
    (tmp_path / "legacy").mkdir()
    (tmp_path / "legacy" / "config.json").write_text((tmp_path / "flat" / "config.json").read_text())
    legacy = {"text_model." + k: v for k, v in state.items()}
    legacy["text_model.embeddings.position_ids"] = np.arange(9, dtype=np.int64)[None]
    save_file(legacy, tmp_path / "legacy" / "model.safetensors", metadata={"format": "pt"})
    for folder in ("flat", "legacy"):
        ours = CLIPTextModel.from_pretrained(tmp_path / folder)
        assert not ours.training and ours.dtype == np.float32
        for o, e in zip(_eval_text(ours, ids), expected):
            assert relative_error(o, e) <= 1e-5, folder

    ckw = clip_kw("newer-eos-gelu")
    tclip = randomize_(transformers.CLIPModel(transformers.CLIPConfig(**ckw)), seed=12).eval()
    tclip.save_pretrained(tmp_path / "clip")
    cids, pix = clip_inputs(ckw, n=3)
    with torch.no_grad():
        t = tclip(input_ids=torch.tensor(cids), pixel_values=torch.tensor(pix, dtype=torch.float32), return_loss=True)
        t_text = tclip.text_model(torch.tensor(cids)).last_hidden_state.numpy()
    ours = CLIPModel.from_pretrained(tmp_path / "clip", dtype="float64")
    o = ours(cids, pix)
    assert relative_error(o.loss, t.loss.numpy()) <= 1e-5
    assert relative_error(o.logits_per_image, t.logits_per_image.numpy()) <= 1e-5
    text_only = CLIPTextModel.from_pretrained(tmp_path / "clip")
    assert relative_error(_eval_text(text_only, cids)[0], t_text) <= 1e-5
    vision_only = CLIPVisionModel.from_pretrained(tmp_path / "clip").eval()
    with torch.no_grad():
        t_vis = tclip.vision_model(torch.tensor(pix, dtype=torch.float32)).pooler_output.numpy()
    assert relative_error(vision_only(pix.astype(np.float32))[1], t_vis) <= 1e-5


def test_save_pretrained_loads_in_transformers(tmp_path):
    """Our folders load in transformers with the same outputs, and our config.json equals the one
    transformers writes for the same configuration."""
    kw = text_kw("eos63-gelu-3x4")
    ours = CLIPTextModel(**kw)
    ids = make_ids(kw, b=3)
    ours.save_pretrained(tmp_path / "text")
    theirs = transformers.CLIPTextModel.from_pretrained(tmp_path / "text").eval()
    with torch.no_grad():
        t = theirs(torch.tensor(ids))
    o = _eval_text(ours, ids)
    assert relative_error(o[0], t.last_hidden_state.numpy()) <= 1e-5
    assert relative_error(o[1], t.pooler_output.numpy()) <= 1e-5
    theirs.save_pretrained(tmp_path / "text_t")
    assert json.loads((tmp_path / "text").joinpath("config.json").read_text()) == \
        json.loads((tmp_path / "text_t").joinpath("config.json").read_text())

    vkw = VISION_CONFIGS["gelu-1x3-rgba"]
    vis = CLIPVisionModel(**vkw).eval()
    vis.save_pretrained(tmp_path / "vision")
    tvis = transformers.CLIPVisionModel.from_pretrained(tmp_path / "vision").eval()
    pix = np.random.default_rng(2).standard_normal((2, 4, 6, 6)).astype(np.float32)
    with torch.no_grad():
        tv = tvis(torch.tensor(pix))
    assert relative_error(vis(pix)[1], tv.pooler_output.numpy()) <= 1e-5

    ckw = clip_kw("mixed-depths")
    model = CLIPModel(**ckw).eval()
    model.logit_scale[...] = 1.9
    model.save_pretrained(tmp_path / "clip")
    tclip = transformers.CLIPModel.from_pretrained(tmp_path / "clip").eval()
    cids, cpix = clip_inputs(ckw, n=3)
    o = model(cids, cpix.astype(np.float32))
    with torch.no_grad():
        t = tclip(input_ids=torch.tensor(cids), pixel_values=torch.tensor(cpix, dtype=torch.float32),
                  return_loss=True)
    assert relative_error(o.loss, t.loss.numpy()) <= 1e-5
    assert relative_error(o.logits_per_text, t.logits_per_text.numpy()) <= 1e-5
    transformers.CLIPModel(transformers.CLIPConfig(**ckw)).save_pretrained(tmp_path / "clip_t")
    assert json.loads((tmp_path / "clip").joinpath("config.json").read_text()) == \
        json.loads((tmp_path / "clip_t").joinpath("config.json").read_text())


def test_legacy_config_dicts_override_sub_configs():
    """Old CLIPModel configs carry text_config_dict / vision_config_dict, which win, as in transformers."""
    d = {"text_config": {"hidden_size": 16, "num_attention_heads": 2}, "text_config_dict": {"hidden_size": 8},
         "vision_config_dict": {"image_size": 32, "patch_size": 8}, "projection_dim": 4}
    ours = CLIPConfig.from_dict(d)
    theirs = transformers.CLIPConfig(**d)
    assert ours.text_config.hidden_size == theirs.text_config.hidden_size == 8
    assert ours.vision_config.image_size == theirs.vision_config.image_size == 32


# ====================================================================== behaviour and errors
def test_gradient_checkpointing_gives_the_same_gradients():
    kw = clip_kw("sd1-like")
    ids, pix = clip_inputs(kw, n=3)
    grads = []
    for ckpt in (False, True):
        manual_seed(0)
        m = CLIPModel(**kw).to("float64")
        for layer in [*m.text_model.encoder.layers, *m.vision_model.encoder.layers]:
            layer.gradient_checkpointing = ckpt
        m(ids, pix)
        m.backward()
        grads.append({k: to_numpy(g).copy() for k, g in m.named_grads()})
    assert all(np.array_equal(grads[0][k], grads[1][k]) for k in grads[0])


def test_eval_mode_keeps_nothing():
    m = CLIPModel(**clip_kw("sd1-like")).eval()
    ids, pix = clip_inputs(clip_kw("sd1-like"), n=2)
    m(ids, pix.astype(np.float32))
    with pytest.raises(RuntimeError, match="needs a forward in training mode"):
        m.backward()


def test_text_model_errors():
    m = CLIPTextModel(**text_kw("eos63-gelu-3x4"))
    with pytest.raises(TypeError, match="input_ids must be an integer array"):
        m(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"input_ids must have shape \(B, T\) with 1 <= T <= "
                                         r"max_position_embeddings = 9, got shape \(2, 10\)"):
        m(np.zeros((2, 10), dtype=np.int64))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 64\)"):
        m(np.full((1, 3), 64))
    with pytest.raises(ValueError, match=r"clip_skip must be None or an int in \[0, 3\]"):
        m(np.zeros((1, 3), dtype=np.int64), clip_skip=4)
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        m(np.zeros((1, 3), dtype=np.int64), attention_mask=np.ones((1, 4)))
    m(np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match=r"grad_pooler_output must have shape \(2, 8\), got \(2, 7\)"):
        m.backward(None, np.zeros((2, 7), dtype=np.float32))
    with pytest.raises(ValueError, match="grad_hidden_states needs a forward with output_hidden_states=True"):
        m.backward(None, None, [None] * 4)
    m(np.zeros((2, 3), dtype=np.int64), output_hidden_states=True, clip_skip=1)
    with pytest.raises(ValueError, match=r"grad_hidden_states must hold 3 gradients \(one per hidden state\), got 4"):
        m.backward(None, None, [None] * 4)
    with pytest.raises(ValueError, match="config.eos_token_id is None"):
        CLIPTextModel(**dict(text_kw("eos63-gelu-3x4"), eos_token_id=None))(np.zeros((1, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="attention_dropout must be 0.0 in training mode"):
        CLIPTextModel(**dict(text_kw("eos63-gelu-3x4"), attention_dropout=0.1))(np.zeros((1, 3), dtype=np.int64))


def test_config_errors():
    with pytest.raises(ValueError, match=r"hidden_size \(10\) must be a multiple of num_attention_heads \(4\)"):
        CLIPTextConfig(hidden_size=10, num_attention_heads=4)
    with pytest.raises(ValueError, match="hidden_act must be one of"):
        CLIPTextConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="num_hidden_layers must be a positive int, got 0"):
        CLIPVisionConfig(num_hidden_layers=0)
    with pytest.raises(ValueError, match=r"patch_size \(16\) must be at most image_size \(8\)"):
        CLIPVisionConfig(image_size=8, patch_size=16)
    with pytest.raises(ValueError, match="eos_token_id must be an int or None, got"):
        CLIPTextConfig(eos_token_id=[2, 3])
    with pytest.raises(TypeError, match="text_config must be a dict"):
        CLIPConfig(text_config=3)
    with pytest.raises(ValueError, match="attention_dropout must be a number in"):
        CLIPVisionConfig(attention_dropout=1.0)


def test_vision_and_clip_model_errors():
    kw = clip_kw("sd1-like")
    m = CLIPModel(**kw)
    ids, pix = clip_inputs(kw, n=3)
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(B, 3, 8, 8\)"):
        m(ids, pix[:, :, :6])
    with pytest.raises(TypeError, match="pixel_values must be a floating array"):
        m(ids, pix.astype(np.int64))
    with pytest.raises(ValueError, match="need the same batch size, got 3 and 2"):
        m(ids, pix[:2])
    m(ids, pix[:2], return_loss=False)
    with pytest.raises(ValueError, match="grad_loss needs a forward with return_loss=True"):
        m.backward(1.0)
    with pytest.raises(ValueError, match=r"grad_logits_per_text must have shape \(3, 2\), got \(2, 3\)"):
        m.backward(grad_logits_per_text=np.zeros((2, 3), dtype=np.float32))
