"""CLIP's pre-LayerNorm transformer: ``CLIPMLP``, ``CLIPEncoderLayer``, ``CLIPEncoder``.

Shapes: B batch, T tokens, D = hidden_size, I = intermediate_size, L = num_hidden_layers.

    CLIPMLP           x (B, T, D) -> fc2(act(fc1(x)))                        (B, T, D)
    CLIPEncoderLayer  h = x + self_attn(layer_norm1(x))
                      y = h + mlp(layer_norm2(h))                            (B, T, D)
    CLIPEncoder       hidden_states[0] = x, hidden_states[i + 1] = layers.i(hidden_states[i])

``act`` is ``hidden_act``: quick_gelu x sigmoid(1.702 x), gelu (erf) or its tanh approximation
(config.ACTIVATIONS). The encoder returns every hidden state (L + 1 of them, the input first), which
is what Stable Diffusion's clip skip reads, and can stop after the first ``num_layers`` layers.

Backward: the residual fan-in makes each layer's input gradient the sum of the skip and the
branch: dh = dy + layer_norm2'(mlp'(dy)), dx = dh + layer_norm1'(self_attn'(dh)).
Docs: docs/clip.md. Source mirrored: transformers/models/clip/modeling_clip.py.
"""
from __future__ import annotations

import functools
import inspect
import numbers

from npdiffusion.backend import xp
from npdiffusion.checks import check_input, check_positive_int
from npdiffusion.models.clip.attention import CLIPAttention
from npdiffusion.models.clip.config import ACTIVATIONS
from npdiffusion.nn.init import normal
from npdiffusion.nn.linear import Linear
from npdiffusion.nn.module import Module, ModuleList
from npdiffusion.nn.norm import LayerNorm
from npdiffusion.ops.activations import gelu_backward, gelu_forward, quick_gelu_backward, quick_gelu_forward


def keyword_backward(cls):
    """Class decorator: let ``cls.backward`` take its optional gradients by keyword.

    ``Module`` wraps every subclass's backward for gradient checkpointing with a wrapper that takes
    positional arguments only; this binds keywords to positions (defaults filled in) and then calls
    that wrapper, so checkpointing still applies.
    """
    wrapped = cls.__dict__["backward"]
    original = getattr(wrapped, "__wrapped__", wrapped)
    signature = inspect.signature(original)

    @functools.wraps(original)
    def backward(self, *args, **kwargs):
        if kwargs:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            args = bound.args[1:]
        return wrapped(self, *args)

    cls.backward = backward       # set after class creation, so Module does not wrap it again
    return cls


def check_grad(module, name, grad, shape):
    """Raise unless ``grad`` is None or a floating array of ``shape``."""
    if grad is None:
        return
    if not hasattr(grad, "shape") or not hasattr(grad, "dtype") or grad.dtype.kind != "f":
        raise TypeError(f"{module}: {name} must be a floating array or None, got "
                        f"{getattr(grad, 'dtype', type(grad).__name__)}")
    if tuple(grad.shape) != tuple(shape):
        raise ValueError(f"{module}: {name} must have shape {tuple(shape)}, got {tuple(grad.shape)}")


def check_hidden_grads(module, grads, count, had_states, shape):
    """``grads`` as a list of ``count`` arrays-or-None of ``shape``, or None; clear errors otherwise."""
    if grads is None:
        return None
    if not had_states:
        raise ValueError(f"{module}: grad_hidden_states needs a forward with output_hidden_states=True")
    if not isinstance(grads, (list, tuple)):
        raise TypeError(f"{module}: grad_hidden_states must be a list or tuple of arrays (or None), "
                        f"got {type(grads).__name__}")
    if len(grads) != count:
        raise ValueError(f"{module}: grad_hidden_states must hold {count} gradients (one per hidden state), "
                         f"got {len(grads)}")
    for i, g in enumerate(grads):
        check_grad(module, f"grad_hidden_states[{i}]", g, shape)
    return list(grads)


def check_no_attention_dropout(owner: str, tower) -> None:
    """A tower in training mode must have config.attention_dropout 0 (npdiffusion has none)."""
    if tower.training and tower.config.attention_dropout != 0.0:
        raise ValueError(f"{owner}: attention_dropout must be 0.0 in training mode (npdiffusion has no "
                         f"attention dropout), got {tower.config.attention_dropout}; set it to 0.0 or call eval()")


