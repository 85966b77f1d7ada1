"""NPDIFFUSION_CUPY_STANDIN=1 makes the "cupy" backend the CPU stand-in, for the library and the CLI."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROGRAM = """
import numpy
from npdiffusion.backend import asarray, get_backend, set_backend, to_numpy, xp
set_backend("cupy")
import cupy
x = asarray(numpy.arange(3.0))
print(get_backend(), type(x).__module__, type(x).__name__, xp.sum(x).shape, to_numpy(x * 2).tolist())
"""


def run(program, **env):
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT, **env})


def test_the_environment_variable_selects_the_stand_in():
    proc = run(PROGRAM, NPDIFFUSION_CUPY_STANDIN="1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["cupy", "cupy", "ndarray", "()", "[0.0,", "2.0,", "4.0]"]


def test_the_cli_runs_on_the_stand_in():
    proc = subprocess.run([sys.executable, "-m", "npdiffusion", "--backend", "cupy", "gradcheck",
                           "--layer", "Linear"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT, "NPDIFFUSION_CUPY_STANDIN": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "backend cupy" in proc.stdout
