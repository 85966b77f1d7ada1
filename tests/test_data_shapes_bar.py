"""The bar, the LoRA lesson's new shape (a wide rectangle the demo's VAE keeps; the cross it blurs): only drawn
when asked (the demo's data keeps its bytes), drawn 2 r wide and r high, read as a bar by the evaluator when
the bar is among the shapes, and never by the demo's three-shape reader. VAE-free."""
import numpy as np
import pytest

from npdiffusion.data.shapes import ALL_SHAPES, SHAPES, draw_params, make_shapes, render
from npdiffusion.evaluation.shape_attributes import read_attributes, score

WITH_BAR = SHAPES + ("bar",)


def test_default_data_never_has_a_bar_and_bar_is_requestable():
    default = make_shapes(600, seed=5)
    assert not any("bar" in c for c in default.captions)
    bars = make_shapes(50, seed=5, shapes=("bar",))
    assert np.array_equal(bars.params.shape, np.full(50, ALL_SHAPES.index("bar")))
    assert all(c.split()[2] == "bar" for c in bars.captions)
    mixed = draw_params(3000, seed=5, shapes=("bar", "circle", "square", "triangle")).shape
    assert set(mixed.tolist()) == {0, 1, 2, ALL_SHAPES.index("bar")} and abs((mixed == 4).mean() - 0.25) < 0.03


def test_bar_is_a_wide_rectangle():
    params = draw_params(1, seed=0, shapes=("bar",))
    params.center[0] = (16.0, 16.0)
    params.radius[0] = 6.0
    mask = render(params).max(axis=-1)[0] > 0                        # (32, 32)
    # |dx| <= r = 6 holds the pixel centres 10.5 .. 21.5, |dy| <= 0.5 r = 3 the centres 13.5 .. 18.5
    expected = np.zeros((32, 32), dtype=bool)
    expected[13:19, 10:22] = True
    assert np.array_equal(mask, expected)
    params.center[0] = (8.3, 23.6)                                   # every drawn bar stays in its quadrant
    params.radius[0] = 7.0
    rows, cols = np.nonzero(render(params).max(axis=-1)[0])
    assert rows.min() >= 0 and rows.max() < 16 and cols.min() >= 16 and cols.max() < 32


def test_evaluator_reads_bars_only_when_asked():
    data = make_shapes(2000, seed=11, shapes=WITH_BAR)
    result = score(data.images, data.captions, shapes=WITH_BAR)
    assert result.shape == 1.0 and result.joint == 1.0                    # squares are not bars, nor bars squares
    both = make_shapes(2000, seed=12, shapes=ALL_SHAPES)
    assert score(both.images, both.captions, shapes=ALL_SHAPES).joint == 1.0
    bars = [i for i, c in enumerate(data.captions) if " bar " in c]
    as_three = read_attributes(data.images[bars]).shape                     # the 3-shape reader: no bar
    assert len(bars) > 400 and "bar" not in as_three
    old = make_shapes(1000, seed=11)
    assert "bar" not in read_attributes(old.images, shapes=WITH_BAR).shape  # the old shapes never read as bars
    with pytest.raises(ValueError, match="is not of the form"):
        score(data.images[:1], ["a red bar in the center"])       # the demo's evaluator knows no bar
