"""UNet2DConditionModel: parity with diffusers on randomized weights over several configs (output,
sample and context gradients, every parameter gradient), a whole-model gradient check, exact
gradient checkpointing and chunked attention, diffusers model folders both ways, config handling
and errors.
"""
import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers.models.embeddings import get_timestep_embedding

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.models.unet import UNet2DConditionModel
from npdiffusion.ops.embedding import timestep_embedding
from npdiffusion.testing import gradcheck, noncontiguous, relative_error
from parity import randomize_, redraw_parameters_, torch_state_to_numpy

TINY = dict(  # diffusers' tests/models/unets/test_models_unet_2d_condition.py::get_init_dict
    block_out_channels=(4, 8), norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8, attention_head_dim=2,
    out_channels=4, in_channels=4, layers_per_block=1, sample_size=16)

CONFIGS = {
    "tiny": TINY,
    # per-block head counts, linear projections, two transformer layers per block
    "heads-linear-2layers": dict(
        block_out_channels=(8, 16), norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=6, attention_head_dim=(2, 4),
        use_linear_projection=True, transformer_layers_per_block=2, layers_per_block=1, sample_size=8),
    # production group count (32), three levels
    "groups32": dict(
        block_out_channels=(32, 32, 64), norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, layers_per_block=1, sample_size=8),
    "no-mid-block": dict(TINY, mid_block_type=None, layers_per_block=2),
    # diffusers' tests/pipelines/stable_diffusion/test_stable_diffusion.py::get_dummy_components
    "pipeline-dummy": dict(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, norm_num_groups=2),
    # the other honoured keys at non-default values
    "options": dict(
        block_out_channels=(4, 8), norm_num_groups=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=6, attention_head_dim=2,
        layers_per_block=(1, 2), only_cross_attention=(True, False), upcast_attention=True,
        center_input_sample=True, flip_sin_to_cos=False, freq_shift=1, mid_block_scale_factor=1.5,
        time_embedding_dim=12, conv_in_kernel=1, conv_out_kernel=5, downsample_padding=0, in_channels=3,
        out_channels=5),
}

# Timesteps whose float32 sinusoidal features are bit-identical to torch's for every config here
# (torch's float32 sin/exp differ from correct rounding in a few entries, see
# npdiffusion/ops/embedding.py); float64 parity at 1e-9 needs identical features.
TIMESTEPS = np.array([37, 14])


def _context_width(cfg):
    return cfg["cross_attention_dim"]


def _inputs(cfg, batch=2, size=(8, 8), tokens=4, seed=0):
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, cfg.get("in_channels", 4), *size))
    ctx = rng.standard_normal((batch, tokens, _context_width(cfg)))
    t = TIMESTEPS[:batch] if batch <= len(TIMESTEPS) else np.full(batch, TIMESTEPS[0])
    return sample, t, ctx


def _check_time_features(model, timesteps):
    """Precondition of float64 parity: our time features equal diffusers' bit for bit."""
    cfg = model.config
    ours = timestep_embedding(np.asarray(timesteps), cfg["block_out_channels"][0], cfg["flip_sin_to_cos"],
                              cfg["freq_shift"])
    theirs = get_timestep_embedding(torch.tensor(np.asarray(timesteps)), cfg["block_out_channels"][0],
                                    flip_sin_to_cos=cfg["flip_sin_to_cos"],
                                    downscale_freq_shift=cfg["freq_shift"]).numpy()
    assert np.array_equal(to_numpy(ours), theirs), "pick timesteps whose float32 features match torch's"


def _build(cfg, dtype, seed=0):
    theirs = randomize_(TorchUNet(**cfg), seed=seed).to(torch.float64 if dtype == "float64" else torch.float32)
    ours = UNet2DConditionModel(**cfg).to(dtype)
    ours.load_state_dict(torch_state_to_numpy(theirs))
    return ours, theirs


def _run_torch(theirs, sample, t, ctx, grad):
    tdt = next(theirs.parameters()).dtype
    xs = torch.tensor(sample, dtype=tdt, requires_grad=True)
    cs = torch.tensor(ctx, dtype=tdt, requires_grad=True)
    theirs.zero_grad(set_to_none=True)
    y = theirs(xs, torch.tensor(t), cs).sample
    y.backward(torch.tensor(grad, dtype=tdt))
    grads = {k: p.grad.numpy() for k, p in theirs.named_parameters()}
    return y.detach().numpy(), xs.grad.numpy(), cs.grad.numpy(), grads


