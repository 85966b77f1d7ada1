"""npdiffusion/ops/reductions.py: every branch (short, medium and long rows; columns) equals the
float64 sum to float32 rounding, and float64 inputs to float64 rounding."""
import numpy as np
import pytest

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.ops import reductions as red


@pytest.mark.parametrize("m", [1, 16, red.SHORT_ROW, red.SHORT_ROW + 1, 2048, red.MEDIUM_ROW,
                               red.MEDIUM_ROW + 1])
@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-6), ("float64", 1e-13)])
def test_row_sum_and_row_dot_equal_float64_sums(backend, m, dtype, rtol):
    rng = np.random.default_rng(m)
    a = (rng.standard_normal((3, m)) + 0.5).astype(dtype)
    b = rng.standard_normal((3, m)).astype(dtype)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    cases = [(red.row_sum(asarray(a)), a64.sum(-1), np.abs(a64).sum(-1)),
             (red.row_dot(asarray(a), asarray(b)), (a64 * b64).sum(-1), np.abs(a64 * b64).sum(-1))]
    for got, want, scale in cases:                 # error bound: rtol times the sum of |terms|
        got = to_numpy(got)
        assert got.shape == (3,) and got.dtype == np.dtype(dtype)
        assert np.all(np.abs(got - want) <= rtol * scale), (m, dtype)


@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-6), ("float64", 1e-13)])
def test_column_sum_equals_float64_sums(backend, dtype, rtol):
    a = np.random.default_rng(0).standard_normal((300, 7)).astype(dtype)
    got = to_numpy(red.column_sum(asarray(a)))
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_allclose(got, a.astype(np.float64).sum(0), rtol=0, atol=rtol * np.abs(a).sum(0).max())
