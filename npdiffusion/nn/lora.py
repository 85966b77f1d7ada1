"""``LoraLayer(base, rank, alpha=None, dropout=0.0)``: a low-rank adapter (LoRA, Hu et al. 2021) around a
``Linear`` or ``Conv2d``, PEFT's ``lora.Linear`` / ``lora.Conv2d`` twin, with a hand-written backward.

Shapes (Linear): x (..., I) -> y (..., O); base weight W (O, I); lora_A.weight A (r, I); lora_B.weight
B (O, r). Conv2d: x (B, C, H, W) -> y (B, O, Ho, Wo); W (O, C, kh, kw); A (r, C, kh, kw), a convolution
with the base layer's kernel size, stride and padding; B (O, r, 1, 1), a 1x1 convolution. r = rank.

    y = base(x) + s * lora_B(lora_A(dropout(x))),      s = alpha / r * multiplier

The backward (docs/lora.md derives it) runs the three layers' own backwards in reverse:

    du = s * dy;   dB, dh = lora_B.backward(du);   dA, dx_d = lora_A.backward(dh)
    dx = base.backward(dy) + dropout.backward(dx_d)

With the base frozen (``requires_grad_(False)`` on the model, then ``requires_grad_(True)`` on the
adapters: ``attach.add_lora`` does it) the base layer computes dx only: no dW product.

State-dict names follow PEFT without its adapter-name level: ``base_layer.weight``, ``base_layer.bias``,
``lora_A.weight``, ``lora_B.weight``. Initialization as PEFT's default: A Kaiming-uniform with a = sqrt(5)
(U(-1/sqrt(fan_in), 1/sqrt(fan_in)), the Linear/Conv2d default), B zeros, so a new adapter changes
nothing. ``multiplier`` is the scale at inference (diffusers' ``lora_scale``); ``fuse()`` folds
s * B A into W (the forward is then the base layer alone) and ``unfuse()`` restores W bit for bit.
"""
from __future__ import annotations

from npdiffusion.backend import xp
from npdiffusion.checks import check_positive_int, check_probability, check_real
from npdiffusion.nn.conv import Conv2d
from npdiffusion.nn.dropout import Dropout
from npdiffusion.nn.linear import Linear
from npdiffusion.nn.module import Module


class LoraLayer(Module):
    """``base`` (a Linear or Conv2d) plus a rank-``rank`` adapter scaled by ``alpha / rank`` (module docstring).

    ``alpha`` defaults to ``rank`` (scale 1, PEFT's default lora_alpha = 8 = r is the same rule);
    ``dropout`` is the probability of dropping an entry of the adapter's input (PEFT's lora_dropout).
    """

    def __init__(self, base, rank: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, (Linear, Conv2d)):
            raise TypeError(f"LoraLayer: base must be a Linear or a Conv2d, got {type(base).__name__}")
        self.rank = check_positive_int("rank", rank, "LoraLayer")
        self.alpha = float(self.rank) if alpha is None else check_real("alpha", alpha, where="LoraLayer")
        self.dropout_p = check_probability("dropout", dropout, "LoraLayer")
        self.multiplier = 1.0
        self.base_layer = base
        if isinstance(base, Linear):
            self.lora_A = Linear(base.in_features, self.rank, bias=False)
            self.lora_B = Linear(self.rank, base.out_features, bias=False)
        else:
            self.lora_A = Conv2d(base.in_channels, self.rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.lora_B = Conv2d(self.rank, base.out_channels, 1, bias=False)
        dtype = base.weight.dtype
        self.lora_A.weight = self.lora_A.weight.astype(dtype)
        self.lora_B.weight = xp.zeros(self.lora_B.weight.shape, dtype=dtype)
        if self.dropout_p > 0.0:
            self.lora_dropout = Dropout(self.dropout_p)
        object.__setattr__(self, "_unfused_weight", None)

    # ------------------------------------------------------------------ the scale
    @property
    def scaling(self) -> float:
        """s = alpha / r * multiplier, the factor of B A x."""
        return self.alpha / self.rank * self.multiplier

    def set_multiplier(self, multiplier: float) -> None:
        """The scale at inference (diffusers' ``lora_scale``): 0 turns the adapter off, 1 is as trained."""
        if self.fused:
            raise ValueError("LoraLayer: unfuse() before changing the multiplier of a fused adapter")
        self.multiplier = check_real("multiplier", multiplier, where="LoraLayer")

    @property
    def fused(self) -> bool:
        return self._unfused_weight is not None

    def delta_weight(self):
        """s * B A in the base weight's shape: (O, I), or (O, C, kh, kw) with
        delta[o, c, i, j] = s * sum_r B[o, r] A[r, c, i, j]."""
        a = self.lora_A.weight
        b = self.lora_B.weight.reshape(self.lora_B.weight.shape[0], self.rank)        # (O, r)
        delta = xp.matmul(b, a.reshape(self.rank, -1)).reshape(self.base_layer.weight.shape)
        return delta * delta.dtype.type(self.scaling)

    def fuse(self) -> None:
        """W <- W + s B A (the original W is kept, so ``unfuse`` restores it exactly)."""
        if self.fused:
            return
        w = self.base_layer.weight
        object.__setattr__(self, "_unfused_weight", w.copy())
        self.base_layer.weight = w + self.delta_weight().astype(w.dtype)

    def unfuse(self) -> None:
        """Undo ``fuse``: W is the original array's values again, bit for bit."""
        if not self.fused:
            return
        self.base_layer.weight = self._unfused_weight
        object.__setattr__(self, "_unfused_weight", None)

    # ------------------------------------------------------------------ forward / backward
    def forward(self, x):
        """x -> base(x) + s lora_B(lora_A(dropout(x))); shapes as the base layer's."""
        y = self.base_layer(x)
        active = not self.fused and self.multiplier != 0.0
        if active:
            xd = self.lora_dropout(x) if self.dropout_p > 0.0 else x
            u = self.lora_B(self.lora_A(xd))
            y = y + u * u.dtype.type(self.scaling)
        self.save_for_backward(active)
        return y

    def backward(self, dy):
        """dy (the output's shape) -> dx (the input's); accumulates dA and dB (and dW, db unless frozen)."""
        active = self.saved()
        dx = self.base_layer.backward(dy)
        if active:
            dxd = self.lora_A.backward(self.lora_B.backward(dy * dy.dtype.type(self.scaling)))
            dx += self.lora_dropout.backward(dxd) if self.dropout_p > 0.0 else dxd
        return dx

    def extra_repr(self):
        return (f"rank={self.rank}, alpha={self.alpha:g}, dropout={self.dropout_p:g}, "
                f"multiplier={self.multiplier:g}, fused={self.fused}")