def tower_outputs(last, pooled, states, output_hidden_states: bool):
    """A tower's return value: ``(last, pooled)``, plus ``states`` when ``output_hidden_states``."""
    return (last, pooled, states) if output_hidden_states else (last, pooled)


def last_hidden_grad(owner: str, grad_last_hidden_state, grad_pooler_output, grad_hidden_states, shape,
                     had_states: bool, dtype):
    """The checked start of a tower's backward: a fresh (B, T, D) array holding the gradient of
    last_hidden_state (zeros when None), for the tower to add its pooler gradient into."""
    check_grad(owner, "grad_last_hidden_state", grad_last_hidden_state, shape)
    check_grad(owner, "grad_pooler_output", grad_pooler_output, (shape[0], shape[2]))
    if grad_hidden_states is not None and not had_states:
        raise ValueError(f"{owner}: grad_hidden_states needs a forward with output_hidden_states=True")
    if grad_last_hidden_state is None:
        return xp.zeros(shape, dtype=dtype)
    return grad_last_hidden_state.astype(dtype, copy=True)


class CLIPMLP(Module):
    """fc1 (D -> I), the activation named by ``hidden_act``, fc2 (I -> D)."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "quick_gelu"):
        super().__init__()
        if hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIPMLP: hidden_act must be one of {sorted(ACTIVATIONS)}, got {hidden_act!r}")
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.intermediate_size = check_positive_int("intermediate_size", intermediate_size)
        self.hidden_act = hidden_act
        self.fc1 = Linear(hidden_size, intermediate_size)
        self.fc2 = Linear(intermediate_size, hidden_size)

    def _act_forward(self, h):
        kind = ACTIVATIONS[self.hidden_act]
        if kind == "quick_gelu":
            return quick_gelu_forward(h)
        return gelu_forward(h, approximate="none" if kind == "erf" else "tanh")

    def forward(self, hidden_states):
        """hidden_states (..., D) -> (..., D)."""
        check_input("CLIPMLP", "hidden_states", hidden_states, min_ndim=1, axis=-1, size=self.hidden_size)
        a, cache = self._act_forward(self.fc1(hidden_states))
        self.save_for_backward(cache)
        return self.fc2(a)

    def backward(self, grad):
        cache = self.saved()
        da = self.fc2.backward(grad)
        dh = quick_gelu_backward(da, cache) if self.hidden_act == "quick_gelu" else gelu_backward(da, cache)
        return self.fc1.backward(dh)

    def extra_repr(self):
        return f"{self.hidden_size} -> {self.intermediate_size} -> {self.hidden_size}, act={self.hidden_act}"


class CLIPEncoderLayer(Module):
    """One pre-LN transformer layer: self-attention and MLP, each behind a LayerNorm and a skip."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_heads: int, hidden_act: str = "quick_gelu",
                 layer_norm_eps: float = 1e-5):
        super().__init__()
        self.embed_dim = check_positive_int("hidden_size", hidden_size)
        # attribute order = transformers' state-dict order
        self.self_attn = CLIPAttention(hidden_size, num_heads)
        self.layer_norm1 = LayerNorm(hidden_size, eps=layer_norm_eps)
        self.mlp = CLIPMLP(hidden_size, intermediate_size, hidden_act)
        self.layer_norm2 = LayerNorm(hidden_size, eps=layer_norm_eps)

    def forward(self, hidden_states, attention_mask=None, causal: bool = False):
        """hidden_states (B, T, D) -> (B, T, D), a fresh array (the input is left untouched)."""
        x = hidden_states
        check_input("CLIPEncoderLayer", "hidden_states", x, ndim=3, axis=-1, size=self.embed_dim)
        h = self.self_attn(self.layer_norm1(x), attention_mask, causal)    # fresh (out_proj's output)
        h += x
        y = self.mlp(self.layer_norm2(h))
        y += h
        self.save_for_backward(True)
        return y

    def backward(self, grad):
        """grad (B, T, D) -> d hidden_states (B, T, D), a fresh array."""
        self.saved()
        dh = self.layer_norm2.backward(self.mlp.backward(grad))
        dh += grad                                                          # skip around the MLP
        dx = self.layer_norm1.backward(self.self_attn.backward(dh))
        dx += dh                                                            # skip around attention
        return dx


