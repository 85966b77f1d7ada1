"""Memory estimates checked before anything big is allocated: a request that cannot fit is refused at
once, in one line naming the estimate and the limit, instead of running out of memory minutes later.

    check_memory(what, needed, advice)   ValueError (MemoryLimitError) when needed > memory_limit()

The limit is ``NPDIFFUSION_MEMORY_LIMIT`` when set (bytes, or a number with a unit: ``512MiB``,
``24GiB``, ``1.5T``), else the memory available now: free GPU memory on the CuPy backend, else
``MemAvailable`` of /proc/meminfo (Linux), else ``os.sysconf`` free pages, else ``FALLBACK_BYTES``.

The estimates count float32 arrays (4 bytes an entry; float16 models compute their largest arrays,
the attention scores, in float32 too) from configs and sizes alone, before any array exists:

* ``unet_parameters`` / ``vae_parameters`` / ``clip_text_parameters``: parameter counts from a
  diffusers / transformers config (what constructing the model allocates), within a few per cent.
* ``sampling_bytes``: the peak of text-to-image or image-to-image: the latents, the U-Net's largest
  step (its skip activations, the working arrays of its widest level, the self-attention scores
  heads x T x T of its largest attention level, on the guidance batch 2B), the VAE's decode (and
  encode) at full resolution with its one-head mid-block attention over the latent pixels, and the
  decoded images. The arrays are counted with a small working factor; the estimate is meant to be
  right within a factor of about two (tests/test_memory_limits.py compares it with tracemalloc).
* ``toy_bytes``: ``npdiffusion toy``'s activations (and gradients) per step or held-out evaluation.

Input images are checked by ``check_image_pixels`` against Pillow's ``MAX_IMAGE_PIXELS`` from the
file header, before any pixel is decoded. Docs: docs/cli.md ("Memory limits").
"""
from __future__ import annotations

import math
import numbers
import os
import re

ENV_VAR = "NPDIFFUSION_MEMORY_LIMIT"
#: the limit when nothing tells how much memory there is
FALLBACK_BYTES = 8 * 2**30
ITEMSIZE = 4
#: working arrays alive at once in a block, in units of that block's activation (input, norm, conv out...)
WORK = 6
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


class MemoryLimitError(ValueError):
    """A request estimated to need more memory than the limit (one line: estimate, limit, advice)."""


# ------------------------------------------------------------------------------------ the limit
def format_bytes(n: float) -> str:
    """``n`` bytes as ``412 GiB`` / ``23.1 GiB`` / ``512 MiB`` / ``100 B``."""
    for unit, size in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            v = n / size
            return f"{v:.3g} {unit}" if v < 1000 else f"{v:,.0f} {unit}"
    return f"{int(n)} B"


def parse_bytes(text: str) -> int:
    """``"17179869184"``, ``"16GiB"``, ``"16 G"``, ``"1.5TiB"``, ``"512MB"`` -> bytes (ValueError naming
    NPDIFFUSION_MEMORY_LIMIT otherwise)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGtT]i?)?[bB]?\s*", str(text))
    value = float(m.group(1)) * _UNITS[(m.group(2) or "").lower()] if m else math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{ENV_VAR} must be a positive number of bytes, optionally with a unit (e.g. 16GiB, "
                         f"512MiB, 17179869184), got {text!r}")
    return int(value)


def _gpu_free() -> int | None:
    from npdiffusion.backend import get_backend  # noqa: PLC0415

    if get_backend() != "cupy":
        return None
    import cupy  # noqa: PLC0415

    return int(cupy.cuda.runtime.memGetInfo()[0]) + int(cupy.get_default_memory_pool().free_bytes())


def _host_available() -> tuple[int, str] | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable"
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free memory"
    except (AttributeError, OSError, ValueError):
        return None


def memory_limit() -> tuple[int, str]:
    """(bytes, a phrase naming them for messages): ``NPDIFFUSION_MEMORY_LIMIT``, else what is free now."""
    env = os.environ.get(ENV_VAR)
    if env is not None and env.strip():
        n = parse_bytes(env)
        return n, f"the {format_bytes(n)} limit that {ENV_VAR} sets"
    gpu = _gpu_free()
    if gpu is not None:
        return gpu, f"the {format_bytes(gpu)} of GPU memory free"
    host = _host_available()
    if host is None:
        return FALLBACK_BYTES, f"the {format_bytes(FALLBACK_BYTES)} assumed (free memory unknown)"
    return host[0], f"the {format_bytes(host[0])} available ({host[1]})"


def check_memory(what: str, needed: float, advice: str) -> None:
    """MemoryLimitError ``"<what> needs about X (estimated), over <the limit>; <advice>"`` when needed > limit."""
    limit, where = memory_limit()
    if needed > limit:
        hint = "" if os.environ.get(ENV_VAR, "").strip() else f" (or set {ENV_VAR}=SIZE if more is free)"
        raise MemoryLimitError(f"{what} needs about {format_bytes(needed)} (estimated), over {where}; {advice}{hint}")


# -------------------------------------------------------------------------------- config values
def count(owner: str, name: str, value) -> int:
    """``value`` as a positive int, or a ValueError naming ``owner``'s config key ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return int(value)


