"""Requests too big for memory are refused before anything big is allocated (issue #17, point 4): one line
(CLI, exit code 2) or a ValueError (library) naming the estimate and the limit. The limit is set with
NPDIFFUSION_MEMORY_LIMIT in every test, so results do not depend on the machine; "nothing big was
allocated" is checked with tracemalloc (NumPy reports its arrays to it) and a generous wall-clock bound.
The estimates themselves: parameter counts equal the built models', the sampling peak follows tracemalloc."""
import json
import os
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from npdiffusion import cli
from pipeline_dummy import copy_folder, dummy_folder, our_pipeline

LIMIT = "8GiB"
SMALL = 64 * 2**20          # nothing close to this may be allocated by a refused request


@pytest.fixture(autouse=True)
def memory_limit(monkeypatch):
    monkeypatch.setenv("NPDIFFUSION_MEMORY_LIMIT", LIMIT)


def refused(fn):
    """Run ``fn``; return (its result or exception, seconds, peak traced bytes)."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - returned for the caller to check
        result = exc
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, seconds, peak


def assert_cli_refuses(capsys, *argv, match=()):
    dummy_folder()                                    # built once, before anything is captured or measured
    capsys.readouterr()
    code, seconds, peak = refused(lambda: cli.main(list(argv)))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith(f"npdiffusion {argv[0]}: error: "), err
    for text in match:
        assert text in err[0], err[0]
    assert seconds < 5 and peak < SMALL, (seconds, peak)
    return err[0]


def model_folder(tmp_path, component, name="config.json", **changes):
    folder = copy_folder(tmp_path / "sd")
    path = os.path.join(folder, component, name)
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)
    return folder


def png_header(path, width, height):
    """A PNG file whose header says width x height (RGB) and that holds no pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return str(path)


# ------------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("size, num_images, what", [("65536", "1", "65536x65536"), ("4096", "1", "4096x4096"),
                                                    ("64", "200000", "200000 image(s)")])
def test_sample_refuses_sizes_over_the_limit(tmp_path, capsys, size, num_images, what):
    out = tmp_path / "out"
    line = assert_cli_refuses(capsys, "sample", "--model", dummy_folder(), "--prompt", "a cat", "--height", size,
                              "--width", size, "--num-images", num_images, "--out", str(out),
                              match=(what, "needs about", "(estimated), over the 8 GiB limit that "
                                     "NPDIFFUSION_MEMORY_LIMIT sets", "--height/--width or --num-images"))
    assert not out.exists(), line


def test_img2img_refuses_a_size_over_the_limit(tmp_path, capsys):
    image = tmp_path / "in.png"
    Image.new("RGB", (32, 24)).save(image)
    assert_cli_refuses(capsys, "img2img", "--model", dummy_folder(), "--image", str(image), "--prompt", "a cat",
                       "--height", "8192", "--width", "8192", "--out", str(tmp_path / "out"),
                       match=("8192x8192", "needs about", "over the 8 GiB limit"))


@pytest.mark.parametrize("width, height", [(10000, 10000), (14000, 14000)])
def test_img2img_refuses_a_huge_image_from_its_header(tmp_path, capsys, width, height):
    """10000^2 is over Pillow's MAX_IMAGE_PIXELS (our check); 14000^2 over twice it (Pillow's
    DecompressionBombError, a traceback before). No pixel is decoded: the file holds none."""
    path = png_header(tmp_path / "bomb.png", width, height)
    assert_cli_refuses(capsys, "img2img", "--model", dummy_folder(), "--image", path, "--prompt", "a cat",
                       "--out", str(tmp_path / "out"), match=("--image", f"{Image.MAX_IMAGE_PIXELS:,} pixels"))


@pytest.mark.parametrize("component, changes, match", [
    ("unet", {"layers_per_block": 10**9}, "UNet2DConditionModel"),
    ("vae", {"layers_per_block": 10**9}, "AutoencoderKL"),
    ("text_encoder", {"num_hidden_layers": 10**9}, "CLIPTextModel")])
