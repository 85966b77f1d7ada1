"""AutoencoderKL: parity with diffusers' AutoencoderKL on randomized weights over several configs
(encode mean / logvar, decode, every gradient through encode_backward and decode_backward against
torch autograd), state-dict keys, model folders both ways (legacy attention keys included), the
clamp's gradient, tiling, checkpointing, and clear errors."""
import functools
import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.io.pretrained import load_weights, save_weights
from npdiffusion.models.vae.autoencoder_kl import AutoencoderKL
from npdiffusion.models.vae.distribution import DiagonalGaussianDistribution
from npdiffusion.nn.module import StateDictError
from npdiffusion.random.torch_generator import TorchGenerator
from npdiffusion.testing import relative_error
from parity import randomize_, torch_state_to_numpy, torch_threads
from vae_parity import assert_grads_match, zero_gradient_names

ENC, DEC = "DownEncoderBlock2D", "UpDecoderBlock2D"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """torch on one thread for these tiny models (see vae_parity.torch_threads)."""
    with torch_threads(1):
        yield


def _cfg(n, **kw):
    return dict(down_block_types=[ENC] * n, up_block_types=[DEC] * n, **kw)


# name -> (config, image shape). "tiny" is diffusers' test config (tests/models/autoencoders/
# test_models_autoencoder_kl.py, input (4, 3, 32, 32)); "pipeline" the SD pipeline tests' dummy VAE.
CONFIGS = {
    "tiny": (_cfg(2, block_out_channels=[2, 4], norm_num_groups=2, in_channels=3, out_channels=3, latent_channels=4),
             (4, 3, 32, 32)),
    "pipeline": (_cfg(2, block_out_channels=[4, 8], norm_num_groups=2, in_channels=3, out_channels=3,
                      latent_channels=4), (2, 3, 16, 16)),
    "groups32-3-levels": (_cfg(3, block_out_channels=[32, 64, 64], norm_num_groups=32, latent_channels=4),
                          (1, 3, 16, 12)),
    "layers-per-block-2": (_cfg(2, block_out_channels=[4, 8], norm_num_groups=4, layers_per_block=2, in_channels=2,
                                out_channels=5, latent_channels=3), (2, 2, 8, 16)),
    "no-attention-no-quant": (_cfg(2, block_out_channels=[4, 6], norm_num_groups=2, mid_block_add_attention=False,
                                   use_quant_conv=False, use_post_quant_conv=False), (2, 3, 12, 10)),
}
TORCH = {"float32": torch.float32, "float64": torch.float64}


