"""GEGLU: a gated linear unit with the exact (erf) GELU as its gate, as a forward/backward pair.

Shapes: h (..., 2F) is split on its last axis into value = h[..., :F] and gate = h[..., F:];
out (..., F) = value * GELU(gate), GELU(g) = g * Phi(g), Phi(g) = (1 + erf(g / sqrt 2)) / 2.
This is diffusers' ``GEGLU`` after its ``proj`` Linear (``hidden_states.chunk(2, dim=-1)``).
Derivation of the backward: docs/ops/attention.md (section "GEGLU").

float16 inputs are computed in float32 and cast back; float32 and float64 stay as they are.
Phi uses the erf helper of ops/activations.py. Unlike ``gelu_backward`` there, the backward here
does not evaluate erf again: Phi(gate) is cached (half of h's size), because erf is the most
expensive element-wise step on the CPU (docs/ops/activations.md). Both
passes run over cache-sized blocks of rows (R = the product of h's leading axes) on the CPU's
threads (npdiffusion/parallel.py).
"""
from __future__ import annotations

import math
from typing import NamedTuple

from npdiffusion.backend import xp
from npdiffusion.checks import compute_dtype
from npdiffusion.ops.activations import phi_cdf
from npdiffusion.parallel import BLOCK_ENTRIES, parallel_for

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class GegluCache(NamedTuple):
    """What ``geglu_backward`` needs from the forward."""
    rows: object          # h as (R, 2F) in the compute dtype: [value | gate]
    cdf: object           # Phi(gate) (R, F)
    in_dtype: object      # h's dtype (dh is cast back to it)
    in_shape: tuple       # h's shape (..., 2F)


def geglu_forward(h):
    """out = value * GELU_erf(gate) with [value | gate] = h split on the last axis.

    h (..., 2F) -> out (..., F). Returns ``(out, cache)``; cache a ``GegluCache`` (h and Phi(gate),
    so the backward does not evaluate erf again).
    """
    if not hasattr(h, "shape") or not hasattr(h, "dtype"):
        raise TypeError(f"geglu: h must be an array, got {type(h).__name__}")
    if h.ndim == 0 or h.shape[-1] % 2:
        raise ValueError(f"geglu: h must have an even number of entries on its last axis, got shape {tuple(h.shape)}")
    cdt = compute_dtype(h.dtype, "geglu", "h")
    f = h.shape[-1] // 2
    hc = h.astype(cdt, copy=False)
    rows = hc.reshape(-1, 2 * f)                            # (R, 2F), a copy only if strided
    cdf = xp.empty((rows.shape[0], f), dtype=cdt)           # Phi(gate) (R, F)
    out = xp.empty((rows.shape[0], f), dtype=cdt)

    def block(lo, hi):
        value, gate = rows[lo:hi, :f], rows[lo:hi, f:]
        phi_cdf(gate, cdf[lo:hi])
        xp.multiply(gate, cdf[lo:hi], out=out[lo:hi])       # GELU(gate)
        out[lo:hi] *= value

    parallel_for(block, rows.shape[0], 2 * f, BLOCK_ENTRIES)
    shape = h.shape[:-1] + (f,)
    return out.reshape(shape).astype(h.dtype, copy=False), GegluCache(rows, cdf, h.dtype, h.shape)


def geglu_backward(dout, cache):
    """dh = [dout * GELU(gate) | dout * value * (Phi(gate) + gate * phi(gate))], phi the normal pdf.

    Returns dh (..., 2F), a fresh array of h's dtype.
    """
    rows, cdf, dtype, shape = cache
    f = cdf.shape[-1]
    dout = dout.astype(rows.dtype, copy=False).reshape(-1, f)
    dh = xp.empty(rows.shape, dtype=rows.dtype)

    def block(lo, hi):
        value, gate, dy = rows[lo:hi, :f], rows[lo:hi, f:], dout[lo:hi]
        dvalue, dgate = dh[lo:hi, :f], dh[lo:hi, f:]
        xp.multiply(gate, cdf[lo:hi], out=dvalue)           # GELU(gate)
        dvalue *= dy
        xp.multiply(gate, gate, out=dgate)                  # GELU'(gate) = Phi + gate * phi
        dgate *= -0.5
        xp.exp(dgate, out=dgate)
        dgate *= gate
        dgate *= _INV_SQRT_2PI
        dgate += cdf[lo:hi]
        dgate *= value
        dgate *= dy

    parallel_for(block, rows.shape[0], 2 * f, BLOCK_ENTRIES)
    return dh.reshape(shape).astype(dtype, copy=False)
