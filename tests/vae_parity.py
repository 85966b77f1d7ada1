"""Helpers of the VAE tests (tests/test_vae_*.py): diffusers twins on randomized weights and
parameter-gradient comparisons that handle gradients which are exactly zero in exact arithmetic.

Some VAE parameters have a true gradient of exactly zero: ``to_k.bias`` (softmax ignores a shift
shared by every key) and a conv bias that only feeds GroupNorms with one channel per group (the
norm subtracts any per-channel constant). Both implementations then hold only rounding noise there
(~1e-16 of the model's largest gradient in float64, ~1e-7 in float32), so a relative error is
meaningless. Such parameters are found from a float64 torch run (gradient <= 1e-11 x the largest
gradient) and checked absolutely: both sides <= rtol x the largest gradient. Every other gradient
is compared by relative error.
"""
from __future__ import annotations

import numpy as np

from npdiffusion.backend import to_numpy
from npdiffusion.testing import relative_error

ZERO_TOL = 1e-11


def zero_gradient_names(grads64: dict) -> set:
    """Names whose float64 gradient is <= ZERO_TOL x the largest gradient (zero in exact arithmetic)."""
    scale = max(float(np.abs(g).max()) for g in grads64.values())
    return {k for k, g in grads64.items() if float(np.abs(g).max()) <= ZERO_TOL * scale}


def grad_errors(ours: dict, theirs: dict, zero_names: set) -> dict:
    """name -> error: relative error for ordinary gradients; max(|ours|, |theirs|) / largest gradient
    for the structurally zero ones."""
    ours = {k: to_numpy(v) for k, v in ours.items()}
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    scale = max(float(np.abs(g).max()) for g in theirs.values())
    errors = {}
    for name, g in ours.items():
        t = theirs[name]
        if name in zero_names:
            errors[name] = max(float(np.abs(g).max()), float(np.abs(t).max())) / scale
        else:
            errors[name] = relative_error(g, t, floor=1e-12)
    return errors


def assert_grads_match(ours: dict, theirs: dict, zero_names: set, rtol: float, what: str = "grad"):
    errors = grad_errors(ours, theirs, zero_names)
    bad = {k: v for k, v in errors.items() if not v <= rtol}
    assert not bad, f"{what} over rtol={rtol:g}: " + ", ".join(f"{k}={v:.2e}" for k, v in sorted(bad.items()))
    return errors
