"""tools/vae_ceiling.py: reads a saved VAE's reconstructions with the attribute checker."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import vae_ceiling  # noqa: E402

from npdiffusion.data.shapes import make_shapes  # noqa: E402
from npdiffusion.models.vae.autoencoder_kl import AutoencoderKL  # noqa: E402


def _tiny_vae():
    return AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=2,
                         norm_num_groups=2, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2).eval()


def test_reconstruct_shapes_and_range():
    images = make_shapes(3, seed=5).images
    out = vae_ceiling.reconstruct(_tiny_vae(), images, batch=2)
    assert out.shape == images.shape and out.dtype == np.uint8
    assert out.std() > 0                                   # not a constant picture


def test_prints_both_scores_for_a_model_folder(tmp_path, capsys):
    _tiny_vae().save_pretrained(str(tmp_path / "vae"))
    assert vae_ceiling.main([str(tmp_path), "--images", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("real images:") and "all three 100.0%" in lines[0]
    assert lines[1].startswith("reconstructions:") and "4 images" in lines[1]


def test_missing_vae_is_one_line_and_exit_2(tmp_path, capsys):
    assert vae_ceiling.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no VAE" in err[0]
