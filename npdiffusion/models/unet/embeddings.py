"""The U-Net's timestep conditioning: ``Timesteps`` (sinusoidal features) and ``TimestepEmbedding``
(the two-layer MLP ``linear_1`` -> SiLU -> ``linear_2``).

Shapes: B batch, C0 = num_channels (block_out_channels[0]), Te = time_embed_dim (4 * C0).
timesteps (B,) -> Timesteps -> t_emb (B, C0) float32 -> TimestepEmbedding -> emb (B, Te).

    t_emb = [cos(t f) | sin(t f)]  (flip_sin_to_cos),  f_i = exp(-ln(10000) i / (C0/2 - shift))
    emb   = linear_2(silu(linear_1(t_emb)))

Backward: d linear_2 -> silu' -> d linear_1 (docs/unet.md, "Timestep embedding"); the sinusoidal
features have no parameters and the (integer) timesteps get no gradient, so ``Timesteps`` has no
backward and ``TimestepEmbedding.backward`` returns d t_emb only for completeness.
State-dict keys as in diffusers: ``time_embedding.linear_1.{weight,bias}``, ``linear_2``.
Source mirrored: diffusers/models/embeddings.py (Timesteps, TimestepEmbedding).
"""
from __future__ import annotations

from npdiffusion.checks import check_input, check_positive_int
from npdiffusion.nn.linear import Linear
from npdiffusion.nn.module import Module
from npdiffusion.ops.activations import silu_backward, silu_forward
from npdiffusion.ops.embedding import timestep_embedding

ACT_FNS = ("silu", "swish")


def check_act_fn(owner: str, act_fn) -> str:
    """``act_fn`` if it is SiLU ("silu" or its alias "swish"), else a clear ValueError."""
    if act_fn not in ACT_FNS:
        raise ValueError(f"{owner}: act_fn must be one of {ACT_FNS} (SiLU, Stable Diffusion's activation), "
                         f"got {act_fn!r}")
    return act_fn


class Timesteps(Module):
    """Sinusoidal timestep features, diffusers' ``Timesteps``: timesteps (B,) -> (B, num_channels)
    float32 (``npdiffusion.ops.embedding.timestep_embedding``). No parameters, no backward."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool = True, downscale_freq_shift: float = 0.0,
                 scale: float = 1.0):
        super().__init__()
        self.num_channels = check_positive_int("num_channels", num_channels)
        self.flip_sin_to_cos = bool(flip_sin_to_cos)
        self.downscale_freq_shift = float(downscale_freq_shift)
        self.scale = float(scale)

    def forward(self, timesteps):
        return timestep_embedding(timesteps, self.num_channels, flip_sin_to_cos=self.flip_sin_to_cos,
                                  downscale_freq_shift=self.downscale_freq_shift, scale=self.scale)

    def extra_repr(self):
        return (f"num_channels={self.num_channels}, flip_sin_to_cos={self.flip_sin_to_cos}, "
                f"downscale_freq_shift={self.downscale_freq_shift}")


class TimestepEmbedding(Module):
    """``linear_1`` (in_channels -> time_embed_dim), SiLU, ``linear_2`` (time_embed_dim ->
    time_embed_dim): sample (B, in_channels) -> (B, time_embed_dim)."""

    def __init__(self, in_channels: int, time_embed_dim: int, act_fn: str = "silu"):
        super().__init__()
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.time_embed_dim = check_positive_int("time_embed_dim", time_embed_dim)
        self.act_fn = check_act_fn("TimestepEmbedding", act_fn)
        self.linear_1 = Linear(in_channels, time_embed_dim)
        self.linear_2 = Linear(time_embed_dim, time_embed_dim)

    def forward(self, sample):
        check_input("TimestepEmbedding", "sample", sample, ndim=2, axis=1, size=self.in_channels)
        a, cache = silu_forward(self.linear_1(sample))
        self.save_for_backward(cache)
        return self.linear_2(a)

    def backward(self, grad):
        """grad (B, time_embed_dim) -> d sample (B, in_channels); accumulates both layers' gradients."""
        return self.linear_1.backward(silu_backward(self.linear_2.backward(grad), self.saved()))

    def extra_repr(self):
        return f"in_channels={self.in_channels}, time_embed_dim={self.time_embed_dim}, act_fn={self.act_fn!r}"