def _run_ours(ours, sample, t, ctx, grad):
    ours.train()
    ours.zero_grad()
    dt = ours.dtype
    y = ours(asarray(sample.astype(dt)), t, asarray(ctx.astype(dt)))
    dx, dc = ours.backward(asarray(grad.astype(dt)))
    return to_numpy(y), to_numpy(dx), to_numpy(dc), {k: to_numpy(g).copy() for k, g in ours.named_grads()}


def assert_grads_match(ours, theirs, rtol, zero_tol):
    """Every parameter gradient. Some are exactly zero in exact arithmetic (a bias or time projection
    feeding a GroupNorm whose groups hold one channel each: the norm removes any per-channel
    constant), so both sides hold only rounding there (below ``zero_tol`` times the largest
    gradient); those are checked against the scale of all gradients, the rest by relative error."""
    assert set(ours) == set(theirs)
    scale = max(float(np.abs(g).max()) for g in theirs.values())
    bad = {}
    for name, g in ours.items():
        t = theirs[name]
        if float(np.abs(t).max()) <= zero_tol * scale:          # structurally zero
            err = float(max(np.abs(g).max(), np.abs(t).max())) / scale
        else:
            err = relative_error(g, t, floor=1e-12)
        if not err <= rtol:
            bad[name] = err
    assert not bad, f"parameter gradients over rtol={rtol:g}: " + ", ".join(f"{k}={v:.2e}" for k, v in bad.items())


def _parity(cfg, dtype, rtol, size=(8, 8), batch=2, seed=0):
    ours, theirs = _build(cfg, dtype, seed=seed)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    sample, t, ctx = _inputs(cfg, batch=batch, size=size, seed=seed)
    _check_time_features(ours, t)
    grad = np.random.default_rng(seed + 1).standard_normal((batch, ours.config["out_channels"], *size))
    y_t, dx_t, dc_t, g_t = _run_torch(theirs, sample, t, ctx, grad)
    y_o, dx_o, dc_o, g_o = _run_ours(ours, sample, t, ctx, grad)
    errors = {"output": relative_error(y_o, y_t), "grad sample": relative_error(dx_o, dx_t),
              "grad context": relative_error(dc_o, dc_t)}
    assert all(v <= rtol for v in errors.values()), errors
    assert_grads_match(g_o, g_t, rtol, zero_tol=1e-9 if dtype == "float64" else 1e-5)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_unet_matches_diffusers_float64(backend, config):
    _parity(CONFIGS[config], "float64", 1e-9)


def test_unet_matches_diffusers_float32(backend):
    _parity(TINY, "float32", 1e-4, size=(16, 16), batch=2)


def test_unet_upsample_size_for_odd_latents(backend):
    """Sides not divisible by 2^num_upsamplers: diffusers forwards explicit upsample sizes."""
    _parity(CONFIGS["groups32"], "float64", 1e-9, size=(7, 5))


def test_state_dict_keys_equal_diffusers():
    for cfg in CONFIGS.values():
        assert set(UNet2DConditionModel(**cfg).state_dict()) == set(TorchUNet(**cfg).state_dict())


def test_unet_gradcheck(backend):
    """Whole-model central differences. norm_num_groups=2 keeps >= 2 channels in every GroupNorm group,
    so no gradient is zero by structure. The model is deep: float64 loss round-off is ~1e-14
    (relative), and some conv weights have large third derivatives; eps = 2e-6 balances the two,
    and directional derivatives below 1e-2 (norm biases, the largest are ~50) are checked to 2e-8
    absolute (floor) instead of relative to themselves."""
    cfg = CONFIGS["pipeline-dummy"]
    model = UNet2DConditionModel(**cfg).to("float64")
    rng = np.random.default_rng(1)
    redraw_parameters_(model, rng)                         # nothing left at zero / one
    sample = noncontiguous(rng.standard_normal((1, 4, 8, 8)))
    ctx = noncontiguous(rng.standard_normal((1, 3, 8)))
    report = gradcheck(model, sample, np.array([37]), ctx, grad_inputs=[0, 2], directions=2, eps=2e-6,
                       floor=1e-2, seed=1)
    assert report.passed, report


