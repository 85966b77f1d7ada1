"""The cross, the LoRA lesson's new shape: only drawn when asked (the demo's data keeps its bytes), drawn as
a plus sign, and read as a cross by the evaluator when the cross is among the shapes (triangles stay
triangles; without the cross, most crosses fit no shape)."""
import numpy as np
import pytest

from npdiffusion.data.shapes import ALL_SHAPES, SHAPES, draw_params, make_shapes, render
from npdiffusion.evaluation.shape_attributes import read_attributes, score


def test_default_data_never_has_a_cross_and_shapes_pick_uniformly():
    default = make_shapes(600, seed=5)
    assert not any("cross" in c for c in default.captions)
    assert np.array_equal(default.images, make_shapes(600, seed=5, shapes=SHAPES).images)
    mixed = draw_params(4000, seed=5, shapes=ALL_SHAPES)
    counts = np.bincount(mixed.shape, minlength=len(ALL_SHAPES)) / 4000
    assert np.all(np.abs(counts - 1 / len(ALL_SHAPES)) < 0.03)
    assert np.array_equal(draw_params(50, seed=5, shapes=("cross",)).shape, np.full(50, 3))
    weighted = draw_params(3000, seed=5, shapes=("cross", "cross", "circle")).shape   # a name twice: twice as often
    assert set(weighted.tolist()) == {0, 3} and abs((weighted == 3).mean() - 2 / 3) < 0.03


def test_cross_is_a_plus_sign():
    params = draw_params(1, seed=0, shapes=("cross",))
    params.center[0] = (16.0, 16.0)
    params.radius[0] = 6.0
    mask = render(params).max(axis=-1)[0] > 0                        # (32, 32)
    rows, cols = np.nonzero(mask)
    assert rows.min() == 10 and rows.max() == 21 and cols.min() == 10 and cols.max() == 21   # arms reach r = 6
    assert mask[16, 10:22].all() and mask[10:22, 16].all()           # the two bars through the centre
    assert not mask[11, 11] and not mask[20, 20]                     # corners of the box are empty
    # bars of half-width 0.25 r = 1.5 hold the pixel centres 14.5 .. 17.5 (edges included): 12 x 4 each
    assert mask.sum() == 2 * 12 * 4 - 16


def test_evaluator_reads_crosses_only_when_asked():
    data = make_shapes(2000, seed=11, shapes=ALL_SHAPES)
    result = score(data.images, data.captions, shapes=ALL_SHAPES)
    assert result.shape >= 0.99 and result.joint >= 0.99
    crosses = [i for i, c in enumerate(data.captions) if "cross" in c]
    as_three = read_attributes(data.images[crosses]).shape                   # the 3-shape reader: no cross
    assert "cross" not in as_three and as_three.count(None) > len(crosses) / 2   # mostly: no template fits
    old = make_shapes(1000, seed=11)
    assert score(old.images, old.captions, shapes=ALL_SHAPES).shape >= 0.99
    with pytest.raises(ValueError, match="shapes must be names from"):
        make_shapes(5, shapes=("cross", "star"))
    with pytest.raises(ValueError, match="is not of the form"):
        score(data.images[:1], ["a red cross in the center"])     # the demo's evaluator knows no cross
