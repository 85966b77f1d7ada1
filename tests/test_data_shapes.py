"""The synthetic shapes: exact captions, determinism, colours, geometry against a per-pixel reference."""
import math
import re

import numpy as np
import pytest

from npdiffusion.data.shapes import (COLOR_NAMES, COLORS, POSITION_NAMES, POSITIONS, SHAPES, ShapesDataset, caption,
                                     draw_params, make_shapes)

CAPTION = re.compile(r"^a (red|green|blue|yellow|cyan|magenta|white) (circle|square|triangle) in the "
                     r"(top left|top right|bottom left|bottom right|center)$")


def test_spec_lists():
    assert set(COLORS) == {"red", "green", "blue", "yellow", "cyan", "magenta", "white"}
    assert SHAPES == ("circle", "square", "triangle")
    assert set(POSITIONS) == {"top left", "top right", "bottom left", "bottom right", "center"}
    assert caption("red", "circle", "top left") == "a red circle in the top left"


def test_same_seed_same_bytes_other_seed_other_images():
    a, b, c = make_shapes(300, seed=7), make_shapes(300, seed=7), make_shapes(300, seed=8)
    assert a.images.tobytes() == b.images.tobytes() and a.captions == b.captions
    assert a.images.tobytes() != c.images.tobytes()
    assert a.images.shape == (300, 32, 32, 3) and a.images.dtype == np.uint8
    assert make_shapes(50, seed=7).images.tobytes() == a.images[:50].tobytes()   # chunking changes nothing


def test_captions_are_exact_and_match_the_drawn_attributes_and_cover_every_combination():
    ds = make_shapes(3000, seed=1)
    p = ds.params
    seen = set()
    for i, text in enumerate(ds.captions):
        m = CAPTION.match(text)
        assert m, text
        assert m.groups() == (COLOR_NAMES[p.color[i]], SHAPES[p.shape[i]], POSITION_NAMES[p.position[i]])
        assert ds.attributes(i) == m.groups()
        seen.add(m.groups())
    assert len(seen) == 7 * 3 * 5


def test_black_background_and_one_pure_colour_per_image():
    ds = make_shapes(500, seed=2)
    palette = np.asarray(list(COLORS.values()), dtype=np.uint8)
    fg = ds.images.max(axis=-1) > 0                                   # (N, S, S)
    assert fg.any(axis=(1, 2)).all()
    expected = palette[ds.params.color]                               # (N, 3)
    assert (ds.images == np.where(fg[..., None], expected[:, None, None, :], 0)).all()


def reference_mask(cy, cx, r, kind, size=32):
    """Per-pixel loops, written from the spec: pixel (y, x) is in when its centre is inside the shape."""
    mask = np.zeros((size, size), dtype=bool)
    for y in range(size):
        for x in range(size):
            py, px = y + 0.5 - cy, x + 0.5 - cx
            if kind == "circle":
                inside = math.hypot(py, px) <= r
            elif kind == "square":
                h = 0.85 * r
                inside = abs(py) <= h and abs(px) <= h
            else:  # apex (cy - r, cx), base y = cy + r, half-width growing linearly to r
                inside = -r <= py <= r and abs(px) <= (py + r) / 2
            mask[y, x] = inside
    return mask


def test_geometry_matches_a_per_pixel_reference():
    ds = make_shapes(40, seed=3)
    p = ds.params
    for i in range(40):
        ref = reference_mask(p.center[i, 0], p.center[i, 1], p.radius[i], SHAPES[p.shape[i]])
        got = ds.images[i].max(axis=-1) > 0
        # float32 rounding in the vectorized version may flip a pixel lying on the boundary exactly
        assert (got != ref).sum() <= 1, (i, SHAPES[p.shape[i]])


def test_sizes_jitter_and_quadrants():
    ds = make_shapes(2000, seed=4)
    p = ds.params
    assert p.radius.min() >= 4.5 and p.radius.max() <= 7.0 and np.ptp(p.radius) > 2.0
    anchors = np.asarray(list(POSITIONS.values())) * 32
    offset = p.center - anchors[p.position]
    assert np.abs(offset).max() <= 1.0 and np.abs(offset).max() > 0.9           # a little jitter
    fg = ds.images.max(axis=-1) > 0
    for i in range(2000):
        rows, cols = np.nonzero(fg[i].any(axis=1))[0], np.nonzero(fg[i].any(axis=0))[0]
        pos = POSITION_NAMES[p.position[i]]
        if pos != "center":   # a quadrant's shape stays inside its 16x16 quadrant
            top = 0 if "top" in pos else 16
            left = 0 if "left" in pos else 16
            assert rows.min() >= top and rows.max() < top + 16 and cols.min() >= left and cols.max() < left + 16


def test_shapes_have_their_fill_ratio_and_triangles_point_up():
    ds = make_shapes(600, seed=5)
    fg = ds.images.max(axis=-1) > 0
    for i in range(600):
        rows = np.nonzero(fg[i].any(axis=1))[0]
        cols = np.nonzero(fg[i].any(axis=0))[0]
        fill = fg[i].sum() / (len(rows) * len(cols))
        kind = SHAPES[ds.params.shape[i]]
        widths = fg[i][rows].sum(axis=1)
        if kind == "square":
            assert fill == 1.0
        elif kind == "circle":
            assert 0.65 < fill < 0.95
            assert widths[len(widths) // 2] == widths.max()
        else:
            assert 0.5 <= fill < 0.64
            assert (np.diff(widths) >= 0).all() and widths[0] < widths[-1]     # narrow top, wide base


def test_other_sizes_scale_the_geometry():
    ds = make_shapes(20, seed=0, size=64)
    assert ds.images.shape == (20, 64, 64, 3) and ds.size == 64
    assert (ds.params.radius >= 9.0).all()


@pytest.mark.parametrize("kwargs,match", [
    ({"num_images": 0}, "num_images must be a positive int, got 0"),
    ({"num_images": 2.5}, "num_images must be a positive int, got 2.5"),
    ({"num_images": 3, "seed": -1}, "seed must be a non-negative int, got -1"),
    ({"num_images": 3, "size": 4}, "size must be an int >= 8, got 4"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShapesDataset(**kwargs)


def test_draw_params_is_the_only_source_of_randomness():
    a, b = draw_params(100, 11), draw_params(100, 11)
    for field in ("color", "shape", "position", "center", "radius"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
