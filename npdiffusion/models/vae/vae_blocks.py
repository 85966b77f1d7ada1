"""The VAE's blocks: ``MidBlockAttention``, ``UNetMidBlock2D``, ``DownEncoderBlock2D``, ``UpDecoderBlock2D``.

Shapes: B batch, C channels, Ci / Co in / out channels, H x W the spatial size, T = H*W tokens,
Ct temb_channels.

* ``MidBlockAttention`` (diffusers' ``Attention`` built with ``norm_num_groups``, ``bias=True``,
  ``residual_connection=True``, ``_from_deprecated_attn_block=True``): x (B, C, H, W) ->
  group_norm -> tokens (B, T, C) -> self-attention (heads = C / attention_head_dim, one head in the
  VAE) -> back to (B, C, H, W) -> (+ x) / rescale_output_factor.
* ``UNetMidBlock2D``: resnets[0], then (attentions[i], resnets[i + 1]) for each layer; C -> C.
* ``DownEncoderBlock2D``: num_layers ResnetBlock2D (Ci -> Co, then Co -> Co), then an optional
  ``Downsample2D`` (the VAE uses padding 0: pad right/bottom by one, 3x3 conv, stride 2):
  (B, Ci, H, W) -> (B, Co, floor(H/2), floor(W/2)).
* ``UpDecoderBlock2D``: num_layers ResnetBlock2D, then an optional ``Upsample2D`` (nearest x2,
  3x3 conv): (B, Ci, H, W) -> (B, Co, 2H, 2W).

Backwards run the children's backwards in reverse order; residual fan-in adds. Derivations and
the architecture with shapes: docs/vae.md. Source mirrored: diffusers/models/unets/unet_2d_blocks.py
(UNetMidBlock2D, DownEncoderBlock2D, UpDecoderBlock2D) and attention_processor.py (AttnProcessor2_0).
State-dict keys equal diffusers'.
"""
from __future__ import annotations

from npdiffusion.checks import check_input, check_positive_int
from npdiffusion.models.blocks.resnet import ResnetBlock2D
from npdiffusion.models.blocks.sampling import Downsample2D, Upsample2D
from npdiffusion.nn.attention import Attention
from npdiffusion.nn.module import Module, ModuleList
from npdiffusion.nn.norm import GroupNorm


def _check_num_layers(name, n):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name}: num_layers must be a positive int, got {n!r}")
    return n


class MidBlockAttention(Attention):
    """Spatial self-attention of the VAE mid-block: x (B, C, H, W) -> (B, C, H, W).

        t  = group_norm(x) viewed as tokens (B, T, C)
        a  = to_out.0(softmax(to_q(t) to_k(t)^T / sqrt(Dh)) to_v(t))     (B, T, C), ``Attention``
        y  = (a viewed as (B, C, H, W) + x) / rescale_output_factor

    The residual adds the input *before* the group norm (diffusers' AttnProcessor2_0), so the
    parent ``Attention`` runs without its own residual and divides by ``rescale_output_factor``;
    the residual branch adds x / rescale_output_factor here. Keys: ``group_norm``, ``to_q``,
    ``to_k``, ``to_v`` (biased), ``to_out.0``; legacy checkpoints name them query / key / value /
    proj_attn (renamed by ``AutoencoderKL.from_pretrained``, see ``LEGACY_NAMES``).
    """

    #: diffusers' renames for attention blocks saved before the Attention refactor
    #: (ModelMixin._fix_state_dict_keys_on_load): old suffix -> new suffix.
    LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

    def __init__(self, channels: int, attention_head_dim: int | None = None, norm_num_groups: int | None = 32,
                 eps: float = 1e-6, rescale_output_factor: float = 1.0, chunk_size: int | None = None):
        check_positive_int("channels", channels)
        head_dim = channels if attention_head_dim is None else check_positive_int("attention_head_dim",
                                                                                  attention_head_dim)
        if channels % head_dim:
            raise ValueError(f"MidBlockAttention: channels ({channels}) must be divisible by attention_head_dim "
                             f"({head_dim})")
        super().__init__(channels, heads=channels // head_dim, dim_head=head_dim, bias=True, out_bias=True,
                         upcast_softmax=True, residual_connection=False,
                         rescale_output_factor=rescale_output_factor, chunk_size=chunk_size)
        self.channels = channels
        self.has_group_norm = norm_num_groups is not None
        if self.has_group_norm:
            self.group_norm = GroupNorm(norm_num_groups, channels, eps=eps)
            self._modules.move_to_end("group_norm", last=False)      # diffusers' key order

    def forward(self, x):
        """x (B, C, H, W) -> (B, C, H, W). The children (group_norm, to_q...) keep the caches."""
        check_input("MidBlockAttention", "x", x, ndim=4, axis=1, size=self.channels)
        b, c, h, w = x.shape
        n = self.group_norm(x) if self.has_group_norm else x
        tokens = n.reshape(b, c, h * w).transpose(0, 2, 1)            # (B, T, C) view
        a = Attention.forward(self, tokens)                           # (B, T, C) / rescale, fresh
        y = a.transpose(0, 2, 1).reshape(b, c, h, w)                  # (B, C, H, W), a copy
        if self.rescale_output_factor != 1.0:
            y += x / self.rescale_output_factor
        else:
            y += x
        return y

    def backward(self, grad):
        """grad (B, C, H, W) -> dx (B, C, H, W); accumulates every parameter gradient.

        dx = group_norm'(Attention'(grad as tokens)) + grad / rescale_output_factor."""
        b, c, h, w = grad.shape
        dtokens, _ = Attention.backward(self, grad.reshape(b, c, h * w).transpose(0, 2, 1))   # (B, T, C)
        dn = dtokens.transpose(0, 2, 1).reshape(b, c, h, w)
        dx = self.group_norm.backward(dn) if self.has_group_norm else dn     # dn is fresh
        dx += grad / self.rescale_output_factor if self.rescale_output_factor != 1.0 else grad
        return dx

    def extra_repr(self):
        return f"channels={self.channels}, heads={self.heads}, dim_head={self.dim_head}"