def test_sample_refuses_a_config_too_big_to_build(tmp_path, capsys, component, changes, match):
    folder = model_folder(tmp_path, component, **changes)
    assert_cli_refuses(capsys, "sample", "--model", folder, "--prompt", "a cat", "--out", str(tmp_path / "out"),
                       match=(os.path.join(folder, component), "parameters) needs about", "over the 8 GiB limit"))


@pytest.mark.parametrize("argv, match", [
    (["--channels", "100000"], "--channels 100000 needs about"),
    (["--batch-size", "10000000"], "--batch-size 10000000 --channels 32 needs about")])
def test_toy_refuses_sizes_over_the_limit(capsys, argv, match):
    assert_cli_refuses(capsys, "toy", *argv, match=(match, "over the 8 GiB limit", "lower --batch-size or --channels"))


def test_an_argument_of_the_wrong_type_is_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["toy", "--batch-size", "1e7"])
    assert info.value.code == 2
    assert capsys.readouterr().err == ("npdiffusion toy: error: argument --batch-size: invalid int value: '1e7' "
                                       "(see npdiffusion toy --help)\n")


def test_trained_betas_of_the_wrong_length_are_one_line(tmp_path, capsys):
    folder = model_folder(tmp_path, "scheduler", "scheduler_config.json", trained_betas=[0.001, 0.002, 0.003])
    assert_cli_refuses(capsys, "sample", "--model", folder, "--prompt", "a cat", "--steps", "2",
                       "--out", str(tmp_path / "out"),
                       match=("trained_betas must have num_train_timesteps = 1000 entries", "got 3"))


# -------------------------------------------------------------------------------------- library
def test_the_pipeline_refuses_sizes_over_the_limit():
    from npdiffusion.memory import MemoryLimitError

    pipe = our_pipeline()
    image = Image.new("RGB", (32, 32))
    for call in (lambda: pipe("a cat", height=65536, width=65536, num_inference_steps=1, progress=False),
                 lambda: pipe("a cat", num_images_per_prompt=200000, num_inference_steps=1, progress=False),
                 lambda: pipe.img2img(image, "a cat", height=4096, width=4096, num_inference_steps=2, progress=False)):
        exc, seconds, peak = refused(call)
        assert isinstance(exc, MemoryLimitError) and isinstance(exc, ValueError), exc
        assert "needs about" in str(exc) and "over the 8 GiB limit" in str(exc), exc
        assert seconds < 5 and peak < SMALL, (seconds, peak)


def test_a_model_too_big_is_refused_before_its_parameters_exist():
    from npdiffusion.models.clip.text_model import CLIPTextModel
    from npdiffusion.models.unet.unet_2d_condition import UNet2DConditionModel
    from npdiffusion.models.vae.autoencoder_kl import AutoencoderKL

    with open(os.path.join(dummy_folder(), "unet", "config.json")) as f:
        unet = json.load(f)
    for build in (lambda: UNet2DConditionModel(**dict(unet, layers_per_block=10**9)),
                  lambda: UNet2DConditionModel(**dict(unet, block_out_channels=[2**20, 2**20])),
                  lambda: AutoencoderKL(block_out_channels=(4, 8), layers_per_block=10**9, norm_num_groups=2,
                                        down_block_types=["DownEncoderBlock2D"] * 2,
                                        up_block_types=["UpDecoderBlock2D"] * 2),
                  lambda: CLIPTextModel(hidden_size=8, intermediate_size=16, num_attention_heads=2,
                                        num_hidden_layers=10**9)):
        exc, seconds, peak = refused(build)
        assert isinstance(exc, ValueError) and "parameters) needs about" in str(exc), exc
        assert seconds < 5 and peak < SMALL, (seconds, peak)


def test_trained_betas_must_have_one_entry_per_training_timestep():
    from npdiffusion.schedulers import DDIMScheduler

    with pytest.raises(ValueError, match=r"trained_betas must have num_train_timesteps = 50 entries .* got 49"):
        DDIMScheduler(num_train_timesteps=50, trained_betas=np.linspace(1e-4, 0.02, 49).tolist())
    with pytest.raises(ValueError, match="trained_betas must be a non-empty 1-d list"):
        DDIMScheduler(num_train_timesteps=4, trained_betas=[[0.1, 0.2], [0.3, 0.4]])
    assert DDIMScheduler(num_train_timesteps=3, trained_betas=[0.1, 0.2, 0.3]).betas.shape == (3,)


