"""DreamBooth (``npdiffusion train dreambooth``) on the tiny diffusers pipeline of tests/pipeline_dummy.py.

* the prior-preservation loss: its value is the two halves' mean squared errors (with and without
  Min-SNR weights), its gradient a float64 central difference (non-contiguous inputs);
* class images: cached (a second call generates nothing), a generation interrupted after two chunks
  resumes to a folder byte for byte equal to an uninterrupted one, other settings are refused;
* the stage: every image trains on the instance prompt, the log splits the loss into instance and
  prior terms, the folder loads in diffusers; SIGKILL + ``--resume`` ends bitwise equal to an
  uninterrupted run (with prior preservation).
"""
import os

import numpy as np
import pytest

from npdiffusion import cli
from npdiffusion.diffusion.objectives import min_snr_weights
from npdiffusion.training import dreambooth_stage
from npdiffusion.training.class_images import SETTINGS_FILE, ensure_class_images, read_class_images
from npdiffusion.training.config import build_config
from npdiffusion.training.dreambooth_stage import prior_preservation_loss
from npdiffusion.training.loop import read_history_csv
from npdiffusion.training.stages import dataset_from_config
from npdiffusion.training.unet_stage import UNetOptions, training_alphas_cumprod
from pipeline_dummy import dummy_folder, our_pipeline
from test_training_finetune import captioned_images, files, images_both, kill_and_resume, write_toml

ABAR = training_alphas_cumprod(UNetOptions())


# ------------------------------------------------------------------------------ the loss
def non_contiguous(a):
    out = np.empty(a.shape + (2,), dtype=a.dtype)[..., 0]
    out[...] = a
    assert not out.flags.c_contiguous
    return out


@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_prior_preservation_loss_value_and_gradient(snr_gamma):
    rng = np.random.default_rng(0)
    n, lam = 3, 0.7
    out = non_contiguous(rng.standard_normal((5, 2, 3, 3)))
    target = non_contiguous(rng.standard_normal((5, 2, 3, 3)))
    t = np.array([10, 500, 999, 3, 250])
    loss, inst, prior, grad = prior_preservation_loss(out, target, t, n, lam, ABAR, "epsilon", snr_gamma)
    w = np.ones(5) if snr_gamma is None else min_snr_weights(t, ABAR, snr_gamma, "epsilon")
    per_row = ((out - target) ** 2).reshape(5, -1).mean(1) * w
    assert inst == pytest.approx(per_row[:n].mean(), rel=1e-12)
    assert prior == pytest.approx(per_row[n:].mean(), rel=1e-12)
    assert loss == pytest.approx(per_row[:n].mean() + lam * per_row[n:].mean(), rel=1e-12)
    upstream = rng.standard_normal()                  # dL/dloss: a random scalar, through grad_scale
    scale = abs(upstream)
    _, _, _, scaled = prior_preservation_loss(out, target, t, n, lam, ABAR, "epsilon", snr_gamma, grad_scale=scale)
    h, numeric = 1e-6, np.empty(out.shape)

    def loss_at(x):
        return prior_preservation_loss(x, target, t, n, lam, ABAR, "epsilon", snr_gamma)[0]

    for i in np.ndindex(out.shape):
        plus, minus = out.copy(), out.copy()
        plus[i] += h
        minus[i] -= h
        numeric[i] = scale * (loss_at(plus) - loss_at(minus)) / (2 * h)
    # central difference of a quadratic: exact up to rounding of values ~1 over 2h (~1e-10)
    assert np.abs(scaled - numeric).max() <= 1e-8
    assert np.allclose(scaled, scale * grad, rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="prior_loss_weight"):
        prior_preservation_loss(out, target, t, n, 0.0, ABAR, "epsilon")
    with pytest.raises(ValueError, match="num_instance"):
        prior_preservation_loss(out, target, t, 5, lam, ABAR, "epsilon")


# ------------------------------------------------------------------------------ class images
class Interrupted(Exception):
    pass


class StopsAfter:
    """A pipeline that raises (as a kill would stop it) after ``chunks`` calls; counts its calls."""

    def __init__(self, pipe, chunks=None):
        self.pipe, self.chunks, self.calls = pipe, chunks, 0
        self.scheduler = pipe.scheduler

    def __call__(self, *args, **kwargs):
        if self.chunks is not None and self.calls == self.chunks:
            raise Interrupted
        self.calls += 1
        return self.pipe(*args, **kwargs)


