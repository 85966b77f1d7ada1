"""``npdiffusion gradcheck [--layer NAME ...] [--seed K] [--list]``: check every layer's backward.

Builds a small float64 instance of each layer in ``LAYERS`` with perturbed parameters, runs
``npdiffusion.testing.gradcheck`` (random upstream gradient, central differences along random
directions for every input and parameter, non-contiguous inputs) and prints one row per layer:
how many arrays were checked, the worst relative error, pass or FAIL. Exit code 0 when every
checked layer passes, 1 when one fails, 2 for a usage error (an unknown layer name).

``LAYERS`` maps a name to (defining module, factory). A factory receives the imported module and a
NumPy Generator and returns ``(layer, inputs, forward_kwargs)``. A layer whose module does not
exist yet (the library is still growing) is skipped with a note; adding a layer is one entry.
Docs: docs/cli.md.
"""
from __future__ import annotations

import importlib
import time

import numpy

from npdiffusion.backend import asarray, get_backend
from npdiffusion.nn.module import Module
from npdiffusion.testing import gradcheck, noncontiguous

TOLERANCE = 1e-6


def _x(rng, *shape):
    """A float64 input of ``shape`` on the backend, in a non-contiguous view."""
    return noncontiguous(rng.standard_normal(shape))


class ParamsOnly(Module):
    """Wraps a layer whose inputs are integers (Embedding): its backward returns no input gradient,
    so gradcheck checks the parameters only."""

    def __init__(self, inner: Module):
        super().__init__()
        self.inner = inner

    def forward(self, *inputs):
        return self.inner(*inputs)

    def backward(self, *grads):
        self.inner.backward(*grads)
        return ()


# name -> (module path, factory(module, rng) -> (layer, inputs, kwargs))
LAYERS = {
    "Linear": ("npdiffusion.nn.linear",
               lambda m, rng: (m.Linear(4, 3), [_x(rng, 2, 3, 4)], {})),
    "Conv2d": ("npdiffusion.nn.conv",
               lambda m, rng: (m.Conv2d(2, 3, 3, padding=1), [_x(rng, 2, 2, 5, 5)], {})),
    "Conv2d-stride2": ("npdiffusion.nn.conv",
                       lambda m, rng: (m.Conv2d(2, 3, 3, stride=2, padding=1), [_x(rng, 2, 2, 5, 6)], {})),
    "GroupNorm": ("npdiffusion.nn.norm",
                  lambda m, rng: (m.GroupNorm(2, 4, eps=1e-5), [_x(rng, 2, 4, 3, 3)], {})),
    "LayerNorm": ("npdiffusion.nn.norm",
                  lambda m, rng: (m.LayerNorm(5), [_x(rng, 2, 3, 5)], {})),
    "SiLU": ("npdiffusion.nn.activations",
             lambda m, rng: (m.SiLU(), [_x(rng, 2, 3, 4)], {})),
    "GELU": ("npdiffusion.nn.activations",
             lambda m, rng: (m.GELU(), [_x(rng, 2, 3, 4)], {})),
    "GELU-tanh": ("npdiffusion.nn.activations",
                  lambda m, rng: (m.GELU(approximate="tanh"), [_x(rng, 2, 3, 4)], {})),
    "QuickGELU": ("npdiffusion.nn.activations",
                  lambda m, rng: (m.QuickGELU(), [_x(rng, 2, 3, 4)], {})),
    "Embedding": ("npdiffusion.nn.embedding",
                  lambda m, rng: (ParamsOnly(m.Embedding(7, 4)), [asarray(rng.integers(0, 7, (2, 5)))], {})),
    "Attention": ("npdiffusion.nn.attention",
                  lambda m, rng: (m.Attention(8, heads=2, dim_head=4), [_x(rng, 2, 3, 8)], {})),
    "Attention-cross": ("npdiffusion.nn.attention",
                        lambda m, rng: (m.Attention(8, cross_attention_dim=6, heads=2, dim_head=4),
                                        [_x(rng, 2, 3, 8), _x(rng, 2, 4, 6)], {})),
    "GEGLU": ("npdiffusion.nn.feedforward",
              lambda m, rng: (m.GEGLU(6, 5), [_x(rng, 2, 3, 6)], {})),
    "FeedForward": ("npdiffusion.nn.feedforward",
                    lambda m, rng: (m.FeedForward(6, mult=2), [_x(rng, 2, 3, 6)], {})),
    "LoRA-Linear": ("npdiffusion.nn.lora",
                    lambda m, rng: (m.LoraLayer(m.Linear(4, 3), 2, 3.0), [_x(rng, 2, 3, 4)], {})),
    "LoRA-Conv2d": ("npdiffusion.nn.lora",
                    lambda m, rng: (m.LoraLayer(m.Conv2d(2, 3, 3, padding=1), 2, 3.0), [_x(rng, 2, 2, 5, 5)], {})),
    "LoRA-Conv2d-1x1": ("npdiffusion.nn.lora",
                        lambda m, rng: (m.LoraLayer(m.Conv2d(3, 4, 1), 2, 1.0), [_x(rng, 2, 3, 4, 4)], {})),
}