def _inputs(name):
    config, shape = CONFIGS[name]
    rng = np.random.default_rng(len(name))
    f = 2 ** (len(config["block_out_channels"]) - 1)
    lat = (shape[0], config.get("latent_channels", 4), shape[2] // f, shape[3] // f)
    return dict(x=rng.standard_normal(shape), g_mean=rng.standard_normal(lat), g_logvar=rng.standard_normal(lat),
                z=rng.standard_normal(lat), g_image=rng.standard_normal(shape[:1] + (config.get("out_channels", 3),)
                                                                        + shape[2:]))


def _torch_model(name, dtype="float64"):
    torch.manual_seed(0)
    return randomize_(TorchAutoencoderKL(**CONFIGS[name][0]), seed=len(name)).to(TORCH[dtype])


@functools.lru_cache(maxsize=None)
def _torch_run(name, dtype):
    """diffusers' encode + decode with autograd on the shared inputs: outputs, input and parameter grads."""
    t, tdt, a = _torch_model(name, dtype), TORCH[dtype], _inputs(name)
    x = torch.tensor(a["x"], dtype=tdt, requires_grad=True)
    z = torch.tensor(a["z"], dtype=tdt, requires_grad=True)
    posterior = t.encode(x).latent_dist
    image = t.decode(z).sample
    torch.autograd.backward([posterior.mean, posterior.logvar, image],
                            [torch.tensor(a[k], dtype=tdt) for k in ("g_mean", "g_logvar", "g_image")])
    grads = {k: p.grad.numpy().copy() for k, p in t.named_parameters()}
    return dict(state=torch_state_to_numpy(t), mean=posterior.mean.detach().numpy(),
                logvar=posterior.logvar.detach().numpy(), image=image.detach().numpy(), dx=x.grad.numpy(),
                dz=z.grad.numpy(), grads=grads)


def _ours(name, dtype, state):
    ours = AutoencoderKL(**CONFIGS[name][0]).to(dtype)
    ours.load_state_dict(state)
    return ours.train()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_dict_keys_equal_diffusers(name):
    theirs = TorchAutoencoderKL(**CONFIGS[name][0]).state_dict()
    ours = AutoencoderKL(**CONFIGS[name][0]).state_dict()
    assert list(ours) == list(theirs)                                   # same keys, same order
    assert [tuple(v.shape) for v in ours.values()] == [tuple(v.shape) for v in theirs.values()]


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-9), ("float32", 1e-4)])
def test_encode_decode_and_gradients_match_diffusers(backend, name, dtype, rtol):
    ref, a = _torch_run(name, dtype), _inputs(name)
    zero = zero_gradient_names(_torch_run(name, "float64")["grads"])
    ours = _ours(name, dtype, ref["state"])
    cast = {k: asarray(v.astype(dtype)) for k, v in a.items()}
    posterior = ours.encode(cast["x"])
    image = ours.decode(cast["z"])                       # decode between encode and encode_backward
    dz = ours.decode_backward(cast["g_image"])
    dx = ours.encode_backward(cast["g_mean"], cast["g_logvar"])
    errors = {"mean": relative_error(posterior.mean, ref["mean"]), "logvar": relative_error(posterior.logvar, ref["logvar"]),
              "image": relative_error(image, ref["image"]), "dx": relative_error(dx, ref["dx"]),
              "dz": relative_error(dz, ref["dz"])}
    for k, arr in (("mean", posterior.mean), ("image", image), ("dx", dx), ("dz", dz)):
        assert arr.dtype == np.dtype(dtype), k
    bad = {k: v for k, v in errors.items() if not v <= rtol}
    assert not bad, f"{name} {dtype}: {bad}"
    assert_grads_match(dict(ours.named_grads()), ref["grads"], zero, rtol)


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-9), ("float32", 1e-4)])
def test_forward_through_the_reparameterization_matches_torch(backend, dtype, rtol):
    """forward(x, noise) = decode(mean + std * noise) and its backward, against torch autograd."""
    name = "pipeline"
    t, tdt, a = _torch_model(name, dtype), TORCH[dtype], _inputs(name)
    noise = np.random.default_rng(5).standard_normal(a["z"].shape)
    x = torch.tensor(a["x"], dtype=tdt, requires_grad=True)
    posterior = t.encode(x).latent_dist
    image = t.decode(posterior.mean + posterior.std * torch.tensor(noise, dtype=tdt)).sample
    image.backward(torch.tensor(a["g_image"], dtype=tdt))
    ours = _ours(name, dtype, torch_state_to_numpy(t))
    out = ours(asarray(a["x"].astype(dtype)), asarray(noise.astype(dtype)))
    dx = ours.backward(asarray(a["g_image"].astype(dtype)))
    assert relative_error(out, image.detach().numpy()) <= rtol
    assert relative_error(dx, x.grad.numpy()) <= rtol
    zero = zero_gradient_names(_forward_grads64(name, noise))
    assert_grads_match(dict(ours.named_grads()), {k: p.grad.numpy() for k, p in t.named_parameters()}, zero, rtol)


def _forward_grads64(name, noise):
    t, a = _torch_model(name), _inputs(name)
    posterior = t.encode(torch.tensor(a["x"])).latent_dist
    t.decode(posterior.mean + posterior.std * torch.tensor(noise)).sample.backward(torch.tensor(a["g_image"]))
    return {k: p.grad.numpy() for k, p in t.named_parameters()}


def test_mode_path_and_sample_posterior_match_diffusers(backend):
    """forward without noise decodes the mean (diffusers' forward); sample_posterior with a
    TorchGenerator draws diffusers' noise bit for bit."""
    name = "tiny"
    t, a = _torch_model(name, "float32"), _inputs(name)
    ours = _ours(name, "float32", torch_state_to_numpy(t)).eval()
    x = a["x"].astype(np.float32)
    with torch.no_grad():
        expected_mode = t(torch.tensor(x)).sample.numpy()
        expected_sample = t(torch.tensor(x), sample_posterior=True, generator=torch.Generator().manual_seed(7)).sample
    assert relative_error(ours(asarray(x)), expected_mode) <= 1e-4
    got = ours(asarray(x), sample_posterior=True, generator=TorchGenerator(7))
    assert relative_error(got, expected_sample.numpy()) <= 1e-4


