"""``npdiffusion sample`` with gradient guidance (--classifier / --clip-guidance) on the tiny pipeline
(tests/pipeline_dummy.py, 64x64 images from 32x32x4 latents) with a tiny noise-aware classifier and a
tiny CLIPModel saved in a tmp folder: the flags change the images, a zero scale leaves them as the
plain pipeline draws them (same noise), the chosen classes are recorded, and bad values give one line
on stderr and exit code 2."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from npdiffusion import cli
from npdiffusion.guidance.classifier import NoiseAwareClassifier
from npdiffusion.models.clip.clip_model import CLIPModel
from npdiffusion.random import manual_seed
from npdiffusion.training.classifier_stage import save_classifier
from pipeline_dummy import PROMPTS, copy_folder, dummy_folder

LABELS = ("red", "green", "blue")


def run_cli(capsys, *args):
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]


def assert_one_error(capsys, *args, match=""):
    code, _, err = run_cli(capsys, "sample", *args)
    assert code == 2, err
    assert len(err) == 1, err
    assert err[0].startswith("npdiffusion sample: error: "), err[0]
    assert match in err[0], err[0]
    return err[0]


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    manual_seed(0)
    clf = NoiseAwareClassifier(in_channels=4, num_classes=3, block_out_channels=(4, 8), norm_num_groups=2,
                               labels=LABELS)
    return save_classifier(clf, str(tmp_path_factory.mktemp("clf") / "color"), attribute="color")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIPModel with a vision tower, its text tower sized for the dummy tokenizer's ids."""
    manual_seed(1)
    clip = CLIPModel(text_config=dict(hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
                                      vocab_size=1000, max_position_embeddings=16, eos_token_id=2, bos_token_id=0),
                     vision_config=dict(hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=8, patch_size=4),
                     projection_dim=6)
    return clip.save_pretrained(str(tmp_path_factory.mktemp("clip") / "clip"))


BASE = ("--prompt", PROMPTS[1], "--num-images", "2", "--steps", "3", "--seed", "5", "--scheduler", "ddim",
        "--guidance", "3", "--no-progress")


def sample(capsys, out, *extra, model=None):
    code, stdout, err = run_cli(capsys, "sample", "--model", model or dummy_folder(), *BASE, "--out", str(out), *extra)
    assert code == 0, err
    names = sorted(n for n in os.listdir(out) if n != "grid.png")
    assert len(names) == 2
    pixels = np.stack([np.asarray(Image.open(os.path.join(out, n)), dtype=np.int16) for n in names])
    params = [json.loads(Image.open(os.path.join(out, n)).text["parameters"]) for n in names]
    return pixels, params


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    code = cli.main(["sample", "--model", dummy_folder(), *BASE, "--out", str(out)])
    assert code == 0
    names = sorted(n for n in os.listdir(out) if n != "grid.png")
    return np.stack([np.asarray(Image.open(os.path.join(out, n)), dtype=np.int16) for n in names])


# ------------------------------------------------------------------------------------ success
def test_classifier_guidance_changes_the_images(tmp_path, capsys, plain, classifier_dir):
    zero, _ = sample(capsys, tmp_path / "zero", "--classifier", classifier_dir, "--classifier-scale", "0")
    np.testing.assert_array_equal(zero, plain)       # the guided loop draws the pipeline's noise
    guided, params = sample(capsys, tmp_path / "g", "--classifier", classifier_dir, "--classifier-scale", "300")
    assert np.abs(guided - plain).max() > 0
    # no --classifier-class: the prompt "a red dog at night" names the label "red"
    assert params[0]["classifier_class"] == ["red", "red"] and params[0]["classifier_scale"] == 300.0
    other, params = sample(capsys, tmp_path / "b", "--classifier", classifier_dir, "--classifier-scale", "300",
                           "--classifier-class", "2")
    assert params[0]["classifier_class"] == ["blue", "blue"]
    assert np.abs(other - guided).max() > 0


def test_clip_guidance_changes_the_images(tmp_path, capsys, plain, clip_dir):
    guided, params = sample(capsys, tmp_path / "g", "--clip-guidance", "3000", "--clip-model", clip_dir)
    assert np.abs(guided - plain).max() > 0
    assert params[0]["clip_guidance"] == 3000.0 and params[0]["clip_model"] == os.path.abspath(clip_dir)
    # the CLIP model inside the model folder (clip/) is found without --clip-model
    model = copy_folder(tmp_path / "model")
    shutil.copytree(clip_dir, os.path.join(model, "clip"))
    inside, _ = sample(capsys, tmp_path / "in", "--clip-guidance", "3000", model=model)
    np.testing.assert_array_equal(inside, guided)


# ------------------------------------------------------------------------------------- errors
def test_bad_guidance_values_give_one_line(tmp_path, capsys, classifier_dir, clip_dir):
    m = ("--model", dummy_folder(), *BASE, "--out", str(tmp_path / "out"))
    assert_one_error(capsys, *m, "--clip-guidance", "2", match="needs a CLIP model with a vision tower")
    assert_one_error(capsys, *m, "--clip-guidance", "nan", match="--clip-guidance must be a finite number")
    assert_one_error(capsys, *m, "--classifier-scale", "2", match="need --classifier DIR")
    assert_one_error(capsys, *m, "--clip-model", clip_dir, match="--clip-model needs --clip-guidance")
    assert_one_error(capsys, *m, "--classifier", str(tmp_path / "nope"), match="is not a folder")
    assert_one_error(capsys, *m, "--classifier", classifier_dir, "--classifier-class", "purple",
                     match="--classifier-class must be a label or an index in [0, 3)")
    assert_one_error(capsys, *m, "--classifier", classifier_dir, "--classifier-class", "3",
                     match="--classifier-class must be a label or an index in [0, 3)")
    assert_one_error(capsys, *m, "--classifier", classifier_dir, "--classifier-scale", "inf",
                     match="--classifier-scale must be a finite number")
    assert_one_error(capsys, *m, "--clip-guidance", "2", "--clip-model", os.path.join(dummy_folder(), "text_encoder"),
                     match="without a vision tower")
    assert_one_error(capsys, *m, "--clip-guidance", "2", "--clip-model", str(tmp_path),
                     match="has no config.json")
    assert not os.path.exists(tmp_path / "out")                # nothing written by a failure


def test_classifier_class_from_prompt_needs_exactly_one_label(tmp_path, capsys, classifier_dir):
    line = assert_one_error(capsys, "--model", dummy_folder(), "--prompt", PROMPTS[0], "--steps", "2", "--out",
                            str(tmp_path / "out"), "--classifier", classifier_dir,
                            match="--classifier-class not given")
    assert "names none of the labels" in line
    wrong = NoiseAwareClassifier(in_channels=3, num_classes=2, block_out_channels=(4,), norm_num_groups=2)
    folder = save_classifier(wrong, str(tmp_path / "pixels"))
    assert_one_error(capsys, "--model", dummy_folder(), "--prompt", PROMPTS[1], "--steps", "2", "--out",
                     str(tmp_path / "out"), "--classifier", folder, "--classifier-class", "1",
                     match="takes 3-channel inputs, but the model's latents have 4 channels")
