"""The VAE stage on a tiny AutoencoderKL: it learns, resumes bit-exactly, exports a folder diffusers loads
(same decode on the same latents) with the measured scaling factor, and rejects inconsistent configs."""
import os

import numpy as np
import pytest
import torch

from npdiffusion.io.pretrained import load_weights, read_config
from npdiffusion.training.config import DataConfig, TrainConfig
from npdiffusion.training.loop import read_history_csv
from npdiffusion.training.stages import run_model_stage
from npdiffusion.training.vae_stage import MAX_SCALE_IMAGES, VAEOptions, VAEStageConfig, build_stage


def tiny(out, steps=6, **train):
    return VAEStageConfig(
        output_dir=str(out), data=DataConfig(num_images=40, resolution=8, seed=2),
        train=TrainConfig(**{"steps": steps, "batch_size": 4, "learning_rate": 3e-3, "checkpointing_steps": 3,
                             "seed": 1, "use_ema": True, "ema_decay": 0.9, **train}),
        vae=VAEOptions(block_out_channels=(8, 8), norm_num_groups=4, latent_channels=2))


def test_trains_and_resumes_bit_exactly(tmp_path):
    summary = run_model_stage(tiny(tmp_path / "ref", steps=12), build_stage, progress=False)
    assert summary.startswith("vae: 12 steps")
    rows = read_history_csv(str(tmp_path / "ref" / "losses.csv"))
    assert set(rows[0]) >= {"loss", "reconstruction", "kl"} and not any(r["skipped"] for r in rows)
    assert np.mean([r["loss"] for r in rows[-3:]]) < np.mean([r["loss"] for r in rows[:3]])

    run_model_stage(tiny(tmp_path / "run", steps=6), build_stage, progress=False)          # stop at 6 ...
    run_model_stage(tiny(tmp_path / "run", steps=12), build_stage, resume=True, progress=False)   # ... resume
    for sub in ("vae", "checkpoint-12/vae"):
        a, b = load_weights(tmp_path / "ref" / sub), load_weights(tmp_path / "run" / sub)
        assert all(a[k].tobytes() == b[k].tobytes() for k in a), sub
    assert (tmp_path / "ref" / "losses.csv").read_text() == (tmp_path / "run" / "losses.csv").read_text()


def test_export_loads_in_diffusers_with_the_measured_scaling_factor(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    config = tiny(tmp_path, steps=3)
    run_model_stage(config, build_stage, progress=False)
    theirs = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "vae")).double().eval()
    sf = read_config(tmp_path / "vae")["scaling_factor"]
    assert theirs.config.scaling_factor == sf

    # the scaling factor is 1 / std of z = mean + std * noise over the training images (here all 40),
    # noise drawn in chunks of 64 from the stage's own stream; recomputed with diffusers' encoder
    from npdiffusion.data.dataset import to_model_input
    from npdiffusion.training.stages import dataset_from_config

    ds = dataset_from_config(config.data)
    n = min(len(ds), MAX_SCALE_IMAGES)
    x = torch.tensor(to_model_input(ds.get_images(np.arange(n))), dtype=torch.float64)
    with torch.no_grad():
        dist = theirs.encode(x).latent_dist
    rng = np.random.default_rng(np.random.SeedSequence(config.train.seed, spawn_key=(2,)))
    noise = torch.tensor(rng.standard_normal(tuple(dist.mean.shape)))
    z = dist.mean + dist.std * noise
    assert sf == pytest.approx(1.0 / float(z.std(unbiased=False)), rel=1e-4)

    # same decode from the same latents
    from npdiffusion.models.vae.autoencoder_kl import AutoencoderKL

    ours = AutoencoderKL.from_pretrained(tmp_path / "vae", dtype="float64")
    latents = np.random.default_rng(0).standard_normal((2, 2, 4, 4))
    with torch.no_grad():
        expected = theirs.decode(torch.tensor(latents)).sample.numpy()
    from npdiffusion.backend import asarray, to_numpy

    got = to_numpy(ours.decode(asarray(latents)))
    assert np.abs(got - expected).max() <= 1e-9 * np.abs(expected).max()


def test_fixed_scaling_factor_is_kept(tmp_path):
    config = tiny(tmp_path, steps=1)
    config.vae.scaling_factor = 0.5
    run_model_stage(config, build_stage, progress=False)
    assert read_config(tmp_path / "vae")["scaling_factor"] == 0.5


@pytest.mark.parametrize("channels,resolution,match", [
    ((8, 10), 8, "norm_num_groups 4 must divide every entry of block_out_channels, got \\[8, 10\\]"),
    ((8, 8, 8, 8), 12, "data.resolution 12 must be a multiple of the downsampling factor 8 of 4 levels"),
])
def test_inconsistent_configs_fail_before_training(tmp_path, channels, resolution, match):
    config = tiny(tmp_path / "out")
    config.vae.block_out_channels = channels
    config.data.resolution = resolution
    with pytest.raises(ValueError, match=match):
        run_model_stage(config, build_stage, progress=False)
    assert os.listdir(tmp_path / "out") == []
