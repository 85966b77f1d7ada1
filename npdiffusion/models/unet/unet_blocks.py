"""The U-Net's stages: down blocks, the middle block and up blocks, with the skip bookkeeping.

Shapes: B batch, Ci / Co in / out channels of a block, Cp the channels coming from the previous
(deeper) up block, H x W the block's input size, Te temb channels, Tc context tokens, Cc context
width. "States" are the skip tensors a down block hands to the up path.

    DownBlock2D / CrossAttnDownBlock2D      x (B, Ci, H, W) -> h, states
        for each layer: h = resnet(h, temb) [; h = attention(h, ctx)]; states += (h,)
        if downsampler:  h = downsample(h) (B, Co, H/2, W/2);            states += (h,)
    UNetMidBlock2DCrossAttn                 x (B, C, H, W) -> resnet, then (attention, resnet) pairs
    UpBlock2D / CrossAttnUpBlock2D          h (B, Cp, H, W), states -> (B, Co, 2H, 2W)
        for each layer: h = cat([h, states.pop()], channels); h = resnet(h, temb) [; attention]
        if upsampler:    h = upsample(h [, output_size])

Backward (docs/unet.md, "Skip connections"): the last state of a down block is its output, so its
gradient is the sum of the gradient from the next stage and the skip gradient from the up path; a
concatenation's gradient splits along channels into the branch and the skip. Each block's backward
returns a ``BlockGrads`` (down and mid blocks) or ``UpBlockGrads`` (up blocks): the input gradient,
d temb and d ctx summed over every resnet / attention in it (None where nothing read them).

State-dict keys as in diffusers: resnets.{j}, attentions.{j}, downsamplers.0.conv, upsamplers.0.conv.
Source mirrored: diffusers/models/unets/unet_2d_blocks.py.
"""
from __future__ import annotations

from typing import NamedTuple

from npdiffusion.backend import xp
from npdiffusion.checks import check_positive_int
from npdiffusion.models.blocks.resnet import ResnetBlock2D
from npdiffusion.models.blocks.sampling import Downsample2D, Upsample2D
from npdiffusion.models.unet.embeddings import check_act_fn
from npdiffusion.models.unet.transformer_2d import Transformer2DModel
from npdiffusion.nn.module import Module, ModuleList


def _add(a, b):
    """a + b where either may be None (no gradient); a new array when both exist."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _per_layer(name: str, value, num_layers: int) -> list:
    """An int for every layer, or a list with one int per layer, as a list of positive ints."""
    values = [value] * num_layers if isinstance(value, int) and not isinstance(value, bool) else list(value)
    if len(values) != num_layers:
        raise ValueError(f"{name} must be an int or have one entry per layer ({num_layers}), got {value!r}")
    return [check_positive_int(name, v) for v in values]


def _heads(block: str, channels: int, num_attention_heads: int) -> int:
    check_positive_int("num_attention_heads", num_attention_heads)
    if channels % num_attention_heads:
        raise ValueError(f"{block}: the {channels} channels must split evenly into num_attention_heads="
                         f"{num_attention_heads} heads")
    return channels // num_attention_heads


def _transformers(block: str, channels: int, num_attention_heads: int, transformer_layers_per_block,
                  num_layers: int, resnet_groups: int, **options) -> ModuleList:
    """``num_layers`` Transformer2DModels over ``channels`` (heads of width channels / heads), the k-th
    with transformer_layers_per_block[k] BasicTransformerBlocks; ``options`` (dropout,
    cross_attention_dim, use_linear_projection, only_cross_attention, upcast_attention) go to each."""
    layers = _per_layer("transformer_layers_per_block", transformer_layers_per_block, num_layers)
    head_dim = _heads(block, channels, num_attention_heads)
    return ModuleList([Transformer2DModel(num_attention_heads, head_dim, in_channels=channels, num_layers=n,
                                          norm_num_groups=resnet_groups, **options) for n in layers])


class BlockGrads(NamedTuple):
    """A down or mid block's backward: the gradients of ``forward(hidden_states, temb,
    encoder_hidden_states)``'s inputs (None for one no resnet / attention of the block read)."""
    hidden_states: object
    temb: object
    encoder_hidden_states: object


class UpBlockGrads(NamedTuple):
    """An up block's backward: the gradients of ``forward(hidden_states, res_hidden_states_tuple,
    temb, encoder_hidden_states)``'s inputs (encoder_hidden_states None in an UpBlock2D)."""
    hidden_states: object
    res_hidden_states_tuple: tuple
    temb: object
    encoder_hidden_states: object


