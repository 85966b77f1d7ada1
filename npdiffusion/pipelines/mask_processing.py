"""Masks for inpainting, as diffusers' ``VaeImageProcessor`` handles them (``diffusers/image_processor.py``).

Shapes: B masks / images, H x W pixels; a processed mask is float32 (B, 1, H, W) of 0 / 1 where 1
marks the pixels to repaint (white in a mask image).

* ``preprocess_mask``: diffusers' mask processor (``do_normalize=False, do_binarize=True,
  do_convert_grayscale=True``): PIL masks are cropped, resized (Lanczos, or "fill") and converted to
  grayscale; arrays (H, W) / (B, H, W) / (B, H, W, 1) in [0, 1] resized with torch's 'nearest';
  then values < 0.5 -> 0, the rest -> 1.
* ``blur``: PIL's Gaussian blur (``VaeImageProcessor.blur``), for softer seams before preprocessing.
* ``get_crop_region``: the box around the mask's non-zero pixels, padded by ``pad`` and widened to
  the aspect ratio of the output (``padding_mask_crop``: only that box is inpainted, at full size).
* ``resize_and_fill`` / ``resize_and_crop``: diffusers' "fill" and "crop" resize modes (aspect kept).
* ``apply_overlay``: the inpainted crop pasted back into the original image, the unmasked pixels
  taken from the original (alpha compositing through the inverted mask).

``MaskProcessor`` bundles them under diffusers' names, as ``pipe.mask_processor``.
Docs: docs/inpainting.md ("Masks").
"""
from __future__ import annotations

import numpy
from PIL import Image, ImageFilter, ImageOps

from npdiffusion.pipelines.image_utils import array_size, default_size, float_array, resize_nearest

RESIZE_MODES = ("default", "fill", "crop")


def blur(image: Image.Image, blur_factor: int = 4) -> Image.Image:
    """``image`` blurred with PIL's GaussianBlur(blur_factor) (diffusers' ``VaeImageProcessor.blur``)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"blur: image must be a PIL image, got {type(image).__name__}")
    return image.filter(ImageFilter.GaussianBlur(blur_factor))


def get_crop_region(mask_image: Image.Image, width: int, height: int, pad: int = 0) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2): the smallest box holding every non-zero pixel of ``mask_image``, grown by ``pad``
    on each side (inside the image), then widened or heightened around its centre to the ratio
    ``width / height`` (shifted back inside the image where it would leave it), as diffusers does."""
    if not isinstance(mask_image, Image.Image):
        raise TypeError(f"get_crop_region: mask_image must be a PIL image, got {type(mask_image).__name__}")
    mask = numpy.array(mask_image.convert("L"))                      # (H, W) uint8
    h, w = mask.shape
    cols, rows = (mask != 0).any(axis=0), (mask != 0).any(axis=1)   # (W,), (H,)
    if not cols.any():
        raise ValueError("padding_mask_crop: the mask has no non-zero pixel, so there is no region to crop to")
    crop_left, crop_right = int(cols.argmax()), int(cols[::-1].argmax())
    crop_top, crop_bottom = int(rows.argmax()), int(rows[::-1].argmax())
    x1, y1 = int(max(crop_left - pad, 0)), int(max(crop_top - pad, 0))
    x2, y2 = int(min(w - crop_right + pad, w)), int(min(h - crop_bottom + pad, h))
    ratio_crop_region = (x2 - x1) / (y2 - y1)
    ratio_processing = width / height
    if ratio_crop_region > ratio_processing:
        y1, y2 = _widen(y1, y2, (x2 - x1) / ratio_processing, mask_image.height)
    else:
        x1, x2 = _widen(x1, x2, (y2 - y1) * ratio_processing, mask_image.width)
    return x1, y1, x2, y2


def _widen(lo: int, hi: int, desired: float, limit: int) -> tuple[int, int]:
    """[lo, hi) grown around its centre to ``desired`` (int-truncated growth), then moved inside [0, limit]."""
    diff = int(desired - (hi - lo))
    lo -= diff // 2
    hi += diff - diff // 2
    if hi >= limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        hi, lo = hi - lo, 0
    return lo, min(hi, limit)


def resize_and_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resized to fit inside width x height (aspect kept), centred, the empty bands filled by stretching
    the image's edge rows / columns (diffusers' ``_resize_and_fill``). Returns an RGB image."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.LANCZOS)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill_height = height // 2 - src_h // 2
        if fill_height > 0:
            res.paste(resized.resize((width, fill_height), box=(0, 0, width, 0)), box=(0, 0))
            res.paste(resized.resize((width, fill_height), box=(0, resized.height, width, resized.height)),
                      box=(0, fill_height + src_h))
    elif ratio > src_ratio:
        fill_width = width // 2 - src_w // 2
        if fill_width > 0:
            res.paste(resized.resize((fill_width, height), box=(0, 0, 0, height)), box=(0, 0))
            res.paste(resized.resize((fill_width, height), box=(resized.width, 0, resized.width, height)),
                      box=(fill_width + src_w, 0))
    return res


