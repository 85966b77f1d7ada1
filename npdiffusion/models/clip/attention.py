"""``CLIPAttention``: transformers' CLIP self-attention (biased q/k/v/out projections, optional causal
and additive masks), with its hand-written backward.

Shapes: B batch, T tokens, D = hidden_size, H heads, Dh = D / H head width.
hidden_states (B, T, D) -> (B, T, D).

    q = q_proj(x), k = k_proj(x), v = v_proj(x)          (B, T, D) -> (B, H, T, Dh)
    o = softmax(q k^T / sqrt(Dh) + mask [+ causal]) v      ops/attention.py
    y = out_proj(o merged back to (B, T, D))

The causal mask removes every key j > query i (the text tower); the vision tower uses none.
float16 scores and softmax are computed in float32 (transformers' ``softmax(dtype=float32)``).
State-dict keys as in transformers, in its order: ``k_proj``, ``v_proj``, ``q_proj``, ``out_proj``
(``.weight`` and ``.bias`` each).
Derivation of the masked attention backward: docs/clip.md ("Causal masked attention") and
docs/ops/attention.md. Source mirrored: transformers/models/clip/modeling_clip.py (CLIPAttention).
"""
from __future__ import annotations

from npdiffusion.checks import check_input, check_positive_int
from npdiffusion.nn.linear import Linear
from npdiffusion.nn.module import Module
from npdiffusion.ops.attention import attention_backward, attention_forward


class CLIPAttention(Module):
    """Multi-head self-attention of width ``hidden_size`` with ``num_heads`` heads (all four
    projections biased). ``forward(x, attention_mask=None, causal=False)``."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.embed_dim = check_positive_int("hidden_size", hidden_size)
        self.num_heads = check_positive_int("num_heads", num_heads)
        if hidden_size % num_heads:
            raise ValueError(f"CLIPAttention: hidden_size ({hidden_size}) must be a multiple of "
                             f"num_heads ({num_heads})")
        self.head_dim = hidden_size // num_heads
        self.scale = float(self.head_dim) ** -0.5
        self.k_proj = Linear(hidden_size, hidden_size)
        self.v_proj = Linear(hidden_size, hidden_size)
        self.q_proj = Linear(hidden_size, hidden_size)
        self.out_proj = Linear(hidden_size, hidden_size)

    def _split(self, t, b, n):
        """(B, T, D) -> (B, H, T, Dh), a view."""
        return t.reshape(b, n, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

    def _merge(self, t, b, n):
        """(B, H, T, Dh) -> (B, T, D)."""
        return t.transpose(0, 2, 1, 3).reshape(b, n, self.embed_dim)

    def forward(self, hidden_states, attention_mask=None, causal: bool = False):
        """hidden_states (B, T, D) -> (B, T, D).

        ``attention_mask``: an additive float mask broadcastable to (B, H, T, T) (``-inf`` or a
        large negative number removes a key), or None. ``causal``: also remove keys j > i.
        """
        x = hidden_states
        check_input("CLIPAttention", "hidden_states", x, ndim=3, axis=-1, size=self.embed_dim)
        b, t, _ = x.shape
        q = self._split(self.q_proj(x), b, t)                   # (B, H, T, Dh)
        k = self._split(self.k_proj(x), b, t)
        v = self._split(self.v_proj(x), b, t)
        o, cache = attention_forward(q, k, v, mask=attention_mask, causal=causal, scale=self.scale)
        y = self.out_proj(self._merge(o, b, t))                 # (B, T, D)
        self.save_for_backward(cache, b, t)
        return y

    def backward(self, grad):
        """grad (B, T, D) -> d hidden_states (B, T, D) (the sum of the q, k and v paths)."""
        cache, b, t = self.saved()
        do = self._split(self.out_proj.backward(grad), b, t)    # (B, H, T, Dh)
        dq, dk, dv = attention_backward(do, cache)
        dx = self.q_proj.backward(self._merge(dq, b, t))
        dx += self.k_proj.backward(self._merge(dk, b, t))
        dx += self.v_proj.backward(self._merge(dv, b, t))
        return dx

    def extra_repr(self):
        return f"hidden_size={self.embed_dim}, num_heads={self.num_heads}"
