"""``npdiffusion sample`` and ``npdiffusion img2img`` on the tiny pipeline: the files they write (and that
they equal the pipeline's images for the same seed), and every failure case: one line on stderr, exit
code 2, nothing overwritten. Most runs call ``npdiffusion.cli.main`` in-process (fast); one runs the
real ``python -m npdiffusion`` in a subprocess."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from npdiffusion import cli
from pipeline_dummy import PROMPTS, copy_folder, dummy_folder, gradient_png, our_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(capsys, *args):
    """(exit code, stdout, stderr lines) of ``npdiffusion *args`` run in-process."""
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]


def assert_one_error(capsys, command, *args, match=""):
    code, _, err = run_cli(capsys, command, *args)
    assert code == 2, err
    assert len(err) == 1, err
    assert err[0].startswith(f"npdiffusion {command}: error: "), err[0]
    assert match in err[0], err[0]
    return err[0]


def folder_state(folder):
    if not os.path.isdir(folder):
        return None
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def input_image(tmp_path_factory):
    return gradient_png(tmp_path_factory.mktemp("img"), 40, 52)


# ------------------------------------------------------------------------------------- success
def test_sample_writes_pngs_and_grid_equal_to_the_pipeline(tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "sample", "--model", dummy_folder(), "--prompt", PROMPTS[0], "--prompt",
                                PROMPTS[1], "--num-images", "2", "--steps", "2", "--seed", "9", "--scheduler",
                                "euler-a", "--negative-prompt", "blue", "--out", str(out), "--no-progress")
    assert code == 0, err
    assert "seed 9" in stdout and "wrote 4 PNG(s) and grid.png" in stdout
    names = sorted(os.listdir(out))
    assert names == ["00-00-a-photo-of-a-cat.png", "00-01-a-photo-of-a-cat.png", "01-00-a-red-dog-at-night.png",
                     "01-01-a-red-dog-at-night.png", "grid.png"]
    pipe = our_pipeline("EulerAncestralDiscreteScheduler")
    want = pipe(PROMPTS, negative_prompt=["blue", "blue"], num_inference_steps=2, num_images_per_prompt=2,
                seed=9, noise="torch", output_type="pil").images
    for name, image in zip(names[:4], want):
        with Image.open(out / name) as written:
            assert np.array_equal(np.asarray(written), np.asarray(image))
            params = json.loads(written.text["parameters"])
    assert params["prompt"] == PROMPTS[1] and params["seed"] == 9 and params["image"] == 1
    assert params["scheduler"] == "EulerAncestralDiscreteScheduler" and params["noise"] == "torch"
    with Image.open(out / "grid.png") as grid:
        assert grid.width > 2 * 64 and grid.height > 2 * 64


def test_sample_refuses_to_overwrite_unless_asked(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "grid.png").write_bytes(b"precious")
    (out / "notes.txt").write_text("mine")
    args = ["--model", dummy_folder(), "--prompt", "a cat", "--steps", "1", "--seed", "1", "--out", str(out),
            "--no-progress"]
    line = assert_one_error(capsys, "sample", *args, match="already exists")
    assert "--overwrite" in line and "grid.png" in line
    assert folder_state(out) == {"grid.png": b"precious", "notes.txt": b"mine"}
    code, _, err = run_cli(capsys, "sample", *args, "--overwrite")
    assert code == 0, err
    assert (out / "grid.png").read_bytes() != b"precious" and (out / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(out)) == ["00-00-a-cat.png", "grid.png", "notes.txt"]


def test_img2img_writes_pngs_and_grid_equal_to_the_pipeline(tmp_path, capsys, input_image):
    out = tmp_path / "edit"
    code, stdout, err = run_cli(capsys, "img2img", "--model", dummy_folder(), "--image", input_image, "--prompt",
                                "a cat", "--strength", "0.5", "--steps", "4", "--seed", "3", "--num-images", "2",
                                "--out", str(out), "--no-progress")
    assert code == 0, err
    assert "48x40" in stdout                                        # 52 wide rounds down to 48
    assert sorted(os.listdir(out)) == ["00-00-a-cat.png", "00-01-a-cat.png", "grid.png"]
    with Image.open(input_image) as im:
        source = im.convert("RGB").resize((48, 40), resample=Image.LANCZOS)
    want = our_pipeline().img2img(source, ["a cat"], strength=0.5, num_inference_steps=4, num_images_per_prompt=2,
                                  seed=3, noise="torch").images
    for name, image in zip(["00-00-a-cat.png", "00-01-a-cat.png"], want):
        with Image.open(out / name) as written:
            assert np.array_equal(np.asarray(written), np.asarray(image))
            assert json.loads(written.text["parameters"])["strength"] == 0.5


def test_the_console_command_reports_one_line(tmp_path):
    """The real `python -m npdiffusion`, as a user runs it: a corrupt safetensors file."""
    folder = copy_folder(tmp_path / "sd")
    weights = os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(100)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "npdiffusion", "sample", "--model", folder, "--prompt", "a cat",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("npdiffusion sample: error: cannot load vae"), proc.stderr
    assert not os.path.exists(tmp_path / "out")


# -------------------------------------------------------------------------------------- failures
def _damage(kind, folder):
    if kind == "no model_index.json":
        os.remove(os.path.join(folder, "model_index.json"))
    elif kind == "model_index.json not JSON":
        with open(os.path.join(folder, "model_index.json"), "w") as f:
            f.write("[1, 2")
    elif kind == "unknown scheduler class":
        path = os.path.join(folder, "model_index.json")
        index = json.load(open(path))
        index["scheduler"] = ["diffusers", "UniPCMultistepScheduler"]
        json.dump(index, open(path, "w"))
    elif kind == "scheduler config missing":
        os.remove(os.path.join(folder, "scheduler", "scheduler_config.json"))
    elif kind == "unet config not JSON":
        with open(os.path.join(folder, "unet", "config.json"), "w") as f:
            f.write("{")
    elif kind == "text encoder weights missing":
        os.remove(os.path.join(folder, "text_encoder", "model.safetensors"))
    elif kind == "corrupt unet safetensors":
        path = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
        data = bytearray(open(path, "rb").read())
        data[8:20] = b"\xff" * 12                                   # breaks the JSON header
        open(path, "wb").write(bytes(data))
    elif kind == "weights of the wrong shape":
        from npdiffusion.io.safetensors import load_file, save_file
        path = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
        state = load_file(path)
        state["conv_in.weight"] = np.zeros((3, 3, 3, 3), np.float32)
        save_file(state, path, metadata={"format": "pt"})


@pytest.mark.parametrize("kind, match", [
    ("no model_index.json", "no model_index.json"),
    ("model_index.json not JSON", "not valid JSON"),
    ("unknown scheduler class", "unknown scheduler class 'UniPCMultistepScheduler'"),
    ("scheduler config missing", "cannot load scheduler"),
    ("unet config not JSON", "cannot load unet"),
    ("text encoder weights missing", "cannot load text_encoder"),
    ("corrupt unet safetensors", "cannot load unet"),
    ("weights of the wrong shape", "conv_in.weight"),
])
@pytest.mark.parametrize("command", ["sample", "img2img"])
def test_malformed_model_folders_fail_in_one_line(tmp_path, capsys, input_image, kind, match, command):
    folder = copy_folder(tmp_path / "sd")
    _damage(kind, folder)
    out = tmp_path / "out"
    extra = ["--image", input_image] if command == "img2img" else []
    assert_one_error(capsys, command, "--model", folder, "--prompt", "a cat", *extra, "--steps", "2",
                     "--out", str(out), match=match)
    assert not out.exists()


@pytest.mark.parametrize("args, match", [
    (["--model", "/nonexistent/model"], "does not exist"),
    (["--scheduler", "lms"], "unknown scheduler 'lms'; choose one of ddim, ddpm, pndm, euler, euler-a, heun, dpm++2m"),
    (["--height", "60", "--width", "64"], "--height must be a positive multiple of 8"),
    (["--height", "64"], "give --height and --width together"),
    (["--steps", "0"], "--steps must be a positive int"),
    (["--num-images", "0"], "--num-images must be a positive int"),
    (["--guidance", "nan"], "--guidance must be a finite number"),
    (["--prompt", "  "], "is empty"),
])
def test_bad_options_fail_in_one_line(tmp_path, capsys, args, match):
    base = {"--model": dummy_folder(), "--prompt": "a cat", "--out": str(tmp_path / "out")}
    base.update(dict(zip(args[::2], args[1::2])))
    flat = [x for kv in base.items() for x in kv]
    assert_one_error(capsys, "sample", *flat, match=match)
    assert not (tmp_path / "out").exists()


def test_img2img_input_problems_fail_in_one_line(tmp_path, capsys, input_image):
    base = ["--model", dummy_folder(), "--prompt", "a cat", "--out", str(tmp_path / "out")]
    assert_one_error(capsys, "img2img", *base, "--image", str(tmp_path / "missing.png"), match="does not exist")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    assert_one_error(capsys, "img2img", *base, "--image", str(junk), match="not an image Pillow can read")
    assert_one_error(capsys, "img2img", *base, "--image", input_image, "--strength", "1.5", match="--strength")
    assert_one_error(capsys, "img2img", *base, "--image", input_image, "--strength", "0.1", "--steps", "5",
                     match="at least 1")
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (7, 30)).save(tiny)
    assert_one_error(capsys, "img2img", *base, "--image", str(tiny), match="7x30 pixels, smaller than 8x8")
    assert not (tmp_path / "out").exists()


def test_out_must_be_a_folder(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert_one_error(capsys, "sample", "--model", dummy_folder(), "--prompt", "a", "--out", str(target),
                     match="is not a folder")
    assert target.read_text() == "x"


def test_help_lists_both_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert "sample" in text and "img2img" in text
