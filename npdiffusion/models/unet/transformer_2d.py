"""The U-Net's spatial transformer: ``BasicTransformerBlock`` and ``Transformer2DModel``.

Shapes: B batch, C channels (in_channels), H x W spatial, T = H*W tokens, I = inner_dim = heads *
head_dim (= C in every U-Net block), Tc context tokens, Cc cross_attention_dim.

BasicTransformerBlock (layer_norm type), x (B, T, I), ctx (B, Tc, Cc) -> (B, T, I):

    x = attn1(norm1(x)[, ctx if only_cross_attention]) + x      self-attention
    x = attn2(norm2(x), ctx) + x                                cross-attention (when Cc is set)
    x = ff(norm3(x)) + x                                        GEGLU feed-forward

Transformer2DModel (continuous input), x (B, C, H, W), ctx -> (B, C, H, W):

    h = norm(x)                                     GroupNorm, eps 1e-6 (hard-coded in diffusers)
    h = proj_in(h) -> tokens (B, T, I)              1x1 conv then NCHW -> (B, T, I), or
                                                    NCHW -> (B, T, C) then Linear (use_linear_projection)
    h = transformer_blocks[k](h, ctx)               k = 0 .. num_layers - 1
    y = proj_out(h) -> (B, C, H, W), y += x         mirrored

Backward (docs/unet.md, "Transformer2DModel"): every residual sum passes its gradient to both
branches; the context gradient is the sum over every attention that read the context.
State-dict keys as in diffusers: norm, proj_in, transformer_blocks.{k}.{norm1, attn1, norm2, attn2,
norm3, ff}, proj_out. Source mirrored: diffusers/models/attention.py (BasicTransformerBlock),
diffusers/models/transformers/transformer_2d.py (Transformer2DModel).
"""
from __future__ import annotations

from npdiffusion.backend import xp
from npdiffusion.checks import check_input, check_positive_int
from npdiffusion.nn.attention import Attention
from npdiffusion.nn.conv import Conv2d
from npdiffusion.nn.feedforward import FeedForward
from npdiffusion.nn.linear import Linear
from npdiffusion.nn.module import Module, ModuleList
from npdiffusion.nn.norm import GroupNorm, LayerNorm


class BasicTransformerBlock(Module):
    """Self-attention, cross-attention and feed-forward, each pre-LayerNorm with a residual.

    x (B, T, dim), encoder_hidden_states (B, Tc, cross_attention_dim) -> (B, T, dim).
    ``only_cross_attention``: attn1 attends to the context too. ``upcast_attention`` is accepted for
    config compatibility (float16 attention softmax always runs in float32 here).
    Derivation of the backward: docs/unet.md ("BasicTransformerBlock").
    """

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, dropout: float = 0.0,
                 cross_attention_dim: int | None = None, activation_fn: str = "geglu", attention_bias: bool = False,
                 only_cross_attention: bool = False, upcast_attention: bool = False, norm_eps: float = 1e-5,
                 norm_elementwise_affine: bool = True):
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.only_cross_attention = bool(only_cross_attention)
        if self.only_cross_attention and cross_attention_dim is None:
            raise ValueError("BasicTransformerBlock: only_cross_attention needs a cross_attention_dim, got None")
        self.cross_attention_dim = cross_attention_dim
        self.norm1 = LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.attn1 = Attention(dim, cross_attention_dim=cross_attention_dim if only_cross_attention else None,
                               heads=num_attention_heads, dim_head=attention_head_dim, dropout=dropout,
                               bias=attention_bias, upcast_softmax=upcast_attention)
        self.has_cross = cross_attention_dim is not None
        if self.has_cross:
            self.norm2 = LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
            self.attn2 = Attention(dim, cross_attention_dim=cross_attention_dim, heads=num_attention_heads,
                                   dim_head=attention_head_dim, dropout=dropout, bias=attention_bias,
                                   upcast_softmax=upcast_attention)
        self.norm3 = LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.ff = FeedForward(dim, dropout=dropout, activation_fn=activation_fn)

    def forward(self, hidden_states, encoder_hidden_states=None):
        """hidden_states (B, T, dim), encoder_hidden_states (B, Tc, cross_attention_dim) -> (B, T, dim)."""
        x = hidden_states
        check_input("BasicTransformerBlock", "hidden_states", x, ndim=3, axis=-1, size=self.dim)
        ctx = encoder_hidden_states
        if (self.has_cross or self.only_cross_attention) and ctx is None:
            raise ValueError(f"BasicTransformerBlock: encoder_hidden_states (B, Tc, {self.cross_attention_dim}) is "
                             "required: this block has cross-attention, got None")
        y = self.attn1(self.norm1(x), ctx if self.only_cross_attention else None)   # fresh array
        y += x
        if self.has_cross:
            z = self.attn2(self.norm2(y), ctx)
            z += y
            y = z
        out = self.ff(self.norm3(y))
        out += y
        return out

    def backward(self, grad):
        """grad (B, T, dim) -> (d hidden_states, d encoder_hidden_states), the latter None when no
        attention read the context. Accumulates every parameter gradient."""
        g = self.norm3.backward(self.ff.backward(grad))
        g += grad                                              # d y after the feed-forward residual
        dctx = None
        if self.has_cross:
            dn, dctx = self.attn2.backward(g)
            dy = self.norm2.backward(dn)
            dy += g
            g = dy
        dn, dctx1 = self.attn1.backward(g)                     # dctx1 None unless only_cross_attention
        if dctx1 is not None:
            dctx = dctx1 if dctx is None else dctx + dctx1
        dx = self.norm1.backward(dn)
        dx += g
        return dx, dctx

    def extra_repr(self):
        return (f"dim={self.dim}, cross_attention_dim={self.cross_attention_dim}, "
                f"only_cross_attention={self.only_cross_attention}")


