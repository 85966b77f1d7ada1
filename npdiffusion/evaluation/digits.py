"""Read generated digit images with a classifier trained on the real digits, and score them against their prompts.

Shape legend: N images, S image side (a multiple of 8), 8 the source side, 64 = 8 x 8 source
pixels; images uint8 (N, S, S, 3) (white ink on black, like ``npdiffusion.data.digits``); labels
int64 (N,) in 0..9.

The classifier is scikit-learn's SVC (RBF kernel, gamma 0.001, C 10, as in scikit-learn's digits
example) fitted to the 1,797 real 8x8 digits in their own scale (gray levels 0..16, one 64-vector
per image). A generated image is brought back to that scale before it is read:

1. gray = the mean of the three channels, (N, S, S);
2. area-average S x S down to 8 x 8: blocks of k x k pixels, k = S / 8. The dataset made the S x S
   image by bilinear upscaling ``A X A^T`` (``A`` (S, 8), rows summing to 1); block-averaging is the
   matrix ``B`` (8, S) with ``B[i, j] = 1/k`` for ``j // k == i``, so the read-back of a real digit
   is ``(B A) X (B A)^T``. For S = 32, ``B A`` is tridiagonal with 0.75 on the diagonal (0.875 in
   the two corners) and 0.125 beside it: a slight blur of X, not X itself, which the SVC still reads;
3. scale 0..255 back to 0..16 (the dataset's map was ``v * 255 / 16``).

On the real digits this reads 99.2% of a held-out fifth right (trained on the other 80%) and 100% of
all 1,797 after the round trip to 32 x 32 and back (``self_check``): the ceiling of any model.

``score(images, labels)`` gives per-digit and overall accuracy (``DigitScore``). scikit-learn is an
optional dependency (the ``digits`` extra, ``pip install scikit-learn``); without it every entry
point raises ``MissingDependencyError`` with one line saying what to install.
Docs: docs/training.md ("The demo", "Digits").
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy

from npdiffusion.data.dataset import MissingDependencyError
from npdiffusion.data.digits import DIGIT_NAMES

SVC_GAMMA = 0.001
SVC_C = 10.0
_PROMPT = re.compile(r"^a handwritten digit (?P<name>\w+)$")
_MISSING = ("the digits classifier needs scikit-learn, which is not installed: pip install scikit-learn "
            "(or the digits extra: pip install -e '.[digits]')")


def require_sklearn():
    """``(load_digits, SVC)`` from scikit-learn, or ``MissingDependencyError`` with one line saying what to install."""
    try:
        from sklearn.datasets import load_digits  # noqa: PLC0415 - optional dependency
        from sklearn.svm import SVC  # noqa: PLC0415
    except ImportError:
        raise MissingDependencyError(_MISSING) from None
    return load_digits, SVC


def train_classifier(train_fraction: float = 1.0, seed: int = 0):
    """SVC fitted to a random ``train_fraction`` of the real 8x8 digits (64 features in 0..16).

    Returns ``(classifier, held_out_accuracy)``; the accuracy on the rest is ``None`` when
    ``train_fraction`` is 1 (nothing held out).
    """
    if isinstance(train_fraction, bool) or not isinstance(train_fraction, (int, float)) \
            or not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"digits classifier: train_fraction must be a number in (0, 1], got {train_fraction!r}")
    load_digits, svc = require_sklearn()
    data = load_digits()
    x = numpy.asarray(data.images, dtype=numpy.float64).reshape(len(data.images), -1)   # (1797, 64)
    y = numpy.asarray(data.target, dtype=numpy.int64)
    order = numpy.random.default_rng(seed).permutation(len(y))
    cut = int(round(train_fraction * len(y)))
    clf = svc(gamma=SVC_GAMMA, C=SVC_C).fit(x[order[:cut]], y[order[:cut]])
    held = float((clf.predict(x[order[cut:]]) == y[order[cut:]]).mean()) if cut < len(y) else None
    return clf, held


def _check_images(images) -> numpy.ndarray:
    images = numpy.asarray(images)
    if images.dtype != numpy.uint8:
        raise TypeError(f"digits classifier: images must be uint8 (N, S, S, 3), got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2] or images.shape[1] % 8 \
            or images.shape[1] == 0:
        raise ValueError(f"digits classifier: images must be (N, S, S, 3) with S a multiple of 8, "
                         f"got shape {images.shape}")
    return images


def to_source_scale(images) -> numpy.ndarray:
    """uint8 (N, S, S, 3) -> float64 (N, 64): gray 8x8 in 0..16 (channel mean, k x k block mean, k = S/8)."""
    images = _check_images(images)
    n, s = images.shape[0], images.shape[1]
    gray = images.astype(numpy.float64).mean(axis=-1)                   # (N, S, S)
    k = s // 8
    small = gray.reshape(n, 8, k, 8, k).mean(axis=(2, 4))              # (N, 8, 8)
    return (small * (16.0 / 255.0)).reshape(n, 64)


def read_digits(clf, images) -> numpy.ndarray:
    """The digit (N,) int64 that ``clf`` (from ``train_classifier``) reads in each uint8 image (N, S, S, 3)."""
    return numpy.asarray(clf.predict(to_source_scale(images)), dtype=numpy.int64)


def prompt_labels(prompts) -> numpy.ndarray:
    """(N,) int64 digits named by prompts ``"a handwritten digit {zero ... nine}"``."""
    if isinstance(prompts, str):
        raise TypeError("digits classifier: prompts must be a list of strings, got one string")
    out = []
    for i, p in enumerate(prompts):
        m = _PROMPT.match(p) if isinstance(p, str) else None
        if m is None or m.group("name") not in DIGIT_NAMES:
            raise ValueError(f"digits classifier: prompts[{i}] must be 'a handwritten digit {{zero ... nine}}', "
                             f"got {p!r}")
        out.append(DIGIT_NAMES.index(m.group("name")))
    return numpy.asarray(out, dtype=numpy.int64)


@dataclass
class DigitScore:
    """Accuracy of generated digits against the prompted ones.

    ``per_digit`` (10,) float64: share of the samples prompted with digit d read as d (NaN where no
    sample asked for d); ``counts`` (10,) int64: samples per prompted digit; ``overall``: share of all
    samples read right; ``n``: number of samples; ``confusion`` (10, 10) int64: [prompted, read].
    """

    per_digit: numpy.ndarray
    counts: numpy.ndarray
    overall: float
    n: int
    confusion: numpy.ndarray

    def as_dict(self) -> dict:
        """``{"zero": acc, ..., "nine": acc, "overall": acc}`` (floats; NaN for a digit without samples)."""
        return {**{name: float(a) for name, a in zip(DIGIT_NAMES, self.per_digit)}, "overall": self.overall}


def score(images, labels, clf=None) -> DigitScore:
    """Read uint8 images (N, S, S, 3) with ``clf`` (default: ``train_classifier()``) and compare with
    ``labels`` (N,) ints in 0..9 (or prompts ``"a handwritten digit ..."``)."""
    images = _check_images(images)
    if images.shape[0] == 0:
        raise ValueError("digits classifier: images must hold at least one image, got 0")
    if len(labels) and isinstance(labels[0], str):
        labels = prompt_labels(labels)
    labels = numpy.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or labels.shape[0] != images.shape[0]:
        raise ValueError(f"digits classifier: labels must be ({images.shape[0]},) integers (one per image), "
                         f"got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"digits classifier: labels must lie in 0..9, got {labels.min()}..{labels.max()}")
    if clf is None:
        clf, _ = train_classifier()
    read = read_digits(clf, images)
    confusion = numpy.zeros((10, 10), dtype=numpy.int64)
    numpy.add.at(confusion, (labels, read), 1)
    counts = confusion.sum(axis=1)
    with numpy.errstate(invalid="ignore", divide="ignore"):
        per = numpy.diag(confusion) / counts
    return DigitScore(per_digit=per, counts=counts, overall=float(numpy.trace(confusion) / labels.size),
                      n=int(labels.size), confusion=confusion)


def self_check(size: int = 32) -> dict:
    """The classifier's ceiling: ``{"held_out": accuracy on a held-out 20% of the real 8x8 digits
    (fitted to the other 80%), "round_trip": accuracy on all real digits upscaled to size x size and
    read back}``."""
    from npdiffusion.data.digits import DigitsDataset  # noqa: PLC0415

    _, held = train_classifier(0.8)
    clf, _ = train_classifier()
    ds = DigitsDataset(size)
    return {"held_out": held, "round_trip": score(ds.get_images(numpy.arange(len(ds))), ds.labels, clf).overall}