def resize_and_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resized to cover width x height (aspect kept) and centred, the excess cut (diffusers' ``_resize_and_crop``)."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.LANCZOS)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return res


def resize_pil(image: Image.Image, height: int, width: int, resize_mode: str = "default") -> Image.Image:
    """diffusers' ``VaeImageProcessor.resize`` for a PIL image: plain Lanczos, "fill" or "crop"."""
    if resize_mode == "default":
        return image.resize((width, height), resample=Image.LANCZOS, reducing_gap=None)
    if resize_mode == "fill":
        return resize_and_fill(image, width, height)
    if resize_mode == "crop":
        return resize_and_crop(image, width, height)
    raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")


def crop_and_resize(images, vae_scale_factor: int, height: int, width: int, crops_coords=None,
                    resize_mode: str = "default") -> list:
    """PIL images cropped to ``crops_coords``, then resized to (height, width) rounded down to multiples of
    ``vae_scale_factor``: the PIL half of ``VaeImageProcessor.preprocess`` before the pixels are read."""
    images = [im.crop(crops_coords) if crops_coords is not None else im for im in images]
    h, w = default_size(height, width, vae_scale_factor)
    return [resize_pil(im, h, w, resize_mode) for im in images]


def _is_pil_list(value) -> bool:
    return isinstance(value, Image.Image) or (isinstance(value, (list, tuple)) and bool(value)
                                              and all(isinstance(v, Image.Image) for v in value))


def preprocess_mask(mask, vae_scale_factor: int, height: int | None = None, width: int | None = None,
                    crops_coords=None, resize_mode: str = "default") -> numpy.ndarray:
    """A mask image -> float32 (B, 1, H, W) of 0 / 1 on the host (module docstring); 1 = repaint.

    ``mask``: a PIL image (any mode; converted to grayscale), a list of them, or a float array
    (H, W), (B, H, W), (H, W, 1) or (B, H, W, 1) in [0, 1]. ``height`` / ``width`` default to the
    mask's and are rounded down to multiples of ``vae_scale_factor``, as diffusers does."""
    if _is_pil_list(mask):
        images = [mask] if isinstance(mask, Image.Image) else list(mask)
        first = images[0].crop(crops_coords) if crops_coords is not None else images[0]
        images = crop_and_resize(images, vae_scale_factor, first.height if height is None else height,
                                 first.width if width is None else width, crops_coords, resize_mode)
        images = [im.convert("L") for im in images]
        arr = numpy.stack([numpy.array(im).astype(numpy.float32) / 255.0 for im in images])[:, None]   # (B, 1, H, W)
    elif hasattr(mask, "shape") and hasattr(mask, "dtype"):
        if crops_coords is not None or resize_mode != "default":
            raise ValueError("mask_image: padding_mask_crop needs a PIL mask image, got an array")
        arr = float_array(mask, "mask_image: an array")
        if arr.ndim == 3:                                    # (H, W, 1) -> (1, H, W, 1); (B, H, W) -> (B, H, W, 1)
            arr = arr[None] if arr.shape[-1] == 1 else arr[..., None]
        elif arr.ndim == 2:
            arr = arr[None, :, :, None]
        if arr.ndim != 4 or arr.shape[-1] != 1:
            raise ValueError(f"mask_image: an array must have shape (H, W), (B, H, W), (H, W, 1) or (B, H, W, 1), "
                             f"got shape {mask.shape}")
        arr = arr.astype(numpy.float32, copy=False).transpose(0, 3, 1, 2)                      # (B, 1, H, W)
        arr = resize_nearest(arr, *array_size(arr, height, width, vae_scale_factor))
    else:
        raise TypeError(f"mask_image must be a PIL image, a list of PIL images or a float array, "
                        f"got {type(mask).__name__}")
    return numpy.where(arr < 0.5, numpy.float32(0), numpy.float32(1))


def apply_overlay(mask: Image.Image, init_image: Image.Image, image: Image.Image, crop_coords=None) -> Image.Image:
    """The inpainted ``image`` put back into ``init_image``: resized ("crop") into ``crop_coords`` when
    given, then the original's pixels composited over it through the inverted mask (diffusers'
    ``VaeImageProcessor.apply_overlay``). Returns an RGB image of init_image's size."""
    width, height = init_image.width, init_image.height
    init_image_masked = Image.new("RGBa", (width, height))
    init_image_masked.paste(init_image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    init_image_masked = init_image_masked.convert("RGBA")
    if crop_coords is not None:
        x, y, x2, y2 = crop_coords
        base_image = Image.new("RGBA", (width, height))
        base_image.paste(resize_and_crop(image, x2 - x, y2 - y), (x, y))
        image = base_image.convert("RGB")
    image = image.convert("RGBA")
    image.alpha_composite(init_image_masked)
    return image.convert("RGB")


class MaskProcessor:
    """diffusers' ``pipe.mask_processor`` names: ``blur``, ``get_crop_region``, ``preprocess``, ``apply_overlay``."""

    def __init__(self, vae_scale_factor: int):
        self.vae_scale_factor = vae_scale_factor

    blur = staticmethod(blur)
    get_crop_region = staticmethod(get_crop_region)
    apply_overlay = staticmethod(apply_overlay)

    def preprocess(self, mask, height=None, width=None, resize_mode: str = "default", crops_coords=None):
        return preprocess_mask(mask, self.vae_scale_factor, height, width, crops_coords, resize_mode)