class _DownBase(Module):
    """Shared forward/backward of DownBlock2D and CrossAttnDownBlock2D."""

    has_cross_attention = False

    def _build_resnets(self, in_channels, out_channels, temb_channels, num_layers, resnet_groups, resnet_eps,
                       dropout, output_scale_factor):
        self.resnets = ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=temb_channels,
                          groups=resnet_groups, eps=resnet_eps, dropout=dropout,
                          output_scale_factor=output_scale_factor)
            for i in range(num_layers)
        ])

    def _build_down(self, out_channels, add_downsample, downsample_padding):
        if add_downsample:
            self.downsamplers = ModuleList([Downsample2D(out_channels, use_conv=True, out_channels=out_channels,
                                                         padding=downsample_padding)])
        self.add_downsample = bool(add_downsample)

    def forward(self, hidden_states, temb=None, encoder_hidden_states=None):
        """hidden_states (B, Ci, H, W), temb (B, Te), encoder_hidden_states (B, Tc, Cc) (cross-attention
        blocks) -> (h, states): h (B, Co, H', W') and the tuple of skip states (the last one is h)."""
        h = hidden_states
        states = []
        attentions = list(self.attentions) if self.has_cross_attention else [None] * len(self.resnets)
        for resnet, attn in zip(self.resnets, attentions):
            h = resnet(h, temb)
            if attn is not None:
                h = attn(h, encoder_hidden_states)
            states.append(h)
        if self.add_downsample:
            h = self.downsamplers[0](h)
            states.append(h)
        return h, tuple(states)

    def backward(self, grad, state_grads=None):
        """grad (B, Co, H', W') of h and ``state_grads`` (one gradient or None per state) ->
        ``BlockGrads(dx, d temb, d ctx)``, d temb / d ctx summed over the block's resnets /
        attentions."""
        n = len(self.resnets)
        n_states = n + (1 if self.add_downsample else 0)
        if state_grads is None:
            state_grads = [None] * n_states
        if len(state_grads) != n_states:
            raise ValueError(f"{type(self).__name__}.backward: state_grads must hold one gradient (or None) per "
                             f"skip state ({n_states}), got {len(state_grads)}")
        g = grad
        g_is_ours = False                     # may g be added to in place (not the caller's grad)?
        if self.add_downsample:
            g = self.downsamplers[0].backward(_add(g, state_grads[n]))
            g_is_ours = True
        dtemb = dctx = None
        attentions = list(self.attentions) if self.has_cross_attention else [None] * n
        for i in reversed(range(n)):
            if state_grads[i] is not None:
                if g_is_ours:
                    g += state_grads[i]
                else:
                    g = g + state_grads[i]
            if attentions[i] is not None:
                g, dc = attentions[i].backward(g)
                dctx = _add(dctx, dc)
            g, dt = self.resnets[i].backward(g)
            dtemb = _add(dtemb, dt)
            g_is_ours = True
        return BlockGrads(g, dtemb, dctx)


