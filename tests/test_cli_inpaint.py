"""``npdiffusion inpaint`` on the tiny pipeline: the files it writes equal the pipeline's images, the grid
holds input, mask and results, and bad input fails in one line with nothing written."""
import json
import os

import numpy as np
import pytest
from PIL import Image, ImageDraw

from npdiffusion.pipelines.inpaint import StableDiffusionInpaintPipeline
from npdiffusion.pipelines.mask_processing import blur
from pipeline_dummy import dummy_folder, gradient_png
from test_cli_sample import assert_one_error, folder_state, run_cli


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inpaint-inputs")
    image = gradient_png(root, 40, 52)
    mask = Image.new("L", (52, 40), 0)
    ImageDraw.Draw(mask).ellipse((10, 8, 30, 30), fill=255)
    mask.save(root / "mask.png")
    return image, str(root / "mask.png")


def test_inpaint_writes_pngs_and_grid_equal_to_the_pipeline(tmp_path, capsys, files):
    image_path, mask_path = files
    out = tmp_path / "edit"
    code, stdout, err = run_cli(capsys, "inpaint", "--model", dummy_folder(), "--image", image_path, "--mask",
                                mask_path, "--prompt", "a cat", "--steps", "4", "--seed", "3", "--num-images", "2",
                                "--mask-blur", "2", "--scheduler", "ddpm", "--jump-n-sample", "2", "--jump-length",
                                "2", "--out", str(out), "--no-progress")
    assert code == 0, err
    assert "48x40" in stdout and "masked sampling" in stdout
    assert sorted(os.listdir(out)) == ["00-00-a-cat.png", "00-01-a-cat.png", "grid.png"]
    pipe = StableDiffusionInpaintPipeline.from_pretrained(dummy_folder())
    from npdiffusion.schedulers import DDPMScheduler

    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    with Image.open(image_path) as im, Image.open(mask_path) as m:
        source, mask = im.convert("RGB"), blur(m.convert("L"), 2)
    want = pipe(["a cat"], image=source, mask_image=mask, height=40, width=48, num_inference_steps=4,
                num_images_per_prompt=2, seed=3, noise="torch", jump_length=2, jump_n_sample=2,
                progress=False).images
    for name, image in zip(["00-00-a-cat.png", "00-01-a-cat.png"], want):
        with Image.open(out / name) as written:
            assert np.array_equal(np.asarray(written), np.asarray(image))
            params = json.loads(written.text["parameters"])
            assert params["jump_n_sample"] == 2 and params["mask_blur"] == 2 and params["unet_in_channels"] == 4
    with Image.open(out / "grid.png") as grid:
        assert grid.width > 4 * 48                                  # input, mask and two results in a row


def test_padding_mask_crop_keeps_the_image_size(tmp_path, capsys, files):
    image_path, mask_path = files
    out = tmp_path / "crop"
    code, stdout, err = run_cli(capsys, "inpaint", "--model", dummy_folder(), "--image", image_path, "--mask",
                                mask_path, "--prompt", "a dog", "--steps", "2", "--seed", "1", "--padding-mask-crop",
                                "4", "--out", str(out), "--no-progress")
    assert code == 0, err
    with Image.open(out / "00-00-a-dog.png") as written, Image.open(image_path) as original, \
            Image.open(mask_path) as m:
        assert written.size == original.size                        # pasted back into the original
        keep = np.asarray(m) == 0
        assert np.array_equal(np.asarray(written)[keep], np.asarray(original.convert("RGB"))[keep])


def test_inpaint_problems_fail_in_one_line(tmp_path, capsys, files):
    image_path, mask_path = files
    out = tmp_path / "bad"
    base = ["--model", dummy_folder(), "--image", image_path, "--prompt", "a", "--out", str(out), "--steps", "2"]
    assert_one_error(capsys, "inpaint", *base, "--mask", str(tmp_path / "nope.png"), match="--mask")
    junk = tmp_path / "junk.png"
    junk.write_text("not a png")
    assert_one_error(capsys, "inpaint", *base, "--mask", str(junk), match="--mask")
    assert_one_error(capsys, "inpaint", *base, "--mask", mask_path, "--strength", "2", match="--strength")
    assert_one_error(capsys, "inpaint", *base, "--mask", mask_path, "--mask-blur", "-1", match="--mask-blur")
    assert_one_error(capsys, "inpaint", *base, "--mask", mask_path, "--jump-n-sample", "0", match="--jump-n-sample")
    assert_one_error(capsys, "inpaint", *base, "--mask", mask_path, "--jump-n-sample", "3", "--scheduler", "euler",
                     match="jump_n_sample > 1")
    black = tmp_path / "black.png"
    Image.new("L", (52, 40), 0).save(black)
    assert_one_error(capsys, "inpaint", *base, "--mask", str(black), "--padding-mask-crop", "2",
                     match="black everywhere")
    assert folder_state(out) is None
