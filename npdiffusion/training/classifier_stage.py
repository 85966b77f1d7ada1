"""Training the noise-aware classifier of classifier guidance (npdiffusion/guidance/classifier.py).

Shapes: N examples, B batch, C channels (3 pixels in [-1, 1], or 4 scaled VAE latents), H x W, K classes.

Each step draws a batch of clean x0 and labels y, timesteps t ~ U{0..T-1} and noise, forms
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (``npdiffusion.diffusion.forward.q_sample``) and
minimises the cross entropy of classifier(x_t, t) against y with AdamW (Dhariwal & Nichol 2021,
sec. 4: the classifier must be right about noisy samples, since guidance queries it at every t).
``max_timestep`` caps t (a classifier is useless at abar_t ~ 0, where x_t carries no signal).

``save_classifier`` / ``load_classifier``: a folder with ``config.json`` (the constructor arguments and
the attribute) and ``model.safetensors`` (state-dict keys of the module). Docs: docs/guidance.md.
"""
from __future__ import annotations

import json
import os

import numpy

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.checks import read_json_object
from npdiffusion.diffusion.forward import q_sample
from npdiffusion.guidance.classifier import NoiseAwareClassifier
from npdiffusion.io.atomic import atomic_write_text
from npdiffusion.io.atomic_folder import atomic_folder
from npdiffusion.io.safetensors import load_file, save_file
from npdiffusion.ops.losses import cross_entropy_backward, cross_entropy_forward
from npdiffusion.optim.adamw import AdamW

__all__ = ["train_classifier", "noisy_accuracy", "save_classifier", "load_classifier"]


def _check_data(x0, labels, classifier):
    x0 = numpy.asarray(x0)
    labels = numpy.asarray(labels)
    if x0.ndim != 4 or x0.shape[1] != classifier.in_channels:
        raise ValueError(f"x0 must be (N, {classifier.in_channels}, H, W), got shape {x0.shape}")
    if labels.shape != (x0.shape[0],) or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be ints of shape ({x0.shape[0]},), got {labels.dtype} {labels.shape}")
    return x0, labels.astype(numpy.int64)


def train_classifier(classifier: NoiseAwareClassifier, x0, labels, alphas_cumprod, steps: int, batch_size: int = 64,
                     lr: float = 1e-3, seed: int = 0, max_timestep: int | None = None, log=None, log_every: int = 50):
    """Train ``classifier`` in place on noisy x0 (N, C, H, W) host floats with labels (N,).

    Returns the list of per-step losses (floats).
    """
    x0, labels = _check_data(x0, labels, classifier)
    a = numpy.asarray(alphas_cumprod, dtype=numpy.float64)
    t_max = a.size if max_timestep is None else int(max_timestep)
    rng = numpy.random.default_rng(seed)
    opt = AdamW(classifier, lr=lr, weight_decay=0.0)
    classifier.train()
    losses = []
    dtype = classifier.dtype
    for step in range(int(steps)):
        idx = rng.integers(0, x0.shape[0], batch_size)
        t = rng.integers(0, t_max, batch_size)
        noise = rng.standard_normal((batch_size, *x0.shape[1:]))
        xb = asarray(x0[idx], dtype=dtype)
        x_t = q_sample(xb, t, a, asarray(noise, dtype=dtype))
        classifier.zero_grad()
        logits = classifier(x_t, t)
        loss, cache = cross_entropy_forward(logits, asarray(labels[idx]))
        classifier.backward(cross_entropy_backward(asarray(1.0, dtype=dtype), cache)[0])
        opt.step()
        losses.append(float(to_numpy(loss)))
        if log is not None and (step + 1) % log_every == 0:
            log(f"classifier step {step + 1}/{steps}: loss {numpy.mean(losses[-log_every:]):.4f}")
    return losses


def noisy_accuracy(classifier: NoiseAwareClassifier, x0, labels, alphas_cumprod, timesteps, seed: int = 0,
                   batch_size: int = 256) -> dict:
    """Accuracy of ``classifier`` on x0 noised to each of ``timesteps``: {t: fraction correct}."""
    x0, labels = _check_data(x0, labels, classifier)
    a = numpy.asarray(alphas_cumprod, dtype=numpy.float64)
    rng = numpy.random.default_rng(seed)
    was = classifier.training
    classifier.eval()
    out = {}
    for t in timesteps:
        correct = 0
        for s in range(0, x0.shape[0], batch_size):
            xb = asarray(x0[s:s + batch_size], dtype=classifier.dtype)
            tb = numpy.full((xb.shape[0],), int(t))
            x_t = q_sample(xb, tb, a, asarray(rng.standard_normal(xb.shape), dtype=classifier.dtype))
            pred = to_numpy(classifier(x_t, tb)).argmax(axis=1)
            correct += int((pred == labels[s:s + batch_size]).sum())
        out[int(t)] = correct / x0.shape[0]
    classifier.train(was)
    return out


def save_classifier(classifier: NoiseAwareClassifier, folder, attribute: str | None = None) -> str:
    """Write ``config.json`` and ``model.safetensors`` into ``folder``, replacing it as a whole,
    atomically (``io.atomic_folder``); returns the folder."""
    cfg = dict(classifier.config, attribute=attribute)
    with atomic_folder(folder) as tmp:
        atomic_write_text(os.path.join(tmp, "config.json"), json.dumps(cfg, indent=2) + "\n")
        save_file({k: to_numpy(v) for k, v in classifier.state_dict().items()}, os.path.join(tmp, "model.safetensors"))
    return str(folder)


def load_classifier(folder) -> tuple[NoiseAwareClassifier, str | None]:
    """The classifier saved by ``save_classifier`` and its attribute name."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_classifier: {folder!r} has no config.json (not a classifier folder)")
    cfg = read_json_object(path, "load_classifier")
    attribute = cfg.pop("attribute", None)
    clf = NoiseAwareClassifier(**cfg)
    clf.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
    return clf, attribute
