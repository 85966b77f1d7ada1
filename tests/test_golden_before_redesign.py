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
1e-11 of the largest magnitude bounds those differences (a few hundred to a few thousand ulps),
while a changed formula moves values by orders of magnitude more. The magnitude is the larger of the
key's own and that of its group (all ``param_grad/`` keys, all ``input_grad/`` keys, ...): a gradient
that is zero in exact arithmetic (an attention key projection's bias; a bias before a norm) holds
only rounding noise of the size of the terms that cancelled in it, which are those of its siblings
(seen under the baseline kernels of .ci/run's second pass: 4e-15 of noise on a key of size 3e-15).
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
    group_scale = {}
    for key, want in expected.items():
        group = key.split("/")[0]
        group_scale[group] = max(group_scale.get(group, 0.0), float(np.max(np.abs(want))) if want.size else 0.0)
    for key, want in expected.items():
        got = actual.get(key)
        if got is None or got.shape != want.shape:
            problems.append(f"{key}: expected shape {want.shape}, got {None if got is None else got.shape}")
            continue
        scale = group_scale[key.split("/")[0]]
        err = float(np.max(np.abs(got - want))) if want.size else 0.0
        if not err <= RTOL * scale:
            problems.append(f"{key}: max |diff| {err:.3e} > {RTOL} * max |golden| of its group {scale:.3e}")
    assert not problems, "\n".join(problems)
