"""The built-in synthetic captioned shapes: one filled shape on black, captioned by what it is and where.

Shape legend: N images, S image side (32), C = 3 colour channels; images are uint8 (N, S, S, 3) in
0..255, channels last (the layout of a PNG), the way every dataset of ``npdiffusion.data`` stores them.

Each image is black except one filled shape:

* shape: ``circle``, ``square`` (axis-aligned) or ``triangle`` (upright: apex at the top, flat base);
  on request (``shapes=``) also ``cross``, an upright plus sign whose arms reach r from the centre and
  are 2 * 0.25 r wide, and ``bar``, a wide rectangle 2 r wide and r high (|dx| <= r, |dy| <= 0.5 r):
  the new shapes of the LoRA lesson (docs/lora.md; the bar is the one the demo's VAE keeps, the cross
  it blurs), never in the default data;
* colour: ``red``, ``green``, ``blue``, ``yellow``, ``cyan``, ``magenta`` or ``white`` (pure 0/255
  channel values, so the hue is exact);
* position: centred on the middle of the ``top left``, ``top right``, ``bottom left`` or
  ``bottom right`` quadrant, or on the image ``center``, plus a little jitter;
* size: "radius" r drawn uniformly from ``RADIUS_RANGE`` = [4.5, 7.0] pixels (scaled by S/32). The
  circle has radius r, the square half-side 0.85 r, the triangle height and base 2 r. With jitter of
  at most 1 px per axis (also scaled) every shape stays inside its quadrant's 16x16 box.

The caption is exactly ``"a {color} {shape} in the {position}"``, e.g. ``"a red circle in the top
left"``. Attributes are drawn independently and uniformly, so the 7 x 3 x 5 = 105 captions are
equally likely. Everything follows from ``seed`` (NumPy PCG64, one row of six uniforms per image);
the same seed gives the same bytes, and image i depends only on the seed and i.

A pixel belongs to the shape when its centre (y + 0.5, x + 0.5) lies inside it; the masks of a
chunk of images are computed at once by broadcasting over (N, S, S), with no per-pixel loop.
Docs: docs/training.md ("Datasets").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy

from npdiffusion.checks import check_int
from npdiffusion.data.dataset import ArrayDataset

COLORS = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "cyan": (0, 255, 255), "magenta": (255, 0, 255), "white": (255, 255, 255),
}
SHAPES = ("circle", "square", "triangle")
#: every shape the renderer draws; ``shapes=`` picks among them (default SHAPES: the demo's data)
ALL_SHAPES = SHAPES + ("cross", "bar")
#: Position names and their anchor as fractions (row, column) of the image side.
POSITIONS = {
    "top left": (0.25, 0.25), "top right": (0.25, 0.75), "bottom left": (0.75, 0.25),
    "bottom right": (0.75, 0.75), "center": (0.5, 0.5),
}
COLOR_NAMES = tuple(COLORS)
POSITION_NAMES = tuple(POSITIONS)

SIDE = 32
RADIUS_RANGE = (4.5, 7.0)   # pixels at S = 32
JITTER = 1.0                # pixels at S = 32, each axis
SQUARE_HALF_SIDE = 0.85     # times r
CROSS_HALF_WIDTH = 0.25    # times r: half the width of the cross's arms
BAR_HALF_HEIGHT = 0.5       # times r: half the height of the bar (its half-width is r)
_CHUNK = 2048               # images per broadcast (2048 * 32 * 32 float32 = 8 MB per temporary)
#: Each shape's area in units of r^2 (the continuous shape; pixel centres make the drawn area differ
#: a little): circle pi r^2, square (1.7 r)^2, triangle base 2r x height 2r / 2, cross two 2r x 0.5r
#: bars less their 0.5r x 0.5r overlap, bar 2r x r.
SHAPE_AREA = {"circle": math.pi, "square": (2 * SQUARE_HALF_SIDE) ** 2, "triangle": 2.0,
              "cross": 8 * CROSS_HALF_WIDTH - 4 * CROSS_HALF_WIDTH ** 2, "bar": 4 * BAR_HALF_HEIGHT}
#: How far below its centre each shape's centroid lies, in units of r: the triangle's sits 2/3 of the
#: way from the apex (centre - r) to the base (centre + r), at centre + r/3; the others are symmetric.
CENTROID_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 3.0, "cross": 0.0, "bar": 0.0}


def shape_mask(shape: str, dy, dx, r):
    """Which pixels ``shape`` of "radius" ``r`` covers, from the pixel centres' offsets ``dy``, ``dx`` to
    its centre (arrays that broadcast together, e.g. (N, S, 1), (N, 1, S), (N, 1, 1)): a boolean array.
    The renderer draws with it and the attribute reader (evaluation/shape_attributes.py) fits it."""
    if shape == "circle":
        return dy * dy + dx * dx <= r * r
    if shape == "square":
        h = SQUARE_HALF_SIDE * r
        return (numpy.abs(dy) <= h) & (numpy.abs(dx) <= h)
    if shape == "triangle":         # upright: apex (cy - r, cx), base from (cy + r, cx - r) to (cy + r, cx + r)
        return (dy >= -r) & (dy <= r) & (2.0 * numpy.abs(dx) <= dy + r)
    if shape == "cross":
        w = CROSS_HALF_WIDTH * r
        return ((numpy.abs(dy) <= r) & (numpy.abs(dx) <= w)) | ((numpy.abs(dx) <= r) & (numpy.abs(dy) <= w))
    if shape == "bar":
        return (numpy.abs(dx) <= r) & (numpy.abs(dy) <= BAR_HALF_HEIGHT * r)
    raise ValueError(f"shape_mask: shape must be one of {ALL_SHAPES}, got {shape!r}")


def caption(color: str, shape: str, position: str) -> str:
    """The caption of one image: ``"a {color} {shape} in the {position}"``."""
    return f"a {color} {shape} in the {position}"


@dataclass(frozen=True)
class ShapeParams:
    """The drawn parameters of N images (indices into COLOR_NAMES, SHAPES, POSITION_NAMES; pixels)."""

    color: numpy.ndarray      # (N,) int64
    shape: numpy.ndarray      # (N,) int64, an index into ALL_SHAPES
    position: numpy.ndarray   # (N,) int64
    center: numpy.ndarray     # (N, 2) float64, (row, column) of the shape's centre, in pixels
    radius: numpy.ndarray     # (N,) float64


def check_shapes(shapes) -> tuple[str, ...]:
    """``shapes`` as a tuple of names from ALL_SHAPES (a name listed k times is drawn k times as often),
    or a ValueError naming them."""
    shapes = tuple(shapes) if isinstance(shapes, (tuple, list)) else shapes
    if not isinstance(shapes, tuple) or not shapes or any(s not in ALL_SHAPES for s in shapes):
        raise ValueError(f"shapes: shapes must be names from {ALL_SHAPES}, got {shapes!r}")
    return shapes


def draw_params(num_images: int, seed: int = 0, size: int = SIDE, shapes=SHAPES) -> ShapeParams:
    """Draw the attributes, centre and radius of ``num_images`` images from ``seed``, each shape
    uniformly from the list ``shapes`` (default: the demo's three; the same seed gives the same images;
    a name listed twice is drawn twice as often)."""
    num_images = check_int("num_images", num_images, 1, "shapes")
    shapes = check_shapes(shapes)
    size = check_int("size", size, 8, "shapes")
    if isinstance(seed, bool) or not isinstance(seed, (int, numpy.integer)) or seed < 0:
        raise ValueError(f"shapes: seed must be a non-negative int, got {seed!r}")
    # One row of uniforms per image, so image i depends only on (seed, i): a longer dataset of the same
    # seed starts with the same images.
    u = numpy.random.default_rng(int(seed)).random((num_images, 6))
    color = numpy.minimum((u[:, 0] * len(COLORS)).astype(numpy.int64), len(COLORS) - 1)
    drawn = numpy.minimum((u[:, 1] * len(shapes)).astype(numpy.int64), len(shapes) - 1)
    shape = numpy.asarray([ALL_SHAPES.index(s) for s in shapes], dtype=numpy.int64)[drawn]
    position = numpy.minimum((u[:, 2] * len(POSITIONS)).astype(numpy.int64), len(POSITIONS) - 1)
    scale = size / SIDE
    lo, hi = RADIUS_RANGE
    radius = (lo + (hi - lo) * u[:, 3]) * scale
    jitter = (2.0 * u[:, 4:6] - 1.0) * (JITTER * scale)
    anchors = numpy.asarray(list(POSITIONS.values())) * size            # (5, 2) row, column
    center = anchors[position] + jitter
    return ShapeParams(color, shape, position, center, radius)


def render(params: ShapeParams, size: int = SIDE) -> numpy.ndarray:
    """The images of ``params`` as uint8 (N, S, S, 3)."""
    n = params.color.shape[0]
    out = numpy.zeros((n, size, size, 3), dtype=numpy.uint8)
    palette = numpy.asarray(list(COLORS.values()), dtype=numpy.uint8)   # (7, 3)
    coords = numpy.arange(size, dtype=numpy.float32) + 0.5               # pixel centres
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(n, start + _CHUNK))
        cy = params.center[sl, 0, None, None].astype(numpy.float32)       # (n, 1, 1)
        cx = params.center[sl, 1, None, None].astype(numpy.float32)
        r = params.radius[sl, None, None].astype(numpy.float32)
        dy = coords[None, :, None] - cy                                   # (n, S, 1)
        dx = coords[None, None, :] - cx                                   # (n, 1, S)
        kind = params.shape[sl, None, None]
        masks = [shape_mask(name, dy, dx, r) for name in ALL_SHAPES]       # each (n, S, S)
        mask = numpy.select([kind == k for k in range(len(ALL_SHAPES))], masks)
        out[sl] = mask[..., None] * palette[params.color[sl]][:, None, None, :]
    return out


def make_shapes(num_images: int, seed: int = 0, size: int = SIDE, shapes=SHAPES) -> "ShapesDataset":
    """``num_images`` captioned shape images drawn from ``seed`` (see the module docstring)."""
    return ShapesDataset(num_images, seed=seed, size=size, shapes=shapes)


class ShapesDataset(ArrayDataset):
    """The synthetic shapes, held in memory: ``images`` uint8 (N, S, S, 3), ``captions`` (N strings).

    ``params`` keeps the drawn attributes (``color``, ``shape``, ``position`` indices, centres, radii),
    and ``attributes(i)`` gives image i's ``(color, shape, position)`` names.
    """

    def __init__(self, num_images: int = 10000, seed: int = 0, size: int = SIDE, shapes=SHAPES):
        params = draw_params(num_images, seed, size, shapes)
        captions = [caption(COLOR_NAMES[c], ALL_SHAPES[s], POSITION_NAMES[p])
                    for c, s, p in zip(params.color.tolist(), params.shape.tolist(), params.position.tolist())]
        extra = "" if tuple(shapes) == SHAPES else f", shapes={tuple(shapes)}"
        super().__init__(render(params, size), captions, name=f"shapes(num_images={num_images}, seed={seed}{extra})")
        self.params = params
        self.seed = seed

    def attributes(self, i: int) -> tuple[str, str, str]:
        p = self.params
        return COLOR_NAMES[p.color[i]], ALL_SHAPES[p.shape[i]], POSITION_NAMES[p.position[i]]
