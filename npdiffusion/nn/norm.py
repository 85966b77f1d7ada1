"""``GroupNorm`` and ``LayerNorm``, the twins of torch.nn.GroupNorm and torch.nn.LayerNorm.

Shapes: GroupNorm x (B, C, *spatial) -> y of x's shape, weight and bias (C,);
LayerNorm x (..., *normalized_shape) -> y of x's shape, weight and bias (*normalized_shape).
Ops and derivations: npdiffusion/ops/norm.py, docs/ops/normalization.md.
"""
from __future__ import annotations

import numpy

from npdiffusion.checks import check_float_array, check_positive_int, check_real
from npdiffusion.nn.module import Module
from npdiffusion.ops.norm import group_norm_backward, group_norm_forward, layer_norm_backward, layer_norm_forward


class GroupNorm(Module):
    """Normalize x (B, C, *spatial) over each of ``num_groups`` groups of C/G consecutive channels
    and all spatial positions, then scale and shift per channel (weight ones, bias zeros at init).

    Parameters ``weight`` and ``bias`` (C,) when ``affine``, named as in torch.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.num_groups = check_positive_int("num_groups", num_groups)
        self.num_channels = check_positive_int("num_channels", num_channels)
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: num_channels ({num_channels}) must be divisible by "
                             f"num_groups ({num_groups})")
        self.eps = check_real("eps", eps, minimum=0.0, where="GroupNorm")
        self.affine = bool(affine)
        if self.affine:
            self.register_parameter("weight", numpy.ones(num_channels, dtype=numpy.float32))
            self.register_parameter("bias", numpy.zeros(num_channels, dtype=numpy.float32))

    def forward(self, x):
        check_float_array("x", x, "GroupNorm")
        if x.ndim < 2:
            raise ValueError(f"GroupNorm: x must have shape (B, C, *spatial) with at least 2 dimensions, "
                             f"got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_channels:
            raise ValueError(f"GroupNorm: x must have {self.num_channels} channels on axis 1, "
                             f"got shape {tuple(x.shape)}")
        w, b = (self.weight, self.bias) if self.affine else (None, None)
        y, cache = group_norm_forward(x, self.num_groups, w, b, self.eps)
        self.save_for_backward(cache)
        return y

    def backward(self, dy):
        dx, dw, db = group_norm_backward(dy, self.saved())
        if self.affine:
            self.accumulate_grad("weight", dw)
            self.accumulate_grad("bias", db)
        return dx

    def extra_repr(self):
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"


class LayerNorm(Module):
    """Normalize x (..., *normalized_shape) over its last len(normalized_shape) axes, then scale
    and shift element-wise (weight ones, bias zeros at init, when ``elementwise_affine``).

    ``normalized_shape`` is an int or a tuple of ints, as in torch.
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True):
        super().__init__()
        if isinstance(normalized_shape, (int, numpy.integer)) and not isinstance(normalized_shape, bool):
            normalized_shape = (int(normalized_shape),)
        try:
            shape = tuple(normalized_shape)
        except TypeError:
            shape = None
        if not shape or not all(isinstance(s, (int, numpy.integer)) and not isinstance(s, bool) and s > 0
                                for s in shape):
            raise ValueError(f"LayerNorm: normalized_shape must be a positive int or a non-empty tuple of "
                             f"positive ints, got {normalized_shape!r}")
        self.normalized_shape = tuple(int(s) for s in shape)
        self.eps = check_real("eps", eps, minimum=0.0, where="LayerNorm")
        self.elementwise_affine = bool(elementwise_affine)
        if self.elementwise_affine:
            self.register_parameter("weight", numpy.ones(self.normalized_shape, dtype=numpy.float32))
            self.register_parameter("bias", numpy.zeros(self.normalized_shape, dtype=numpy.float32))

    def forward(self, x):
        check_float_array("x", x, "LayerNorm")
        k = len(self.normalized_shape)
        if x.ndim < k or tuple(x.shape[x.ndim - k:]) != self.normalized_shape:
            raise ValueError(f"LayerNorm: x must end with the normalized shape {self.normalized_shape}, "
                             f"got shape {tuple(x.shape)}")
        w, b = (self.weight, self.bias) if self.elementwise_affine else (None, None)
        y, cache = layer_norm_forward(x, self.normalized_shape, w, b, self.eps)
        self.save_for_backward(cache)
        return y

    def backward(self, dy):
        dx, dw, db = layer_norm_backward(dy, self.saved())
        if self.elementwise_affine:
            self.accumulate_grad("weight", dw)
            self.accumulate_grad("bias", db)
        return dx

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