# ------------------------------------------------------------------------------------ estimates
UNET_CONFIGS = [
    dict(block_out_channels=[16, 32, 32], layers_per_block=2, norm_num_groups=8, cross_attention_dim=24,
         down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
         up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], transformer_layers_per_block=2,
         use_linear_projection=True, attention_head_dim=4),
    dict(block_out_channels=[8, 16], layers_per_block=[1, 3], norm_num_groups=4, cross_attention_dim=8,
         down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
         mid_block_type=None, attention_head_dim=2)]


def n_parameters(model):
    return sum(int(p.size) for p in model.state_dict().values())


def test_parameter_counts_equal_the_built_models():
    from npdiffusion.memory import clip_text_parameters, unet_parameters, vae_parameters
    from npdiffusion.models.clip.text_model import CLIPTextModel
    from npdiffusion.models.unet.unet_2d_condition import UNet2DConditionModel
    from npdiffusion.models.vae.autoencoder_kl import AutoencoderKL

    pipe = our_pipeline()
    for config in [pipe.unet.config] + UNET_CONFIGS:
        assert unet_parameters(config) == n_parameters(UNet2DConditionModel(**config))
    vae = dict(block_out_channels=[8, 16, 32], down_block_types=["DownEncoderBlock2D"] * 3, latent_channels=3,
               up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=2, norm_num_groups=4)
    assert vae_parameters(pipe.vae.config) == n_parameters(pipe.vae)
    assert vae_parameters(vae) == n_parameters(AutoencoderKL.from_config(vae))
    assert clip_text_parameters(pipe.text_encoder.config) == n_parameters(pipe.text_encoder)
    assert clip_text_parameters({"num_hidden_layers": 1}) == n_parameters(CLIPTextModel(num_hidden_layers=1))


@pytest.mark.parametrize("image", [False, True])
def test_the_sampling_estimate_follows_the_measured_peak(image):
    from npdiffusion.memory import sampling_bytes

    pipe = our_pipeline()
    if image:
        run = lambda: pipe.img2img(Image.new("RGB", (128, 128)), ["a cat"], num_inference_steps=2, strength=0.5,
                                   progress=False)  # noqa: E731
    else:
        run = lambda: pipe(["a cat"], height=128, width=128, num_images_per_prompt=2, num_inference_steps=1,
                           progress=False)  # noqa: E731
    _, _, peak = refused(run)
    estimate = sampling_bytes(pipe.unet.config, pipe.vae.config, 1 if image else 2, 128, 128, True, int(image))
    assert 0.5 < estimate / peak < 2, (estimate, peak)


def test_the_limit_and_its_environment_variable(monkeypatch):
    from npdiffusion.memory import check_memory, memory_limit, parse_bytes

    assert [parse_bytes(t) for t in ("17179869184", "16GiB", "16 gib", "1.5K", "2M", "512MiB")] == [
        16 * 2**30, 16 * 2**30, 16 * 2**30, 1500, 2 * 10**6, 512 * 2**20]
    for bad in ("", "lots", "-1G", "0", "nan"):
        with pytest.raises(ValueError, match="NPDIFFUSION_MEMORY_LIMIT must be a positive number of bytes"):
            parse_bytes(bad)
    assert memory_limit()[0] == 8 * 2**30
    check_memory("this", 8 * 2**30, "advice")                        # at the limit: accepted
    with pytest.raises(ValueError, match=r"^this needs about 9 GiB \(estimated\), over the 8 GiB limit that "
                                         r"NPDIFFUSION_MEMORY_LIMIT sets; advice$"):
        check_memory("this", 9 * 2**30, "advice")
    monkeypatch.delenv("NPDIFFUSION_MEMORY_LIMIT")
    available, phrase = memory_limit()                                # the machine's, whatever it is
    assert available > 0 and "available" in phrase or "free" in phrase or "assumed" in phrase
