"""A noise-aware classifier p(y | x_t, t) (Dhariwal & Nichol 2021, sec. 4), the encoder half of a
U-Net with a pooled linear head, and the input gradient that classifier guidance follows.

Shapes: B batch, C in_channels (3 for pixels, 4 for SD latents), H x W the input side, C0..Cn the
block_out_channels, Te = 4 C0 the time-embedding width, K num_classes.

    temb   = time_embedding(time_proj(t))                      (B, Te)
    h      = conv_in(x)                                        (B, C0, H, W)
    level i: h = resnets(h, temb) ...; h = downsample(h)       (not after the last level)
    h      = silu(norm_out(h))                                 (B, Cn, H', W')
    pooled = mean over H', W' of h                             (B, Cn)
    logits = head(pooled)                                      (B, K)

Backward (docs/guidance.md, "The classifier's backward"): the head's backward, the mean pool's adjoint
d h = d pooled / (H' W') broadcast over H', W', then every block's backward in reverse order; the
time-embedding gradients of all resnets are summed and sent through ``time_embedding``'s backward
(parameter gradients only: integer timesteps get none). ``backward`` returns d x (B, C, H, W).

``log_prob_grad(classifier, x, t, y)`` returns log p(y | x, t) (B,) and grad_x log p (B, C, H, W):
the upstream gradient of log_softmax(logits)[b, y_b] is onehot(y) - softmax(logits), and each sample
depends only on its own input (GroupNorm normalises per sample), so one backward of the batch sum
gives every per-sample gradient at once.

State-dict keys follow diffusers' U-Net encoder names: ``time_embedding.linear_1``, ``conv_in``,
``down_blocks.{i}.resnets.{j}``, ``down_blocks.{i}.downsamplers.0.conv``, ``norm_out``, ``head``.
"""
from __future__ import annotations

import numbers

import numpy

from npdiffusion.backend import asarray, xp
from npdiffusion.checks import check_input, check_positive_int
from npdiffusion.models.blocks.resnet import ResnetBlock2D
from npdiffusion.models.blocks.sampling import Downsample2D
from npdiffusion.models.unet.embeddings import TimestepEmbedding, Timesteps
from npdiffusion.nn.conv import Conv2d
from npdiffusion.nn.linear import Linear
from npdiffusion.nn.module import Module, ModuleList, frozen
from npdiffusion.nn.norm import GroupNorm
from npdiffusion.ops.activations import silu_backward, silu_forward
from npdiffusion.ops.softmax import log_softmax_forward

__all__ = ["ClassifierDownBlock", "NoiseAwareClassifier", "log_prob_grad"]


