"""``Attention``: diffusers' multi-head attention layer (``Attention`` + ``AttnProcessor2_0``).

Shapes: B batch, Tq query tokens, Tk context tokens, C = query_dim, Cc = cross_attention_dim,
H heads, Dh = dim_head, HD = H * Dh.
hidden_states (B, Tq, C), encoder_hidden_states (B, Tk, Cc) -> (B, Tq, C).

    q = to_q(x), k = to_k(ctx), v = to_v(ctx)            (B, T, HD) -> (B, H, T, Dh)
    o = softmax(q k^T / sqrt(Dh) + mask) v                ops/attention.py
    y = to_out.0(o merged back to (B, Tq, HD))
    y = (y + x if residual_connection else y) / rescale_output_factor

ctx = x (self-attention) when ``encoder_hidden_states`` is None. State-dict keys as in diffusers:
``to_q.weight``, ``to_k.weight``, ``to_v.weight`` (+ ``.bias`` when ``bias``), ``to_out.0.weight``,
``to_out.0.bias`` (``to_out.1`` is the dropout, as in diffusers: no parameters).
Derivations: docs/ops/attention.md. Source mirrored: diffusers/models/attention_processor.py.
"""
from __future__ import annotations

import numbers

from npdiffusion.checks import check_input, check_positive_int
from npdiffusion.nn.dropout import Dropout
from npdiffusion.nn.linear import Linear
from npdiffusion.nn.module import Module, ModuleList
from npdiffusion.ops.attention import attention_backward, attention_forward


