"""Non-finite numbers are refused, never reported as success (issue #17, point 2).

* config.json / scheduler_config.json holding NaN, Infinity or an overflowing number are refused where
  they are read, naming the file and the key; the VAE's scaling_factor must be a sensible positive
  number; betas (beta_start, beta_end, trained_betas) must lie in (0, 1) with beta_end >= beta_start;
* latents that turn NaN/inf during denoising, and a decoded image holding NaN/inf, stop the pipeline
  with a NonFiniteError (a ValueError) naming the step and the likely cause;
* ``npdiffusion sample`` / ``img2img`` then print one line, exit 2 and write no image.
"""
import json
import os

import numpy as np
import pytest

from npdiffusion import cli
from npdiffusion.io.pretrained import read_config
from npdiffusion.models.vae.autoencoder_kl import AutoencoderKL
from npdiffusion.pipelines.loading import SCHEDULERS
from npdiffusion.pipelines.nonfinite import NonFiniteError
from npdiffusion.schedulers import DDIMScheduler, DPMSolverMultistepScheduler
from pipeline_dummy import copy_folder, dummy_folder, gradient_png, our_pipeline


def run_one_error(capsys, command, *args):
    """The one stderr line of a failing ``npdiffusion command *args`` (exit code 2 checked)."""
    capsys.readouterr()                                        # drop what building the tiny folder printed
    code = cli.main([command, *args])
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"npdiffusion {command}: error: "), lines[0]
    return lines[0]


def pngs(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".png")) if os.path.isdir(folder) else []


@pytest.fixture(scope="module")
def input_image(tmp_path_factory):
    return gradient_png(tmp_path_factory.mktemp("img"), 32, 32)


# ------------------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize("command", ["sample", "img2img"])
def test_huge_guidance_stops_with_one_line_naming_the_step(tmp_path, capsys, input_image, command):
    out = tmp_path / "out"
    extra = ["--image", input_image] if command == "img2img" else []
    line = run_one_error(capsys, command, "--model", dummy_folder(), "--prompt", "a cat", *extra, "--guidance",
                         "1e30", "--steps", "3", "--seed", "0", "--scheduler", "ddim", "--out", str(out),
                         "--no-progress")
    assert "NaN or inf" in line and "step" in line and "guidance scale 1e+30" in line, line
    assert pngs(out) == []


def _edit_json(path, **values):
    with open(path) as f:
        data = json.load(f)
    data.update(values)
    with open(path, "w") as f:
        json.dump(data, f)                                     # allow_nan: writes the NaN literal


@pytest.mark.parametrize("sub, file, values, match", [
    ("unet", "config.json", {"freq_shift": float("nan")}, "'freq_shift' is NaN"),
    ("vae", "config.json", {"scaling_factor": 1e-30}, "scaling_factor must be"),
    ("scheduler", "scheduler_config.json", {"beta_end": 1.5}, "beta_end must be a finite number in (0, 1)"),
    ("scheduler", "scheduler_config.json", {"beta_start": 0}, "beta_start must be a finite number in (0, 1)"),
])
def test_non_finite_or_out_of_range_configs_are_refused(tmp_path, capsys, sub, file, values, match):
    folder = copy_folder(tmp_path / "sd")
    _edit_json(os.path.join(folder, sub, file), **values)
    out = tmp_path / "out"
    line = run_one_error(capsys, "sample", "--model", folder, "--prompt", "a cat", "--steps", "2", "--seed", "0",
                         "--out", str(out), "--no-progress")
    assert match in line and os.path.join(folder, sub) in line, line
    assert not out.exists()


# ------------------------------------------------------------------------------------- config reader
@pytest.mark.parametrize("text, key, what", [
    ('{"a": 1, "freq_shift": NaN}', "'freq_shift'", "NaN"),
    ('{"x": Infinity}', "'x'", "inf"),
    ('{"sample_size": [32, -Infinity]}', "'sample_size[1]'", "-inf"),
    ('{"text_config": {"eps": 1e999}}', "'text_config.eps'", "inf"),
])
def test_read_config_refuses_non_finite_numbers(tmp_path, text, key, what):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match="config.json") as info:
        read_config(tmp_path)
    assert f"{key} is {what}" in str(info.value)


def test_read_config_keeps_nulls_and_ordinary_numbers(tmp_path):
    (tmp_path / "config.json").write_text('{"trained_betas": null, "scaling_factor": 0.18215, "n": [1, 2.5e-3]}')
    assert read_config(tmp_path) == {"trained_betas": None, "scaling_factor": 0.18215, "n": [1, 2.5e-3]}


