"""Images in and out of the pipelines: PIL <-> arrays, the [-1, 1] <-> [0, 1] maps, a labelled grid.

Shapes: B images, H x W pixels, C channels (3 for RGB). "NHWC" arrays (B, H, W, C) are what PIL and
``output_type="np"`` use; "NCHW" arrays (B, C, H, W) are what the VAE takes and gives.

The functions mirror diffusers' ``VaeImageProcessor`` (``diffusers/image_processor.py``) step for step,
so an image goes through the same float32 operations as in diffusers' pipelines:

* ``pil_to_numpy``: uint8 -> float32 / 255, NHWC;
* ``preprocess_image``: PIL images are resized (Lanczos, PIL's own) to a multiple of the VAE's
  downsampling factor, arrays with nearest-neighbour indexing as ``torch.nn.functional.interpolate``
  does; then NCHW and ``2 x - 1`` into [-1, 1];
* ``postprocess_image``: ``clip(x * 0.5 + 0.5, 0, 1)`` then NHWC float32 (``"np"``) or
  ``round(x * 255)`` to uint8 PIL images (``"pil"``).

``image_grid`` lays images out in rows with a caption under each, for the ``sample`` and ``img2img``
commands. Docs: docs/pipeline.md.
"""
from __future__ import annotations

import numpy
from PIL import Image, ImageDraw, ImageFont

from npdiffusion.backend import asarray, to_numpy

OUTPUT_TYPES = ("pil", "np", "latent")


# ------------------------------------------------------------------------------------ conversions
def numpy_to_pil(images) -> list:
    """Float images (B, H, W, C) or (H, W, C) in [0, 1] -> list of B uint8 PIL images (``round(x * 255)``)."""
    arr = to_numpy(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"numpy_to_pil: images must have shape (B, H, W, C) with C in (1, 3, 4), "
                         f"got shape {arr.shape}")
    arr = (arr * 255).round().astype(numpy.uint8)
    if arr.shape[-1] == 1:
        return [Image.fromarray(a[..., 0], mode="L") for a in arr]
    return [Image.fromarray(a) for a in arr]


def pil_to_numpy(images) -> numpy.ndarray:
    """A PIL image or a list of them (same size) -> float32 (B, H, W, C) in [0, 1]. Images that are
    not RGB (grayscale, RGBA, palette...) are converted to RGB first."""
    if isinstance(images, Image.Image):
        images = [images]
    arrays = []
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise TypeError(f"pil_to_numpy: images[{i}] must be a PIL image, got {type(im).__name__}")
        if im.mode != "RGB":
            im = im.convert("RGB")
        arrays.append(numpy.array(im).astype(numpy.float32) / 255.0)
    if len({a.shape for a in arrays}) > 1:
        raise ValueError(f"pil_to_numpy: all images must have the same size, got {[a.shape[:2] for a in arrays]}")
    return numpy.stack(arrays, axis=0)


def default_size(height: int, width: int, factor: int) -> tuple[int, int]:
    """(height, width) rounded down to multiples of ``factor`` (diffusers' ``get_default_height_width``)."""
    return height - height % factor, width - width % factor


def nearest_indices(size_in: int, size_out: int) -> numpy.ndarray:
    """torch's 'nearest' source index for each output index: min(floor(i * (in / out)), in - 1), in float32."""
    scale = numpy.float32(size_in / size_out)
    idx = numpy.floor(numpy.arange(size_out, dtype=numpy.float32) * scale).astype(numpy.int64)
    return numpy.minimum(idx, size_in - 1)


def float_array(value, what: str) -> numpy.ndarray:
    """``value`` (any backend's array) as a host NumPy array of floats, else TypeError naming ``what``."""
    arr = numpy.asarray(to_numpy(value))
    if arr.dtype.kind != "f":
        raise TypeError(f"{what} must hold floats in [0, 1], got dtype {arr.dtype}")
    return arr


def array_size(arr, height: int | None, width: int | None, factor: int) -> tuple[int, int]:
    """(height, width) of an NCHW array's output: the given ones or the array's, rounded down to ``factor``."""
    return default_size(arr.shape[2] if height is None else height, arr.shape[3] if width is None else width, factor)


def resize_nearest(arr, height: int, width: int):
    """(B, C, H, W) -> (B, C, height, width) as ``torch.nn.functional.interpolate(mode='nearest')``."""
    return arr[:, :, nearest_indices(arr.shape[2], height)][:, :, :, nearest_indices(arr.shape[3], width)]


