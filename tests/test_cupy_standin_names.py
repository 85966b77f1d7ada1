"""The CuPy stand-in exposes only names real CuPy has, and its list of CuPy's names is current."""
import importlib.util
import os
import subprocess
import sys

import pytest

from npdiffusion import cupy_standin
from npdiffusion.cupy_standin import cupyx
from npdiffusion.cupy_standin.cupy import cuda, linalg
from npdiffusion.cupy_standin.names import NAMES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def public(module):
    return {name for name in dir(module) if not name.startswith("_")}


@pytest.mark.parametrize("key,module", [
    ("cupy", cupy_standin.cupy), ("cupy.linalg", linalg), ("cupy.cuda", cuda),
    ("cupy.cuda.runtime", cuda.runtime), ("cupyx", cupyx), ("cupyx.scipy", cupyx.scipy),
    ("cupyx.scipy.special", cupyx.scipy.special),
    ("cupy.ndarray", cupy_standin.cupy.ndarray), ("cupy.ufunc", cupy_standin.cupy.add),
    ("cupy.cuda.nccl", cuda.nccl), ("cupy.cuda.nccl.NcclCommunicator", cuda.nccl.NcclCommunicator),
])
def test_the_stand_in_exposes_only_names_cupy_has(key, module):
    extra = public(module) - set(NAMES[key])
    assert not extra, f"{key}: the stand-in exposes names real CuPy lacks: {sorted(extra)}"


def test_the_names_the_library_uses_are_implemented():
    cupy = cupy_standin.cupy
    for name in ("matmul", "where", "empty", "zeros", "exp", "asarray", "einsum", "quantile",
                 "ascontiguousarray", "float32", "inf", "result_type", "isfinite", "take_along_axis"):
        assert name in dir(cupy), name
    assert "norm" in dir(linalg) and "reduceat" in dir(cupy.add)
    assert {"expit", "erf"} <= public(cupyx.scipy.special)


@pytest.mark.skipif(importlib.util.find_spec("cupy") is None,
                    reason="real CuPy is not installed here, so the stand-in's name list cannot be "
                           "compared with it (pip install cupy-cuda12x; no GPU needed)")
def test_the_name_list_agrees_with_the_installed_cupy():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "cupy_names.py"), "--check"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