@keyword_backward
class CLIPEncoder(Module):
    """``num_hidden_layers`` CLIPEncoderLayers, state-dict keys ``layers.N.*``."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_hidden_layers: int, num_heads: int,
                 hidden_act: str = "quick_gelu", layer_norm_eps: float = 1e-5):
        super().__init__()
        check_positive_int("num_hidden_layers", num_hidden_layers)
        self.layers = ModuleList([CLIPEncoderLayer(hidden_size, intermediate_size, num_heads, hidden_act,
                                                   layer_norm_eps) for _ in range(num_hidden_layers)])

    def forward(self, inputs_embeds, attention_mask=None, causal: bool = False, num_layers: int | None = None,
                output_hidden_states: bool = False):
        """inputs_embeds (B, T, D) -> ``(last_hidden_state, hidden_states)``.

        Runs the first ``num_layers`` layers (default all). ``hidden_states`` is the tuple of the
        input and every layer's output (num_layers + 1 arrays, the last one is last_hidden_state)
        when ``output_hidden_states``, else None. ``attention_mask`` and ``causal`` go to every
        layer's attention.
        """
        n = len(self.layers) if num_layers is None else num_layers
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 0 <= n <= len(self.layers):
            raise ValueError(f"CLIPEncoder: num_layers must be an int in [0, {len(self.layers)}] or None, "
                             f"got {num_layers!r}")
        h = inputs_embeds
        states = [h]
        for layer in self.layers[:n]:
            h = layer(h, attention_mask, causal)
            states.append(h)
        self.save_for_backward(int(n), bool(output_hidden_states), tuple(inputs_embeds.shape))
        return h, (tuple(states) if output_hidden_states else None)

    def backward(self, grad, grad_hidden_states=None):
        """grad (B, T, D) of last_hidden_state (or None) -> d inputs_embeds (B, T, D).

        ``grad_hidden_states``: after an ``output_hidden_states`` forward, a sequence of
        num_layers + 1 gradients (arrays or None), one per hidden state; each is added where its
        state entered the stack (the last one adds to ``grad``).
        """
        n, had_states, shape = self.saved()
        check_grad("CLIPEncoder", "grad", grad, shape)
        state_grads = check_hidden_grads("CLIPEncoder", grad_hidden_states, n + 1, had_states, shape)
        if state_grads is None:
            state_grads = [None] * (n + 1)
        g, fresh = grad, False
        if state_grads[n] is not None:
            g, fresh = (state_grads[n], False) if g is None else (g + state_grads[n], True)
        for i in range(n - 1, -1, -1):
            if g is not None:
                g, fresh = self.layers[i].backward(g), True
                if state_grads[i] is not None:
                    g += state_grads[i]
            elif state_grads[i] is not None:     # nothing came from above this state: start here
                g, fresh = state_grads[i], False
        if g is None:
            return None
        return g if fresh else g.copy()


def init_encoder_weights_(encoder: CLIPEncoder, factor: float = 1.0) -> None:
    """transformers' CLIP initialization of an encoder, in place (drawn on the host).

    With D = hidden_size and L = the number of layers: q/k/v_proj weights N(0, (D^-1/2 (2L)^-1/2 f)^2),
    out_proj N(0, (D^-1/2 f)^2), fc1 N(0, ((2D)^-1/2 f)^2), fc2 N(0, (D^-1/2 (2L)^-1/2 f)^2), every
    bias zero, LayerNorms one and zero (``f`` = initializer_factor).
    """
    layers = list(encoder.layers)
    d = layers[0].embed_dim
    in_std = d ** -0.5 * (2 * len(layers)) ** -0.5 * factor
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        for lin, std in ((attn.q_proj, in_std), (attn.k_proj, in_std), (attn.v_proj, in_std),
                         (attn.out_proj, d ** -0.5 * factor), (mlp.fc1, (2 * d) ** -0.5 * factor),
                         (mlp.fc2, in_std)):
            lin.weight = normal(lin.weight.shape, std=std, dtype=lin.weight.dtype)
            lin.bias = xp.zeros_like(lin.bias)
