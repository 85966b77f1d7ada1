"""``npdiffusion --backend cupy demo --quick`` and then ``sample`` from its model folder, on the CuPy
stand-in (issue #18): the whole command line on the device path, in process, without a GPU.

``NPDIFFUSION_CUPY_STANDIN=1`` makes ``--backend cupy`` the strict CPU stand-in
(npdiffusion/cupy_standin), which refuses host/device mixing and implicit conversions as CuPy does.
The stand-in's arithmetic is NumPy's, so its losses are compared with the NumPy run of the same
quick demo (``quick_demo_model``, conftest.py): the two paths differ only where ops choose another
formula on CuPy (the two-pass variance, the attention's row maximum), i.e. in the last bits.
docs/gpu.md, "The CuPy stand-in".
"""
import os

import numpy as np
import pytest

from npdiffusion import cupy_standin
from npdiffusion.backend import get_backend, set_backend
from npdiffusion.cli import main
from npdiffusion.training.loop import read_history_csv


@pytest.fixture
def standin_cli(monkeypatch):
    """The command line's ``--backend cupy`` on the stand-in; the backend and ``sys.modules`` restored after."""
    previous = get_backend()
    was_installed = cupy_standin.is_installed()
    monkeypatch.setenv("NPDIFFUSION_CUPY_STANDIN", "1")
    try:
        yield
    finally:
        set_backend(previous)
        if not was_installed and cupy_standin.is_installed():
            cupy_standin.uninstall()


def test_quick_demo_then_sample_on_the_cupy_standin(standin_cli, quick_demo_model, tmp_path, capsys):
    out = tmp_path / "demo"
    with cupy_standin.count_syncs() as log:
        assert main(["--backend", "cupy", "demo", "--quick", "--out", str(out), "--no-progress"]) == 0
        assert get_backend() == "cupy" and cupy_standin.is_installed()
        assert main(["--backend", "cupy", "sample", "--model", str(out / "model"), "--prompt", "a red circle",
                     "--prompt", "a blue square", "--steps", "3", "--seed", "0", "--guidance", "2",
                     "--out", str(out / "samples"), "--no-progress"]) == 0
    assert log.total > 0, "nothing ran on device arrays: the stand-in was not used"
    for name in ("samples.png", "diffusion.png", "losses.png", "report.md", "model/model_index.json",
                 "model/unet/config.json", "samples/grid.png"):
        assert (out / name).is_file(), name
    assert len([f for f in os.listdir(out / "samples") if f.endswith(".png")]) == 3   # 2 images + grid
    # the device path trains the same model as the NumPy path, up to the last bits
    numpy_runs = os.path.join(os.path.dirname(quick_demo_model), "runs")
    for stage in ("clip", "vae", "unet"):
        got = read_history_csv(str(out / "runs" / stage / "losses.csv"))
        want = read_history_csv(os.path.join(numpy_runs, stage, "losses.csv"))
        assert [r["step"] for r in got] == [r["step"] for r in want]
        np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-4, err_msg=stage)
    assert "error" not in capsys.readouterr().err