def test_clamped_logvar_gets_zero_gradient_like_torch(backend):
    """Push the quant_conv's log-variance biases to +-40 on some channels so the clamp is active:
    gradients match torch.clamp's (zero where clamped) and the clamped logvar equals the bound."""
    name = "tiny"
    t = _torch_model(name)
    with torch.no_grad():
        t.quant_conv.bias[4] = 45.0                        # logvar channel 0 -> above 20
        t.quant_conv.bias[6] = -45.0                       # logvar channel 2 -> below -30
    a = _inputs(name)
    x = torch.tensor(a["x"], requires_grad=True)
    posterior = t.encode(x).latent_dist
    torch.autograd.backward([posterior.mean, posterior.logvar], [torch.tensor(a["g_mean"]), torch.tensor(a["g_logvar"])])
    ours = _ours(name, "float64", torch_state_to_numpy(t))
    p = ours.encode(asarray(a["x"]))
    lv = to_numpy(p.logvar)
    assert (lv[:, 0] == 20.0).mean() > 0.9 and (lv[:, 2] == -30.0).mean() > 0.9
    assert relative_error(p.logvar, posterior.logvar.detach().numpy()) <= 1e-12
    dx = ours.encode_backward(asarray(a["g_mean"]), asarray(a["g_logvar"]))
    assert relative_error(dx, x.grad.numpy()) <= 1e-9
    bias_grad = to_numpy(dict(ours.named_grads())["quant_conv.bias"])
    assert relative_error(bias_grad, t.quant_conv.bias.grad.numpy()) <= 1e-9
    assert np.all(bias_grad[[4, 6]] == 0.0)                             # fully clamped channels: exactly zero


def test_gradient_checkpointing_is_exact(backend):
    name = "layers-per-block-2"
    state, a = _torch_run(name, "float64")["state"], _inputs(name)
    results = []
    for checkpoint in (False, True):
        ours = _ours(name, "float64", state).enable_gradient_checkpointing(checkpoint)
        ours.encode(asarray(a["x"]))
        ours.decode(asarray(a["z"]))
        dz = ours.decode_backward(asarray(a["g_image"]))
        dx = ours.encode_backward(asarray(a["g_mean"]), asarray(a["g_logvar"]))
        results.append((to_numpy(dx), to_numpy(dz), {k: to_numpy(g).copy() for k, g in ours.named_grads()}))
    (dx0, dz0, g0), (dx1, dz1, g1) = results
    assert np.array_equal(dx0, dx1) and np.array_equal(dz0, dz1)
    assert all(np.array_equal(g0[k], g1[k]) for k in g0)


def test_eval_keeps_nothing_and_backward_needs_training_mode(backend):
    ours = AutoencoderKL(**CONFIGS["tiny"][0]).eval()
    x = asarray(np.zeros((1, 3, 8, 8), dtype=np.float32))
    ours.encode(x)
    assert all(not m._caches for m in ours.modules())
    with pytest.raises(RuntimeError, match="needs an encode .* in training mode"):
        ours.encode_backward(asarray(np.zeros((1, 4, 4, 4), dtype=np.float32)))


# ============================================================================ model folders
def _compare_with_diffusers(ours, theirs, x, rtol):
    with torch.no_grad():
        post = theirs.encode(torch.tensor(x)).latent_dist
        image = theirs.decode(post.mean).sample.numpy()
    p = ours.encode(asarray(x))
    assert relative_error(p.mean, post.mean.numpy()) <= rtol
    assert relative_error(p.logvar, post.logvar.numpy()) <= rtol
    assert relative_error(ours.decode(p.mean), image) <= rtol


def test_from_pretrained_reads_a_diffusers_folder(tmp_path):
    theirs = _torch_model("pipeline", "float32")
    theirs.save_pretrained(tmp_path / "vae")                            # safetensors by default
    x = _inputs("pipeline")["x"].astype(np.float32)
    ours = AutoencoderKL.from_pretrained(tmp_path, subfolder="vae")
    assert not ours.training and ours.dtype == np.float32
    assert ours.config == {k: v for k, v in json.loads((tmp_path / "vae" / "config.json").read_text()).items()
                           if not k.startswith("_")}
    _compare_with_diffusers(ours, theirs, x, 1e-5)
    ours64 = AutoencoderKL.from_pretrained(tmp_path / "vae", dtype="float64")
    assert ours64.dtype == np.float64
    _compare_with_diffusers(ours64, theirs.double(), x.astype(np.float64), 1e-6)


