"""The diffusers-compatible API of npdiffusion.schedulers: configs, loading/saving, outputs, dtypes, errors.

Oracle: diffusers 0.42 (config dicts, config moves between classes, saved JSON, add_noise,
get_velocity, scale_model_input, init_noise_sigma, custom timesteps). Hypothesis draws config
combinations for the config-move test.
"""
import copy
import json

import diffusers
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import npdiffusion.schedulers as ours_mod
from npdiffusion.backend import asarray, to_numpy
from npdiffusion.testing import relative_error

# diffusers' own warnings (NumPy 2 __array__ copy keyword; deprecated algorithm types we test on purpose)
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed:FutureWarning")]

CLASSES = ["DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
           "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler"]

# The SD1.5 scheduler_config.json as published (written by diffusers 0.6, before timestep_spacing existed)
SD15_JSON = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
             "clip_sample": False}


def pair(name, **config):
    return getattr(ours_mod, name)(**config), getattr(diffusers, name)(**config)


def comparable(config):
    """A config as a dict with ``_use_default_values`` as a set and the diffusers version left out."""
    d = dict(config)
    d["_use_default_values"] = set(d.get("_use_default_values", []))
    d.pop("_diffusers_version", None)
    d.pop("_class_name", None)
    return d


def sample(shape=(2, 3, 4, 4), dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("name", CLASSES)
def test_config_keys_defaults_and_class_name_match_diffusers(name):
    ours, theirs = pair(name)
    assert list(ours_mod.__dict__[name].config_keys()) == [k for k in theirs.config if not k.startswith("_")]
    assert comparable(ours.config) == comparable(theirs.config)
    assert ours.config["_class_name"] == name
    assert len(ours) == len(theirs) == 1000
    assert type(ours).order == type(theirs).order
    assert name in repr(ours)


@pytest.mark.parametrize("name", CLASSES)
def test_explicit_keys_are_not_listed_as_defaults(name):
    ours, theirs = pair(name, beta_schedule="scaled_linear", num_train_timesteps=500)
    assert comparable(ours.config) == comparable(theirs.config)
    assert "beta_schedule" not in ours.config["_use_default_values"]


def test_config_is_read_only_with_attribute_access():
    s = ours_mod.DDIMScheduler(steps_offset=1)
    cfg = s.config
    assert cfg.steps_offset == 1 and cfg["steps_offset"] == 1
    with pytest.raises(TypeError, match="read-only"):
        cfg["steps_offset"] = 2
    with pytest.raises(TypeError, match="read-only"):
        cfg.update(steps_offset=2)
    with pytest.raises(AttributeError, match="no key 'nope'"):
        cfg.nope  # noqa: B018
    assert copy.deepcopy(cfg) == cfg and isinstance(dict(cfg), dict)
    assert s.config.steps_offset == 1


# Values every scheduler accepts, per key, for drawing configs to move between classes.
POOL = {
    "num_train_timesteps": [500, 1000], "beta_start": [0.0001, 0.00085], "beta_end": [0.012, 0.02],
    "beta_schedule": ["linear", "scaled_linear", "squaredcos_cap_v2"], "prediction_type": ["epsilon", "v_prediction"],
    "timestep_spacing": ["leading", "trailing", "linspace"], "steps_offset": [0, 1], "clip_sample": [True, False],
    "set_alpha_to_one": [True, False], "skip_prk_steps": [True, False], "use_karras_sigmas": [True, False],
    "final_sigmas_type": ["zero", "sigma_min"], "solver_order": [1, 2, 3], "lower_order_final": [True, False],
    "variance_type": ["fixed_small", "fixed_large"], "rescale_betas_zero_snr": [False, True],
}


@st.composite
def config_moves(draw):
    src = draw(st.sampled_from(CLASSES))
    dst = draw(st.sampled_from(CLASSES))
    keys = [k for k in ours_mod.__dict__[src].config_keys() if k in POOL]
    chosen = draw(st.lists(st.sampled_from(keys), unique=True, max_size=len(keys)))
    config = {k: draw(st.sampled_from(POOL[k])) for k in chosen}
    if config.get("rescale_betas_zero_snr"):
        config["prediction_type"] = "v_prediction"
    if src == "DPMSolverMultistepScheduler":
        config.pop("variance_type", None)
    n = draw(st.sampled_from([4, 10, 25]))
    return src, dst, config, n


@given(move=config_moves())
def test_config_moves_between_schedulers_as_in_diffusers(move):
    src, dst, config, n = move
    ours_src, theirs_src = pair(src, **config)
    ours = getattr(ours_mod, dst).from_config(ours_src.config)
    theirs = getattr(diffusers, dst).from_config(theirs_src.config)
    assert comparable(ours.config) == comparable(theirs.config)
    assert ours.config["_class_name"] == dst
    ours.set_timesteps(n)
    theirs.set_timesteps(n)
    if ours.config.get("use_karras_sigmas"):
        np.testing.assert_allclose(ours.timesteps, theirs.timesteps.numpy(), rtol=1e-6, atol=1e-4)
    else:
        assert np.array_equal(ours.timesteps, theirs.timesteps.numpy())
    assert ours.init_noise_sigma == pytest.approx(float(theirs.init_noise_sigma), rel=1e-6)


def test_stable_diffusion_config_moves():
    """parity-facts.md: the SD1.5 PNDM config gives leading + offset 1 to DDIM; Euler/DPM from the raw
    JSON keep their own default spacing, linspace -- exactly as diffusers."""
    pndm = ours_mod.PNDMScheduler.from_config(SD15_JSON)
    their_pndm = diffusers.PNDMScheduler.from_config(SD15_JSON)
    assert comparable(pndm.config) == comparable(their_pndm.config)
    assert pndm.config["_diffusers_version"] == "0.6.0"  # unknown and private keys are kept
    ddim = ours_mod.DDIMScheduler.from_config(pndm.config)
    assert ddim.config["timestep_spacing"] == "leading" and ddim.config["steps_offset"] == 1
    assert ddim.config["skip_prk_steps"] is True  # a foreign key, carried along as diffusers does
    ddim.set_timesteps(50)
    assert ddim.timesteps[0] == 981 and ddim.timesteps[-1] == 1
    for name in CLASSES:
        ours = getattr(ours_mod, name).from_config(pndm.config)
        theirs = getattr(diffusers, name).from_config(their_pndm.config)
        assert comparable(ours.config) == comparable(theirs.config), name
        assert comparable(getattr(ours_mod, name).from_config(SD15_JSON).config) == comparable(
            getattr(diffusers, name).from_config(SD15_JSON).config), name
    assert ours_mod.EulerDiscreteScheduler.from_config(SD15_JSON).config["timestep_spacing"] == "linspace"


def test_from_config_overrides_and_unused_kwargs():
    s, unused = ours_mod.EulerDiscreteScheduler.from_config(SD15_JSON, return_unused_kwargs=True,
                                                            timestep_spacing="trailing")
    t, t_unused = diffusers.EulerDiscreteScheduler.from_config(SD15_JSON, return_unused_kwargs=True,
                                                               timestep_spacing="trailing")
    assert s.config["timestep_spacing"] == "trailing" and s.config["steps_offset"] == 1
    assert unused == t_unused
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        ours_mod.DDIMScheduler.from_config(SD15_JSON, timestep_spacingg="trailing")
    with pytest.raises(TypeError, match="config must be a dict"):
        ours_mod.DDIMScheduler.from_config("some/folder")


# --------------------------------------------------------------------------------- save and load
@pytest.mark.parametrize("name", CLASSES)
def test_save_config_round_trips_with_diffusers(name, tmp_path):
    ours = getattr(ours_mod, name)(beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="trailing")
    path = ours.save_config(tmp_path / "ours")
    data = json.loads(open(path).read())
    assert list(data) == sorted(data) and "_use_default_values" not in data and data["_class_name"] == name
    back = getattr(ours_mod, name).from_pretrained(tmp_path / "ours")
    theirs = getattr(diffusers, name).from_pretrained(tmp_path / "ours")
    assert comparable(back.config) == comparable(theirs.config)
    # and the other way round, from a subfolder as in a pipeline folder
    getattr(diffusers, name)(beta_schedule="scaled_linear", steps_offset=1).save_config(tmp_path / "pipe" / "scheduler")
    mine = getattr(ours_mod, name).from_pretrained(tmp_path / "pipe", subfolder="scheduler")
    theirs = getattr(diffusers, name).from_pretrained(tmp_path / "pipe", subfolder="scheduler")
    assert comparable(mine.config) == comparable(theirs.config)
    assert mine.config["_diffusers_version"] == diffusers.__version__


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no scheduler_config.json at"):
        ours_mod.DDIMScheduler.from_pretrained(tmp_path)
    (tmp_path / "scheduler_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object, got a JSON list"):
        ours_mod.DDIMScheduler.from_pretrained(tmp_path)
    (tmp_path / "scheduler_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        ours_mod.DDIMScheduler.from_pretrained(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="save_directory must be a folder"):
        ours_mod.DDIMScheduler().save_config(tmp_path / "file")


def test_trained_betas_round_trip(tmp_path):
    betas = np.linspace(1e-4, 0.02, 50)
    ours = ours_mod.DDIMScheduler(num_train_timesteps=50, trained_betas=betas)
    ours.save_config(tmp_path)
    back = ours_mod.DDIMScheduler.from_pretrained(tmp_path)
    theirs = diffusers.DDIMScheduler(num_train_timesteps=50, trained_betas=betas)
    assert np.array_equal(back.alphas_cumprod, theirs.alphas_cumprod.numpy())


# ----------------------------------------------------------------------- timesteps, sigmas, scaling
@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_init_noise_sigma_and_scale_model_input(backend, name, spacing):
    ours, theirs = pair(name, timestep_spacing=spacing, steps_offset=1, beta_schedule="scaled_linear",
                        beta_start=0.00085, beta_end=0.012)
    assert ours.init_noise_sigma == pytest.approx(float(theirs.init_noise_sigma), rel=1e-7)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    x = sample()
    t_o, t_t = ours.timesteps[3], theirs.timesteps[3]
    scaled = ours.scale_model_input(asarray(x), t_o)
    assert scaled.dtype == np.float32
    assert relative_error(to_numpy(scaled), theirs.scale_model_input(torch.from_numpy(x), t_t).numpy()) <= 1e-7


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_add_noise_matches_diffusers(backend, name, dtype):
    ours, theirs = pair(name, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    x0, noise = sample(dtype=dtype), sample(dtype=dtype, seed=1)
    ts_o, ts_t = ours.timesteps[[1, 7]], theirs.timesteps[[1, 7]]
    out = ours.add_noise(asarray(x0), asarray(noise), ts_o)
    expected = theirs.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), ts_t).numpy()
    assert out.dtype == dtype and relative_error(to_numpy(out), expected) <= 1e-6


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_get_velocity_matches_diffusers(backend, name):
    ours, theirs = pair(name, beta_schedule="squaredcos_cap_v2")
    x0, noise = sample(), sample(seed=1)
    t = np.array([3, 999])
    out = ours.get_velocity(asarray(x0), asarray(noise), t)
    expected = theirs.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    assert relative_error(to_numpy(out), expected) <= 1e-6


def test_custom_timesteps_and_sigmas_match_diffusers():
    ours, theirs = pair("DDPMScheduler")
    ours.set_timesteps(timesteps=[999, 800, 500, 10, 0])
    theirs.set_timesteps(timesteps=[999, 800, 500, 10, 0])
    assert np.array_equal(ours.timesteps, theirs.timesteps.numpy())
    assert ours.previous_timestep(500) == theirs.previous_timestep(500) == 10
    assert ours.previous_timestep(0) == -1
    for kw in (dict(timesteps=[900.0, 600.5, 300.0, 5.0]), dict(sigmas=[14.0, 7.0, 1.0, 0.1, 0.0])):
        ours, theirs = pair("EulerDiscreteScheduler", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        ours.set_timesteps(**kw)
        theirs.set_timesteps(**kw)
        np.testing.assert_allclose(ours.timesteps, theirs.timesteps.numpy(), rtol=1e-6)
        np.testing.assert_allclose(ours.sigmas, theirs.sigmas.numpy(), rtol=1e-6)
    for name in ("HeunDiscreteScheduler", "DPMSolverMultistepScheduler"):
        ours, theirs = pair(name)
        ours.set_timesteps(timesteps=[999, 700, 400, 100])
        theirs.set_timesteps(timesteps=[999, 700, 400, 100])
        assert np.array_equal(ours.timesteps, theirs.timesteps.numpy())
        np.testing.assert_allclose(ours.sigmas, theirs.sigmas.numpy(), rtol=1e-6)


def test_starting_midway_as_image_to_image():
    """set_begin_index + add_noise + a partial loop, as img2img pipelines do, equals diffusers."""
    ours, theirs = pair("EulerDiscreteScheduler", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ours.set_timesteps(20)
    theirs.set_timesteps(20)
    ours.set_begin_index(8)
    theirs.set_begin_index(8)
    x0, noise = sample(), sample(seed=1)
    xo = ours.add_noise(x0, noise, ours.timesteps[8:9])
    xt = theirs.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), theirs.timesteps[8:9])
    for t_o, t_t in zip(ours.timesteps[8:], theirs.timesteps[8:]):
        mo = np.tanh(to_numpy(ours.scale_model_input(xo, t_o)))
        mt = torch.tanh(theirs.scale_model_input(xt, t_t))
        xo = ours.step(mo, t_o, xo).prev_sample
        xt = theirs.step(mt, t_t, xt).prev_sample
    assert relative_error(xo, xt.numpy()) <= 1e-5
    # duplicate timesteps: the first call enters at the second occurrence, as diffusers does
    s = ours_mod.EulerDiscreteScheduler()
    s.set_timesteps(timesteps=[900.0, 500.0, 500.0, 100.0])
    assert s.index_for_timestep(500.0) == 2


# ------------------------------------------------------------------------------- state and outputs
@pytest.mark.parametrize("name,config", [("PNDMScheduler", {}), ("PNDMScheduler", {"skip_prk_steps": True}),
                                         ("DPMSolverMultistepScheduler", {"solver_order": 3}),
                                         ("HeunDiscreteScheduler", {}), ("EulerDiscreteScheduler", {})])
def test_set_timesteps_resets_the_multistep_state(backend, name, config):
    s = getattr(ours_mod, name)(**config)

    def loop():
        s.set_timesteps(8)
        x = asarray(sample())
        for t in s.timesteps:
            x = s.step(0.5 * s.scale_model_input(x, t) + 0.1, t, x).prev_sample
        return to_numpy(x)

    first = loop()
    assert np.array_equal(loop(), first)


@pytest.mark.parametrize("name", CLASSES)
def test_outputs_and_return_dict_as_diffusers(name):
    ours, theirs = pair(name)
    ours.set_timesteps(5)
    theirs.set_timesteps(5)
    x = sample()
    t_o, t_t = ours.timesteps[0], theirs.timesteps[0]
    ours.scale_model_input(x, t_o)
    theirs.scale_model_input(torch.from_numpy(x), t_t)
    kw = {"noise": sample(seed=2)} if name in ("DDPMScheduler", "EulerAncestralDiscreteScheduler") else {}
    out = ours.step(0.3 * x, t_o, x, return_dict=False, **kw)
    their_out = theirs.step(0.3 * torch.from_numpy(x), t_t, torch.from_numpy(x), return_dict=False)
    assert isinstance(out, tuple) and len(out) == len(their_out)
    ours.set_timesteps(5)
    ours.scale_model_input(x, t_o)
    res = ours.step(0.3 * x, t_o, x, **kw)
    assert res[0] is res.prev_sample and res["prev_sample"] is res.prev_sample
    assert len(res.to_tuple()) == len(their_out)


def test_rng_draws_equal_explicit_noise():
    for name, kw in [("DDPMScheduler", {}), ("DDIMScheduler", {"eta": 1.0}), ("EulerAncestralDiscreteScheduler", {}),
                     ("DPMSolverMultistepScheduler", {}), ("EulerDiscreteScheduler", {"s_churn": 10.0})]:
        config = {"algorithm_type": "sde-dpmsolver++"} if name == "DPMSolverMultistepScheduler" else {}
        runs = []
        for mode in ("rng", "noise"):
            s = getattr(ours_mod, name)(**config)
            s.set_timesteps(4)
            gen = np.random.default_rng(7)
            x = sample()
            for t in s.timesteps:
                extra = {"rng": gen} if mode == "rng" else {"noise": gen.standard_normal(x.shape, dtype=np.float32)}
                x = s.step(np.sin(s.scale_model_input(x, t)), t, x, **extra, **kw).prev_sample
            runs.append(x)
        assert np.array_equal(runs[0], runs[1]), name
        assert not np.array_equal(runs[0], sample()), name


# ----------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_step_keeps_the_sample_dtype(backend, name, dtype):
    s = getattr(ours_mod, name)()
    s.set_timesteps(4)
    x = asarray(sample(dtype=dtype))
    for t in s.timesteps:
        xin = s.scale_model_input(x, t)
        assert xin.dtype == dtype
        noisy = name in ("DDPMScheduler", "EulerAncestralDiscreteScheduler")
        kw = {"noise": sample(dtype=dtype, seed=3)} if noisy else {}
        out = s.step(0.5 * xin, t, x, **kw)
        x = out.prev_sample
        assert x.dtype == dtype
        if out.pred_original_sample is not None:
            assert out.pred_original_sample.dtype == dtype


# ----------------------------------------------------------------------------------------- errors
def test_errors_name_argument_expected_and_got():
    with pytest.raises(ValueError, match=r"DDIMScheduler: beta_schedule must be one of .* got 'cosine'"):
        ours_mod.DDIMScheduler(beta_schedule="cosine")
    with pytest.raises(ValueError, match=r"prediction_type must be one of .* got 'eps'"):
        ours_mod.EulerDiscreteScheduler(prediction_type="eps")
    with pytest.raises(ValueError, match="fixed_large_log"):
        ours_mod.DDPMScheduler(variance_type="fixed_large_log")
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['eta'\]"):
        ours_mod.DDIMScheduler(eta=0.5)
    with pytest.raises(ValueError, match="only one of use_karras_sigmas"):
        ours_mod.EulerDiscreteScheduler(use_karras_sigmas=True, use_exponential_sigmas=True)
    with pytest.raises(ValueError, match="final_sigmas_type='zero' is not supported for algorithm_type 'dpmsolver'"):
        ours_mod.DPMSolverMultistepScheduler(algorithm_type="dpmsolver")
    with pytest.raises(ValueError, match="use_flow_sigmas=True"):
        ours_mod.DPMSolverMultistepScheduler(use_flow_sigmas=True)
    with pytest.raises(ValueError, match="needs num_inference_steps >= 4, got 3"):
        ours_mod.PNDMScheduler().set_timesteps(3)
    with pytest.raises(ValueError, match=r"num_inference_steps must be <= num_train_timesteps \(1000\), got 1001"):
        ours_mod.DDIMScheduler().set_timesteps(1001)
    with pytest.raises(ValueError, match="num_inference_steps must be a positive int, got 0"):
        ours_mod.EulerDiscreteScheduler().set_timesteps(0)
    ddim = ours_mod.DDIMScheduler()
    x = sample()
    with pytest.raises(ValueError, match="call set_timesteps"):
        ddim.step(x, 999, x)
    ddim.set_timesteps(10)
    with pytest.raises(ValueError,
                       match=r"model_output must have the shape of sample \(2, 3, 4, 4\), got \(2, 3, 4, 5\)"):
        ddim.step(sample((2, 3, 4, 5)), 901, x)
    with pytest.raises(TypeError, match="model_output must be a floating-point array, got dtype int64"):
        ddim.step(np.zeros((2, 3, 4, 4), dtype=np.int64), 901, x)
    with pytest.raises(TypeError, match="sample must be an array, got list"):
        ddim.step(x, 901, [1.0])
    with pytest.raises(ValueError, match="pass either noise or rng, not both"):
        ddim.step(x, 901, x, eta=1.0, noise=x, rng=np.random.default_rng(0))
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator, got RandomState"):
        ddim.step(x, 901, x, eta=1.0, rng=np.random.RandomState(0))
    euler = ours_mod.EulerDiscreteScheduler()
    euler.set_timesteps(10)
    with pytest.raises(ValueError, match="got the integer 3"):
        euler.step(x, 3, x)
    with pytest.raises(ValueError, match="timestep 3.5 is not one of the scheduler's timesteps"):
        euler.step(x, 3.5, x)
    ddpm = ours_mod.DDPMScheduler()
    ddpm.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep 5 is not one of the scheduler's timesteps"):
        ddpm.step(x, 5, x)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 999\], got min 0 max 1000"):
        ddpm.add_noise(x, x, np.array([0, 1000]))
    dpm = ours_mod.DPMSolverMultistepScheduler()
    dpm.set_timesteps(2)
    for t in dpm.timesteps:
        x = dpm.step(x, t, x).prev_sample
    with pytest.raises(ValueError, match="all 2 steps are done"):
        dpm.step(x, dpm.timesteps[-1], x)