class Attention(Module):
    """Multi-head self- or cross-attention with diffusers' parameter names.

    ``upcast_softmax`` is accepted for config compatibility; the softmax of float16 inputs is always
    computed in float32 here. ``dropout`` (``to_out.1``, an ``npdiffusion.nn.dropout.Dropout``) acts on
    the output projection in training mode, before the residual, as in diffusers. ``chunk_size`` (also settable later as an attribute) computes the
    attention ``chunk_size`` query rows at a time, so the full (Tq, Tk) score matrix never exists:
    a memory option for large latents, exact to rounding. The VAE's ``group_norm`` is left to
    the VAE code.
    """

    def __init__(self, query_dim: int, cross_attention_dim: int | None = None, heads: int = 8,
                 dim_head: int = 64, dropout: float = 0.0, bias: bool = False, out_bias: bool = True,
                 upcast_softmax: bool = False, residual_connection: bool = False,
                 rescale_output_factor: float = 1.0, chunk_size: int | None = None):
        super().__init__()
        self.query_dim = check_positive_int("query_dim", query_dim)
        self.is_cross_attention = cross_attention_dim is not None
        self.cross_attention_dim = (query_dim if cross_attention_dim is None
                                    else check_positive_int("cross_attention_dim", cross_attention_dim))
        self.heads = check_positive_int("heads", heads)
        self.dim_head = check_positive_int("dim_head", dim_head)
        self.inner_dim = heads * dim_head
        if isinstance(rescale_output_factor, bool) or not isinstance(rescale_output_factor, numbers.Real) \
                or rescale_output_factor == 0:
            raise ValueError(f"rescale_output_factor must be a nonzero number, got {rescale_output_factor!r}")
        if chunk_size is not None:
            check_positive_int("chunk_size", chunk_size)
        self.rescale_output_factor = float(rescale_output_factor)
        self.residual_connection = bool(residual_connection)
        self.upcast_softmax = bool(upcast_softmax)
        self.scale = float(dim_head) ** -0.5
        self.chunk_size = chunk_size
        self.to_q = Linear(query_dim, self.inner_dim, bias=bias)
        self.to_k = Linear(self.cross_attention_dim, self.inner_dim, bias=bias)
        self.to_v = Linear(self.cross_attention_dim, self.inner_dim, bias=bias)
        self.to_out = ModuleList([Linear(self.inner_dim, query_dim, bias=out_bias), Dropout(dropout)])

    def _split_heads(self, t, b, n):
        """(B, T, HD) -> (B, H, T, Dh), a view."""
        return t.reshape(b, n, self.heads, self.dim_head).transpose(0, 2, 1, 3)

    def _merge_heads(self, t, b, n):
        """(B, H, T, Dh) -> (B, T, HD) (a copy unless t is already laid out as (B, T, H, Dh))."""
        return t.transpose(0, 2, 1, 3).reshape(b, n, self.inner_dim)

    def _prepare_mask(self, mask, b, tq, tk):
        """diffusers' accepted masks (B, Tk), (B, 1|Tq, Tk) or (B*heads, 1|Tq, Tk) -> 4-d views."""
        if mask is None:
            return None
        check_input("Attention", "attention_mask", mask, min_ndim=2)
        shape = tuple(mask.shape)
        ok = mask.ndim in (2, 3) and shape[-1] == tk and (mask.ndim == 2 or shape[1] in (1, tq))
        if ok and shape[0] == b:
            return mask.reshape(b, 1, 1 if mask.ndim == 2 else shape[1], tk)
        if ok and shape[0] == b * self.heads:
            return mask.reshape(b, self.heads, 1 if mask.ndim == 2 else shape[1], tk)
        raise ValueError(
            f"Attention: attention_mask must have shape (B, Tk), (B, 1 or Tq, Tk) or (B*heads, 1 or Tq, Tk) "
            f"with B={b}, heads={self.heads}, Tq={tq}, Tk={tk}, got shape {shape}"
        )

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None):
        """hidden_states (B, Tq, query_dim), encoder_hidden_states (B, Tk, cross_attention_dim) or
        None (self-attention), attention_mask additive (see ``_prepare_mask``) -> (B, Tq, query_dim)."""
        x = hidden_states
        check_input("Attention", "hidden_states", x, ndim=3, axis=-1, size=self.query_dim)
        b, tq, _ = x.shape
        cross = encoder_hidden_states is not None
        ctx = encoder_hidden_states if cross else x
        if cross:
            check_input("Attention", "encoder_hidden_states", ctx, ndim=3, axis=-1, size=self.cross_attention_dim)
            if ctx.shape[0] != b:
                raise ValueError(f"Attention: encoder_hidden_states must have batch size {b} like hidden_states, "
                                 f"got shape {tuple(ctx.shape)}")
        elif self.cross_attention_dim != self.query_dim:
            raise ValueError(f"Attention: encoder_hidden_states (width {self.cross_attention_dim}) is required "
                             f"when cross_attention_dim != query_dim, got None")
        tk = ctx.shape[1]
        mask = self._prepare_mask(attention_mask, b, tq, tk)

        q = self._split_heads(self.to_q(x), b, tq)                  # (B, H, Tq, Dh)
        k = self._split_heads(self.to_k(ctx), b, tk)                # (B, H, Tk, Dh)
        v = self._split_heads(self.to_v(ctx), b, tk)
        o, cache = attention_forward(q, k, v, mask=mask, scale=self.scale, chunk_size=self.chunk_size)
        y = self.to_out[0](self._merge_heads(o, b, tq))             # (B, Tq, C), a fresh array
        dropout = self.training and self.to_out[1].p > 0.0
        if dropout:
            y = self.to_out[1](y)                                   # a fresh array too
        if self.residual_connection:
            y += x
        if self.rescale_output_factor != 1.0:
            y /= self.rescale_output_factor
        self.save_for_backward(cache, b, tq, tk, cross, dropout)
        return y

    def backward(self, grad):
        """grad (B, Tq, query_dim) -> (d hidden_states, d encoder_hidden_states), the latter None after a
        self-attention forward (no encoder_hidden_states). Accumulates every parameter gradient."""
        cache, b, tq, tk, cross, dropout = self.saved()
        g = grad / self.rescale_output_factor if self.rescale_output_factor != 1.0 else grad
        dz = self.to_out[1].backward(g) if dropout else g
        do = self._split_heads(self.to_out[0].backward(dz), b, tq)  # (B, H, Tq, Dh)
        dq, dk, dv = attention_backward(do, cache)
        dctx = self.to_v.backward(self._merge_heads(dv, b, tk))
        dctx += self.to_k.backward(self._merge_heads(dk, b, tk))
        dx = self.to_q.backward(self._merge_heads(dq, b, tq))
        if self.residual_connection:
            dx += g
        if cross:
            return dx, dctx
        dx += dctx                                                  # x fed q, k and v
        return dx, None

    def extra_repr(self):
        return (f"query_dim={self.query_dim}, cross_attention_dim={self.cross_attention_dim}, "
                f"heads={self.heads}, dim_head={self.dim_head}")
