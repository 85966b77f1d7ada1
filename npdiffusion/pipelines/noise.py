"""Where a generation's random numbers come from: NumPy's generator, or torch's CPU stream bit for bit.

Shapes: B images in the batch (prompts x images per prompt); a draw of shape S returns a host NumPy
array of shape S.

diffusers takes one ``generator`` (or a list, one per image) and draws from it, in this order:

1. text-to-image: the initial latents ``randn(B, 4, H/f, W/f)``; image-to-image: the VAE posterior's
   sample ``randn(B, 4, h, w)`` and then the ``add_noise`` noise ``randn(B, 4, h, w)``;
2. inside ``scheduler.step``, the stochastic schedulers' fresh noise ``randn(B, 4, h, w)`` (Euler
   ancestral at every step, DDPM at every step with t > 0, DDIM when eta > 0).

``NoiseSource`` gives the same sequence. With ``kind="torch"`` every draw comes from
``npdiffusion.random.TorchGenerator(seed)``, which reproduces ``torch.Generator().manual_seed(seed)``
bit for bit, so a prompt and a seed give diffusers' image; with ``kind="numpy"`` (the default of
the pipelines) the draws come from ``numpy.random.default_rng(seed)`` instead. A list of seeds gives
one generator per image, each drawing that image's slice, as diffusers does with a list of
generators. Docs: docs/pipeline.md ("Seeds and noise").
"""
from __future__ import annotations

import numbers
import secrets

import numpy

from npdiffusion.random.torch_generator import TorchGenerator, randn_tensor

NOISE_KINDS = ("numpy", "torch")


def _check_seed(seed, kind: str, what: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{what} must be an int (or None, or a list of ints), got {type(seed).__name__} {seed!r}")
    seed = int(seed)
    if kind == "numpy" and seed < 0:
        raise ValueError(f"{what} must be >= 0 with noise='numpy' (numpy.random.default_rng), got {seed}")
    if kind == "torch" and not -2 ** 63 <= seed < 2 ** 64:
        raise ValueError(f"{what} must lie in [-2**63, 2**64) with noise='torch' (torch.Generator.manual_seed), "
                         f"got {seed}")
    return seed


def random_seed() -> int:
    """A fresh seed in [0, 2**31) from the operating system's entropy."""
    return secrets.randbelow(2 ** 31)


class NoiseSource:
    """The generator(s) of one pipeline call (see the module docstring).

    ``kind``: "numpy" or "torch". ``seed``: an int, None (a fresh random seed) or a list of ints with
    one entry per image (``batch`` of them). ``seeds`` records what was used.
    """

    def __init__(self, kind: str = "numpy", seed=None, batch: int | None = None):
        if kind not in NOISE_KINDS:
            raise ValueError(f"noise must be one of {NOISE_KINDS}, got {kind!r}")
        self.kind = kind
        if isinstance(seed, (list, tuple)):
            if batch is not None and len(seed) != batch:
                raise ValueError(f"seed: a list of seeds needs one per image, {batch} (prompts x "
                                 f"num_images_per_prompt), got {len(seed)}")
            self.seeds = [_check_seed(s, kind, f"seed[{i}]") for i, s in enumerate(seed)]
            self.generators = [self._make(s) for s in self.seeds]
        else:
            self.seeds = _check_seed(random_seed() if seed is None else seed, kind)
            self.generators = self._make(self.seeds)

    def _make(self, seed):
        return TorchGenerator(seed) if self.kind == "torch" else numpy.random.default_rng(seed)

    @property
    def per_image(self) -> bool:
        """Whether there is one generator per image (a list of seeds)."""
        return isinstance(self.generators, list)

    def generator(self, i: int):
        """The generator of image ``i`` (the only one when a single seed was given)."""
        return self.generators[i] if self.per_image else self.generators

    def for_image(self, i: int) -> "NoiseSource":
        """A source that draws from image ``i``'s generator alone (the shared one for a single seed)."""
        sub = object.__new__(NoiseSource)
        sub.kind = self.kind
        sub.seeds = self.seeds[i] if self.per_image else self.seeds
        sub.generators = self.generator(i)
        return sub

    def randn(self, shape, dtype=numpy.float32) -> numpy.ndarray:
        """A standard-normal draw of ``shape`` (B first) in ``dtype`` (float16, float32 or float64), on the host.

        One generator: one draw of the whole shape. One per image: each draws its (1, ...) slice, in order.
        """
        shape = tuple(int(s) for s in shape)
        dtype = numpy.dtype(dtype)
        if self.kind == "torch":
            return randn_tensor(shape, self.generators, dtype=dtype)
        if self.per_image:
            if not shape or shape[0] != len(self.generators):
                raise ValueError(f"NoiseSource: {len(self.generators)} generators cannot draw a batch of shape {shape}")
            return numpy.concatenate([_numpy_normal(g, (1,) + shape[1:], dtype) for g in self.generators])
        return _numpy_normal(self.generators, shape, dtype)

    def scheduler_rng(self) -> numpy.random.Generator:
        """What to pass as ``rng=`` to ``scheduler.step``: a ``numpy.random.Generator`` whose
        ``standard_normal`` is this source's ``randn`` (the NumPy generator itself when there is one)."""
        if self.kind == "numpy" and not self.per_image:
            return self.generators
        return _StreamRng(self)

    def __repr__(self):
        return f"NoiseSource(kind={self.kind!r}, seed={self.seeds!r})"


def _numpy_normal(gen: numpy.random.Generator, shape, dtype) -> numpy.ndarray:
    draw = dtype if dtype in (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64)) else numpy.float32
    return gen.standard_normal(shape, dtype=draw).astype(dtype, copy=False)


class _StreamRng(numpy.random.Generator):
    """A ``numpy.random.Generator`` (so the schedulers accept it as ``rng``) whose ``standard_normal``
    draws from a ``NoiseSource``; the schedulers call nothing else. Other methods refuse rather than
    silently using an unrelated stream."""

    def __init__(self, source: NoiseSource):
        super().__init__(numpy.random.PCG64(0))
        self._source = source

    def standard_normal(self, size=None, dtype=numpy.float64, out=None):
        if size is None or out is not None:
            raise TypeError("this generator draws whole arrays only: standard_normal(shape, dtype)")
        shape = (size,) if isinstance(size, numbers.Integral) else tuple(size)
        return self._source.randn(shape, dtype)

    def __getattribute__(self, name):
        if name in ("standard_normal", "_source", "__class__", "__init__", "__repr__") or name.startswith("__"):
            return object.__getattribute__(self, name)
        raise AttributeError(f"the pipeline's noise stream offers standard_normal only, not {name!r}")

    def __repr__(self):
        return f"<noise stream of {self._source!r}>"
