"""The npdiffusion command: --help/--version, one-line errors with exit code 2, gradcheck, toy, plots.

Most tests run ``python -m npdiffusion`` in a subprocess, as a user would; the ones that need to
plant a broken layer or a bug call ``npdiffusion.cli.main`` in-process.
"""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import npdiffusion
from npdiffusion import cli
from npdiffusion.backend import asarray, is_available
from npdiffusion.cli import gradcheck as gradcheck_cmd
from npdiffusion.cli.toy import ToyDenoiser, make_shapes
from npdiffusion.nn.linear import Linear
from npdiffusion.plotting import COLORS, line_plot, nice_ticks, save_png
from npdiffusion.testing import gradcheck, noncontiguous

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def npd(*args, timeout=120, backend_env=None):
    """Run ``python -m npdiffusion *args`` from a neutral folder; returns the CompletedProcess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("NPDIFFUSION_BACKEND", None)
    if backend_env is not None:
        env["NPDIFFUSION_BACKEND"] = backend_env
    env["OPENBLAS_NUM_THREADS"] = "1"   # tiny GEMMs; and pytest -n 2 already uses both cores
    return subprocess.run([sys.executable, "-m", "npdiffusion", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=os.path.dirname(ROOT))


def one_error_line(proc, command):
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"npdiffusion {command}: error: "), lines[0]
    return lines[0]


# ------------------------------------------------------------------------------ top level
def test_help_lists_every_command_and_the_backend_option():
    proc = npd("--help")
    assert proc.returncode == 0, proc.stderr
    for name in cli.COMMANDS:
        assert name.rsplit(".", 1)[1] in proc.stdout
    assert "--backend numpy|cupy" in proc.stdout
    for sub in ("gradcheck", "toy"):
        sub_help = npd(sub, "--help")
        assert sub_help.returncode == 0 and f"usage: npdiffusion {sub}" in sub_help.stdout


def test_version():
    proc = npd("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"npdiffusion {npdiffusion.__version__}"


def test_missing_command_is_a_usage_error():
    proc = npd()
    assert proc.returncode == 2
    assert "the following arguments are required: COMMAND" in proc.stderr


def test_unknown_backend_gives_one_line_and_exit_2():
    proc = npd("--backend", "tpu", "gradcheck", "--layer", "Linear")
    line = one_error_line(proc, "gradcheck")
    assert proc.returncode == 2
    assert "backend must be one of ('numpy', 'cupy'), got 'tpu'" in line
    assert proc.stdout == ""


def test_bad_backend_environment_variable_gives_one_line_and_exit_2():
    proc = npd("gradcheck", "--layer", "Linear", backend_env="tpu")
    line = one_error_line(proc, "gradcheck")
    assert proc.returncode == 2 and "backend must be one of ('numpy', 'cupy'), got 'tpu'" in line
    assert npd("--backend", "numpy", "gradcheck", "--layer", "Linear", backend_env="tpu").returncode == 0


@pytest.mark.skipif(is_available("cupy"), reason="this machine has CuPy and a GPU, so --backend cupy works")
def test_cupy_backend_without_a_gpu_gives_one_line_and_exit_2():
    proc = npd("--backend", "cupy", "gradcheck", "--layer", "Linear")
    line = one_error_line(proc, "gradcheck")
    assert proc.returncode == 2 and "the 'cupy' backend needs" in line


@pytest.mark.skipif(shutil.which("npdiffusion") is None,
                    reason="the npdiffusion console script is not installed here (pip install -e . adds it)")
def test_console_script():
    proc = subprocess.run(["npdiffusion", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"npdiffusion {npdiffusion.__version__}"


def test_expected_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    def bad_value(args):
        raise ValueError("--thing must be positive,\n  got -1")

    def missing(args):
        raise KeyError("unknown layer 'x'")

    def bug(args):
        return 1 / 0

    for run, text in [(bad_value, "--thing must be positive, got -1"), (missing, "unknown layer 'x'")]:
        monkeypatch.setattr(gradcheck_cmd, "run", run)
        assert cli.main(["gradcheck"]) == 2
        assert capsys.readouterr().err == f"npdiffusion gradcheck: error: {text}\n"
    monkeypatch.setattr(gradcheck_cmd, "run", bug)
    with pytest.raises(ZeroDivisionError):
        cli.main(["gradcheck"])


# ------------------------------------------------------------------------------- gradcheck
ROW = re.compile(r"^(\S+)\s+(\d+)\s+(\S+)\s+(pass|FAIL)\s+\S+s$")


def test_gradcheck_passes_every_layer_and_prints_a_table():
    proc = npd("gradcheck", "--seed", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1].split() == ["layer", "arrays", "max", "rel.", "error", "result", "time"]
    rows = [ROW.match(line) for line in lines[2:-1]]
    checked = [m for m in rows if m]
    assert len(checked) >= 10, proc.stdout            # Linear, norms, activations, attention, ...
    for m in checked:
        assert m.group(4) == "pass" and float(m.group(3)) <= gradcheck_cmd.TOLERANCE
        assert int(m.group(2)) >= 1
    assert {m.group(1) for m in checked} >= {"Linear", "GroupNorm", "LayerNorm", "Attention-cross"}
    assert re.fullmatch(rf"{len(checked)} passed, 0 failed, \d+ skipped", lines[-1])


def test_gradcheck_layer_selection_and_unknown_names():
    proc = npd("gradcheck", "--layer", "linear", "--layer", "LayerNorm")
    assert proc.returncode == 0
    assert [line.split()[0] for line in proc.stdout.splitlines()[2:-1]] == ["Linear", "LayerNorm"]
    proc = npd("gradcheck", "--layer", "Linear", "Conv3d")
    line = one_error_line(proc, "gradcheck")
    assert proc.returncode == 2 and "unknown layer 'Conv3d'; choose from Linear" in line


class _BrokenLinear(Linear):
    """A Linear whose input gradient is off by 1%: gradcheck must catch it."""

    def backward(self, dy):
        return super().backward(dy) * 1.01


def test_gradcheck_reports_a_broken_layer_and_exits_1(monkeypatch, capsys):
    monkeypatch.setitem(gradcheck_cmd.LAYERS, "Broken",
                        ("npdiffusion.nn.linear",
                         lambda m, rng: (_BrokenLinear(3, 2), [noncontiguous(rng.standard_normal((2, 3)))], {})))
    assert cli.main(["gradcheck", "--layer", "Broken", "Linear"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^Broken\s+3\s+\S+\s+FAIL", out, re.M)
    assert re.search(r"^Linear\s+3\s+\S+\s+pass", out, re.M)
    assert "input[0]" in out and "<-- FAILED" in out and out.rstrip().endswith("1 passed, 1 failed, 0 skipped")


def test_gradcheck_skips_a_layer_whose_module_does_not_exist_yet(monkeypatch, capsys):
    monkeypatch.setitem(gradcheck_cmd.LAYERS, "Future",
                        ("npdiffusion.nn.not_written_yet", lambda m, rng: (m.Future(), [], {})))
    assert cli.main(["gradcheck", "--layer", "Future"]) == 0
    out = capsys.readouterr().out
    assert "Future           skipped: npdiffusion.nn.not_written_yet is not available yet" in out
    assert out.rstrip().endswith("0 passed, 0 failed, 1 skipped")


# ------------------------------------------------------------------------------------- toy
SUMMARY = re.compile(r"^toy: (\d+) steps in [\d.]+ s on numpy: train loss ([\d.]+) -> ([\d.]+), "
                     r"held-out loss ([\d.]+) -> ([\d.]+)(; wrote (.+))?$")


def test_toy_trains_the_loss_falls_and_writes_the_curve(tmp_path):
    out = tmp_path / "run"
    proc = npd("toy", "--steps", "80", "--batch-size", "32", "--out", str(out), "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    m = SUMMARY.match(proc.stdout.strip().splitlines()[-1])
    assert m, proc.stdout
    steps, train0, train1, held0, held1 = int(m.group(1)), *map(float, m.group(2, 3, 4, 5))
    assert steps == 80
    # predicting zero noise scores ~1.0; 80 AdamW steps must already beat it clearly
    assert 0.8 < held0 < 1.3 and held1 < 0.75 * held0 and train1 < 0.8 * train0
    png = out / "losses.png"
    assert m.group(7) == str(png)
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (800, 480)
    rows = (out / "losses.csv").read_text().splitlines()
    assert rows[0] == "step,train_loss,heldout_loss" and len(rows) == 2 + steps
    assert float(rows[1].split(",")[2]) == pytest.approx(held0, abs=1e-4)
    assert float(rows[2].split(",")[1]) == pytest.approx(train0, abs=1e-4)
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_toy_bad_out_path_fails_at_once_with_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = npd("toy", "--steps", "5", "--out", str(blocker / "run"))
    line = one_error_line(proc, "toy")
    assert proc.returncode == 2 and "a-file" in line
    assert proc.stdout == ""                            # failed before training, not after


@pytest.mark.parametrize("args,text", [(["--steps", "0"], "--steps must be a positive int, got 0"),
                                       (["--lr", "nan"], "--lr must be a positive number, got nan")])
def test_toy_rejects_bad_numbers(args, text):
    proc = npd("toy", *args)
    assert proc.returncode == 2 and text in one_error_line(proc, "toy")


def test_toy_model_backward_passes_gradcheck(backend):
    rng = np.random.default_rng(0)
    model = ToyDenoiser(channels=3).to("float64")
    x = noncontiguous(rng.standard_normal((2, 1, 8, 8)))
    s = asarray(rng.uniform(0.1, 0.9, (2, 1)))
    report = gradcheck(model, x, s, directions=3)
    assert report.passed, report
    assert set(report.errors) == {"input[0]", "input[1]", "conv_in.weight", "conv_in.bias", "noise_proj.weight",
                                  "noise_proj.bias", "conv_out.weight", "conv_out.bias"}


def test_toy_shapes_are_binary_images_with_a_shape_in_each():
    images = make_shapes(np.random.default_rng(0), 500)
    assert images.shape == (500, 1, 8, 8) and images.dtype == np.float32
    assert set(np.unique(images)) == {-1.0, 1.0}
    lit = (images > 0).sum(axis=(1, 2, 3))
    assert lit.min() >= 3 and lit.max() <= 48          # never empty, never the whole image
    assert len({im.tobytes() for im in images}) > 100  # varied


# ---------------------------------------------------------------------------------- plotting
def test_line_plot_draws_each_series_in_its_colour_with_a_legend(tmp_path):
    y = np.exp(-np.arange(200) / 50.0)
    y[40:45] = np.nan                                     # a gap, not a crash
    image = line_plot({"train": y, "eval": (np.arange(0, 200, 20), 1.2 * y[::20])},
                      title="t", xlabel="step", ylabel="loss", logy=True, size=(640, 400))
    assert image.size == (640, 400) and image.mode == "RGB"
    pixels = np.asarray(image).reshape(-1, 3).astype(int)
    for color in COLORS[:2]:
        rgb = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(pixels - rgb).sum(axis=1) < 40).sum() > 100, color
    path = tmp_path / "plot.png"
    save_png(image, path)
    with Image.open(path) as again:
        assert again.size == (640, 400)
    assert os.listdir(tmp_path) == ["plot.png"]


def test_line_plot_rejects_what_it_cannot_draw():
    with pytest.raises(ValueError, match="series must be a non-empty mapping"):
        line_plot({})
    with pytest.raises(ValueError, match="no finite positive point to draw"):
        line_plot({"a": [0.0, -1.0, np.nan]}, logy=True)
    with pytest.raises(ValueError, match=r"series 'a' must be y or \(x, y\) with equal 1-D lengths"):
        line_plot({"a": ([1, 2, 3], [1, 2])})
    with pytest.raises(FileNotFoundError):
        save_png(line_plot({"a": [1, 2]}), "/nonexistent-folder/x.png")


def test_nice_ticks_are_round_and_cover_the_range():
    assert nice_ticks(0, 600) == [0, 100, 200, 300, 400, 500, 600]
    assert nice_ticks(0.27, 1.1) == [0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(-0.37, 2.2) == [0.0, 0.5, 1.0, 1.5, 2.0]
