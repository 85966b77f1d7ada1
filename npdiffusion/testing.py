"""Gradient checking and comparison helpers, public so users can check their own modules.

``gradcheck(module, *inputs)`` compares a module's hand-written backward with float64 central
differences: along random directions for every input and every parameter, and element by element
(the full Jacobian-vector product) for arrays with at most ``full_max`` entries. The upstream
gradient is random (never all ones: that hides bugs in softmax and normalization backwards).

``gradcheck_op(forward, backward, inputs)`` does the same for a stateless op pair whose
``forward(*inputs)`` returns ``(y, cache)`` and ``backward(dy, cache)`` returns one gradient per
input (None where an input gets none).

Relative error of a directional derivative: |num - ana| / max(|num|, |ana|, floor).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy

from npdiffusion.backend import asarray, to_numpy, xp
from npdiffusion.nn.recorder import given_input_grads


def relative_error(actual, expected, floor: float = 1e-30) -> float:
    """max |actual - expected| / max(max |expected|, floor), computed on the host in float64."""
    a = to_numpy(actual).astype(numpy.float64)
    e = to_numpy(expected).astype(numpy.float64)
    if a.shape != e.shape:
        raise ValueError(f"shapes differ: actual {a.shape}, expected {e.shape}")
    if a.size == 0:
        return 0.0
    return float(numpy.max(numpy.abs(a - e)) / max(float(numpy.max(numpy.abs(e))), floor))


def noncontiguous(x):
    """The same values as ``x`` in a non-contiguous view (every other element of a wider array)."""
    x = asarray(x)
    if x.ndim == 0:
        return x
    wide = xp.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
    wide[..., ::2] = x
    return wide[..., ::2]


@dataclass
class GradcheckReport:
    """Per-array worst relative error of the analytic gradient against central differences."""

    errors: dict = field(default_factory=dict)  # name -> worst relative error
    tolerance: float = 1e-6

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    @property
    def passed(self) -> bool:
        return all(numpy.isfinite(e) and e <= self.tolerance for e in self.errors.values())

    def __str__(self):
        width = max((len(n) for n in self.errors), default=4)
        lines = [f"{'array':<{width}}  relative error   (tolerance {self.tolerance:.1e})"]
        for name, err in self.errors.items():
            flag = "" if err <= self.tolerance else "   <-- FAILED"
            lines.append(f"{name:<{width}}  {err:.3e}{flag}")
        return "\n".join(lines)


def _as_outputs(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _check_arrays(named_arrays, named_grads, loss, rng, directions, eps, full_max, floor, report):
    """Compare ``named_grads`` with central differences of ``loss()`` in each array's entries."""
    for name, arr in named_arrays:
        grad = named_grads[name]
        if grad is None:
            raise AssertionError(f"no analytic gradient for {name!r}")
        grad = to_numpy(grad).astype(numpy.float64)
        worst = 0.0
        probes = [rng.standard_normal(arr.shape) for _ in range(directions)]
        if arr.size <= full_max:
            probes = list(numpy.eye(arr.size).reshape((arr.size,) + arr.shape)) + probes
        saved = arr.copy()
        for d in probes:
            d_dev = asarray(d, dtype=arr.dtype)
            arr[...] = saved + eps * d_dev
            plus = loss()
            arr[...] = saved - eps * d_dev
            minus = loss()
            arr[...] = saved
            numeric = (plus - minus) / (2 * eps)
            analytic = float(numpy.sum(grad * d))
            scale = max(abs(numeric), abs(analytic), floor)
            worst = max(worst, abs(numeric - analytic) / scale)
        report.errors[name] = worst


def gradcheck(module, *inputs, grad_inputs=None, directions: int = 3, eps: float = 1e-6,
              full_max: int = 0, tolerance: float = 1e-6, floor: float = 1e-10,
              seed: int = 0, check_params: bool = True, **kwargs) -> GradcheckReport:
    """Check ``module.backward`` against central differences of ``module.forward``.

    ``module`` must be in float64 (``module.to("float64")``) and the inputs float64 arrays.
    ``grad_inputs`` (default: every floating input) says which positional inputs receive a
    gradient; ``kwargs`` go to forward unchanged. The scalar checked is sum(g * y) over the
    outputs y with random upstream gradients g.
    """
    rng = numpy.random.default_rng(seed)
    module.train()
    if grad_inputs is None:
        grad_inputs = [i for i, x in enumerate(inputs) if hasattr(x, "dtype") and x.dtype.kind == "f"]
    inputs = list(inputs)
    outs = _as_outputs(module.forward(*inputs, **kwargs))
    upstream = [asarray(rng.standard_normal(o.shape), dtype=o.dtype) for o in outs]

    def loss():
        ys = _as_outputs(module.forward(*inputs, **kwargs))
        return float(sum(float(xp.sum(y.astype(xp.float64) * g)) for y, g in zip(ys, upstream)))

    module.zero_grad()
    module.forward(*inputs, **kwargs)
    result = module.backward(*upstream)
    input_grads = given_input_grads(result)          # None entries: inputs that were not given
    if len(input_grads) != len(grad_inputs):
        raise AssertionError(f"backward returned {len(input_grads)} gradients for {len(grad_inputs)} inputs")
    named_grads = {f"input[{i}]": g for i, g in zip(grad_inputs, input_grads)}
    if check_params:
        named_grads.update({k: v.copy() for k, v in module.named_grads()})
    report = GradcheckReport(tolerance=tolerance)
    named_arrays = [(f"input[{i}]", inputs[i]) for i in grad_inputs]
    if check_params:
        named_arrays += list(module.named_parameters())
    _check_arrays(named_arrays, named_grads, loss, rng, directions, eps, full_max, floor, report)
    return report


def gradcheck_op(forward, backward, inputs, grad_inputs=None, directions: int = 3, eps: float = 1e-6,
                 full_max: int = 0, tolerance: float = 1e-6, floor: float = 1e-10, seed: int = 0,
                 **kwargs) -> GradcheckReport:
    """Check a stateless pair: ``forward(*inputs, **kwargs) -> (y, cache)``,
    ``backward(dy, cache) -> grads`` (one per input, in order; a single array for one input).

    ``y`` may be a tuple of outputs, then ``dy`` is the tuple of their upstream gradients.
    """
    rng = numpy.random.default_rng(seed)
    inputs = list(inputs)
    if grad_inputs is None:
        grad_inputs = [i for i, x in enumerate(inputs) if hasattr(x, "dtype") and x.dtype.kind == "f"]
    y, cache = forward(*inputs, **kwargs)
    is_tuple = isinstance(y, (tuple, list))
    outs = _as_outputs(y)
    upstream = [asarray(rng.standard_normal(o.shape), dtype=o.dtype) for o in outs]

    def loss():
        ys = _as_outputs(forward(*inputs, **kwargs)[0])
        return float(sum(float(xp.sum(y_.astype(xp.float64) * g)) for y_, g in zip(ys, upstream)))

    grads = backward(tuple(upstream) if is_tuple else upstream[0], cache)
    grads = list(grads) if isinstance(grads, (tuple, list)) else [grads]
    named_grads = {f"input[{i}]": grads[i] for i in grad_inputs}
    report = GradcheckReport(tolerance=tolerance)
    named_arrays = [(f"input[{i}]", inputs[i]) for i in grad_inputs]
    _check_arrays(named_arrays, named_grads, loss, rng, directions, eps, full_max, floor, report)
    return report
