"""The digits quality check: an SVC trained on the real digits reads generated ones.

    python tools/digits_classifier.py --self-check           # held-out accuracy on real digits
    python tools/digits_classifier.py MODEL_FOLDER [--seeds 10] [--steps 20] [--guidance 4]

The classifier: scikit-learn's SVC (RBF kernel, gamma 0.001, C 10) on the 8x8 gray digits, as in
scikit-learn's digits example. A generated 32x32 RGB image is read by averaging its channels,
area-averaging it down to 8x8 (4x4 blocks: the inverse of the dataset's upscaling, up to blur) and
scaling 0..255 back to the source's 0..16. With a model folder, it generates ``--seeds`` images of
each of the ten prompts "a handwritten digit {zero ... nine}" (our pipeline, DPM-Solver++, the
given guidance) and prints the share whose predicted digit is the prompted one, per digit and
overall (the acceptance: at least 90%). Docs: docs/training.md ("Quality checks").
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from npdiffusion.data.digits import DIGIT_NAMES, digit_caption  # noqa: E402


def train_classifier(train_fraction: float = 1.0, seed: int = 0):
    """SVC on the real 8x8 digits; with train_fraction < 1 also returns the held-out accuracy."""
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    data = load_digits()
    x, y = data.images.reshape(len(data.images), -1), data.target
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(round(train_fraction * len(y)))
    clf = SVC(gamma=0.001, C=10.0).fit(x[order[:cut]], y[order[:cut]])
    held = float((clf.predict(x[order[cut:]]) == y[order[cut:]]).mean()) if cut < len(y) else None
    return clf, held


def to_source_scale(images) -> np.ndarray:
    """uint8 (N, S, S, 3) -> (N, 64) gray 8x8 in 0..16 (channel mean, block mean)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] % 8 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be (N, S, S, 3) with S a multiple of 8, got {images.shape}")
    n, s = images.shape[0], images.shape[1]
    gray = images.astype(np.float64).mean(axis=-1)                       # (N, S, S)
    k = s // 8
    small = gray.reshape(n, 8, k, 8, k).mean(axis=(2, 4))               # (N, 8, 8)
    return (small * (16.0 / 255.0)).reshape(n, 64)


def read_digits(clf, images) -> np.ndarray:
    """Predicted digit (N,) of uint8 images (N, S, S, 3)."""
    return clf.predict(to_source_scale(images))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", help="a pipeline folder trained on the digits")
    p.add_argument("--self-check", action="store_true", help="train on 80%% of the real digits, score the rest "
                   "and the real digits through the 32x32 round trip")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    args = p.parse_args(argv)
    if args.self_check:
        from npdiffusion.data.digits import DigitsDataset

        _, held = train_classifier(0.8)
        clf, _ = train_classifier()
        ds = DigitsDataset(32)
        round_trip = float((read_digits(clf, ds.get_images(np.arange(len(ds)))) == ds.labels).mean())
        print(f"held-out accuracy on real 8x8 digits: {100 * held:.1f}%; real digits upscaled to 32x32 and read "
              f"back: {100 * round_trip:.1f}%")
        return 0
    if not args.model:
        p.error("give a MODEL folder or --self-check")
    from npdiffusion.pipelines.stable_diffusion import StableDiffusionPipeline
    from npdiffusion.training.demo import generate

    clf, _ = train_classifier()
    pipe = StableDiffusionPipeline.from_pretrained(args.model)
    prompts = [digit_caption(d) for d in range(10)]
    images = generate(pipe, prompts, list(range(args.seeds)), args.guidance, args.steps)
    wanted = np.repeat(np.arange(10), args.seeds)
    hit = read_digits(clf, images) == wanted
    per = " ".join(f"{DIGIT_NAMES[d]} {100 * hit[wanted == d].mean():.0f}%" for d in range(10))
    print(f"prompted digit recognized in {100 * hit.mean():.1f}% of {hit.size} samples ({per})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