def test_save_pretrained_folder_loads_in_diffusers(tmp_path):
    ours = AutoencoderKL(**CONFIGS["layers-per-block-2"][0], scaling_factor=0.13025, sample_size=64)
    rng = np.random.default_rng(0)
    for _, p in ours.named_parameters():
        p[...] = asarray(rng.standard_normal(p.shape).astype(np.float32) * 0.3)
    ours.save_pretrained(tmp_path)
    theirs = TorchAutoencoderKL.from_pretrained(tmp_path)
    assert theirs.config.scaling_factor == 0.13025 and theirs.config.sample_size == 64
    assert theirs.config.layers_per_block == 2
    for k, v in theirs.state_dict().items():
        assert np.array_equal(v.numpy(), to_numpy(ours.state_dict()[k])), k
    x = rng.standard_normal((1, 2, 8, 8)).astype(np.float32)
    _compare_with_diffusers(ours.eval(), theirs, x, 1e-5)


def test_legacy_attention_keys_are_renamed_like_diffusers(tmp_path):
    """A folder whose mid-block attention uses the pre-refactor names query/key/value/proj_attn
    loads in diffusers and here to the same model."""
    theirs = _torch_model("tiny", "float32")
    theirs.save_pretrained(tmp_path)
    state = load_weights(tmp_path)
    legacy = {}
    for k, v in state.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if ".mid_block.attentions.0." + new + "." in k:
                k = k.replace(".mid_block.attentions.0." + new + ".", ".mid_block.attentions.0." + old + ".")
        legacy[k] = v
    assert any(".query.weight" in k for k in legacy) and any(".proj_attn.bias" in k for k in legacy)
    save_weights(tmp_path, legacy)
    ours = AutoencoderKL.from_pretrained(tmp_path)
    reloaded = TorchAutoencoderKL.from_pretrained(tmp_path)
    for k, v in reloaded.state_dict().items():
        assert np.array_equal(v.numpy(), to_numpy(ours.state_dict()[k])), k
    _compare_with_diffusers(ours, theirs, _inputs("tiny")["x"][:1].astype(np.float32), 1e-5)


def test_from_pretrained_errors(tmp_path):
    _torch_model("tiny", "float32").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, _class_name="UNet2DConditionModel")))
    with pytest.raises(ValueError, match="config is for 'UNet2DConditionModel', not 'AutoencoderKL'"):
        AutoencoderKL.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(config, latent_channels=3)))
    with pytest.raises(StateDictError, match="quant_conv.weight: expected shape"):
        AutoencoderKL.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(config, some_future_key=1)))
    with pytest.warns(UserWarning, match="ignoring config keys it does not use: \\['some_future_key'\\]"):
        AutoencoderKL.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        AutoencoderKL.from_pretrained(tmp_path / "missing")


# ============================================================================ tiling
def test_tiled_encode_and_decode_match_diffusers():
    """Tiles of sample_size 16 pixels (latent tiles 8) over a 40x40 image / 20x20 latents, blended
    with diffusers' overlaps: equal to diffusers' enable_tiling output (float64)."""
    cfg = dict(CONFIGS["tiny"][0], sample_size=16)
    torch.manual_seed(0)
    theirs = randomize_(TorchAutoencoderKL(**cfg), seed=4).double()
    theirs.enable_tiling()
    ours = AutoencoderKL(**cfg).to("float64")
    ours.load_state_dict(torch_state_to_numpy(theirs))
    ours.eval().enable_tiling()
    rng = np.random.default_rng(3)
    x, z = rng.standard_normal((1, 3, 40, 40)), rng.standard_normal((1, 4, 20, 20))
    with torch.no_grad():
        post = theirs.encode(torch.tensor(x)).latent_dist
        image = theirs.decode(torch.tensor(z)).sample.numpy()
    p = ours.encode(asarray(x))
    assert p.shape == tuple(post.mean.shape)
    assert relative_error(p.mean, post.mean.numpy()) <= 1e-10
    assert relative_error(p.logvar, post.logvar.numpy()) <= 1e-10
    assert relative_error(ours.decode(asarray(z)), image) <= 1e-10
    ours.disable_tiling()
    untiled = to_numpy(ours.decode(asarray(z)))
    assert relative_error(untiled, image) > 1e-6                         # tiling did change something
    ours.train().enable_tiling()
    ours.decode(asarray(z))
    with pytest.raises(RuntimeError, match="ran in tiles"):
        ours.decode_backward(asarray(np.zeros(image.shape)))


