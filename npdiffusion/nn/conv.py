"""``Conv2d(in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True)``, the twin of
torch.nn.Conv2d (zero padding, no dilation, no groups).

Shapes: x (B, C_in, H, W) -> y (B, C_out, Ho, Wo), Ho = floor((H + 2*ph - kh) / sh) + 1 (same for
W); weight (C_out, C_in, kh, kw), bias (C_out,).
Op and derivation: npdiffusion/ops/conv.py, docs/ops/convolution.md.
"""
from __future__ import annotations

from npdiffusion.checks import check_input, check_pair, check_positive_int
from npdiffusion.nn.init import uniform_fan_in
from npdiffusion.nn.module import Module
from npdiffusion.ops.conv import conv2d_backward, conv2d_forward


class Conv2d(Module):
    """2-D convolution (cross-correlation) over NCHW input, with torch's parameter names and init.

    weight (out_channels, in_channels, kh, kw) and bias (out_channels,) are drawn from
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = in_channels * kh * kw (torch's default).
    ``kernel_size``, ``stride`` and ``padding`` are an int or a pair (rows, columns).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 bias: bool = True):
        super().__init__()
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.out_channels = check_positive_int("out_channels", out_channels)
        self.kernel_size = check_pair("kernel_size", kernel_size, 1, "Conv2d")
        self.stride = check_pair("stride", stride, 1, "Conv2d")
        self.padding = check_pair("padding", padding, 0, "Conv2d")
        kh, kw = self.kernel_size
        fan_in = in_channels * kh * kw
        self.register_parameter("weight", uniform_fan_in((out_channels, in_channels, kh, kw), fan_in))
        if bias:
            self.register_parameter("bias", uniform_fan_in((out_channels,), fan_in))
        self.has_bias = bool(bias)

    def forward(self, x):
        """x (B, in_channels, H, W) -> y (B, out_channels, Ho, Wo)."""
        check_input("Conv2d", "x", x, ndim=4, axis=1, size=self.in_channels)
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        h, w = x.shape[2] + 2 * ph, x.shape[3] + 2 * pw
        if h < kh or w < kw:
            raise ValueError(
                f"Conv2d: x is too small for the kernel: padded size ({h}, {w}) < kernel_size "
                f"({kh}, {kw}), got shape {tuple(x.shape)} with padding {self.padding}"
            )
        y, cache = conv2d_forward(x, self.weight, self.bias if self.has_bias else None,
                                  self.stride, self.padding)
        self.save_for_backward(cache)
        return y

    def backward(self, dy):
        """dy (B, out_channels, Ho, Wo) -> dx (B, in_channels, H, W); accumulates weight/bias grads."""
        dx, dw, db = conv2d_backward(dy, self.saved(), weight_grad=self.requires_grad)  # frozen: no dW GEMM
        self.accumulate_grad("weight", dw)
        if self.has_bias:
            self.accumulate_grad("bias", db)
        return dx

    def weight_grad(self, dy):
        """d <dy, y> / d weight for the last forward's input, returned and not accumulated, and the
        cache kept (torch's ``autograd.grad(y, weight, dy)``; the GAN loss's adaptive weight)."""
        _, dw, _ = conv2d_backward(dy, self.saved())
        return dw

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.has_bias}")