def _plain_ckpt_chunk(cfg, size, variants):
    ours, _ = _build(cfg, "float64", seed=4)
    sample, t, ctx = _inputs(cfg, size=size, tokens=5, seed=4)
    grad = np.random.default_rng(5).standard_normal((2, ours.config["out_channels"], *size))
    out = {}
    for name, (ckpt, chunk) in variants.items():
        ours.enable_gradient_checkpointing(ckpt)
        ours.set_attention_chunk_size(chunk)
        out[name] = _run_ours(ours, sample, t, ctx, grad)
    return out


def test_checkpointing_and_chunked_attention_are_exact(backend):
    runs = _plain_ckpt_chunk(TINY, (8, 8), {"plain": (False, None), "checkpointing": (True, None),
                                            "chunked": (False, 5), "both": (True, 3)})
    y0, dx0, dc0, g0 = runs.pop("plain")
    for name, (y, dx, dc, g) in runs.items():
        assert relative_error(y, y0) <= 1e-12, name
        assert relative_error(dx, dx0) <= 1e-12, name
        assert relative_error(dc, dc0) <= 1e-12, name
        assert_grads_match(g, g0, rtol=1e-12, zero_tol=1e-9)


def test_checkpointing_keeps_only_block_inputs(backend):
    ours = UNet2DConditionModel(**TINY).enable_gradient_checkpointing()
    sample, t, ctx = _inputs(TINY)
    ours(asarray(sample.astype("float32")), t, asarray(ctx.astype("float32")))
    blocks = [m for m in ours.modules() if m.gradient_checkpointing]
    assert blocks and all(m._checkpoint_inputs is not None for m in blocks)
    assert all(not c._caches for m in blocks for c in m.modules())


# ----------------------------------------------------------------------------- model folders
def _saved_diffusers_folder(tmp_path, cfg, dtype=torch.float32):
    theirs = randomize_(TorchUNet(**cfg), seed=7).to(dtype)
    theirs.save_pretrained(tmp_path / "unet")
    return theirs


def test_from_pretrained_reads_diffusers_folder(backend, tmp_path):
    theirs = _saved_diffusers_folder(tmp_path, TINY)
    ours = UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet").eval()
    assert ours.config["block_out_channels"] == [4, 8] and ours.dtype == np.float32
    sample, t, ctx = _inputs(TINY)
    with torch.no_grad():
        expected = theirs(torch.tensor(sample, dtype=torch.float32), torch.tensor(t),
                          torch.tensor(ctx, dtype=torch.float32)).sample.numpy()
    y = ours(asarray(sample.astype(np.float32)), t, asarray(ctx.astype(np.float32)))
    assert relative_error(y, expected) <= 1e-5


def test_from_pretrained_float16_weights(backend, tmp_path):
    theirs = _saved_diffusers_folder(tmp_path, TINY, dtype=torch.float16)
    ours32 = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    ours16 = UNet2DConditionModel.from_pretrained(tmp_path / "unet", dtype="float16")
    assert ours32.dtype == np.float32 and ours16.dtype == np.float16
    for k, v in theirs.state_dict().items():
        assert np.array_equal(to_numpy(ours16.state_dict()[k]), v.numpy())
        assert np.array_equal(to_numpy(ours32.state_dict()[k]), v.float().numpy())


def test_save_pretrained_loads_in_diffusers(backend, tmp_path):
    ours = UNet2DConditionModel(**CONFIGS["heads-linear-2layers"])
    rng = np.random.default_rng(8)
    ours.load_state_dict({k: rng.standard_normal(v.shape) * 0.2 for k, v in ours.state_dict().items()})
    ours.save_pretrained(tmp_path / "u")
    config = json.loads((tmp_path / "u" / "config.json").read_text())
    assert config["_class_name"] == "UNet2DConditionModel"
    theirs = TorchUNet.from_pretrained(tmp_path / "u")
    for k, v in theirs.state_dict().items():
        assert np.array_equal(v.numpy(), to_numpy(ours.state_dict()[k])), k
    again = UNet2DConditionModel.from_pretrained(tmp_path / "u")
    assert again.config == ours.config


