"""``Linear(in_features, out_features, bias=True)``, torch.nn.Linear's twin.

Shapes: x (..., in_features) -> y (..., out_features); weight (out, in), bias (out,).
"""
from __future__ import annotations

from npdiffusion.checks import check_input, check_positive_int
from npdiffusion.nn.init import uniform_fan_in
from npdiffusion.nn.module import Module
from npdiffusion.ops.linear import linear_backward, linear_forward


class Linear(Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        self.register_parameter("weight", uniform_fan_in((out_features, in_features), in_features))
        if bias:
            self.register_parameter("bias", uniform_fan_in((out_features,), in_features))
        self.has_bias = bool(bias)

    def forward(self, x):
        check_input("Linear", "x", x, min_ndim=1, axis=-1, size=self.in_features)
        y, cache = linear_forward(x, self.weight, self.bias if self.has_bias else None)
        self.save_for_backward(cache)
        return y

    def backward(self, dy):
        dx, dw, db = linear_backward(dy, self.saved(), weight_grad=self.requires_grad)  # frozen: no dW GEMM
        self.accumulate_grad("weight", dw)
        if self.has_bias:
            self.accumulate_grad("bias", db)
        return dx

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}"
