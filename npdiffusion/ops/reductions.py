"""Sums over one axis, each computed the fastest way NumPy offers for its shape, with the rounding
of each way stated.

Shapes: a, b (R, M) -> (R,) for the row reductions; a (N, M) -> (M,) for ``column_sum``.

NumPy's ``sum`` is pairwise (accurate) but slow per row and per entry; a GEMV with ones and
``einsum`` are faster but add in sequence within each of their running sums. These helpers pick by
row length (measurements: docs/benchmarks.md, "Figures behind the code's constants"); the norms,
convolution and linear backwards and attention use them. Which rounding is chosen barely matters
for ordinary outputs (float32 relative error below 5e-7); gradients that are zero in exact
arithmetic (a conv bias feeding a group norm) come out as rounding noise of a different size,
which the golden checks' noise keys allow for (docs/oracle.md).
"""
from __future__ import annotations

from npdiffusion.backend import xp

# Rows up to this long are summed by a GEMV with a ones vector (NumPy's ``sum`` pays a fixed cost
# per row); every partial sum of the GEMV then adds at most 16 entries, the same rounding class as
# NumPy's pairwise summation (8 partial sums of up to 16 entries).
SHORT_ROW = 256
# Rows up to this long (and longer than SHORT_ROW) are summed by ``einsum``: NumPy's SIMD loop with
# a few dozen running sums, faster than the pairwise ``sum`` and no BLAS call, so two threads can
# run it at once. Its running sums are sequential, so its error grows with the row (max relative
# error 4e-7 at 16 K entries against 1e-7 pairwise); longer rows stay pairwise.
MEDIUM_ROW = 1 << 14


def row_sum(a):
    """Sum over the last axis of a 2-D array (R, M) -> (R,): a GEMV with ones for short rows, an
    einsum for medium ones, NumPy's pairwise summation for long ones (see the constants above)."""
    m = a.shape[-1]
    if m <= SHORT_ROW:
        return xp.matmul(a, xp.ones(m, dtype=a.dtype))
    if m <= MEDIUM_ROW:
        return xp.einsum("ij->i", a)
    return a.sum(axis=-1)


def row_dot(a, b):
    """sum(a * b) over the last axis of two 2-D arrays (R, M) -> (R,), without a temporary:
    NumPy's einsum up to ``MEDIUM_ROW`` entries (no BLAS call per row, and two threads calling
    OpenBLAS at once slow each other down), one BLAS dot per row beyond (its 64 running sums keep
    long rows accurate)."""
    if a.shape[-1] <= MEDIUM_ROW:
        return xp.einsum("ij,ij->i", a, b)
    return xp.matmul(a[:, None, :], b[:, :, None])[:, 0, 0]


def column_sum(a):
    """Sum over the first axis of a 2-D array (N, M) -> (M,) by einsum: NumPy's ``sum(axis=0)``
    also adds the rows in sequence, but is slower for narrow arrays."""
    return xp.einsum("nm->m", a)