def _per_block(owner: str, name: str, value, n: int) -> list:
    """One positive int per block (a shared int, a list of them; a list entry may itself be a list of
    ints per layer, summed)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{owner}: {name} must have one entry per block ({n}), got {value!r}")
    return [sum(count(owner, name, x) for x in v) if isinstance(v, (list, tuple)) else count(owner, name, v)
            for v in values]


def _channels(owner: str, cfg, default) -> list:
    boc = cfg.get("block_out_channels", default)
    if not isinstance(boc, (list, tuple)) or not boc:
        raise ValueError(f"{owner}: block_out_channels must be a non-empty list of positive ints, got {boc!r}")
    return [count(owner, "block_out_channels entry", c) for c in boc]


# ------------------------------------------------------------------------------ parameter counts
def _resnet(i: int, o: int, temb: int = 0) -> int:
    """ResnetBlock2D: two GroupNorms, two 3x3 convs, the time projection, a 1x1 shortcut when i != o."""
    return 2 * i + 9 * i * o + o + (temb * o + o if temb else 0) + 2 * o + 9 * o * o + o + (i * o + o if i != o else 0)


def _attention(c: int, cross: int, count_: int, depth: float) -> float:
    """``count_`` Transformer2DModels of ``depth`` blocks each: GroupNorm and proj_in/out per model; per block
    three LayerNorms, self-attention, cross-attention (keys/values from ``cross`` wide context), GEGLU FF."""
    block = 3 * 2 * c + (4 * c * c + c) + (2 * c * c + 2 * cross * c + c) + (8 * c * c + 8 * c + 4 * c * c + c)
    return count_ * (2 * c + 2 * (c * c + c) + depth * block)


def unet_parameters(cfg) -> int:
    """Parameters of the UNet2DConditionModel a diffusers config describes (missing keys: diffusers'
    defaults). Raises ValueError naming a key whose counts are not positive ints."""
    from npdiffusion.models.unet.unet_2d_condition import CLASS_NAME, DEFAULT_CONFIG  # noqa: PLC0415

    cfg = {**DEFAULT_CONFIG, **cfg}
    boc = _channels(CLASS_NAME, cfg, None)
    n = len(boc)
    layers = _per_block(CLASS_NAME, "layers_per_block", cfg["layers_per_block"], n)
    depth = _per_block(CLASS_NAME, "transformer_layers_per_block", cfg["transformer_layers_per_block"], n)
    tlpb = cfg["transformer_layers_per_block"]
    depth = [d / layers[i] if isinstance(tlpb, (list, tuple)) and isinstance(tlpb[i], (list, tuple)) else d
             for i, d in enumerate(depth)]                            # transformer blocks per attention
    cross = _per_block(CLASS_NAME, "cross_attention_dim", cfg["cross_attention_dim"], n)
    attn = [t != "DownBlock2D" for t in list(cfg["down_block_types"])[:n]]
    attn_up = [t != "UpBlock2D" for t in list(cfg["up_block_types"])[:n]]
    k_in, k_out = (count(CLASS_NAME, k, cfg[k]) for k in ("conv_in_kernel", "conv_out_kernel"))
    c_in, c_out = (count(CLASS_NAME, k, cfg[k]) for k in ("in_channels", "out_channels"))
    temb = 4 * boc[0] if cfg["time_embedding_dim"] is None else count(CLASS_NAME, "time_embedding_dim",
                                                                       cfg["time_embedding_dim"])
    total = k_in * k_in * c_in * boc[0] + boc[0] + boc[0] * temb + temb + temb * temb + temb
    total += 2 * boc[0] + k_out * k_out * boc[0] * c_out + c_out
    prev = boc[0]
    for i, c in enumerate(boc):                                       # down blocks
        total += _resnet(prev, c, temb) + (layers[i] - 1) * _resnet(c, c, temb)
        total += _attention(c, cross[i], layers[i], depth[i]) if attn[i] else 0
        total += 9 * c * c + c if i < n - 1 else 0
        prev = c
    if cfg["mid_block_type"] is not None:
        total += 2 * _resnet(boc[-1], boc[-1], temb) + _attention(boc[-1], cross[-1], 1, depth[-1])
    for j in range(n):                                                # up blocks: layers + 1 resnets each
        i = n - 1 - j                                                 # the matching down block
        c, skip, m = boc[i], boc[max(i - 1, 0)], layers[i] + 1
        # resnet r takes (prev if r == 0 else c) + (skip if r == m - 1 else c) channels
        total += _resnet(prev + c, c, temb) + (m - 2) * _resnet(2 * c, c, temb) + _resnet(c + skip, c, temb)
        total += _attention(c, cross[i], m, depth[i]) if j < len(attn_up) and attn_up[j] else 0
        total += 9 * c * c + c if j < n - 1 else 0
        prev = c
    return int(total)


def _vae_config(cfg) -> dict:
    import inspect  # noqa: PLC0415

    from npdiffusion.models.vae.autoencoder_kl import AutoencoderKL  # noqa: PLC0415

    defaults = {k: p.default for k, p in inspect.signature(AutoencoderKL.__init__).parameters.items() if k != "self"}
    return {**defaults, **{k: v for k, v in cfg.items() if k in defaults}}


def vae_parameters(cfg) -> int:
    """Parameters of the AutoencoderKL a diffusers config describes (encoder, decoder, quant convs)."""
    cfg = _vae_config(cfg)
    boc = _channels("AutoencoderKL", cfg, None)
    L = count("AutoencoderKL", "layers_per_block", cfg["layers_per_block"])
    z = count("AutoencoderKL", "latent_channels", cfg["latent_channels"])
    c_in, c_out = (count("AutoencoderKL", k, cfg[k]) for k in ("in_channels", "out_channels"))
    mid = 2 * _resnet(boc[-1], boc[-1]) + (2 * boc[-1] + 4 * (boc[-1] ** 2 + boc[-1])) * bool(
        cfg["mid_block_add_attention"])
    enc = 9 * c_in * boc[0] + boc[0] + mid + 2 * boc[-1] + 9 * boc[-1] * 2 * z + 2 * z
    prev = boc[0]
    for i, c in enumerate(boc):
        enc += _resnet(prev, c) + (L - 1) * _resnet(c, c) + (9 * c * c + c if i < len(boc) - 1 else 0)
        prev = c
    dec = 9 * z * boc[-1] + boc[-1] + mid + 2 * boc[0] + 9 * boc[0] * c_out + c_out
    prev = boc[-1]
    for j, c in enumerate(boc[::-1]):
        dec += _resnet(prev, c) + L * _resnet(c, c) + (9 * c * c + c if j < len(boc) - 1 else 0)
        prev = c
    return int(enc + dec + 4 * z * z + 2 * z + z * z + z)


def clip_text_parameters(cfg) -> int:
    """Parameters of a CLIPTextModel (a CLIPTextConfig or its dict): embeddings, encoder layers, final norm."""
    get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    h = count("CLIPTextConfig", "hidden_size", get("hidden_size", 512))
    inter = count("CLIPTextConfig", "intermediate_size", get("intermediate_size", 2048))
    layers = count("CLIPTextConfig", "num_hidden_layers", get("num_hidden_layers", 12))
    vocab = count("CLIPTextConfig", "vocab_size", get("vocab_size", 49408))
    pos = count("CLIPTextConfig", "max_position_embeddings", get("max_position_embeddings", 77))
    layer = 4 * h + 4 * (h * h + h) + h * inter + inter + inter * h + h
    return (vocab + pos) * h + layers * layer + 2 * h


def check_model(owner: str, parameters: int, advice: str) -> None:
    """Refuse building a model of ``parameters`` float32 parameters that would not fit."""
    check_memory(f"{owner}: this config ({parameters:.3g} parameters)", ITEMSIZE * parameters, advice)


# ----------------------------------------------------------------------------------- activations
def _vae_pass_bytes(cfg, batch: int, height: int, width: int, chunk: int | None) -> float:
    """Peak of one VAE decode (or encode) of ``batch`` images of height x width: the working arrays of
    the widest level and the one-head mid-block attention scores over the latent pixels."""
    cfg = _vae_config(cfg)
    boc = _channels("AutoencoderKL", cfg, None)
    widest = max(max(boc[i], boc[min(i + 1, len(boc) - 1)]) * (height * width) / 4 ** i for i in range(len(boc)))
    tokens = height * width / 4 ** (len(boc) - 1)
    scores = tokens * min(tokens, chunk or tokens) if cfg["mid_block_add_attention"] else 0
    return ITEMSIZE * batch * (WORK * widest + scores)


def _unet_step_bytes(cfg, batch: int, h: int, w: int, chunk: int | None) -> float:
    """Peak of one U-Net call on ``batch`` latents h x w: the skips of every down block, the working arrays
    (WORK, and GEGLU's 8C-wide hidden array) of the widest level, the self-attention scores heads x T x T."""
    from npdiffusion.models.unet.unet_2d_condition import CLASS_NAME, DEFAULT_CONFIG  # noqa: PLC0415

    cfg = {**DEFAULT_CONFIG, **cfg}
    boc = _channels(CLASS_NAME, cfg, None)
    n = len(boc)
    layers = _per_block(CLASS_NAME, "layers_per_block", cfg["layers_per_block"], n)
    heads = cfg["num_attention_heads"] if cfg["num_attention_heads"] is not None else cfg["attention_head_dim"]
    heads = _per_block(CLASS_NAME, "attention_head_dim", heads, n)
    attn = [t != "DownBlock2D" for t in list(cfg["down_block_types"])[:n]]
    skips = boc[0] * h * w + sum((layers[i] + (i < n - 1)) * c * h * w / 4 ** i for i, c in enumerate(boc))
    work = scores = 0.0
    for i, c in enumerate(boc):
        t = h * w / 4 ** i
        work = max(work, (WORK * 2 * c + (12 * c if attn[i] else 0)) * t)
        if attn[i]:
            scores = max(scores, heads[i] * t * min(t, chunk or t))
    return ITEMSIZE * batch * (skips + work + scores)


def sampling_bytes(unet_config, vae_config, batch: int, height: int, width: int, guidance: bool = True,
                   encode_batch: int = 0, chunk: int | None = None, vae_chunk: int | None = None) -> float:
    """Peak bytes of generating ``batch`` images of height x width pixels (text to image; with
    ``encode_batch`` > 0 image to image, that many images encoded at once): the latents and decoded
    images, plus the largest of the U-Net step (on 2 x batch with guidance), the VAE decode and encode.
    ``chunk`` / ``vae_chunk``: the attention chunk sizes set on the models (None: all rows at once)."""
    f = 2 ** (len(_channels("AutoencoderKL", _vae_config(vae_config), None)) - 1)
    h, w = height // f, width // f
    c_lat = count("UNet2DConditionModel", "in_channels", {**{"in_channels": 4}, **unet_config}["in_channels"])
    keep = ITEMSIZE * batch * (4 * c_lat * h * w + 3 * height * width) + batch * 3 * height * width
    unet = _unet_step_bytes(unet_config, (2 if guidance else 1) * batch, h, w, chunk)
    decode = _vae_pass_bytes(vae_config, batch, height, width, vae_chunk)
    encode = _vae_pass_bytes(vae_config, encode_batch, height, width, vae_chunk) if encode_batch else 0
    return keep + max(unet, decode, encode)


def toy_bytes(batch: int, channels: int) -> float:
    """Peak bytes of ``npdiffusion toy``: the larger of a training step (per image about five (C, 8, 8)
    hidden arrays forward and backward, and the data) and the evaluation of the 256 held-out images
    (about four forward); plus the parameters with their gradients and AdamW's state."""
    return ITEMSIZE * (64 * max(batch * (5 * channels + 12), 256 * (4 * channels + 4)) + 4 * 20 * channels)


def check_image_pixels(what: str, width: int, height: int, limit: int | None) -> None:
    """Refuse an input image of more than ``limit`` pixels (None: no limit) from its header size, before
    decoding it (callers pass Pillow's ``PIL.Image.MAX_IMAGE_PIXELS``, 89,478,485 by default)."""
    if limit is not None and width * height > limit:
        raise MemoryLimitError(f"{what} is {width}x{height} = {width * height:,} pixels, over the limit of "
                               f"{limit:,} pixels for an input image (PIL.Image.MAX_IMAGE_PIXELS; decoding it "
                               f"would take about {format_bytes(16 * width * height)}); shrink it first")
