"""scikit-learn digits: captions, upscaling against torch's bilinear interpolation, the missing-package error."""
import sys

import numpy as np
import pytest
import torch

from npdiffusion import cli
from npdiffusion.data.dataset import MissingDependencyError
from npdiffusion.data.digits import DIGIT_NAMES, DigitsDataset, bilinear_matrix


@pytest.fixture
def sklearn_datasets():
    return pytest.importorskip("sklearn.datasets", reason="the digits dataset needs scikit-learn (pip install "
                               "scikit-learn)")


def test_images_and_captions(sklearn_datasets):
    ds = DigitsDataset(32)
    ref = sklearn_datasets.load_digits()
    assert len(ds) == len(ref.target) == 1797
    assert ds.images.shape == (1797, 32, 32, 3) and ds.images.dtype == np.uint8
    assert [c for c in ds.captions[:10]] == [f"a handwritten digit {DIGIT_NAMES[t]}" for t in ref.target[:10]]
    assert set(ds.captions) == {f"a handwritten digit {n}" for n in
                                ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")}
    assert (ds.images[..., 0] == ds.images[..., 1]).all() and (ds.images[..., 0] == ds.images[..., 2]).all()
    assert ds.images.max() == 255 and ds.images.min() == 0            # white ink (16) on black (0)


@pytest.mark.parametrize("size", [8, 20, 32, 33])
def test_upscaling_is_torch_bilinear_with_half_pixel_centres(sklearn_datasets, size):
    ds = DigitsDataset(size)
    src = sklearn_datasets.load_digits().images[:50]                   # (50, 8, 8) in 0..16
    theirs = torch.nn.functional.interpolate(torch.tensor(src)[:, None], size=(size, size), mode="bilinear",
                                             align_corners=False)[:, 0].numpy()
    expected = np.clip(np.rint(theirs * 255.0 / 16.0), 0, 255)
    got = ds.images[:50, :, :, 0].astype(np.float64)
    assert np.abs(got - expected).max() <= 1          # a value exactly on .5 may round either way
    assert (got == expected).mean() > 0.999


def test_bilinear_matrix_rows_sum_to_one_and_match_torch_on_random_data():
    rng = np.random.default_rng(0)
    for out, inp in [(32, 8), (5, 8), (13, 7)]:
        a = bilinear_matrix(out, inp)
        assert np.allclose(a.sum(axis=1), 1.0)
        x = rng.standard_normal((3, inp, inp))
        theirs = torch.nn.functional.interpolate(torch.tensor(x)[:, None], size=(out, out), mode="bilinear",
                                                 align_corners=False)[:, 0].numpy()
        assert np.allclose(a @ x @ a.T, theirs, rtol=0, atol=1e-12)


def test_missing_scikit_learn_is_one_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(MissingDependencyError, match="needs scikit-learn.*pip install scikit-learn"):
        DigitsDataset(32)
    config = tmp_path / "c.toml"
    config.write_text(f'output_dir = "{tmp_path / "out"}"\n[data]\ndataset = "digits"\n')
    assert cli.main(["train", "tokenizer", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("npdiffusion train: error: the digits dataset needs scikit-learn")
    assert not (tmp_path / "out" / "tokenizer").exists()


def test_bad_size():
    with pytest.raises(ValueError, match="digits: size must be an int >= 8, got 4"):
        DigitsDataset(4)
