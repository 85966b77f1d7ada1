"""diffusers' transformer feed-forward: ``FeedForward`` with its ``GEGLU`` / ``GELU`` input layers.

Shapes: x (..., dim) -> (..., dim_out); I = inner_dim = dim * mult.

    FeedForward:  net.0 (GEGLU or GELU: dim -> I), net.1 (Dropout, no parameters),
                  net.2 (Linear I -> dim_out), net.3 (Dropout, with final_dropout)
    GEGLU:        proj (Linear dim -> 2I), then value * GELU_erf(gate) on [value | gate] (ops/geglu.py)
    GELU:         proj (Linear dim -> I), then GELU (erf, or tanh with approximate="tanh")

State-dict keys as in diffusers: ``net.0.proj.weight``, ``net.0.proj.bias``, ``net.2.weight``,
``net.2.bias``. Derivations: docs/ops/attention.md (GEGLU), docs/ops/activations.md (GELU).
Source mirrored: diffusers/models/attention.py (FeedForward), diffusers/models/activations.py.
"""
from __future__ import annotations

from npdiffusion.checks import check_input, check_positive_int
from npdiffusion.nn.dropout import Dropout
from npdiffusion.nn.linear import Linear
from npdiffusion.nn.module import Module, ModuleList
from npdiffusion.ops.activations import gelu_backward, gelu_forward
from npdiffusion.ops.geglu import geglu_backward, geglu_forward


class GEGLU(Module):
    """``proj`` (dim_in -> 2 dim_out), then value * GELU_erf(gate). x (..., dim_in) -> (..., dim_out)."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True):
        super().__init__()
        self.dim_in = check_positive_int("dim_in", dim_in)
        self.dim_out = check_positive_int("dim_out", dim_out)
        self.proj = Linear(dim_in, 2 * dim_out, bias=bias)

    def forward(self, hidden_states):
        check_input("GEGLU", "hidden_states", hidden_states, min_ndim=1, axis=-1, size=self.dim_in)
        y, cache = geglu_forward(self.proj(hidden_states))
        self.save_for_backward(cache)
        return y

    def backward(self, grad):
        return self.proj.backward(geglu_backward(grad, self.saved()))

    def extra_repr(self):
        return f"dim_in={self.dim_in}, dim_out={self.dim_out}"


class GELU(Module):
    """``proj`` (dim_in -> dim_out), then GELU (``approximate`` "none" = erf, or "tanh")."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "none", bias: bool = True):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.dim_in = check_positive_int("dim_in", dim_in)
        self.dim_out = check_positive_int("dim_out", dim_out)
        self.approximate = approximate
        self.proj = Linear(dim_in, dim_out, bias=bias)

    def forward(self, hidden_states):
        check_input("GELU", "hidden_states", hidden_states, min_ndim=1, axis=-1, size=self.dim_in)
        y, cache = gelu_forward(self.proj(hidden_states), approximate=self.approximate)
        self.save_for_backward(cache)
        return y

    def backward(self, grad):
        return self.proj.backward(gelu_backward(grad, self.saved()))

    def extra_repr(self):
        return f"dim_in={self.dim_in}, dim_out={self.dim_out}, approximate={self.approximate!r}"


ACTIVATIONS = ("geglu", "gelu", "gelu-approximate")


class FeedForward(Module):
    """net.0 (GEGLU / GELU), net.1 (dropout), net.2 (Linear). x (..., dim) -> (..., dim_out).

    ``activation_fn``: "geglu" (Stable Diffusion), "gelu" or "gelu-approximate" (tanh GELU).
    ``dropout``: the probability of ``net.1`` (and of ``net.3`` with ``final_dropout``), active in
    training mode; a dropout layer with p = 0 is skipped (no copy in forward or backward).
    """

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, dropout: float = 0.0,
                 activation_fn: str = "geglu", final_dropout: bool = False, inner_dim: int | None = None,
                 bias: bool = True):
        super().__init__()
        check_positive_int("dim", dim)
        if inner_dim is None:
            if isinstance(mult, bool) or not isinstance(mult, (int, float)) or mult <= 0:
                raise ValueError(f"mult must be a positive number, got {mult!r}")
            inner_dim = int(dim * mult)
        check_positive_int("inner_dim", inner_dim)
        dim_out = dim if dim_out is None else check_positive_int("dim_out", dim_out)
        if activation_fn == "geglu":
            act = GEGLU(dim, inner_dim, bias=bias)
        elif activation_fn == "gelu":
            act = GELU(dim, inner_dim, bias=bias)
        elif activation_fn == "gelu-approximate":
            act = GELU(dim, inner_dim, approximate="tanh", bias=bias)
        else:
            raise ValueError(f"activation_fn must be one of {ACTIVATIONS}, got {activation_fn!r}")
        self.dim, self.dim_out, self.inner_dim = dim, dim_out, inner_dim
        self.activation_fn = activation_fn
        layers = [act, Dropout(dropout), Linear(inner_dim, dim_out, bias=bias)]
        if final_dropout:
            layers.append(Dropout(dropout))
        self.net = ModuleList(layers)

    def forward(self, hidden_states):
        check_input("FeedForward", "hidden_states", hidden_states, min_ndim=1, axis=-1, size=self.dim)
        active = [m for m in self.net if not (isinstance(m, Dropout) and (m.p == 0.0 or not self.training))]
        h = hidden_states
        for layer in active:
            h = layer(h)
        self.save_for_backward(active)
        return h

    def backward(self, grad):
        for layer in reversed(self.saved()):
            grad = layer.backward(grad)
        return grad

    def extra_repr(self):
        return f"dim={self.dim}, dim_out={self.dim_out}, inner_dim={self.inner_dim}, activation_fn={self.activation_fn!r}"
