"""Fine-tuning a pretrained pipeline (``[unet] pretrained``) on the tiny diffusers pipeline of
tests/pipeline_dummy.py, saved by diffusers in a temporary folder, with a folder of captioned images.

* 0 steps: the written folder is the original: every file but the U-Net's byte for byte, the U-Net's
  weights bitwise, so diffusers and npdiffusion give bitwise the original's images from it;
* N steps: the weights moved, and diffusers loads the folder and gives our images within 1e-4
  (float32; the bound of tests/test_pipeline_parity.py);
* the folder's sizes win: a size key given in the config that disagrees is refused naming both; the
  schedule comes from the folder unless the config gives it (then the written scheduler says so);
* a run SIGKILLed mid-run and resumed with ``--resume`` ends bitwise equal to an uninterrupted one.
"""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from npdiffusion import cli
from npdiffusion.io.pretrained import load_weights
from npdiffusion.pipelines import StableDiffusionPipeline
from npdiffusion.training import unet_stage
from npdiffusion.training.config import build_config
from npdiffusion.training.pretrained import open_start
from parity import torch_threads
from pipeline_dummy import PROMPTS, dummy_folder
from test_training_cli import snapshot as files           # {relative path: sha256} of a folder's files

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    with torch_threads(1):
        yield


def captioned_images(folder, n=8, seed=1, size=16):
    """``n`` shapes images and their captions in ``folder`` (PNG files + metadata.jsonl)."""
    from PIL import Image

    from npdiffusion.data.shapes import make_shapes

    os.makedirs(folder, exist_ok=True)
    ds = make_shapes(n, seed=seed, size=size)
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        for i in range(n):
            Image.fromarray(ds.images[i]).save(os.path.join(folder, f"{i:02d}.png"))
            f.write(json.dumps({"file_name": f"{i:02d}.png", "text": ds.captions[i]}) + "\n")
    return str(folder)


def finetune_config(tmp_path, name, steps, **unet):
    data = {"output_dir": str(tmp_path / name),
            "data": {"dataset": "folder", "path": captioned_images(tmp_path / "images"), "resolution": 16},
            "train": {"steps": max(steps, 1), "batch_size": 4, "learning_rate": 1e-3, "checkpointing_steps": 2,
                      "seed": 3},
            "unet": {"pretrained": dummy_folder(), **unet}}
    config = build_config(unet_stage.CONFIG, data)
    return dataclasses.replace(config, train=dataclasses.replace(config.train, steps=steps))


def images_both(folder, seed=0):
    """(ours, diffusers') float32 images of PROMPTS from the same latents, 3 DDIM steps, guidance 4."""
    from diffusers import StableDiffusionPipeline as DiffusersPipeline

    lat = np.random.default_rng(seed).standard_normal((2, 4, 32, 32)).astype(np.float32)
    kw = dict(num_inference_steps=3, guidance_scale=4.0, output_type="np")
    ours = StableDiffusionPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    theirs = DiffusersPipeline.from_pretrained(folder)
    theirs.set_progress_bar_config(disable=True)
    return ours(PROMPTS, latents=lat, **kw).images, theirs(PROMPTS, latents=torch.from_numpy(lat), **kw).images


