"""Float64 outputs and gradients of the U-Net, VAE and CLIP against goldens exported before the
module-protocol redesign (issue 21: fixed backward shapes, caches freed by the protocol, frozen
parameters), which changed no formula.

tests/golden/<model>.safetensors holds, from ``npdiffusion golden export --model <model>`` (float64,
seed 0, the default tiny configs) run on the code before the redesign, the loss and every
``output/``, ``input_grad/`` and ``param_grad/`` key (the per-layer ``act/`` and ``grad/`` keys are
left out to keep the files small: a difference inside shows in the parameter gradients). The test
exports again with today's code and compares.

Tolerance: on the machine that exported them the arrays are bitwise equal (checked when they were
made); another CPU's BLAS kernel and SIMD transcendentals sum and round in another order. A float64
sum of n terms reordered moves by at most about n * eps * sum |terms| (eps = 2.2e-16); here n is at
most a few hundred (GEMM reductions of these tiny configs) and the chain is ~100 ops deep, so
1e-11 of each key's largest magnitude bounds those differences (a few hundred to a few thousand
ulps), while a changed formula moves values by orders of magnitude more.
"""
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from npdiffusion.oracle import export_golden

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
RTOL = 1e-11


@pytest.mark.parametrize("model", ["unet", "vae", "text-encoder", "clip"])
def test_outputs_and_gradients_equal_the_goldens_from_before_the_redesign(tmp_path, model):
    expected = load_file(os.path.join(GOLDEN, f"{model}.safetensors"))
    export_golden(model, str(tmp_path / model), dtype="float64", seed=0)
    actual = load_file(str(tmp_path / model / "golden.safetensors"))
    assert any(k.startswith("param_grad/") for k in expected) and any(k.startswith("output/") for k in expected)
    problems = []
    for key, want in expected.items():
        got = actual.get(key)
        if got is None or got.shape != want.shape:
            problems.append(f"{key}: expected shape {want.shape}, got {None if got is None else got.shape}")
            continue
        scale = float(np.max(np.abs(want))) if want.size else 0.0
        err = float(np.max(np.abs(got - want))) if want.size else 0.0
        if not err <= RTOL * scale:
            problems.append(f"{key}: max |diff| {err:.3e} > {RTOL} * max |golden| {scale:.3e}")
    assert not problems, "\n".join(problems)
