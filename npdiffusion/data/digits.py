"""scikit-learn's bundled handwritten digits, upscaled, captioned ``"a handwritten digit {zero ... nine}"``.

Shape legend: N = 1797 images, S output side (default 32), 8 the source side; images uint8
(N, S, S, 3), white ink on black (the source's 0..16 gray levels times 255/16, in all three channels).

scikit-learn is an optional dependency (``pip install scikit-learn``): it ships the 8x8 digits of
the UCI optical-recognition set inside the package, so nothing is downloaded. Upscaling is bilinear
with half-pixel centres (PIL's and torch's ``align_corners=False`` convention, edges clamped), done
for every image at once as two small matrix products: ``A @ img @ A^T`` with ``A`` (S, 8).
Docs: docs/training.md ("Datasets").
"""
from __future__ import annotations

import numpy

from npdiffusion.data.dataset import ArrayDataset, MissingDependencyError

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digit_caption(label: int) -> str:
    """``"a handwritten digit {name}"`` for a label 0..9."""
    return f"a handwritten digit {DIGIT_NAMES[int(label)]}"


def bilinear_matrix(out_size: int, in_size: int) -> numpy.ndarray:
    """(out, in) float64 matrix of bilinear interpolation weights with half-pixel centres.

    Output pixel o samples the source at s = (o + 0.5) * in / out - 0.5, clamped to [0, in - 1],
    with weights (1 - f, f) on floor(s) and floor(s) + 1.
    """
    s = (numpy.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    s = numpy.clip(s, 0.0, in_size - 1)
    lo = numpy.floor(s).astype(numpy.int64)
    hi = numpy.minimum(lo + 1, in_size - 1)
    f = s - lo
    a = numpy.zeros((out_size, in_size))
    rows = numpy.arange(out_size)
    numpy.add.at(a, (rows, lo), 1.0 - f)
    numpy.add.at(a, (rows, hi), f)
    return a


def _load_sklearn_digits():
    try:
        from sklearn.datasets import load_digits  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise MissingDependencyError("the digits dataset needs scikit-learn, which is not installed: "
                          "pip install scikit-learn") from None
    data = load_digits()
    return numpy.asarray(data.images, dtype=numpy.float64), numpy.asarray(data.target, dtype=numpy.int64)


class DigitsDataset(ArrayDataset):
    """The 1797 scikit-learn digits at ``size`` x ``size``; ``labels`` (N,) int64 holds each digit."""

    def __init__(self, size: int = 32):
        if isinstance(size, bool) or not isinstance(size, int) or size < 8:
            raise ValueError(f"digits: size must be an int >= 8, got {size!r}")
        images, labels = _load_sklearn_digits()                        # (N, 8, 8) in 0..16
        a = bilinear_matrix(size, images.shape[1])                      # (S, 8)
        up = numpy.matmul(numpy.matmul(a, images), a.T)                 # (N, S, S)
        gray = numpy.clip(numpy.rint(up * (255.0 / 16.0)), 0, 255).astype(numpy.uint8)
        rgb = numpy.repeat(gray[..., None], 3, axis=-1)                 # (N, S, S, 3)
        super().__init__(rgb, [digit_caption(t) for t in labels.tolist()], name="digits(scikit-learn)")
        self.labels = labels


def make_digits(size: int = 32) -> DigitsDataset:
    """The digits dataset at ``size`` x ``size`` (needs scikit-learn)."""
    return DigitsDataset(size)