def test_scheduler_from_pretrained_refuses_non_finite_numbers(tmp_path):
    (tmp_path / "scheduler_config.json").write_text('{"beta_start": NaN}')
    with pytest.raises(ValueError, match=r"scheduler_config.json'.*'beta_start' is NaN"):
        DDIMScheduler.from_pretrained(tmp_path)
    (tmp_path / "scheduler_config.json").write_text('{"lambda_min_clipped": NaN}')
    with pytest.raises(ValueError, match="'lambda_min_clipped' is NaN"):
        DPMSolverMultistepScheduler.from_pretrained(tmp_path)


def test_diffusers_infinite_lambda_min_clipped_still_loads(tmp_path):
    """diffusers writes "lambda_min_clipped": -Infinity (its default, no clipping) in DPM-Solver configs."""
    import diffusers

    diffusers.DPMSolverMultistepScheduler().save_config(tmp_path)
    assert "-Infinity" in (tmp_path / "scheduler_config.json").read_text()
    assert DPMSolverMultistepScheduler.from_pretrained(tmp_path).config["lambda_min_clipped"] == -np.inf


# ------------------------------------------------------------------------------------- betas
@pytest.mark.parametrize("kwargs, match", [
    ({"beta_start": 0.0}, "beta_start must be a finite number in (0, 1)"),
    ({"beta_end": 1.5}, "beta_end must be a finite number in (0, 1)"),
    ({"beta_end": 1.0}, "beta_end must be a finite number in (0, 1)"),
    ({"beta_start": float("nan")}, "beta_start must be finite, got nan"),
    ({"beta_start": 0.02, "beta_end": 0.001}, "beta_end must be >= beta_start"),
    ({"trained_betas": [0.001, 0.0, 0.02], "num_train_timesteps": 3}, "trained_betas[1] = 0.0"),
    ({"trained_betas": [0.001, 0.01, 1.0], "num_train_timesteps": 3}, "trained_betas[2] = 1.0"),
    ({"trained_betas": [0.001, float("inf")], "num_train_timesteps": 2}, "trained_betas[1] = inf"),
])
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_checks_its_betas(name, kwargs, match):
    with pytest.raises(ValueError, match=r"\w+Scheduler: ") as info:
        SCHEDULERS[name](**kwargs)
    assert match in str(info.value)


def test_beta_checks_keep_legal_schedules():
    assert DDIMScheduler(beta_start=0.02, beta_end=0.02).betas[-1] == np.float32(0.02)      # constant is fine
    # the cosine schedule does not use beta_start / beta_end: diffusers' defaults or anything else pass
    assert np.isfinite(DDIMScheduler(beta_schedule="squaredcos_cap_v2", beta_start=0.0).alphas_cumprod).all()
    assert DDIMScheduler(trained_betas=np.linspace(1e-4, 0.02, 10), num_train_timesteps=10).betas.size == 10


# ------------------------------------------------------------------------------------- scaling_factor
@pytest.mark.parametrize("value", [1e-30, 0.0, -0.18215, float("nan"), float("inf")])
def test_vae_scaling_factor_must_be_a_sensible_positive_number(value):
    with pytest.raises(ValueError, match="AutoencoderKL: scaling_factor must be"):
        AutoencoderKL(scaling_factor=value, block_out_channels=(4,), norm_num_groups=2)


# ------------------------------------------------------------------------------------- the pipeline
def test_pipeline_names_the_step_where_latents_turned_non_finite():
    pipe = our_pipeline()

    def poison(pipe_, i, t, kwargs):
        return {"latents": kwargs["latents"] * np.float32("nan")} if i == 1 else {}

    with pytest.raises(NonFiniteError, match=r"denoising step 2 of 3 \(timestep \d+\)"):
        pipe("a cat", num_inference_steps=3, seed=0, output_type="np", callback_on_step_end=poison, progress=False)


def test_pipeline_blames_a_huge_guidance_scale():
    with pytest.raises(NonFiniteError, match="guidance scale 1e\\+30") as info:
        our_pipeline()("a cat", num_inference_steps=3, guidance_scale=1e30, seed=0, output_type="np", progress=False)
    assert isinstance(info.value, ValueError)


def test_decoded_image_is_checked_before_it_becomes_pixels():
    pipe = our_pipeline()
    latents = np.zeros((1, 4, 8, 8), np.float32)
    pipe.vae.decoder.conv_out.bias[...] = np.nan                 # a decoder that gives NaN on finite latents
    with pytest.raises(NonFiniteError, match="decoded image"):
        pipe.decode_latents(latents, "pil")


def test_guided_sample_names_the_step():
    from npdiffusion.guidance.classifier_guidance import guided_sample

    calls = []

    def model_fn(x, t):                                        # finite at first, then NaN
        calls.append(t)
        return x * np.float32("nan") if len(calls) == 3 else x * np.float32(0.1)

    with pytest.raises(NonFiniteError, match=r"after denoising step 3 of 4 .*the guided prediction"):
        guided_sample(model_fn, DDIMScheduler(), (1, 4, 4, 4), 4, np.random.default_rng(0))
    assert len(calls) == 3