def test_zero_steps_write_the_original_pipeline(tmp_path):
    config = finetune_config(tmp_path, "zero", 0)
    unet_stage.train(config, progress=False, log=lambda *a: None)
    model, original = os.path.join(config.output_dir, "model"), dummy_folder()
    got, want = files(model), files(original)
    assert set(got) == set(want)
    assert {k for k in got if got[k] != want[k]} <= {"unet/diffusion_pytorch_model.safetensors"}
    a, b = load_weights(os.path.join(model, "unet")), load_weights(os.path.join(original, "unet"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    ours, theirs = images_both(model)
    ours0, theirs0 = images_both(original)
    assert np.array_equal(ours, ours0) and np.array_equal(theirs, theirs0)
    assert float(np.abs(ours - theirs).max()) <= TOL
    assert ((ours > 0) & (ours < 1)).mean() > 0.5 and np.abs(ours[0] - ours[1]).max() > 1e-2   # not vacuous


def test_after_training_diffusers_loads_the_folder_with_our_images(tmp_path):
    config = finetune_config(tmp_path, "trained", 3)
    summary = unet_stage.train(config, progress=False, log=lambda *a: None)
    assert "3 steps" in summary
    model = os.path.join(config.output_dir, "model")
    got, want = files(model), files(dummy_folder())
    changed = {k for k in got if got[k] != want.get(k)}
    assert changed == {"unet/diffusion_pytorch_model.safetensors"}        # the rest is the original's
    before, after = load_weights(os.path.join(dummy_folder(), "unet")), load_weights(os.path.join(model, "unet"))
    assert max(float(np.abs(after[k] - before[k]).max()) for k in after) > 1e-4
    ours, theirs = images_both(model, seed=1)
    assert float(np.abs(ours - theirs).max()) <= TOL
    assert np.abs(ours - images_both(dummy_folder(), seed=1)[0]).max() > 1e-4   # training changed the images


# ------------------------------------------------------------------------------ what the folder decides
def test_sizes_come_from_the_folder_and_a_disagreeing_key_is_refused(tmp_path):
    start = open_start(finetune_config(tmp_path, "a", 1).unet)
    assert start.options.block_out_channels == (32, 64)           # the config's defaults are not checked
    config = finetune_config(tmp_path, "b", 1, block_out_channels=[32, 64])
    with pytest.raises(ValueError) as err:
        open_start(config.unet)
    msg = str(err.value)
    assert "unet.block_out_channels = [32, 64]" in msg and "block_out_channels = [4, 8]" in msg
    assert os.path.join(dummy_folder(), "unet", "config.json") in msg
    open_start(finetune_config(tmp_path, "c", 1, block_out_channels=[4, 8], norm_num_groups=2).unet)   # agrees


def test_schedule_from_the_folder_unless_given(tmp_path):
    folder = tmp_path / "vpred"
    shutil.copytree(dummy_folder(), folder)
    path = folder / "scheduler" / "scheduler_config.json"
    sched = json.loads(path.read_text())
    path.write_text(json.dumps(dict(sched, prediction_type="v_prediction", beta_end=0.02)))
    config = finetune_config(tmp_path, "x", 1, pretrained=str(folder))
    start = open_start(config.unet)
    assert (start.options.prediction_type, start.options.beta_end) == ("v_prediction", 0.02)
    assert start.overrides == {} and start.folders["vae"] == os.path.join(str(folder), "vae")
    given = open_start(finetune_config(tmp_path, "y", 1, pretrained=str(folder), prediction_type="epsilon").unet)
    assert (given.options.prediction_type, given.options.beta_end) == ("epsilon", 0.02)
    assert given.overrides == {"prediction_type": "epsilon"}
    assert given.scheduler().config["prediction_type"] == "epsilon"


def test_bad_pretrained_folders_are_one_line_exit_2(tmp_path, capsys):
    images = captioned_images(tmp_path / "images")
    bare = tmp_path / "bare_unet"
    shutil.copytree(os.path.join(dummy_folder(), "unet"), bare)
    cases = {str(tmp_path / "missing"): "does not exist",
             images: "neither a pipeline folder",
             str(bare): "unet.vae must name the vae folder",
             os.path.join(dummy_folder(), "vae"): "not a UNet2DConditionModel"}
    for pretrained, expected in cases.items():
        config = tmp_path / "config.toml"
        config.write_text(f'output_dir = "{tmp_path / "out"}"\n[data]\ndataset = "folder"\npath = "{images}"\n'
                          f'resolution = 16\n[unet]\npretrained = "{pretrained}"\n')
        code = cli.main(["train", "unet", "--config", str(config), "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert not os.path.exists(tmp_path / "out" / "model")


# ------------------------------------------------------------------------------ killed and resumed
def write_toml(path, data):
    from npdiffusion.training.config import config_to_toml

    path.write_text(config_to_toml(data))
    return str(path)


def run_cli_process(stage, config, resume=False):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OPENBLAS_NUM_THREADS="1")
    env.pop("NPDIFFUSION_BACKEND", None)
    args = [sys.executable, "-m", "npdiffusion", "train", stage, "--config", config, "--no-progress"]
    return subprocess.Popen(args + (["--resume"] if resume else []), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def kill_and_resume(stage, make_config, tmp_path, weights="unet"):
    """Run ``make_config(out)`` to the end in one process, and in another SIGKILLed after its second
    checkpoint, then resumed: the final weights and loss histories must be bitwise equal."""
    ref = run_cli_process(stage, make_config(tmp_path / "ref"))
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    out = tmp_path / "killed"
    proc = run_cli_process(stage, make_config(out))
    deadline = time.monotonic() + 300
    while not os.path.isdir(out / "checkpoint-4"):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(np.random.default_rng().uniform(0.0, 0.1))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the run finished before it could be killed"
    assert not os.path.exists(out / "model")
    resumed = run_cli_process(stage, make_config(out), resume=True)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    a, b = load_weights(out / weights), load_weights(tmp_path / "ref" / weights)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert (out / "losses.csv").read_text() == (tmp_path / "ref" / "losses.csv").read_text()
    assert files(out / "model") == files(tmp_path / "ref" / "model")
    return out


def test_finetuning_killed_and_resumed_equals_the_uninterrupted_run(tmp_path):
    images = captioned_images(tmp_path / "images")

    def make_config(out):
        return write_toml(tmp_path / f"{os.path.basename(out)}.toml", {
            "output_dir": str(out), "data": {"dataset": "folder", "path": images, "resolution": 16},
            "train": {"steps": 30, "batch_size": 2, "checkpointing_steps": 2, "checkpoints_total_limit": 2},
            "unet": {"pretrained": dummy_folder()}})

    kill_and_resume("unet", make_config, tmp_path)


# ------------------------------------------------------------------------------ training the text encoder
def test_text_encoder_gradient_is_a_central_difference(tmp_path):
    """float64: the loss's derivative along a random direction of every text-encoder parameter (through
    the U-Net's context gradient) against a central difference, the step's draws replayed each time."""
    from npdiffusion.backend import to_numpy
    from npdiffusion.training.stages import dataset_from_config

    config = finetune_config(tmp_path, "grad", 1, train_text_encoder=True)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, dtype="float64"))
    dataset = dataset_from_config(config.data)
    stage = unet_stage.build_stage(config, dataset)
    assert {n.split(".")[0] for n, _ in stage.module.named_parameters()} == {"unet", "text_encoder"}
    idx = np.arange(4)
    batch = stage.collate(None, [dataset.captions[i] for i in idx], idx, 0, 0)
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state

    def loss():
        rng.bit_generator.state = state
        stage.module.zero_grad()
        return float(stage.train_step(batch, rng)["loss"])

    loss()
    params = dict(stage.text_encoder.named_parameters())
    grads = {n: to_numpy(g).copy() for n, g in stage.text_encoder.named_grads()}
    direction = {n: np.random.default_rng(1).standard_normal(p.shape) for n, p in params.items()}
    analytic = sum(float((grads[n] * direction[n]).sum()) for n in params)
    h, values = 1e-5, []
    for sign in (1, -1):
        for n, p in params.items():
            p += sign * h * direction[n]
        values.append(loss())
        for n, p in params.items():
            p -= sign * h * direction[n]
    numeric = (values[0] - values[1]) / (2 * h)
    assert abs(analytic) > 1e-6
    # truncation ~h^2 (smooth loss) and rounding ~1e-16 |L| / h: both far below 1e-6 relative
    assert abs(numeric - analytic) <= 1e-6 * abs(analytic)


def test_training_the_text_encoder_its_own_rate_resume_and_diffusers(tmp_path):
    from npdiffusion.training.stages import run_model_stage

    config = finetune_config(tmp_path, "te", 4, train_text_encoder=True, text_encoder_learning_rate=3e-3)
    unet_stage.train(config, progress=False, log=lambda *a: None)
    model = os.path.join(config.output_dir, "model")
    got, want = files(model), files(dummy_folder())
    assert {k for k in got if got[k] != want.get(k)} == {"unet/diffusion_pytorch_model.safetensors",
                                                          "text_encoder/model.safetensors"}
    ours, theirs = images_both(model, seed=2)
    assert float(np.abs(ours - theirs).max()) <= TOL
    # resumed from its step-2 checkpoint: bitwise the uninterrupted run
    half = finetune_config(tmp_path, "te_half", 2, train_text_encoder=True, text_encoder_learning_rate=3e-3)
    run_model_stage(half, unet_stage.build_stage, progress=False, log=lambda *a: None)
    rest = finetune_config(tmp_path, "te_half", 4, train_text_encoder=True, text_encoder_learning_rate=3e-3)
    run_model_stage(rest, unet_stage.build_stage, resume=True, progress=False, log=lambda *a: None)
    for name in ("unet", "text_encoder"):
        a, b = load_weights(os.path.join(config.output_dir, name)), load_weights(os.path.join(rest.output_dir, name))
        assert all(np.array_equal(a[k], b[k]) for k in a)
    # the text encoder's rate: 3e-3 moved it further than 3e-4 would have, the U-Net's (1e-3) is unchanged
    slow = finetune_config(tmp_path, "te_slow", 4, train_text_encoder=True, text_encoder_learning_rate=3e-4)
    run_model_stage(slow, unet_stage.build_stage, progress=False, log=lambda *a: None)
    original = load_weights(os.path.join(dummy_folder(), "text_encoder"))      # transformers 5: no text_model.

    def moved(folder):
        w = {k.removeprefix("text_model."): v for k, v in load_weights(os.path.join(folder, "text_encoder")).items()}
        assert original.keys() <= w.keys()
        return max(float(np.abs(w[k] - original[k]).max()) for k in original)

    assert moved(slow.output_dir) < 0.5 * moved(config.output_dir)