class Transformer2DModel(Module):
    """A spatial transformer over a feature map: x (B, in_channels, H, W), encoder_hidden_states
    (B, Tc, cross_attention_dim) -> (B, out_channels, H, W) (out_channels = in_channels by default;
    the residual requires equality, as in every U-Net block).

    inner_dim = num_attention_heads * attention_head_dim (head width, diffusers' meaning here).
    ``use_linear_projection``: Linear proj_in/proj_out on tokens (SD 2.x) instead of 1x1 convs.
    Derivation of the backward: docs/unet.md ("Transformer2DModel").
    """

    def __init__(self, num_attention_heads: int = 16, attention_head_dim: int = 88, in_channels: int | None = None,
                 out_channels: int | None = None, num_layers: int = 1, dropout: float = 0.0,
                 norm_num_groups: int = 32, cross_attention_dim: int | None = None, attention_bias: bool = False,
                 activation_fn: str = "geglu", use_linear_projection: bool = False,
                 only_cross_attention: bool = False, upcast_attention: bool = False, norm_eps: float = 1e-5,
                 norm_elementwise_affine: bool = True):
        super().__init__()
        if in_channels is None:
            raise ValueError("Transformer2DModel: in_channels is required (only continuous inputs are supported), "
                             "got None")
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.out_channels = in_channels if out_channels is None else check_positive_int("out_channels", out_channels)
        if self.out_channels != self.in_channels:
            raise ValueError(f"Transformer2DModel: out_channels ({out_channels}) must equal in_channels "
                             f"({in_channels}): the output is added to the input")
        check_positive_int("num_layers", num_layers)
        heads = check_positive_int("num_attention_heads", num_attention_heads)
        head_dim = check_positive_int("attention_head_dim", attention_head_dim)
        self.inner_dim = heads * head_dim
        self.use_linear_projection = bool(use_linear_projection)
        self.norm = GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        if self.use_linear_projection:
            self.proj_in = Linear(in_channels, self.inner_dim)
        else:
            self.proj_in = Conv2d(in_channels, self.inner_dim, 1)
        self.transformer_blocks = ModuleList([
            BasicTransformerBlock(self.inner_dim, heads, head_dim, dropout=dropout,
                                  cross_attention_dim=cross_attention_dim, activation_fn=activation_fn,
                                  attention_bias=attention_bias, only_cross_attention=only_cross_attention,
                                  upcast_attention=upcast_attention, norm_eps=norm_eps,
                                  norm_elementwise_affine=norm_elementwise_affine)
            for _ in range(num_layers)
        ])
        if self.use_linear_projection:
            self.proj_out = Linear(self.inner_dim, in_channels)
        else:
            self.proj_out = Conv2d(self.inner_dim, in_channels, 1)

    def forward(self, hidden_states, encoder_hidden_states=None):
        """hidden_states (B, C, H, W), encoder_hidden_states (B, Tc, Cc) or None -> (B, C, H, W)."""
        x = hidden_states
        check_input("Transformer2DModel", "hidden_states", x, ndim=4, axis=1, size=self.in_channels)
        b, c, height, width = x.shape
        n = self.norm(x)
        if self.use_linear_projection:
            tokens = self.proj_in(n.transpose(0, 2, 3, 1).reshape(b, height * width, c))        # (B, T, I)
        else:
            tokens = self.proj_in(n).transpose(0, 2, 3, 1).reshape(b, height * width, self.inner_dim)
        for block in self.transformer_blocks:
            tokens = block(tokens, encoder_hidden_states)
        if self.use_linear_projection:
            out = xp.empty(x.shape, dtype=tokens.dtype)                                       # NCHW, contiguous
            xp.add(self.proj_out(tokens).reshape(b, height, width, c).transpose(0, 3, 1, 2), x, out=out)
        else:
            out = self.proj_out(tokens.reshape(b, height, width, self.inner_dim).transpose(0, 3, 1, 2))
            out += x
        self.save_for_backward(x.shape)
        return out

    def backward(self, grad):
        """grad (B, C, H, W) -> (d hidden_states, d encoder_hidden_states), the latter None when no
        block read the context. Accumulates every parameter gradient."""
        b, c, height, width = self.saved()
        if self.use_linear_projection:
            dtok = self.proj_out.backward(grad.transpose(0, 2, 3, 1).reshape(b, height * width, c))
        else:
            dtok = self.proj_out.backward(grad).transpose(0, 2, 3, 1).reshape(b, height * width, self.inner_dim)
        dctx = None
        for block in reversed(list(self.transformer_blocks)):
            dtok, dc = block.backward(dtok)
            if dc is not None:
                dctx = dc if dctx is None else dctx + dc
        if self.use_linear_projection:
            dn = self.proj_in.backward(dtok).reshape(b, height, width, c).transpose(0, 3, 1, 2)
        else:
            dn = self.proj_in.backward(dtok.reshape(b, height, width, self.inner_dim).transpose(0, 3, 1, 2))
        dx = self.norm.backward(dn)
        dx += grad
        return dx, dctx

    def extra_repr(self):
        return (f"in_channels={self.in_channels}, inner_dim={self.inner_dim}, "
                f"use_linear_projection={self.use_linear_projection}")
