"""Read colour, shape and position off shape images, and score generated images against their prompts.

Shape legend: N images, S image side, 3 RGB channels; images uint8 (N, S, S, 3) (or float
(N, 3, S, S) in [-1, 1], a model's output, converted first).

For each image:

1. **Foreground**: pixels whose brightest channel is above ``threshold`` (default 0.5 of full
   scale) on the black background; of those, the largest 4-connected component (stray specks of a
   generated image do not count). No foreground: every attribute is ``None`` (wrong).
2. **Colour** = the dominant hue: each foreground pixel votes for ``white`` when its saturation
   (max - min) / max is below 0.35, otherwise for the nearest of the six hues red 0, yellow 60,
   green 120, cyan 180, blue 240, magenta 300 degrees; the majority wins.
3. **Position** = the anchor (quadrant centres at S/4 and 3S/4, or the image centre) nearest to
   the foreground's centroid.
4. **Shape** = the shape whose template fits the foreground best. For each shape the reader may
   answer (the demo's three, or with ``cross`` and/or ``bar``), the template is the renderer's own mask of that
   shape (``data.shapes.shape_mask``) with the foreground's area (r from ``SHAPE_AREA``) and centroid
   (the triangle's centre sits r/3 above its centroid, ``CENTROID_DROP``); the fit is the
   intersection over union (IoU) of template and foreground, and the best fit wins. Below
   ``MIN_IOU`` no shape fits and the shape is ``None`` (wrong). Area and centroid barely move when a
   generated shape has a stray pixel on its edge, so neither does the fit; the bounding box does,
   which is why the reader no longer measures how much of it the shape fills (docs/benchmarks.md,
   "The shape reader"). On 20,000 of the dataset's own images per shape set every shape is read
   right: the right template fits squares and triangles exactly (IoU 1), circles with IoU >= 0.93,
   crosses >= 0.73 (their thin arms are pixelated) and bars >= 0.8, while a wrong template reaches at
   most 0.94 (a square against the circle template) and never beats the right one.

Everything is vectorized over the whole stack: one ``scipy.ndimage.label`` call with a structure that
does not connect different images, then bincounts. ``score(images, prompts)`` parses each prompt
(``"a {color} {shape} in the {position}"``) and reports per-attribute and joint accuracy.
Docs: docs/training.md ("Quality checks").
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy

from npdiffusion.data.shapes import (CENTROID_DROP, COLOR_NAMES, POSITION_NAMES, POSITIONS, SHAPE_AREA,
                                     SHAPES, check_shapes, shape_mask)

HUES = {"red": 0.0, "yellow": 60.0, "green": 120.0, "cyan": 180.0, "blue": 240.0, "magenta": 300.0}
WHITE_SATURATION = 0.35
MIN_IOU = 0.6
ATTRIBUTES = ("color", "shape", "position")
_PROMPT = re.compile(r"^a (?P<color>\w+) (?P<shape>\w+) in the (?P<position>[\w ]+)$")


def _as_uint8(images) -> numpy.ndarray:
    images = numpy.asarray(images)
    if images.ndim == 3 and images.shape[-1] == 3:
        images = images[None]
    if images.ndim != 4:
        raise ValueError(f"shape checker: images must be (N, S, S, 3) uint8 or (N, 3, S, S) float, got {images.shape}")
    if images.dtype == numpy.uint8:
        if images.shape[-1] != 3:
            raise ValueError(f"shape checker: uint8 images must be (N, S, S, 3), got {images.shape}")
        return images
    if images.dtype.kind == "f" and images.shape[1] == 3:
        from npdiffusion.data.dataset import to_uint8  # noqa: PLC0415

        return to_uint8(images)
    raise ValueError(f"shape checker: images must be uint8 (N, S, S, 3) or float (N, 3, S, S) in [-1, 1], "
                     f"got {images.dtype} {images.shape}")


@dataclass
class Attributes:
    """What the checker read: for each image a colour, shape and position name, or None."""

    color: list
    shape: list
    position: list
    fill_ratio: numpy.ndarray       # (N,) float64, foreground / bounding-box area, NaN where no foreground
    shape_iou: numpy.ndarray        # (N,) float64, the best template's IoU, NaN where no foreground
    centroid: numpy.ndarray         # (N, 2) float64 (row, column), NaN where no foreground
    foreground: numpy.ndarray       # (N,) int64 pixels in the largest component

    def __getitem__(self, i: int) -> tuple:
        return self.color[i], self.shape[i], self.position[i]


def read_attributes(images, threshold: float = 0.5, shapes=SHAPES) -> Attributes:
    """Colour, shape and position of each image (see the module docstring); ``shapes``: the shapes an
    image may show (the demo's three, or with ``cross`` and/or ``bar``)."""
    shapes = check_shapes(shapes)
    from scipy import ndimage  # noqa: PLC0415

    images = _as_uint8(images)
    n, s = images.shape[0], images.shape[1]
    on = images.max(axis=-1) > threshold * 255.0                             # (N, S, S)
    structure = numpy.zeros((3, 3, 3), dtype=bool)
    structure[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]                         # 4-connected, within an image
    labels, count = ndimage.label(on, structure=structure)                  # (N, S, S), ids 1..count
    img_of = numpy.zeros(count + 1, dtype=numpy.int64)
    flat = labels.reshape(-1)
    pix_img = numpy.repeat(numpy.arange(n), s * s)
    img_of[flat] = pix_img                                                  # every pixel of a label is in one image
    sizes = numpy.bincount(flat, minlength=count + 1)
    sizes[0] = 0
    # Largest component per image: order labels by (image, size) and keep each image's last.
    best = numpy.zeros(n, dtype=numpy.int64)
    if count:
        ids = numpy.arange(1, count + 1)
        order = numpy.lexsort((sizes[ids], img_of[ids]))
        ids, imgs = ids[order], img_of[ids][order]
        last = numpy.r_[imgs[1:] != imgs[:-1], True]
        best[imgs[last]] = ids[last]
    mask = (labels == best[:, None, None]) & (best[:, None, None] > 0)     # (N, S, S)
    npix = mask.sum(axis=(1, 2))
    has = npix > 0

    # Colour: each foreground pixel votes (white, or the nearest hue); majority per image.
    px = images[mask].astype(numpy.float32) / 255.0                         # (M, 3), M foreground pixels
    pmx, pmn = px.max(axis=-1), px.min(axis=-1)
    sat = (pmx - pmn) / numpy.maximum(pmx, 1e-12)
    hue = _hue_degrees(px, pmx, pmn)
    centres = numpy.asarray(list(HUES.values()), dtype=numpy.float32)
    dist = numpy.abs((hue[:, None] - centres + 180.0) % 360.0 - 180.0)     # (M, 6)
    names7 = list(HUES) + ["white"]
    vote = numpy.where(sat < WHITE_SATURATION, 6, dist.argmin(axis=-1))    # 6 = white
    img_idx = numpy.nonzero(mask)[0]                                         # image of each foreground pixel
    counts = numpy.bincount(img_idx * 7 + vote, minlength=n * 7).reshape(n, 7)
    color = [names7[k] if h else None for k, h in zip(counts.argmax(axis=1).tolist(), has.tolist())]

    # Position: centroid -> nearest anchor.
    coords = numpy.arange(s, dtype=numpy.float64) + 0.5
    with numpy.errstate(invalid="ignore", divide="ignore"):
        cy = (mask.sum(axis=2) * coords).sum(axis=1) / npix
        cx = (mask.sum(axis=1) * coords).sum(axis=1) / npix
    centroid = numpy.stack([cy, cx], axis=1)
    anchors = numpy.asarray(list(POSITIONS.values())) * s                   # (5, 2)
    d2 = ((numpy.nan_to_num(centroid)[:, None, :] - anchors[None]) ** 2).sum(axis=-1)
    position = [POSITION_NAMES[k] if h else None for k, h in zip(d2.argmin(axis=1).tolist(), has.tolist())]

    # The bounding box's fill ratio: not the shape reader's any more (module docstring), kept as a description.
    rows, cols = mask.any(axis=2), mask.any(axis=1)                         # (N, S)
    height = numpy.where(has, s - rows.argmax(axis=1) - rows[:, ::-1].argmax(axis=1), 0)
    width = numpy.where(has, s - cols.argmax(axis=1) - cols[:, ::-1].argmax(axis=1), 0)
    with numpy.errstate(invalid="ignore", divide="ignore"):
        fill = numpy.where(has, npix / numpy.maximum(height * width, 1), numpy.nan)
    shape, iou = _fit_shapes(mask, npix, centroid, shapes)
    return Attributes(color, shape, position, fill, iou, centroid, npix)


def _fit_shapes(mask, npix, centroid, shapes) -> tuple[list, numpy.ndarray]:
    """(shape names or None, best IoU (N,)) of the foregrounds ``mask`` (N, S, S) with ``npix`` (N,) pixels
    and ``centroid`` (N, 2): each of ``shapes`` drawn with the same area and centroid, the best fit wins."""
    n, s = mask.shape[0], mask.shape[1]
    coords = numpy.arange(s, dtype=numpy.float64) + 0.5
    cy, cx = numpy.nan_to_num(centroid).T[:, :, None, None]                 # (N, 1, 1) each
    ious = numpy.empty((len(shapes), n))
    for k, name in enumerate(shapes):                                        # 3 to 5 shapes, each vectorized
        r = numpy.sqrt(npix / SHAPE_AREA[name])[:, None, None]
        template = shape_mask(name, coords[None, :, None] - (cy - CENTROID_DROP[name] * r),
                              coords[None, None, :] - cx, r)                 # (N, S, S)
        inter = (template & mask).sum(axis=(1, 2))
        ious[k] = inter / numpy.maximum(template.sum(axis=(1, 2)) + npix - inter, 1)
    best, iou = ious.argmax(axis=0), ious.max(axis=0)
    fits = (npix > 0) & (iou >= MIN_IOU)
    names = [shapes[k] if ok else None for k, ok in zip(best.tolist(), fits.tolist())]
    return names, numpy.where(npix > 0, iou, numpy.nan)


def _hue_degrees(rgb, mx, mn):
    """HSV hue in degrees [0, 360) of float RGB (..., 3); 0 where the pixel is gray."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    delta = numpy.maximum(mx - mn, 1e-12)
    h = numpy.where(mx == r, ((g - b) / delta) % 6.0,
                    numpy.where(mx == g, (b - r) / delta + 2.0, (r - g) / delta + 4.0))
    return numpy.where(mx - mn > 0, h * 60.0, 0.0)


def parse_prompt(prompt: str, shapes=SHAPES) -> tuple[str, str, str]:
    """``"a {color} {shape} in the {position}"`` -> ``(color, shape, position)``, or a ValueError."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    m = _PROMPT.match(prompt.strip())
    if m is None or m["color"] not in COLOR_NAMES or m["shape"] not in shapes or m["position"] not in POSITION_NAMES:
        raise ValueError(f"prompt {prompt!r} is not of the form 'a {{color}} {{shape}} in the {{position}}' with "
                         f"color in {COLOR_NAMES}, shape in {tuple(shapes)}, position in {POSITION_NAMES}")
    return m["color"], m["shape"], m["position"]


@dataclass
class ShapeScore:
    """Accuracy of images against prompts: per attribute, and all three together (``joint``)."""

    n: int
    color: float
    shape: float
    position: float
    joint: float
    correct: dict = field(repr=False, default_factory=dict)   # attribute -> (N,) bool, plus "joint"
    read: Attributes | None = field(repr=False, default=None)

    def as_dict(self) -> dict:
        return {"n": self.n, "color": self.color, "shape": self.shape, "position": self.position, "joint": self.joint}

    def summary(self) -> str:
        return (f"{self.n} images: color {100 * self.color:.1f}%, shape {100 * self.shape:.1f}%, "
                f"position {100 * self.position:.1f}%, all three {100 * self.joint:.1f}%")


def score(images, prompts, threshold: float = 0.5, shapes=SHAPES) -> ShapeScore:
    """Score ``images`` (N of them) against their ``prompts`` (N strings); ``shapes`` as in
    ``read_attributes`` (a prompt's shape must be one of them)."""
    prompts = list(prompts)
    read = read_attributes(images, threshold, shapes)
    if len(prompts) != len(read.color):
        raise ValueError(f"score: {len(read.color)} images but {len(prompts)} prompts")
    if not prompts:
        raise ValueError("score: no images to score")
    wanted = [parse_prompt(p, shapes) for p in prompts]
    correct = {}
    for k, attr in enumerate(ATTRIBUTES):
        got = getattr(read, attr)
        correct[attr] = numpy.asarray([w[k] == g for w, g in zip(wanted, got)])
    correct["joint"] = correct["color"] & correct["shape"] & correct["position"]
    n = len(prompts)
    return ShapeScore(n, *(float(correct[a].mean()) for a in (*ATTRIBUTES, "joint")), correct=correct, read=read)
