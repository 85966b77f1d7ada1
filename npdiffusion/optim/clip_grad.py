"""``clip_grad_norm_(module, max_norm, norm_type=2.0)``: torch.nn.utils.clip_grad_norm_'s twin.

With G the concatenation of every gradient of the module::

    total = ||G||_p = (sum_i ||g_i||_p^p)^(1/p)        (max_i max |g_i| for p = inf)
    coef  = max_norm / (total + 1e-6)
    g_i <- g_i * coef   for every gradient, in place, when coef < 1

Returns ``total`` (a Python float, measured before clipping). A non-finite total leaves the
gradients untouched (torch would multiply them by NaN) and is returned so the caller can skip
the step, or raises with ``error_if_nonfinite=True``. See docs/optim.md ("Gradient clipping").

On a module in flat training storage (npdiffusion/nn/flat_parameters.py) the g_i are the
parameters' views of the gradient buffers, in the same order, so the norm is the same to the last bit
(training in either layout gives the same weights), and the clipping is one multiply per buffer.
"""
from __future__ import annotations

import math

from npdiffusion.backend import xp
from npdiffusion.nn import flat_parameters
from npdiffusion.optim.optimizer import check_float, check_module


def _grad_norm(g, p: float):
    """||g||_p as a 0-d array (float16 is measured in float32)."""
    flat = g.reshape(-1)
    if flat.dtype.itemsize < 4 and flat.dtype.kind == "f":
        flat = flat.astype(xp.float32)
    if flat.size == 0:
        return xp.zeros((), dtype=flat.dtype)
    if p == 2.0:
        return xp.sqrt(xp.vdot(flat, flat))
    if math.isinf(p):
        return xp.max(xp.abs(flat))
    return xp.sum(xp.abs(flat) ** p) ** (1.0 / p)


def grad_norm_array(module, norm_type: float = 2.0):
    """``grad_norm`` as a 0-d float64 array of the backend, not read back to the host (no device
    sync: the caller reads it together with the loss, ``backend.to_host_floats``); None without
    gradients."""
    check_module("grad_norm", module)
    p = check_float("grad_norm", "norm_type", norm_type, low_open=True, allow_inf=True)
    flat = flat_parameters.current(module)
    if flat is not None:
        norms = [_grad_norm(g, p) for group in flat.groups for g in group.grad_views]
    else:
        norms = [_grad_norm(g, p) for _, g in module.named_grads()]
    if not norms:
        return None
    stacked = xp.stack([n.astype(xp.float64) for n in norms])
    if math.isinf(p):
        return xp.max(stacked)
    return xp.sum(stacked ** p) ** (1.0 / p)


def grad_norm(module, norm_type: float = 2.0) -> float:
    """The ``norm_type``-norm of all of ``module``'s gradients taken together."""
    total = grad_norm_array(module, norm_type)
    return 0.0 if total is None else float(total)


def clip_grads_with_norm_(module, max_norm: float, total: float) -> None:
    """The clipping of ``clip_grad_norm_`` with the total norm ``total`` already measured (a finite
    float): every gradient times ``max_norm / (total + 1e-6)`` when that is below 1."""
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        flat = flat_parameters.current(module)
        grads = [group.grads for group in flat.groups] if flat is not None else [g for _, g in module.named_grads()]
        for g in grads:
            g *= coef


def clip_grad_norm_(module, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> float:
    """Scale every gradient of ``module`` in place so their joint norm is at most ``max_norm``.

    Returns the total norm before clipping (see the module docstring).
    """
    max_norm = check_float("clip_grad_norm_", "max_norm", max_norm)
    total = grad_norm(module, norm_type)
    if not math.isfinite(total):
        if error_if_nonfinite:
            raise RuntimeError(f"clip_grad_norm_: the total norm of order {norm_type} of the gradients is "
                               f"{total}; set error_if_nonfinite=False to return it instead")
        return total
    clip_grads_with_norm_(module, max_norm, total)
    return total