class DownBlock2D(_DownBase):
    """``num_layers`` ResnetBlock2Ds, then an optional stride-2 downsampler (see the module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, dropout: float = 0.0,
                 num_layers: int = 1, resnet_eps: float = 1e-6, resnet_act_fn: str = "swish",
                 resnet_groups: int = 32, output_scale_factor: float = 1.0, add_downsample: bool = True,
                 downsample_padding: int = 1):
        super().__init__()
        check_act_fn("DownBlock2D", resnet_act_fn)
        check_positive_int("num_layers", num_layers)
        self._build_resnets(in_channels, out_channels, temb_channels, num_layers, resnet_groups, resnet_eps,
                            dropout, output_scale_factor)
        self._build_down(out_channels, add_downsample, downsample_padding)


class CrossAttnDownBlock2D(_DownBase):
    """``num_layers`` (ResnetBlock2D, Transformer2DModel) pairs, then an optional downsampler.

    ``num_attention_heads`` heads of width out_channels / heads (diffusers' U-Net calls this count
    ``attention_head_dim``); ``transformer_layers_per_block``: an int or one per layer.
    """

    has_cross_attention = True

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, dropout: float = 0.0,
                 num_layers: int = 1, transformer_layers_per_block=1, resnet_eps: float = 1e-6,
                 resnet_act_fn: str = "swish", resnet_groups: int = 32, num_attention_heads: int = 1,
                 cross_attention_dim: int = 1280, output_scale_factor: float = 1.0, downsample_padding: int = 1,
                 add_downsample: bool = True, use_linear_projection: bool = False,
                 only_cross_attention: bool = False, upcast_attention: bool = False):
        super().__init__()
        check_act_fn("CrossAttnDownBlock2D", resnet_act_fn)
        check_positive_int("num_layers", num_layers)
        self._build_resnets(in_channels, out_channels, temb_channels, num_layers, resnet_groups, resnet_eps,
                            dropout, output_scale_factor)
        self.attentions = _transformers(
            "CrossAttnDownBlock2D", out_channels, num_attention_heads, transformer_layers_per_block, num_layers,
            resnet_groups, dropout=dropout, cross_attention_dim=cross_attention_dim,
            use_linear_projection=use_linear_projection, only_cross_attention=only_cross_attention,
            upcast_attention=upcast_attention)
        self._build_down(out_channels, add_downsample, downsample_padding)


class UNetMidBlock2DCrossAttn(Module):
    """resnets.0, then ``num_layers`` (Transformer2DModel, ResnetBlock2D) pairs, all at in_channels:
    x (B, C, H, W), temb (B, Te), ctx (B, Tc, Cc) -> (B, C, H, W)."""

    has_cross_attention = True

    def __init__(self, in_channels: int, temb_channels: int | None, dropout: float = 0.0, num_layers: int = 1,
                 transformer_layers_per_block=1, resnet_eps: float = 1e-6, resnet_act_fn: str = "swish",
                 resnet_groups: int | None = 32, num_attention_heads: int = 1, output_scale_factor: float = 1.0,
                 cross_attention_dim: int = 1280, use_linear_projection: bool = False,
                 upcast_attention: bool = False):
        super().__init__()
        check_act_fn("UNetMidBlock2DCrossAttn", resnet_act_fn)
        check_positive_int("num_layers", num_layers)
        resnet_groups = resnet_groups if resnet_groups is not None else min(in_channels // 4, 32)

        def resnet():
            return ResnetBlock2D(in_channels, in_channels, temb_channels=temb_channels, groups=resnet_groups,
                                 eps=resnet_eps, dropout=dropout, output_scale_factor=output_scale_factor)

        self.attentions = _transformers(
            "UNetMidBlock2DCrossAttn", in_channels, num_attention_heads, transformer_layers_per_block, num_layers,
            resnet_groups, dropout=dropout, cross_attention_dim=cross_attention_dim,
            use_linear_projection=use_linear_projection, upcast_attention=upcast_attention)
        self.resnets = ModuleList([resnet() for _ in range(num_layers + 1)])

    def forward(self, hidden_states, temb=None, encoder_hidden_states=None):
        h = self.resnets[0](hidden_states, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            h = attn(h, encoder_hidden_states)
            h = resnet(h, temb)
        return h

    def backward(self, grad):
        """grad (B, C, H, W) -> ``BlockGrads(dx, d temb, d ctx)``."""
        g, dtemb, dctx = grad, None, None
        for attn, resnet in reversed(list(zip(self.attentions, self.resnets[1:]))):
            g, dt = resnet.backward(g)
            dtemb = _add(dtemb, dt)
            g, dc = attn.backward(g)
            dctx = _add(dctx, dc)
        g, dt = self.resnets[0].backward(g)
        dtemb = _add(dtemb, dt)
        return BlockGrads(g, dtemb, dctx)


class _UpBase(Module):
    """Shared forward/backward of UpBlock2D and CrossAttnUpBlock2D."""

    has_cross_attention = False

    def _build_resnets(self, in_channels, prev_output_channel, out_channels, temb_channels, num_layers,
                       resnet_groups, resnet_eps, dropout, output_scale_factor, add_upsample):
        resnets = []
        for i in range(num_layers):
            res_skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in_channels = prev_output_channel if i == 0 else out_channels
            resnets.append(ResnetBlock2D(resnet_in_channels + res_skip_channels, out_channels,
                                         temb_channels=temb_channels, groups=resnet_groups, eps=resnet_eps,
                                         dropout=dropout, output_scale_factor=output_scale_factor))
        self.resnets = ModuleList(resnets)
        if add_upsample:
            self.upsamplers = ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)])
        self.add_upsample = bool(add_upsample)

    def forward(self, hidden_states, res_hidden_states_tuple, temb=None, encoder_hidden_states=None,
                upsample_size=None):
        """hidden_states (B, Cp, H, W), res_hidden_states_tuple (one skip state per resnet, consumed from
        the end), temb (B, Te), encoder_hidden_states (B, Tc, Cc) (cross-attention blocks),
        upsample_size (Ho, Wo) or None -> (B, Co, 2H, 2W) or (B, Co, Ho, Wo)."""
        n = len(self.resnets)
        if len(res_hidden_states_tuple) != n:
            raise ValueError(f"{type(self).__name__}: res_hidden_states_tuple must hold {n} skip states (one per "
                             f"resnet), got {len(res_hidden_states_tuple)}")
        h = hidden_states
        split = []
        attentions = list(self.attentions) if self.has_cross_attention else [None] * n
        for i, (resnet, attn) in enumerate(zip(self.resnets, attentions)):
            skip = res_hidden_states_tuple[n - 1 - i]
            if skip.shape[0] != h.shape[0] or skip.shape[2:] != h.shape[2:]:
                raise ValueError(f"{type(self).__name__}: skip state {n - 1 - i} has shape {tuple(skip.shape)}, "
                                 f"which does not match the hidden state {tuple(h.shape)} outside the channels")
            split.append(h.shape[1])
            h = resnet(xp.concatenate([h, skip], axis=1), temb)          # (B, C_h + C_skip, H, W)
            if attn is not None:
                h = attn(h, encoder_hidden_states)
        if self.add_upsample:
            h = self.upsamplers[0](h, upsample_size)
        self.save_for_backward(split)
        return h

    def backward(self, grad):
        """grad of the output -> ``UpBlockGrads(dh, d states, d temb, d ctx)``: d states in the order
        of ``res_hidden_states_tuple`` (views into the concatenations' gradients)."""
        split = self.saved()
        n = len(self.resnets)
        g = self.upsamplers[0].backward(grad) if self.add_upsample else grad
        attentions = list(self.attentions) if self.has_cross_attention else [None] * n
        dstates = [None] * n
        dtemb = dctx = None
        for i in reversed(range(n)):
            if attentions[i] is not None:
                g, dc = attentions[i].backward(g)
                dctx = _add(dctx, dc)
            dcat, dt = self.resnets[i].backward(g)
            dtemb = _add(dtemb, dt)
            g, dstates[n - 1 - i] = dcat[:, :split[i]], dcat[:, split[i]:]
        return UpBlockGrads(g, tuple(dstates), dtemb, dctx)


class UpBlock2D(_UpBase):
    """``num_layers`` (skip concatenation, ResnetBlock2D) steps, then an optional nearest x2 upsampler."""

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int | None,
                 dropout: float = 0.0, num_layers: int = 1, resnet_eps: float = 1e-6, resnet_act_fn: str = "swish",
                 resnet_groups: int = 32, output_scale_factor: float = 1.0, add_upsample: bool = True):
        super().__init__()
        check_act_fn("UpBlock2D", resnet_act_fn)
        check_positive_int("num_layers", num_layers)
        self._build_resnets(in_channels, prev_output_channel, out_channels, temb_channels, num_layers,
                            resnet_groups, resnet_eps, dropout, output_scale_factor, add_upsample)

    def forward(self, hidden_states, res_hidden_states_tuple, temb=None, upsample_size=None):
        return super().forward(hidden_states, res_hidden_states_tuple, temb, None, upsample_size)


