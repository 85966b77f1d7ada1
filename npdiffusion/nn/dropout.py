"""``Dropout(p=0.5, rng=None)``, torch.nn.Dropout's twin with an explicit random generator.

Shapes: x (...) -> y (...) of the same shape and dtype. No parameters.
Op and derivation: npdiffusion/ops/dropout.py, docs/ops/activations.md (section "Dropout").
"""
from __future__ import annotations

import numpy

from npdiffusion.checks import check_probability
from npdiffusion.nn.module import Module, _recording
from npdiffusion.ops.dropout import dropout_backward, dropout_forward
from npdiffusion.random import default_rng


def _spawn_generator():
    """A generator of its own, seeded from the parameter-initialization generator (so
    ``npdiffusion.random.manual_seed`` fixes it) without consuming that generator's stream."""
    parent = default_rng()
    if hasattr(parent, "spawn"):                            # NumPy >= 1.25
        return parent.spawn(1)[0]
    return numpy.random.default_rng(int(parent.integers(2**63)))


class Dropout(Module):
    """Inverted dropout, active only in training mode (in ``eval()`` it returns x itself).

    ``rng`` is the ``numpy.random.Generator`` that draws the masks (default: a generator of the
    module's own, seeded from ``npdiffusion.random``); set ``module.rng`` to change it. Masks are
    drawn on the host, so a seed gives the same masks on NumPy and CuPy.

    Gradient checkpointing stays exact: a forward that runs without caching (the first pass of a
    checkpointed ancestor) remembers the generator state it drew from, and the next caching
    forward on an input of the same shape (the recompute in backward) replays that state, so
    both passes use the same mask; the generator then continues from where it was.
    """

    def __init__(self, p: float = 0.5, rng=None):
        super().__init__()
        self.p = check_probability("p", p, "Dropout")
        if rng is not None and not isinstance(rng, numpy.random.Generator):
            raise TypeError(f"Dropout: rng must be a numpy.random.Generator or None, got {type(rng).__name__}")
        self.rng = rng if rng is not None else _spawn_generator()
        self._replay = None                                  # (generator state, input shape)

    def forward(self, x):
        if not self.training:
            return x
        if not 0.0 < self.p < 1.0:
            y, cache = dropout_forward(x, self.p, self.rng)
        elif not _recording["on"]:
            self._replay = (self.rng.bit_generator.state, tuple(x.shape))
            y, cache = dropout_forward(x, self.p, self.rng)
        elif self._replay is not None and self._replay[1] == tuple(x.shape):
            now = self.rng.bit_generator.state
            self.rng.bit_generator.state = self._replay[0]
            try:
                y, cache = dropout_forward(x, self.p, self.rng)
            finally:
                self.rng.bit_generator.state = now
                self._replay = None
        else:
            y, cache = dropout_forward(x, self.p, self.rng)
        self.save_for_backward(cache)
        return y

    def backward(self, dy):
        return dropout_backward(dy, self.saved())

    def extra_repr(self):
        return f"p={self.p}"