def _lookup(names):
    """The LAYERS keys matching ``names`` (case-insensitive), or a KeyError listing the choices."""
    if not names:
        return list(LAYERS)
    by_lower = {k.lower(): k for k in LAYERS}
    unknown = [n for n in names if n.lower() not in by_lower]
    if unknown:
        raise KeyError(f"unknown layer {', '.join(map(repr, unknown))}; choose from {', '.join(LAYERS)}")
    return list(dict.fromkeys(by_lower[n.lower()] for n in names))


def _import(path: str):
    """The module at ``path``, or None when that module does not exist (yet)."""
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError as exc:
        if exc.name == path:
            return None
        raise  # a missing dependency inside an existing module is a real error


def _perturb(layer: Module, rng) -> None:
    """Move every parameter away from its initial value (norm gains off one, biases off zero)."""
    for _, p in layer.named_parameters():
        p += asarray(0.5 * rng.standard_normal(p.shape), dtype=p.dtype)


def check_layer(name: str, seed: int = 0):
    """Gradcheck ``LAYERS[name]``: returns a ``GradcheckReport``, or a str saying why it was skipped."""
    path, factory = LAYERS[name]
    module = _import(path)
    if module is None:
        return f"skipped: {path} is not available yet"
    rng = numpy.random.default_rng(seed)
    layer, inputs, kwargs = factory(module, rng)
    layer.to("float64")
    _perturb(layer, rng)
    return gradcheck(layer, *inputs, seed=seed, directions=3, tolerance=TOLERANCE, **kwargs)


def add_parser(subparsers):
    p = subparsers.add_parser(
        "gradcheck", help="check every layer's hand-written backward against central differences",
        description="Gradient-check small float64 instances of the layers (random upstream "
                    "gradients, central differences, non-contiguous inputs) and print a table. "
                    "Exit code 1 when a layer fails.")
    p.add_argument("--layer", nargs="+", action="extend", metavar="NAME", default=[],
                   help="check only these layers (case-insensitive; see --list); default: all")
    p.add_argument("--seed", type=int, default=0, metavar="K",
                   help="seed of the weights, inputs and probe directions (default 0)")
    p.add_argument("--list", action="store_true", help="list the layer names and exit")
    return p


def run(args) -> int:
    if args.list:
        for name, (path, _) in LAYERS.items():
            print(f"{name:<16} {path}")
        return 0
    names = _lookup(args.layer)
    print(f"gradcheck: float64, backend {get_backend()}, seed {args.seed}, tolerance {TOLERANCE:.0e}")
    print(f"{'layer':<16} {'arrays':>6}  {'max rel. error':>14}  {'result':<6}  {'time':>6}")
    passed = failed = skipped = 0
    for name in names:
        start = time.perf_counter()
        report = check_layer(name, args.seed)
        if isinstance(report, str):
            print(f"{name:<16} {report}")
            skipped += 1
            continue
        ok = report.passed
        passed += ok
        failed += not ok
        print(f"{name:<16} {len(report.errors):>6}  {report.max_error:>14.2e}  {'pass' if ok else 'FAIL':<6}"
              f"  {time.perf_counter() - start:>5.2f}s")
        if not ok:
            for line in str(report).splitlines():
                print(f"    {line}")
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0