class CrossAttnUpBlock2D(_UpBase):
    """``num_layers`` (skip concatenation, ResnetBlock2D, Transformer2DModel) steps, then an optional
    upsampler. Heads and transformer layers as in CrossAttnDownBlock2D."""

    has_cross_attention = True

    def __init__(self, in_channels: int, out_channels: int, prev_output_channel: int, temb_channels: int | None,
                 dropout: float = 0.0, num_layers: int = 1, transformer_layers_per_block=1,
                 resnet_eps: float = 1e-6, resnet_act_fn: str = "swish", resnet_groups: int = 32,
                 num_attention_heads: int = 1, cross_attention_dim: int = 1280, output_scale_factor: float = 1.0,
                 add_upsample: bool = True, use_linear_projection: bool = False, only_cross_attention: bool = False,
                 upcast_attention: bool = False):
        super().__init__()
        check_act_fn("CrossAttnUpBlock2D", resnet_act_fn)
        check_positive_int("num_layers", num_layers)
        self._build_resnets(in_channels, prev_output_channel, out_channels, temb_channels, num_layers,
                            resnet_groups, resnet_eps, dropout, output_scale_factor, add_upsample)
        self.attentions = _transformers(
            "CrossAttnUpBlock2D", out_channels, num_attention_heads, transformer_layers_per_block, num_layers,
            resnet_groups, dropout=dropout, cross_attention_dim=cross_attention_dim,
            use_linear_projection=use_linear_projection, only_cross_attention=only_cross_attention,
            upcast_attention=upcast_attention)

    def forward(self, hidden_states, res_hidden_states_tuple, temb=None, encoder_hidden_states=None,
                upsample_size=None):
        return super().forward(hidden_states, res_hidden_states_tuple, temb, encoder_hidden_states, upsample_size)
