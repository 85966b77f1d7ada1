"""Affine map over the last axis: y = x W^T + b.

Shapes: x (..., I), W (O, I), b (O,), y (..., O); N is the product of the leading axes.
Derivation: docs/ops/linear.md.
"""
from __future__ import annotations

from typing import NamedTuple

from npdiffusion.backend import xp
from npdiffusion.ops.reductions import column_sum


class LinearCache(NamedTuple):
    """What ``linear_backward`` needs from the forward."""
    x: object             # (..., I)
    weight: object        # (O, I)
    has_bias: bool


def linear_forward(x, weight, bias=None):
    """y = x @ weight.T + bias. Returns ``(y, cache)``; cache a ``LinearCache``."""
    x2 = x.reshape(-1, x.shape[-1])                          # (N, I)
    y = xp.matmul(x2, weight.T).reshape(*x.shape[:-1], weight.shape[0])
    if bias is not None:
        y += bias
    return y, LinearCache(x, weight, bias is not None)


def linear_backward(dy, cache, weight_grad: bool = True):
    """Returns ``(dx, dweight, dbias)``: dx = dy W, dW = dy^T x (summed over N), db = sum_N dy.
    ``weight_grad=False`` (frozen parameters): dx only, dweight and dbias are None."""
    x, weight, has_bias = cache
    dy2 = dy.reshape(-1, dy.shape[-1])                      # (N, O)
    dx = xp.matmul(dy2, weight).reshape(x.shape)            # (..., I)
    if not weight_grad:
        return dx, None, None
    dweight = xp.matmul(dy2.T, x.reshape(-1, x.shape[-1]))  # (O, I)
    dbias = column_sum(dy2) if has_bias else None
    return dx, dweight, dbias
