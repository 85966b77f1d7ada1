"""``npdiffusion train``: each bad input is one clear line, exit code 2 and nothing lost; stages not in this
build say which model is missing; the tokenizer stage end to end (its files load in transformers with the
same ids); a model stage (a toy one registered for the test) trains, refuses to overwrite, resumes.
"""
import hashlib
import json
import os
import subprocess
import sys
import tomllib
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from npdiffusion import cli
from npdiffusion.data.shapes import make_shapes
from npdiffusion.training import stages
from npdiffusion.training.config import StageConfig, build_config, option
from npdiffusion.training.tokenizer_stage import TokenizerStageConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------ a toy model stage
@dataclass
class ToyStageConfig(StageConfig):
    output_dir: str = option("runs/toy", "where")


CONFIG = ToyStageConfig


def train(config, resume=False, progress=None, log=print):
    from test_training_loop import ToyStage  # noqa: PLC0415 - tests/ is on sys.path under pytest

    bad = set(range(3, 10 ** 6)) if os.environ.get("TOY_DIVERGE") else ()
    return stages.run_model_stage(config, lambda c, ds: ToyStage(seed=c.train.seed, bad_calls=bad, dtype="float32"),
                                  resume=resume, progress=progress, log=log)


@pytest.fixture
def toy_stage(monkeypatch):
    monkeypatch.setitem(stages.STAGES, "vae", (__name__, []))


# ------------------------------------------------------------------------------ helpers
def run_cli(capsys, *args):
    code = cli.main(["train", *args])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("npdiffusion train: error: "), lines[0]
    return lines[0]