# ----------------------------------------------------------------------------- config and inputs
def test_config_keys():
    cfg = dict(TINY, _class_name="UNet2DConditionModel", _diffusers_version="0.42.1", _name_or_path="x")
    model = UNet2DConditionModel(**cfg)
    assert "_class_name" not in model.config and model.config["attention_head_dim"] == 2
    assert set(model.config) == {k for k in TorchUNet(**TINY).config if not k.startswith("_")}
    # num_attention_heads, when given, is the head count (attention_head_dim then unused)
    heads = UNet2DConditionModel(**dict(TINY, attention_head_dim=4, num_attention_heads=2))
    assert set(heads.state_dict()) == set(model.state_dict())
    assert heads.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == 2


@pytest.mark.parametrize("key,value,message", [
    ("class_embed_type", "timestep", "class_embed_type='timestep' is not supported"),
    ("resnet_time_scale_shift", "scale_shift", "resnet_time_scale_shift='scale_shift' is not supported"),
    ("addition_embed_type", "text_time", "addition_embed_type='text_time' is not supported"),
    ("down_block_types", ("AttnDownBlock2D", "DownBlock2D"), "down block type 'AttnDownBlock2D' is not supported"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn", "mid_block_type 'UNetMidBlock2DSimpleCrossAttn' is not"),
    ("act_fn", "gelu", "act_fn must be one of"),
    ("not_a_key", 1, "unknown config keys \\['not_a_key'\\]"),
    ("block_out_channels", (4, 8, 8), "block_out_channels must have one entry per down block"),
    ("attention_head_dim", (2, 2, 2), "attention_head_dim must have one entry per down block"),
    ("attention_head_dim", 3, "must split evenly into num_attention_heads=3"),
    ("norm_num_groups", 3, "must be divisible by num_groups"),
    ("conv_in_kernel", 2, "conv_in_kernel must be odd"),
])
def test_config_errors(key, value, message):
    with pytest.raises(ValueError, match=message):
        UNet2DConditionModel(**dict(TINY, **{key: value}))


def test_timestep_forms_match_diffusers(backend):
    ours, theirs = _build(TINY, "float64", seed=2)
    ours.eval()
    sample, _, ctx = _inputs(TINY, batch=2)
    xs, cs = torch.tensor(sample), torch.tensor(ctx)
    forms = [(37, 37), (37.0, 37.0), (np.int64(37), torch.tensor(37)), (np.array(37), torch.tensor(37)),
             (np.array([37]), torch.tensor([37])), (np.array([37, 14]), torch.tensor([37, 14])),
             (np.array([37.0, 14.0], dtype=np.float32), torch.tensor([37.0, 14.0]))]
    for ours_t, their_t in forms:
        with torch.no_grad():
            expected = theirs(xs, their_t, cs).sample.numpy()
        assert relative_error(ours(asarray(sample), ours_t, asarray(ctx)), expected) <= 1e-12, ours_t


def test_input_errors(backend):
    model = UNet2DConditionModel(**TINY)
    x = asarray(np.zeros((2, 4, 8, 8), dtype=np.float32))
    ctx = asarray(np.zeros((2, 3, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="sample must have 4 entries on axis 1, got shape \\(2, 3, 8, 8\\)"):
        model(asarray(np.zeros((2, 3, 8, 8), dtype=np.float32)), 1, ctx)
    with pytest.raises(ValueError, match="encoder_hidden_states must have batch size 2"):
        model(x, 1, ctx[:1])
    with pytest.raises(ValueError, match="encoder_hidden_states must have 8 entries on axis -1"):
        model(x, 1, asarray(np.zeros((2, 3, 5), dtype=np.float32)))
    with pytest.raises(ValueError, match="timestep must be a scalar or have shape \\(1,\\) or \\(B,\\)"):
        model(x, np.array([1, 2, 3]), ctx)
    with pytest.raises(TypeError, match="timestep must be a number or an array"):
        model(x, "10", ctx)
    with pytest.raises(TypeError, match="timestep must hold integers or floats"):
        model(x, np.array([True, False]), ctx)
    model.eval()
    model(x, 1, ctx)
    with pytest.raises(RuntimeError, match="needs a forward in training mode"):
        model.backward(x)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        model.set_attention_chunk_size(0)
