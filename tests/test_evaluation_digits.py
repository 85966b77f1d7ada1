"""npdiffusion.evaluation.digits: the classifier reads the real digits after the round trip to S x S,
the 8x8 read-back against hand-made images, scores against hand-counted confusions, prompt parsing,
bad input, and one clear line without scikit-learn.

Shapes: images uint8 (N, S, S, 3), S a multiple of 8; features (N, 64) in 0..16; labels (N,) in 0..9.
"""
import sys

import numpy as np
import pytest

from npdiffusion.data.dataset import MissingDependencyError
from npdiffusion.evaluation import digits as ev


def _need_sklearn():
    pytest.importorskip("sklearn.svm", reason="the digits classifier needs scikit-learn (pip install scikit-learn, "
                                              "the digits extra)")


def _hide_sklearn(monkeypatch):
    """Make every ``import sklearn...`` fail, even of submodules an earlier test imported."""
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")] + ["sklearn"]:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.fixture(scope="module")
def clf():
    _need_sklearn()
    return ev.train_classifier()[0]


class FixedReader:
    """A stand-in classifier whose predictions are given (to check the counting, not the SVC)."""

    def __init__(self, read):
        self.read = np.asarray(read)

    def predict(self, x):
        assert x.shape == (len(self.read), 64)
        return self.read


def test_real_digits_read_back_at_16_32_and_48(clf):
    from npdiffusion.data.digits import DigitsDataset

    for size in (16, 32, 48):
        ds = DigitsDataset(size)
        s = ev.score(ds.get_images(np.arange(len(ds))), ds.labels, clf)
        assert s.overall >= 0.99, (size, s.overall)
        assert s.n == 1797 and s.counts.sum() == 1797 and s.confusion.sum() == 1797
        assert np.all(s.per_digit >= 0.95)


def test_held_out_accuracy_and_shuffled_labels(clf):
    from npdiffusion.data.digits import DigitsDataset

    _, held = ev.train_classifier(0.8)
    assert 0.97 <= held <= 1.0                           # scikit-learn's example reports about 0.99
    assert ev.train_classifier(1.0)[1] is None
    ds = DigitsDataset(32)
    wrong = np.random.default_rng(0).permutation(ds.labels)
    assert ev.score(ds.get_images(np.arange(len(ds))), wrong, clf).overall < 0.2   # chance is about 0.1


def test_to_source_scale_of_hand_made_images():
    # each 4x4 block of a 32x32 image holds one gray level g(i, j) = 8 i + j (0..63) times 4:
    # the block mean is that level, and 0..255 maps back to 0..16 by 16/255
    level = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)                       # (8, 8)
    img = np.repeat(np.repeat(level, 4, axis=0), 4, axis=1)                          # (32, 32)
    rgb = np.stack([img, img, img], axis=-1)[None]                                   # (1, 32, 32, 3)
    np.testing.assert_allclose(ev.to_source_scale(rgb), (level * 16.0 / 255.0).reshape(1, 64), rtol=1e-12)
    # the channel mean: (255, 0, 0) is gray 85, i.e. 85 * 16 / 255 = 16/3
    red = np.zeros((2, 16, 16, 3), np.uint8)
    red[..., 0] = 255
    np.testing.assert_allclose(ev.to_source_scale(red), np.full((2, 64), 16.0 / 3.0), rtol=1e-12)
    # a single bright pixel in a 2x2 block of a 16x16 image counts a quarter
    one = np.zeros((1, 16, 16, 3), np.uint8)
    one[0, 3, 5] = 255
    want = np.zeros((1, 64))
    want[0, 8 * 1 + 2] = 16.0 / 4.0
    np.testing.assert_allclose(ev.to_source_scale(one), want, rtol=1e-12)


def test_score_counts_against_hand_values():
    labels = [0, 0, 1, 1, 2, 9]
    read = [0, 1, 1, 1, 3, 9]
    s = ev.score(np.zeros((6, 8, 8, 3), np.uint8), labels, FixedReader(read))
    assert s.overall == pytest.approx(4 / 6) and s.n == 6
    assert s.per_digit[0] == 0.5 and s.per_digit[1] == 1.0 and s.per_digit[2] == 0.0 and s.per_digit[9] == 1.0
    assert np.isnan(s.per_digit[3]) and s.counts.tolist() == [2, 2, 1, 0, 0, 0, 0, 0, 0, 1]
    assert s.confusion[0, 1] == 1 and s.confusion[2, 3] == 1 and s.confusion.sum() == 6
    d = s.as_dict()
    assert d["zero"] == 0.5 and d["overall"] == pytest.approx(4 / 6) and list(d)[:10] == [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    # prompts in place of labels
    prompts = ["a handwritten digit zero"] * 2 + ["a handwritten digit one"] * 2 + ["a handwritten digit two",
                                                                                    "a handwritten digit nine"]
    assert ev.score(np.zeros((6, 8, 8, 3), np.uint8), prompts, FixedReader(read)).overall == pytest.approx(4 / 6)


def test_prompt_labels():
    assert ev.prompt_labels(["a handwritten digit seven", "a handwritten digit zero"]).tolist() == [7, 0]
    with pytest.raises(ValueError, match=r"prompts\[1\] must be 'a handwritten digit \{zero ... nine\}', got 'a red"):
        ev.prompt_labels(["a handwritten digit one", "a red circle in the center"])
    with pytest.raises(ValueError, match=r"prompts\[0\].*got 'a handwritten digit ten'"):
        ev.prompt_labels(["a handwritten digit ten"])
    with pytest.raises(TypeError, match="prompts must be a list of strings, got one string"):
        ev.prompt_labels("a handwritten digit one")


def test_bad_input():
    reader = FixedReader([0])
    with pytest.raises(TypeError, match="images must be uint8 .*got dtype float32"):
        ev.score(np.zeros((1, 32, 32, 3), np.float32), [0], reader)
    with pytest.raises(ValueError, match=r"S a multiple of 8, got shape \(1, 12, 12, 3\)"):
        ev.to_source_scale(np.zeros((1, 12, 12, 3), np.uint8))
    with pytest.raises(ValueError, match=r"S a multiple of 8, got shape \(32, 32, 3\)"):
        ev.to_source_scale(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"labels must be \(1,\) integers .*got int64 \(2,\)"):
        ev.score(np.zeros((1, 8, 8, 3), np.uint8), [0, 1], reader)
    with pytest.raises(ValueError, match="labels must lie in 0..9, got 0..10"):
        ev.score(np.zeros((2, 8, 8, 3), np.uint8), [0, 10], FixedReader([0, 0]))
    with pytest.raises(ValueError, match="at least one image, got 0"):
        ev.score(np.zeros((0, 8, 8, 3), np.uint8), [], reader)
    with pytest.raises(ValueError, match=r"train_fraction must be a number in \(0, 1\], got 0"):
        ev.train_classifier(0)


def test_missing_scikit_learn_is_one_clear_line(monkeypatch):
    _hide_sklearn(monkeypatch)
    for call in (ev.require_sklearn, ev.train_classifier, lambda: ev.score(np.zeros((1, 8, 8, 3), np.uint8), [0])):
        with pytest.raises(MissingDependencyError) as exc:
            call()
        msg = str(exc.value)
        assert "\n" not in msg and msg.startswith("the digits classifier needs scikit-learn")
        assert "pip install scikit-learn" in msg