def snapshot(folder):
    """{relative path: sha256} of every file under ``folder``."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def write_config(tmp_path, text, name="config.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.fixture
def previous_run(tmp_path, capsys):
    """An output folder holding a finished tokenizer, which no failed run may touch."""
    out = tmp_path / "out"
    config = write_config(tmp_path, f'output_dir = "{out}"\n[data]\nnum_images = 300\n', "good.toml")
    code, _, err = run_cli(capsys, "tokenizer", "--config", config)
    assert code == 0, err
    return out


def captioned_folder(path, n, captions=True):
    os.makedirs(path, exist_ok=True)
    ds = make_shapes(n, seed=1)
    for i in range(n):
        Image.fromarray(ds.images[i]).save(os.path.join(path, f"{i}.png"))
        if captions:
            with open(os.path.join(path, f"{i}.txt"), "w") as f:
                f.write(ds.captions[i])
    return ds


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("case", ["missing folder", "empty folder", "images without captions", "unknown key",
                                  "wrong type", "wrong choice", "unwritable output folder", "missing config"])
def test_bad_input_is_one_line_exit_2_and_nothing_lost(tmp_path, capsys, previous_run, case):
    before = snapshot(previous_run)
    data = tmp_path / "images"
    out = previous_run
    extra = ""
    if case == "missing folder":
        extra, expected = f'[data]\ndataset = "folder"\npath = "{data}"\n', f"image folder '{data}' does not exist"
    elif case == "empty folder":
        data.mkdir()
        extra, expected = f'[data]\ndataset = "folder"\npath = "{data}"\n', "holds no images"
    elif case == "images without captions":
        captioned_folder(data, 3, captions=False)
        extra, expected = f'[data]\ndataset = "folder"\npath = "{data}"\n', "3 of 3 images have no caption: 0.png"
    elif case == "unknown key":
        extra, expected = "[tokenizer]\nvocab = 600\n", "unknown key 'tokenizer.vocab' (did you mean 'vocab_size'?)"
    elif case == "wrong type":
        extra, expected = '[tokenizer]\nvocab_size = "600"\n', "'tokenizer.vocab_size' must be an int, got str '600'"
    elif case == "wrong choice":
        extra, expected = '[data]\ndataset = "mnist"\n', "'data.dataset' must be one of 'shapes', 'digits', 'folder'"
    elif case == "unwritable output folder":
        (tmp_path / "a_file").write_text("x")
        out = tmp_path / "a_file" / "out"
        expected = f"output_dir '{out}' is not writable: Not a directory"
    config = write_config(tmp_path, f'output_dir = "{out}"\n' + extra)
    if case == "missing config":
        config, expected = str(tmp_path / "nope.toml"), f"config file '{tmp_path / 'nope.toml'}' does not exist"
    code, stdout, err = run_cli(capsys, "tokenizer", "--config", config)
    assert code == 2 and stdout == ""
    assert expected in one_error_line(err)
    assert snapshot(previous_run) == before


def test_config_flag_is_required(capsys):
    code, _, err = run_cli(capsys, "tokenizer")
    assert code == 2 and "--config FILE is required" in one_error_line(err)


def test_print_config_is_a_complete_valid_config(capsys):
    code, out, _ = run_cli(capsys, "tokenizer", "--print-config")
    assert code == 0
    assert build_config(TokenizerStageConfig, tomllib.loads(out)) == TokenizerStageConfig()


def test_stages_missing_from_this_build_say_what_is_missing(capsys, monkeypatch, tmp_path):
    config = write_config(tmp_path, 'output_dir = "x"\n')
    monkeypatch.setitem(stages.STAGES, "unet", ("npdiffusion.training.no_such_stage",
                                                [("npdiffusion.models.no_such_unet", "the U-Net (UNet2DConditionModel)"),
                                                 ("npdiffusion.data.shapes", "the shapes")]))
    code, _, err = run_cli(capsys, "unet", "--config", config)
    line = one_error_line(err)
    assert code == 2 and "the unet stage is not available in this build: it needs the U-Net " \
                         "(UNet2DConditionModel) (npdiffusion.models.no_such_unet), which is not here yet" in line
    assert "the shapes" not in line
    monkeypatch.setitem(stages.STAGES, "clip", ("npdiffusion.training.no_such_stage",
                                                [("npdiffusion.data.shapes", "the shapes")]))
    code, _, err = run_cli(capsys, "clip", "--config", config)
    assert code == 2 and "its training code (npdiffusion/training/no_such_stage.py) is not written yet" in \
        one_error_line(err)
    assert not os.path.exists("x")


# ------------------------------------------------------------------------------ a model stage via the CLI
def test_model_stage_trains_refuses_to_overwrite_and_resumes(tmp_path, capsys, toy_stage):
    out = tmp_path / "run"
    config = write_config(tmp_path, f'output_dir = "{out}"\n[data]\nnum_images = 64\nresolution = 8\n'
                                    "[train]\nsteps = 6\nbatch_size = 8\ncheckpointing_steps = 3\n")
    code, stdout, err = run_cli(capsys, "vae", "--config", config, "--no-progress")
    assert code == 0, err
    assert stdout.startswith("toy: 6 steps, loss ") and f"wrote {out}" in stdout
    assert sorted(os.listdir(out)) == ["checkpoint-3", "checkpoint-6", "latest", "losses.csv", "losses.png", "toy"]
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["config"]["train"]["steps"] == 6 and state["step"] == 6
    before = snapshot(out)

    code, _, err = run_cli(capsys, "vae", "--config", config)
    assert code == 2 and "already holds checkpoints (newest: checkpoint-6); pass --resume" in one_error_line(err)
    assert snapshot(out) == before

    config9 = write_config(tmp_path, open(config).read().replace("steps = 6", "steps = 9"), "nine.toml")
    code, stdout, err = run_cli(capsys, "vae", "--config", config9, "--resume", "--no-progress")
    assert code == 0, err
    assert "toy: 9 steps" in stdout and "resumed from" in stdout and "resuming from" in stdout
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-3", "checkpoint-6",
                                                                               "checkpoint-9"]


def test_model_stage_divergence_is_one_line_and_keeps_the_last_good_checkpoint(tmp_path, capsys, toy_stage,
                                                                               monkeypatch):
    monkeypatch.setenv("TOY_DIVERGE", "1")
    out = tmp_path / "run"
    config = write_config(tmp_path, f'output_dir = "{out}"\n[data]\nnum_images = 64\nresolution = 8\n'
                                    "[train]\nsteps = 50\nbatch_size = 8\ncheckpointing_steps = 2\n"
                                    "max_consecutive_bad_steps = 4\n")
    code, _, err = run_cli(capsys, "vae", "--config", config, "--no-progress")
    line = one_error_line(err)
    assert code == 2
    assert "stopped at step 6: 4 consecutive steps had a non-finite loss or gradient" in line
    assert f"the last good checkpoint is {out / 'checkpoint-2'}" in line and "--resume" in line
    assert sorted(os.listdir(out)) == ["checkpoint-2", "latest", "losses.csv"]


# ------------------------------------------------------------------------------ the tokenizer stage
def test_tokenizer_stage_end_to_end_loads_in_transformers_with_the_same_ids(tmp_path):
    transformers = pytest.importorskip("transformers")
    data = tmp_path / "images"
    ds = captioned_folder(data, 30)
    config = write_config(tmp_path, f'output_dir = "{tmp_path / "out"}"\n[data]\ndataset = "folder"\n'
                                    f'path = "{data}"\nresolution = 16\n[tokenizer]\nvocab_size = 600\n')
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "npdiffusion", "train", "tokenizer", "--config", config],
                          capture_output=True, text=True, env=env, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("tokenizer: ") and "from 30 captions" in proc.stdout
    folder = tmp_path / "out" / "tokenizer"
    assert sorted(os.listdir(folder)) == ["merges.txt", "special_tokens_map.json", "tokenizer_config.json",
                                          "vocab.json"]
    from npdiffusion.models.clip.tokenizer import CLIPTokenizer

    ours = CLIPTokenizer.from_pretrained(folder)
    theirs = transformers.CLIPTokenizer.from_pretrained(str(folder))
    for text in set(ds.captions) | {"a red circle in the bottom right", "unseen words, too!"}:
        assert ours.encode(text) == theirs(text).input_ids
    for word in ("red", "circle", "top", "left"):      # frequent caption words became single tokens
        assert len(ours.tokenize_ids(word)) == 1
    assert np.array_equal(ours(["a red square in the center"], max_length=12),
                          theirs(["a red square in the center"], padding="max_length", max_length=12,
                                 return_tensors="np").input_ids)
