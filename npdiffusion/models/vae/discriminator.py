"""OPTIONAL (latent diffusion's adversarial term): a PatchGAN discriminator and its layers.

``NLayerDiscriminator`` is taming-transformers' / latent diffusion's PatchGAN (pix2pix's
``NLayerDiscriminator``): it maps an image to a grid of real/fake logits, one per overlapping
patch. Its layers ``BatchNorm2d`` (torch.nn.BatchNorm2d's twin) and ``LeakyReLU`` live here
because nothing else in npdiffusion uses them. The VAE itself never needs this file; it only
serves ``loss.KLAutoencoderGANLoss``.

Shapes: B batch, C channels, H x W image; ndf the first layer's width.

    main.0  Conv2d(C, ndf, 4, stride 2, pad 1) + bias      main.1  LeakyReLU(0.2)
    for n = 1 .. n_layers - 1 (m = min(2^n, 8)):
            Conv2d(ndf*m_prev, ndf*m, 4, stride 2, pad 1, no bias), BatchNorm2d, LeakyReLU(0.2)
    then    Conv2d(ndf*m_prev, ndf*min(2^n_layers, 8), 4, stride 1, pad 1, no bias), BatchNorm2d, LeakyReLU
    last    Conv2d(., 1, 4, stride 1, pad 1) + bias        -> logits (B, 1, H', W')

(3 layers on 256 x 256 give 30 x 30 logits, each seeing a 70 x 70 patch.) State-dict keys
``main.{i}.weight`` / ``.bias`` / ``.running_mean`` / ``.running_var`` / ``.num_batches_tracked``
as torch's ``nn.Sequential`` gives them. Derivations: docs/vae.md ("Optional: the adversarial term").
"""
from __future__ import annotations

import numpy

from npdiffusion.backend import xp
from npdiffusion.checks import check_input, check_positive_int
from npdiffusion.nn.conv import Conv2d
from npdiffusion.nn.module import Module, ModuleList
from npdiffusion.random import default_rng


class LeakyReLU(Module):
    """y = x for x > 0, negative_slope * x otherwise (torch.nn.LeakyReLU). dy/dx = 1 or negative_slope
    (the slope at exactly 0, as torch)."""

    def __init__(self, negative_slope: float = 0.2):
        super().__init__()
        self.negative_slope = float(negative_slope)

    def forward(self, x):
        positive = x > 0
        y = xp.where(positive, x, x * self.negative_slope)
        self.save_for_backward(positive)
        return y

    def backward(self, dy):
        positive = self.saved()
        return xp.where(positive, dy, dy * self.negative_slope)

    def extra_repr(self):
        return f"negative_slope={self.negative_slope}"


class BatchNorm2d(Module):
    """torch.nn.BatchNorm2d: x (B, C, H, W) normalized per channel over (B, H, W).

    Training mode: batch statistics (biased variance) normalize, and the running statistics move
    by ``momentum`` towards the batch mean and the *unbiased* batch variance; ``num_batches_tracked``
    counts the updates. Eval mode: the running statistics normalize (and nothing is kept for a
    backward). Backward, with means over (B, H, W), x_hat the normalized input and
    g = dy * weight per channel: dx = (g - mean(g) - x_hat * mean(g * x_hat)) / sqrt(var + eps),
    dweight = sum(dy * x_hat), dbias = sum(dy).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_features = check_positive_int("num_features", num_features)
        self.eps, self.momentum = float(eps), float(momentum)
        self.register_parameter("weight", numpy.ones(num_features, dtype=numpy.float32))
        self.register_parameter("bias", numpy.zeros(num_features, dtype=numpy.float32))
        self.register_buffer("running_mean", numpy.zeros(num_features, dtype=numpy.float32))
        self.register_buffer("running_var", numpy.ones(num_features, dtype=numpy.float32))
        self.register_buffer("num_batches_tracked", numpy.zeros((), dtype=numpy.int64))

    def forward(self, x):
        check_input("BatchNorm2d", "x", x, ndim=4, axis=1, size=self.num_features)
        axes = (0, 2, 3)
        if self.training:
            n = x.shape[0] * x.shape[2] * x.shape[3]
            if n < 2:
                raise ValueError(f"BatchNorm2d: training needs more than one value per channel, got shape {tuple(x.shape)}")
            mean = x.mean(axis=axes)
            centered = x - mean[None, :, None, None]
            var = (centered * centered).mean(axis=axes)
            m = self.momentum
            self.running_mean[...] = (1.0 - m) * self.running_mean + m * mean
            self.running_var[...] = (1.0 - m) * self.running_var + m * var * (n / (n - 1.0))
            self.num_batches_tracked[...] = self.num_batches_tracked + 1
        else:
            centered = x - self.running_mean[None, :, None, None]
            var = self.running_var
        inv = 1.0 / xp.sqrt(var + self.eps)                               # (C,)
        x_hat = centered * inv[None, :, None, None]
        y = x_hat * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        self.save_for_backward(x_hat, inv)                                # kept in training mode only
        return y

    def backward(self, dy):
        """dy (B, C, H, W) -> dx, after a training-mode forward (batch statistics)."""
        x_hat, inv = self.saved()
        axes = (0, 2, 3)
        self.accumulate_grad("weight", (dy * x_hat).sum(axis=axes))
        self.accumulate_grad("bias", dy.sum(axis=axes))
        g = dy * self.weight[None, :, None, None]
        g = g - g.mean(axis=axes, keepdims=True) - x_hat * (g * x_hat).mean(axis=axes, keepdims=True)
        return g * inv[None, :, None, None]

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class NLayerDiscriminator(Module):
    """PatchGAN discriminator: image (B, input_nc, H, W) -> logits (B, 1, H', W') (see the module
    docstring). Weights drawn as taming's ``weights_init``: conv N(0, 0.02), batch-norm gain
    N(1, 0.02), bias 0. Needs H, W >= 2^(n_layers + 1) or so (each stride-2 conv halves).
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        check_positive_int("input_nc", input_nc)
        check_positive_int("ndf", ndf)
        check_positive_int("n_layers", n_layers)
        self.input_nc = input_nc
        layers = [Conv2d(input_nc, ndf, 4, stride=2, padding=1), LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            layers += [Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1, bias=False), BatchNorm2d(ndf * mult),
                       LeakyReLU(0.2)]
        prev, mult = mult, min(2 ** n_layers, 8)
        layers += [Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=False), BatchNorm2d(ndf * mult),
                   LeakyReLU(0.2), Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.main = ModuleList(layers)
        rng = default_rng()
        for name, p in self.named_parameters():
            if p.ndim == 4:
                p[...] = xp.asarray(rng.normal(0.0, 0.02, p.shape), dtype=p.dtype)
            elif name.endswith("weight"):                                 # batch-norm gains
                p[...] = xp.asarray(rng.normal(1.0, 0.02, p.shape), dtype=p.dtype)
            else:
                p[...] = 0.0

    def forward(self, x):
        """x (B, input_nc, H, W) -> logits (B, 1, H', W')."""
        check_input("NLayerDiscriminator", "x", x, ndim=4, axis=1, size=self.input_nc)
        h = x
        for layer in self.main:
            h = layer(h)
        return h

    def backward(self, grad):
        """grad (B, 1, H', W') -> dx (B, input_nc, H, W); accumulates every parameter gradient."""
        g = grad
        for layer in reversed(list(self.main)):
            g = layer.backward(g)
        return g