def test_class_images_are_cached_and_an_interrupted_generation_resumes_exactly(tmp_path):
    kw = dict(size=16, steps=2, guidance_scale=2.0, batch_size=2, seed=5, model=dummy_folder(), log=lambda *a: None)
    full = ensure_class_images(our_pipeline(), tmp_path / "full", "a dog", 5, **kw)
    assert [os.path.basename(p) for p in full] == [f"class-{i:05d}.png" for i in range(5)]
    stopped = StopsAfter(our_pipeline(), chunks=2)
    with pytest.raises(Interrupted):
        ensure_class_images(stopped, tmp_path / "cut", "a dog", 5, **kw)
    assert len([f for f in os.listdir(tmp_path / "cut") if f.endswith(".png")]) == 4    # two chunks of two
    again = StopsAfter(our_pipeline())
    ensure_class_images(again, tmp_path / "cut", "a dog", 5, **kw)
    assert again.calls == 1                                                     # only the third chunk
    assert files(tmp_path / "cut") == files(tmp_path / "full")
    cached = StopsAfter(our_pipeline(), chunks=0)
    ensure_class_images(cached, tmp_path / "full", "a dog", 5, **kw)          # nothing to generate
    with pytest.raises(ValueError, match=r"prompts = \['a dog'\], not \['a cat'\]"):
        ensure_class_images(our_pipeline(), tmp_path / "full", "a cat", 5, **kw)
    images = read_class_images(full)
    assert all(im.shape == (16, 16, 3) for im in images) and np.abs(images[0].astype(int) - images[1]).max() > 0
    assert os.path.isfile(tmp_path / "full" / SETTINGS_FILE)


# ------------------------------------------------------------------------------ the stage
def dreambooth_data(tmp_path, out, steps=3, **dreambooth):
    return {"output_dir": str(out),
            "data": {"dataset": "folder", "path": captioned_images(tmp_path / "images", n=4), "resolution": 16},
            "train": {"steps": steps, "batch_size": 2, "checkpointing_steps": 2, "checkpoints_total_limit": 2},
            "unet": {"pretrained": dummy_folder()},
            "dreambooth": {"instance_prompt": "a sks dog", "class_prompt": "a dog", "num_class_images": 3,
                           "class_batch_size": 2, "class_inference_steps": 2, "prior_loss_weight": 0.5, **dreambooth}}


def test_dreambooth_logs_both_terms_and_writes_a_folder_diffusers_loads(tmp_path):
    data = dreambooth_data(tmp_path, tmp_path / "db", class_prompts=["a dog", "a red cat"])
    del data["dreambooth"]["class_prompt"]
    config = build_config(dreambooth_stage.CONFIG, data)
    summary = dreambooth_stage.train(config, progress=False, log=lambda *a: None)
    assert summary.startswith("dreambooth: 3 steps")
    rows = read_history_csv(tmp_path / "db" / "losses.csv")
    for r in rows:
        assert r["loss"] == pytest.approx(r["instance_loss"] + 0.5 * r["prior_loss"], rel=1e-6)
        assert r["instance_loss"] > 0 and r["prior_loss"] > 0
    assert len(os.listdir(tmp_path / "db" / "class_images")) == 3 + 1
    ours, theirs = images_both(str(tmp_path / "db" / "model"))
    assert float(np.abs(ours - theirs).max()) <= 1e-4
    stage = dreambooth_stage.build_stage(config, dataset_from_config(config.data))
    assert set(stage.caption_index.values()) == {1}                    # every image: the instance prompt
    assert np.array_equal(stage.context[:2], stage.encode_text(["", "a sks dog"]))
    assert stage.class_rows.tolist() == [2, 3, 2] and stage.num_class == 3       # class_prompts in turn
    assert np.array_equal(stage.context[2], stage.encode_text(["a dog"])[0])
    assert np.array_equal(stage.context[3], stage.encode_text(["a red cat"])[0])


def test_dreambooth_needs_a_pretrained_model(tmp_path, capsys):
    data = dreambooth_data(tmp_path, tmp_path / "x")
    data["unet"] = {}
    code = cli.main(["train", "dreambooth", "--config", write_toml(tmp_path / "c.toml", data), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "unet.pretrained is empty" in err


def test_dreambooth_killed_and_resumed_equals_the_uninterrupted_run(tmp_path):
    def make_config(out):
        return write_toml(tmp_path / f"{os.path.basename(out)}.toml", dreambooth_data(tmp_path, out, steps=30))

    out = kill_and_resume("dreambooth", make_config, tmp_path)
    assert files(out / "class_images") == files(tmp_path / "ref" / "class_images")
    assert "prior_loss" in (out / "losses.csv").read_text().splitlines()[0]


def test_dreambooth_with_the_text_encoder_runs_on_the_cupy_standin(tmp_path):
    """The strict CPU stand-in for CuPy (refuses host/device mixing): DreamBooth with a trained text
    encoder runs and gives the NumPy run's losses within float32 rounding (the stand-in's kernels may
    sum in another order: ~1e-7 relative, carried forward by each step; measured 1.5e-7 at step 2)."""
    from npdiffusion import cupy_standin
    from npdiffusion.backend import get_backend, set_backend

    def run(name):
        data = dreambooth_data(tmp_path, tmp_path / name)
        data["unet"]["train_text_encoder"] = True
        dreambooth_stage.train(build_config(dreambooth_stage.CONFIG, data), progress=False, log=lambda *a: None)
        return [r["loss"] for r in read_history_csv(tmp_path / name / "losses.csv")]

    reference = run("numpy")
    previous = get_backend()
    with cupy_standin.installed():
        set_backend("cupy")
        try:
            losses = run("standin")
            assert losses == pytest.approx(reference, rel=1e-5)
        finally:
            set_backend(previous)