def preprocess_image(image, vae_scale_factor: int, height: int | None = None, width: int | None = None,
                     on_size=None):
    """An input image -> float32 NCHW array (B, 3, H, W) in [-1, 1] on the active backend.

    ``image``: a PIL image, a list of PIL images, or a float array (H, W, C) / (B, H, W, C) with values
    in [0, 1] (an array whose minimum is below 0 is taken as already in [-1, 1], as diffusers does).
    ``height`` / ``width`` default to the image's; either way they are rounded down to a multiple of
    ``vae_scale_factor``, as diffusers does.
    An array with ``C`` equal to 4 on axis 1 (B, 4, h, w) is returned unchanged: it already holds latents.
    ``on_size(B, H, W)``, if given, is called with the output size before any pixel is resized or converted.
    """
    if isinstance(image, (list, tuple)) and image and all(isinstance(im, Image.Image) for im in image) \
            or isinstance(image, Image.Image):
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        h, w = default_size(images[0].height if height is None else height,
                            images[0].width if width is None else width, vae_scale_factor)
        _check_size(h, w, vae_scale_factor)
        if on_size is not None:
            on_size(len(images), h, w)
        images = [im.resize((w, h), resample=Image.LANCZOS, reducing_gap=None) for im in images]
        arr = pil_to_numpy(images).transpose(0, 3, 1, 2)                     # (B, 3, H, W)
    elif hasattr(image, "shape") and hasattr(image, "dtype"):
        arr = float_array(image, "preprocess_image: an image array")
        if arr.ndim == 4 and arr.shape[1] == 4:
            return asarray(arr.astype(numpy.float32, copy=False))             # latents, as diffusers
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"preprocess_image: an image array must have shape (H, W, 3) or (B, H, W, 3), "
                             f"got shape {arr.shape}")
        arr = arr.astype(numpy.float32, copy=False).transpose(0, 3, 1, 2)      # (B, 3, H, W)
        h, w = array_size(arr, height, width, vae_scale_factor)
        _check_size(h, w, vae_scale_factor)
        if on_size is not None:
            on_size(arr.shape[0], h, w)
        arr = resize_nearest(arr, h, w)
    else:
        raise TypeError(f"preprocess_image: image must be a PIL image, a list of PIL images or a float array "
                        f"(H, W, 3) / (B, H, W, 3), got {type(image).__name__}")
    if arr.min() >= 0:
        arr = 2.0 * arr - 1.0
    return asarray(numpy.ascontiguousarray(arr, dtype=numpy.float32))


def _check_size(height, width, factor):
    if height < factor or width < factor:
        raise ValueError(f"the image must be at least {factor} x {factor} pixels (the VAE's downsampling factor), "
                         f"got {height} x {width} after rounding down to multiples of {factor}")


def postprocess_image(image, output_type: str = "pil"):
    """Decoded images (B, 3, H, W) in about [-1, 1] -> ``clip(x * 0.5 + 0.5, 0, 1)`` as float32 NHWC
    (``"np"``) or a list of PIL images (``"pil"``); ``"latent"`` returns the input unchanged."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if output_type == "latent":
        return image
    x = image * 0.5
    x += 0.5
    x = to_numpy(x).clip(0, 1)
    x = numpy.ascontiguousarray(x.transpose(0, 2, 3, 1), dtype=numpy.float32)  # (B, H, W, 3)
    return x if output_type == "np" else numpy_to_pil(x)


# ------------------------------------------------------------------------------------------ grid
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)   # Pillow >= 10.1: a scalable bundled font
    except TypeError:                              # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap of ``text`` to ``width`` pixels; at most ``max_lines`` lines, the last one cut
    with an ellipsis when the text does not fit."""
    words = text.split() or [""]
    lines, current = [], ""
    for word in words:
        trial = word if not current else f"{current} {word}"
        if draw.textlength(trial, font=font) <= width or not current:
            current = trial
        else:
            lines.append(current)
            current = word
    lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] += " ..."
    out = []
    for line in lines:   # a single over-long word: cut it, marking the cut with an ellipsis
        if draw.textlength(line, font=font) > width:
            while len(line) > 1 and draw.textlength(line + "…", font=font) > width:
                line = line[:-1]
            line += "…"
        out.append(line)
    return out


def image_grid(images, labels=None, cols: int | None = None, min_tile: int = 192, font_size: int = 14,
               max_label_lines: int = 3) -> Image.Image:
    """The PIL ``images`` (same size) in a grid of ``cols`` columns, each with its label underneath.

    Images smaller than ``min_tile`` pixels across are scaled up by an integer factor (nearest
    neighbour) so that a tiny model's 64 x 64 outputs and their labels stay legible. Labels wrap to
    the tile width (at most ``max_label_lines`` lines). Returns an RGB image on a white background.
    """
    images = list(images)
    if not images:
        raise ValueError("image_grid: images must hold at least one image, got none")
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise TypeError(f"image_grid: images[{i}] must be a PIL image, got {type(im).__name__}")
    labels = [""] * len(images) if labels is None else [str(s) for s in labels]
    if len(labels) != len(images):
        raise ValueError(f"image_grid: labels must have one entry per image ({len(images)}), got {len(labels)}")
    cols = len(images) if cols is None else int(cols)
    if cols < 1:
        raise ValueError(f"image_grid: cols must be a positive int, got {cols}")
    w, h = images[0].size
    if any(im.size != (w, h) for im in images):
        raise ValueError(f"image_grid: all images must have the same size, got {sorted({im.size for im in images})}")
    scale = max(1, -(-min_tile // w))
    tw, th = w * scale, h * scale
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = 6
    wrapped = [_wrap(probe, label, font, tw - 2 * pad, max_label_lines) if label else [] for label in labels]
    line_h = font_size + 4
    label_h = (max(len(w_) for w_ in wrapped) * line_h + 2 * pad) if any(wrapped) else 0
    rows = -(-len(images) // cols)
    gap = 4
    grid = Image.new("RGB", (cols * tw + (cols + 1) * gap, rows * (th + label_h) + (rows + 1) * gap), "white")
    draw = ImageDraw.Draw(grid)
    for k, (im, lines) in enumerate(zip(images, wrapped)):
        r, c = divmod(k, cols)
        x0 = gap + c * (tw + gap)
        y0 = gap + r * (th + label_h + gap)
        tile = im.convert("RGB")
        if scale > 1:
            tile = tile.resize((tw, th), resample=Image.NEAREST)
        grid.paste(tile, (x0, y0))
        for j, line in enumerate(lines):
            draw.text((x0 + pad, y0 + th + pad + j * line_h), line, fill="black", font=font)
    return grid