# ============================================================================ errors and small API
def test_errors_name_the_argument_and_what_came():
    ours = AutoencoderKL(**CONFIGS["groups32-3-levels"][0])
    with pytest.raises(ValueError, match=r"x must have 3 channels on axis 1 \(in_channels\), got shape \(1, 4, 8, 8\)"):
        ours.encode(asarray(np.zeros((1, 4, 8, 8), np.float32)))
    with pytest.raises(ValueError, match=r"x is too small: .* halves the image 2 times, so height and width must be "
                                         r"at least 4, got shape \(1, 3, 3, 8\)"):
        ours.encode(asarray(np.zeros((1, 3, 3, 8), np.float32)))
    with pytest.raises(ValueError, match=r"x must have 4 dimensions, got shape \(3, 8, 8\)"):
        ours.encode(asarray(np.zeros((3, 8, 8), np.float32)))
    with pytest.raises(TypeError, match="x must be a floating array, got dtype int64"):
        ours.encode(asarray(np.zeros((1, 3, 8, 8), np.int64)))
    with pytest.raises(ValueError, match=r"z must have 4 channels on axis 1 \(latent_channels\), got shape \(1, 8, 2, 2\)"):
        ours.decode(asarray(np.zeros((1, 8, 2, 2), np.float32)))
    ours.encode(asarray(np.zeros((1, 3, 8, 8), np.float32)))
    with pytest.raises(ValueError, match=r"grad_mean must have the shape of mean \(1, 4, 2, 2\), got shape \(1, 4, 4, 4\)"):
        ours.encode_backward(asarray(np.zeros((1, 4, 4, 4), np.float32)))
    with pytest.raises(ValueError, match="give grad_mean, grad_logvar or both"):
        ours.encode_backward()
    ours.decode(asarray(np.zeros((1, 4, 2, 2), np.float32)))
    with pytest.raises(ValueError, match=r"grad_image must have the decoded image's shape \(1, 3, 8, 8\)"):
        ours.decode_backward(asarray(np.zeros((1, 3, 4, 4), np.float32)))
    with pytest.raises(ValueError, match="only 'DownEncoderBlock2D' blocks are supported, got \\['AttnDownEncoderBlock2D'\\]"):
        AutoencoderKL(down_block_types=["AttnDownEncoderBlock2D"])
    with pytest.raises(ValueError, match="need one block type per entry of block_out_channels \\(2\\), got 1"):
        AutoencoderKL(block_out_channels=[4, 8], norm_num_groups=2)
    with pytest.raises(ValueError, match="act_fn must be one of"):
        AutoencoderKL(act_fn="gelu")
    with pytest.raises(ValueError, match="num_channels \\(6\\) must be divisible by num_groups \\(4\\)"):
        AutoencoderKL(block_out_channels=[6], norm_num_groups=4)
    with pytest.raises(ValueError, match="scaling_factor must be a finite number >= 0.0001"):
        AutoencoderKL(scaling_factor=0)


def test_odd_image_sizes_are_floored_like_diffusers(backend):
    """diffusers' encoder takes sides the downsampling factor does not divide (each level floors)."""
    name = "pipeline"
    t = _torch_model(name)
    ours = _ours(name, "float64", torch_state_to_numpy(t)).eval()
    x = np.random.default_rng(2).standard_normal((1, 3, 7, 10))
    with torch.no_grad():
        mean = t.encode(torch.tensor(x)).latent_dist.mean.numpy()
    p = ours.encode(asarray(x))
    assert p.shape == mean.shape == (1, 4, 3, 5)
    assert relative_error(p.mean, mean) <= 1e-9


def test_scaling_factor_round_trip_and_config():
    ours = AutoencoderKL(**CONFIGS["tiny"][0], scaling_factor=0.5, shift_factor=0.25)
    z = asarray(np.linspace(-1, 1, 8).reshape(1, 2, 2, 2))
    assert np.allclose(to_numpy(ours.scale_latents(z)), (to_numpy(z) - 0.25) * 0.5)
    assert np.allclose(to_numpy(ours.unscale_latents(ours.scale_latents(z))), to_numpy(z))
    assert ours.config["scaling_factor"] == 0.5 and ours.downsample_factor == 2
    assert set(ours.config) == set(TorchAutoencoderKL(**CONFIGS["tiny"][0]).config) - {"_use_default_values"}
    assert isinstance(ours.encode(asarray(np.zeros((1, 3, 4, 4), np.float32))), DiagonalGaussianDistribution)