class ClassifierDownBlock(Module):
    """``layers`` ResnetBlock2D (with timestep embedding) and an optional stride-2 Downsample2D:
    x (B, Ci, H, W), temb (B, Te) -> (B, Co, H', W'). ``backward(dy)`` returns (dx, d temb)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, layers: int, groups: int,
                 add_downsample: bool):
        super().__init__()
        self.resnets = ModuleList(ResnetBlock2D(in_channels if j == 0 else out_channels, out_channels,
                                                temb_channels, groups=groups, eps=1e-5)
                                  for j in range(layers))
        self.add_downsample = bool(add_downsample)
        if self.add_downsample:
            self.downsamplers = ModuleList([Downsample2D(out_channels, use_conv=True, padding=1)])

    def forward(self, x, temb):
        h = x
        for resnet in self.resnets:
            h = resnet(h, temb)
        if self.add_downsample:
            h = self.downsamplers[0](h)
        return h

    def backward(self, grad):
        g = self.downsamplers[0].backward(grad) if self.add_downsample else grad
        dtemb = None
        for resnet in reversed(list(self.resnets)):
            g, dt = resnet.backward(g)
            dtemb = dt if dtemb is None else dtemb + dt
        return g, dtemb


class NoiseAwareClassifier(Module):
    """Logits (B, num_classes) of one attribute from a noisy sample x (B, in_channels, H, W) and its
    timesteps t (B,) (ints or floats, as the schedulers give them). See the module docstring.

    ``block_out_channels`` are the widths per level (a stride-2 downsample between levels),
    ``layers_per_block`` the resnets per level, ``norm_num_groups`` the GroupNorm groups (must divide
    every width). ``labels`` optionally names the classes (saved with the weights by the training stage).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 7, block_out_channels=(32, 64),
                 layers_per_block: int = 1, norm_num_groups: int = 8, labels=None):
        super().__init__()
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.num_classes = check_positive_int("num_classes", num_classes)
        boc = tuple(block_out_channels)
        if not boc or any(isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 1 for c in boc):
            raise ValueError(f"NoiseAwareClassifier: block_out_channels must be a non-empty sequence of positive "
                             f"ints, got {block_out_channels!r}")
        groups = check_positive_int("norm_num_groups", norm_num_groups)
        if any(c % groups for c in boc):
            raise ValueError(f"NoiseAwareClassifier: norm_num_groups={groups} must divide every entry of "
                             f"block_out_channels, got {boc}")
        layers = check_positive_int("layers_per_block", layers_per_block)
        if labels is not None and len(labels) != num_classes:
            raise ValueError(f"NoiseAwareClassifier: labels must name {num_classes} classes, got {len(labels)}")
        self.labels = None if labels is None else tuple(str(s) for s in labels)
        self.block_out_channels, self.layers_per_block, self.norm_num_groups = boc, layers, groups
        widths = self.block_out_channels                        # channels of each resolution level
        temb_dim = 4 * widths[0]
        self.time_proj = Timesteps(widths[0], flip_sin_to_cos=True, downscale_freq_shift=0.0)
        self.time_embedding = TimestepEmbedding(widths[0], temb_dim)
        self.conv_in = Conv2d(in_channels, widths[0], 3, padding=1)
        self.down_blocks = ModuleList(
            ClassifierDownBlock(widths[max(i - 1, 0)], c, temb_dim, layers, groups,
                                add_downsample=i < len(widths) - 1)
            for i, c in enumerate(widths))
        self.norm_out = GroupNorm(groups, widths[-1], eps=1e-5)
        self.head = Linear(widths[-1], num_classes)

    @property
    def config(self) -> dict:
        return {"in_channels": self.in_channels, "num_classes": self.num_classes,
                "block_out_channels": list(self.block_out_channels), "layers_per_block": self.layers_per_block,
                "norm_num_groups": self.norm_num_groups, "labels": None if self.labels is None else list(self.labels)}

    def forward(self, x, t):
        """x (B, in_channels, H, W) float, t (B,) or a scalar timestep -> logits (B, num_classes)."""
        check_input("NoiseAwareClassifier", "x", x, ndim=4, axis=1, size=self.in_channels)
        b = x.shape[0]
        t_host = numpy.asarray(t.get() if hasattr(t, "get") else t)
        if t_host.ndim == 0:
            t_host = numpy.full((b,), t_host)
        if t_host.shape != (b,):
            raise ValueError(f"NoiseAwareClassifier: t must be a scalar or have shape ({b},) like x's batch, "
                             f"got shape {t_host.shape}")
        t_emb = asarray(self.time_proj(asarray(t_host))).astype(x.dtype, copy=False)
        temb = self.time_embedding(t_emb)                                   # (B, Te)
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h, temb)
        a, cache = silu_forward(self.norm_out(h))
        pooled = a.mean(axis=(2, 3))                                        # (B, Cn)
        self.save_for_backward(cache, a.shape)
        return self.head(pooled)

    def backward(self, grad):
        """grad (B, num_classes) -> d x (B, in_channels, H, W); accumulates every parameter gradient."""
        cache, shape = self.saved()
        dpooled = self.head.backward(grad)                                  # (B, Cn)
        da = xp.broadcast_to((dpooled / float(shape[2] * shape[3]))[:, :, None, None], shape)
        g = self.norm_out.backward(silu_backward(xp.ascontiguousarray(da), cache))
        dtemb = None
        for block in reversed(list(self.down_blocks)):
            g, dt = block.backward(g)
            dtemb = dt if dtemb is None else dtemb + dt
        self.time_embedding.backward(dtemb)                                 # parameter gradients only
        return self.conv_in.backward(g)

    def extra_repr(self):
        return (f"in_channels={self.in_channels}, num_classes={self.num_classes}, "
                f"block_out_channels={self.block_out_channels}")


def _check_labels(y, batch: int, num_classes: int):
    y_host = numpy.asarray(y.get() if hasattr(y, "get") else y)
    if y_host.ndim == 0:
        y_host = numpy.full((batch,), y_host)
    if y_host.shape != (batch,) or y_host.dtype.kind not in "iu":
        raise ValueError(f"y must be an int or an int array of shape ({batch},), got {y!r}")
    if y_host.size and (y_host.min() < 0 or y_host.max() >= num_classes):
        raise ValueError(f"y must hold class indices in [0, {num_classes}), got values {sorted(set(y_host.tolist()))}")
    return y_host.astype(numpy.int64)


def log_prob_grad(classifier: NoiseAwareClassifier, x, t, y):
    """log p(y | x, t) (B,) and its gradient with respect to x (B, C, H, W) (docs/guidance.md).

    The classifier runs frozen (``nn.module.frozen``: input gradients only, no weight-gradient
    products), so its parameter gradients are untouched, and its mode is restored: this can run in
    the middle of a training loop.
    """
    if not isinstance(classifier, NoiseAwareClassifier):
        raise TypeError(f"classifier must be a NoiseAwareClassifier, got {type(classifier).__name__}")
    check_input("log_prob_grad", "x", x, ndim=4, axis=1, size=classifier.in_channels)
    labels = _check_labels(y, x.shape[0], classifier.num_classes)
    was_training = classifier.training
    classifier.train()
    try:
        with frozen(classifier):
            logits = classifier(x, t)
            logp, _ = log_softmax_forward(logits, axis=-1)
            rows = numpy.arange(x.shape[0])
            onehot = xp.zeros_like(logp)
            onehot[rows, asarray(labels)] = 1.0
            dlogits = onehot - xp.exp(logp)                                 # d log p_y / d logits
            grad = classifier.backward(dlogits)
            out = logp[rows, asarray(labels)]
    finally:
        classifier.train(was_training)
    return out, grad
