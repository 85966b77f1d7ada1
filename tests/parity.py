"""Parity with the torch twin on shared weights: forward, input gradients, every parameter gradient.

Used by the module and model tests::

    report = assert_parity(ours, theirs, [x], dtype="float64", rtol=1e-10)

The torch module's weights (randomized first, so zero-initialized layers hide nothing) are copied
into ours through ``load_state_dict``; both run forward on the same inputs, both run backward on
the same random upstream gradients, and every array is compared by relative error
(max |ours - theirs| / max |theirs|).
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.testing import relative_error

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# torch's float32 normal kernel on this CPU: its AVX2 kernel on AVX2/AVX-512 x86, its scalar (DEFAULT)
# kernel elsewhere and under ATEN_CPU_CAPABILITY=default; TorchGenerator(kernel=...) reproduces both
TORCH_NORMAL_KERNEL = "avx2" if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else "scalar"


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """Run torch on ``n`` threads inside the block, then restore the previous count. The tests' torch
    models are tiny: two OpenMP threads on a busy 2-core machine spin-wait far longer than they compute."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def torch_state_to_numpy(module: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.5) -> torch.nn.Module:
    """Redraw every parameter: weights N(0, scale^2/fan_in)-ish, so nothing stays zero or one."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        fan_in = p[0].numel() if p.dim() > 1 else 1
        std = scale / max(fan_in, 1) ** 0.5 if p.dim() > 1 else scale * 0.5
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64) * std
        if p.dim() == 1 and ("norm" in name or name.endswith("ln.weight")) and name.endswith("weight"):
            noise += 1.0  # norm gains around one
        p.copy_(noise.to(p.dtype))
    return module


def redraw_parameters_(module, rng):
    """Redraw every parameter of one of our modules from ``rng`` (a NumPy Generator), in place:
    weights ~ 0.5/sqrt(fan_in), norm gains ~ 1, other vectors ~ 0.2, so nothing stays zero or one."""
    for name, p in module.named_parameters():
        if p.ndim > 1:
            v = rng.standard_normal(p.shape) * 0.5 / p[0].size ** 0.5
        elif "norm" in name and name.endswith("weight"):
            v = 1.0 + 0.2 * rng.standard_normal(p.shape)
        else:
            v = 0.2 * rng.standard_normal(p.shape)
        p[...] = asarray(v)
    return module


def _outputs(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def assert_parity(ours, theirs, inputs, *, dtype="float64", rtol=1e-10, grad_inputs=None,
                  our_forward=None, their_forward=None, our_backward=None, seed=0,
                  load_weights=True, check_param_grads=True):
    """Compare ``ours`` with ``theirs`` (a torch module) on ``inputs`` (NumPy arrays).

    ``grad_inputs``: indices of inputs that receive gradients (default: every floating input).
    ``our_forward(module, *arrays)`` / ``their_forward(module, *tensors)`` override plain calls and
    return an array / tensor or a tuple of them; ``our_backward(module, *grads)`` overrides
    ``module.backward``. Returns the dict of relative errors; raises AssertionError naming every
    array over ``rtol``.
    """
    tdt = TORCH_DTYPES[dtype]
    theirs = theirs.to(tdt)
    ours.to(dtype)
    if load_weights:
        ours.load_state_dict(torch_state_to_numpy(theirs))
    ours.train()
    theirs.train()
    if grad_inputs is None:
        grad_inputs = [i for i, x in enumerate(inputs) if np.asarray(x).dtype.kind == "f"]

    t_inputs = []
    for i, x in enumerate(inputs):
        x = np.asarray(x)
        t = torch.tensor(x, dtype=tdt if x.dtype.kind == "f" else None)
        t.requires_grad_(i in grad_inputs)
        t_inputs.append(t)
    o_inputs = [asarray(np.asarray(x, dtype=dtype) if np.asarray(x).dtype.kind == "f" else x) for x in inputs]

    t_out = _outputs((their_forward or (lambda m, *a: m(*a)))(theirs, *t_inputs))
    o_out = _outputs((our_forward or (lambda m, *a: m(*a)))(ours, *o_inputs))
    rng = np.random.default_rng(seed)
    upstream = [rng.standard_normal(tuple(t.shape)) for t in t_out]

    theirs.zero_grad(set_to_none=True)
    torch.autograd.backward([t for t in t_out], [torch.tensor(g, dtype=tdt) for g in upstream])
    ours.zero_grad()
    o_grads = (our_backward or (lambda m, *g: m.backward(*g)))(ours, *[asarray(g.astype(dtype)) for g in upstream])
    o_grads = list(o_grads) if isinstance(o_grads, tuple) else [o_grads]

    errors = {}
    for k, (o, t) in enumerate(zip(o_out, t_out)):
        errors[f"output[{k}]"] = relative_error(to_numpy(o), t.detach().numpy())
    for g, i in zip(o_grads, grad_inputs):
        errors[f"grad input[{i}]"] = relative_error(to_numpy(g), t_inputs[i].grad.numpy())
    if check_param_grads:
        t_grads = {k: p.grad for k, p in theirs.named_parameters()}
        for name, g in ours.named_grads():
            tg = t_grads.get(name)
            expected = np.zeros(g.shape) if tg is None else tg.numpy()
            errors[f"grad {name}"] = relative_error(to_numpy(g), expected, floor=1e-12)
        missing = set(t_grads) - {n for n, _ in ours.named_parameters()}
        assert not missing, f"torch parameters without a counterpart: {sorted(missing)}"
    bad = {k: v for k, v in errors.items() if not v <= rtol}
    assert not bad, f"parity over rtol={rtol:g} ({dtype}): " + ", ".join(f"{k}={v:.2e}" for k, v in bad.items())
    return errors