class UNetMidBlock2D(Module):
    """diffusers' ``UNetMidBlock2D`` (resnet_time_scale_shift "default", pre-norm, SiLU):
    x (B, C, H, W), temb (B, Ct) or None -> (B, C, H, W).

    ``resnets`` holds num_layers + 1 ResnetBlock2D, ``attentions`` num_layers MidBlockAttention
    (none when ``add_attention`` is False). ``attention_head_dim`` None means one head of width C
    (diffusers warns and does the same); ``attn_groups`` defaults to ``resnet_groups``.
    Backward returns (dx, d temb), d temb None after a forward without temb.
    """

    def __init__(self, in_channels: int, temb_channels: int | None = None, dropout: float = 0.0,
                 num_layers: int = 1, resnet_eps: float = 1e-6, resnet_act_fn: str = "swish",
                 resnet_groups: int = 32, attn_groups: int | None = None, add_attention: bool = True,
                 attention_head_dim: int | None = 1, output_scale_factor: float = 1.0):
        super().__init__()
        check_positive_int("in_channels", in_channels)
        _check_num_layers("UNetMidBlock2D", num_layers)
        if resnet_act_fn not in ("swish", "silu"):
            raise ValueError(f"UNetMidBlock2D: resnet_act_fn must be 'swish' or 'silu', got {resnet_act_fn!r}")
        self.in_channels = in_channels
        self.temb_channels = temb_channels
        self.add_attention = bool(add_attention)
        attn_groups = resnet_groups if attn_groups is None else attn_groups

        def resnet():
            return ResnetBlock2D(in_channels, in_channels, temb_channels=temb_channels, groups=resnet_groups,
                                 eps=resnet_eps, dropout=dropout, output_scale_factor=output_scale_factor)

        self.attentions = ModuleList(
            [MidBlockAttention(in_channels, attention_head_dim=attention_head_dim, norm_num_groups=attn_groups,
                               eps=resnet_eps, rescale_output_factor=output_scale_factor)
             for _ in range(num_layers)] if self.add_attention else [])
        self.resnets = ModuleList([resnet() for _ in range(num_layers + 1)])

    def forward(self, x, temb=None):
        """x (B, C, H, W), temb (B, Ct) or None -> (B, C, H, W)."""
        check_input("UNetMidBlock2D", "x", x, ndim=4, axis=1, size=self.in_channels)
        h = self.resnets[0](x, temb)
        for i, resnet in enumerate(self.resnets[1:]):
            if self.add_attention:
                h = self.attentions[i](h)
            h = resnet(h, temb)
        return h

    def backward(self, grad):
        """grad (B, C, H, W) -> (dx, d temb) (d temb None without temb); children's backwards in
        reverse order."""
        dtemb = None
        g = grad
        for i in range(len(self.resnets) - 1, -1, -1):
            g, dt = self.resnets[i].backward(g)
            if dt is not None:
                dtemb = dt if dtemb is None else dtemb + dt
            if i > 0 and self.add_attention:
                g = self.attentions[i - 1].backward(g)
        return g, dtemb

    def extra_repr(self):
        return f"in_channels={self.in_channels}, add_attention={self.add_attention}"


