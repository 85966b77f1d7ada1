"""Activation modules: ``SiLU``, ``GELU(approximate)``, ``QuickGELU`` (no parameters).

Shapes: x (...) -> y (...) of the same shape and dtype. Twins: torch.nn.SiLU, torch.nn.GELU,
transformers' QuickGELUActivation. Ops and derivations: npdiffusion/ops/activations.py,
docs/ops/activations.md.
"""
from __future__ import annotations

from npdiffusion.nn.module import Module
from npdiffusion.ops.activations import (
    gelu_backward,
    gelu_forward,
    quick_gelu_backward,
    quick_gelu_forward,
    silu_backward,
    silu_forward,
)


class _Activation(Module):
    _forward = None
    _backward = None

    def forward(self, x):
        y, cache = type(self)._forward(x)
        self.save_for_backward(cache)
        return y

    def backward(self, dy):
        return type(self)._backward(dy, self.saved())


class SiLU(_Activation):
    """y = x * sigmoid(x)."""

    _forward = staticmethod(silu_forward)
    _backward = staticmethod(silu_backward)


class QuickGELU(_Activation):
    """y = x * sigmoid(1.702 x) (CLIP)."""

    _forward = staticmethod(quick_gelu_forward)
    _backward = staticmethod(quick_gelu_backward)


class GELU(Module):
    """y = x * Phi(x) with the exact erf (``approximate="none"``) or the tanh approximation."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x):
        y, cache = gelu_forward(x, self.approximate)
        self.save_for_backward(cache)
        return y

    def backward(self, dy):
        return gelu_backward(dy, self.saved())

    def extra_repr(self):
        return f"approximate={self.approximate!r}"
