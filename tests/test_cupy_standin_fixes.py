"""Library paths that handed host arrays to device code, run on the strict CuPy stand-in (which
refuses host/device mixing as CuPy does), so they stay fixed without a GPU (issue #18)."""
import numpy as np
import pytest

from npdiffusion import cupy_standin
from npdiffusion.backend import asarray, get_backend, set_backend, to_numpy


@pytest.fixture
def standin():
    previous = get_backend()
    with cupy_standin.installed() as cupy:
        set_backend("cupy")
        try:
            yield cupy
        finally:
            set_backend(previous)


def test_guided_sample_takes_device_latents(standin):
    """guidance/classifier_guidance.py used numpy.asarray(latents): a TypeError for device latents."""
    from npdiffusion.guidance.classifier_guidance import guided_sample
    from npdiffusion.schedulers import DDIMScheduler

    def model(x, t):
        return x * 0.5 + 1e-3 * t

    host = np.random.default_rng(3).standard_normal((2, 3, 4, 4))
    got = guided_sample(model, DDIMScheduler(), (2, 3, 4, 4), 4, np.random.default_rng(7),
                        latents=asarray(host))
    want = guided_sample(model, DDIMScheduler(), (2, 3, 4, 4), 4, np.random.default_rng(7),
                         latents=host)
    assert isinstance(got, standin.ndarray) and got.dtype == np.float32
    np.testing.assert_array_equal(to_numpy(got), to_numpy(want))


def test_demo_diffusion_picture_runs_on_the_device(standin, quick_demo_model, tmp_path):
    """training/demo/pictures.py handed a host x0 to q_sample next to device noise: on CuPy the demo crashed
    at its last picture (TypeError: Unsupported type numpy.ndarray) after minutes of training."""
    from npdiffusion.data.shapes import make_shapes
    from npdiffusion.pipelines import StableDiffusionPipeline
    from npdiffusion.training.demo import diffusion_png

    pipe = StableDiffusionPipeline.from_pretrained(quick_demo_model)
    diffusion_png(pipe, make_shapes(2, size=pipe.vae.config["sample_size"]), str(tmp_path / "d.png"),
                  guidance_scale=2.0, steps=2)
    assert (tmp_path / "d.png").stat().st_size > 0


def test_vae_ceiling_reconstructs_on_the_device(standin):
    """tools/vae_ceiling.py handed host images to the VAE and NumPy device reconstructions."""
    import importlib.util
    import pathlib

    from npdiffusion.models.vae import AutoencoderKL

    path = pathlib.Path(__file__).parents[1] / "tools" / "vae_ceiling.py"
    spec = importlib.util.spec_from_file_location("vae_ceiling", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], norm_num_groups=2)
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    rec = tool.reconstruct(vae, images, batch=2)
    assert isinstance(rec, np.ndarray) and rec.shape == images.shape and rec.dtype == np.uint8