class _ResnetsThenResample(Module):
    """The body DownEncoderBlock2D and UpDecoderBlock2D share: ``resnets`` (num_layers ResnetBlock2D
    without time projection) and then, optionally, one resampler kept at ``<RESAMPLERS>.0``."""

    RESAMPLERS = ""                                   # "downsamplers" or "upsamplers" (diffusers' names)

    def __init__(self, in_channels, out_channels, dropout, num_layers, resnet_eps, resnet_act_fn,
                 resnet_groups, output_scale_factor, make_resampler):
        super().__init__()
        name = type(self).__name__
        check_positive_int("in_channels", in_channels)
        check_positive_int("out_channels", out_channels)
        _check_num_layers(name, num_layers)
        if resnet_act_fn not in ("swish", "silu"):
            raise ValueError(f"{name}: resnet_act_fn must be 'swish' or 'silu', got {resnet_act_fn!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.resnets = ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None,
                          groups=resnet_groups, eps=resnet_eps, dropout=dropout,
                          output_scale_factor=output_scale_factor)
            for i in range(num_layers)])
        self._resample = make_resampler is not None
        if self._resample:
            setattr(self, self.RESAMPLERS, ModuleList([make_resampler()]))

    def forward(self, x):
        check_input(type(self).__name__, "x", x, ndim=4, axis=1, size=self.in_channels)
        h = x
        for resnet in self.resnets:
            h = resnet(h)
        if self._resample:
            h = getattr(self, self.RESAMPLERS)[0](h)
        return h

    def backward(self, grad):
        g = getattr(self, self.RESAMPLERS)[0].backward(grad) if self._resample else grad
        for resnet in reversed(list(self.resnets)):
            g, _ = resnet.backward(g)                 # no time projection: d temb is None
        return g

    def extra_repr(self):
        flag = "add_downsample" if self.RESAMPLERS == "downsamplers" else "add_upsample"
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, {flag}={self._resample}"


class DownEncoderBlock2D(_ResnetsThenResample):
    """diffusers' ``DownEncoderBlock2D``: x (B, Ci, H, W) -> (B, Co, Ho, Wo), Ho = floor(H/2) with
    the VAE's padding-0 downsampler (H without ``add_downsample``).

    ``resnets``: num_layers ResnetBlock2D without time projection; ``downsamplers.0``: a
    ``Downsample2D`` with ``downsample_padding`` (0 in the VAE encoder) when ``add_downsample``.
    """

    RESAMPLERS = "downsamplers"

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_act_fn: str = "swish", resnet_groups: int = 32,
                 output_scale_factor: float = 1.0, add_downsample: bool = True, downsample_padding: int = 1):
        def make():
            return Downsample2D(out_channels, use_conv=True, out_channels=out_channels, padding=downsample_padding)

        super().__init__(in_channels, out_channels, dropout, num_layers, resnet_eps, resnet_act_fn,
                         resnet_groups, output_scale_factor, make if add_downsample else None)
        self.add_downsample = bool(add_downsample)


class UpDecoderBlock2D(_ResnetsThenResample):
    """diffusers' ``UpDecoderBlock2D`` (time_embedding_norm "default", no temb in the VAE):
    x (B, Ci, H, W) -> (B, Co, 2H, 2W) (or (B, Co, H, W) without ``add_upsample``).

    ``resnets``: num_layers ResnetBlock2D; ``upsamplers.0``: an ``Upsample2D`` with a conv.
    """

    RESAMPLERS = "upsamplers"

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_act_fn: str = "swish", resnet_groups: int = 32,
                 output_scale_factor: float = 1.0, add_upsample: bool = True):
        def make():
            return Upsample2D(out_channels, use_conv=True, out_channels=out_channels)

        super().__init__(in_channels, out_channels, dropout, num_layers, resnet_eps, resnet_act_fn,
                         resnet_groups, output_scale_factor, make if add_upsample else None)
        self.add_upsample = bool(add_upsample)
