"""tools/bench_gpu.py at tiny sizes on the CPU: every row's code path runs and agrees with torch.

The real benchmark needs a CUDA GPU (tools/gpu_check.sh runs it there); this smoke test keeps its
code honest on every machine: both sides build, load the same weights, run each row (training
step in float32 and mixed precision, U-Net forward in float32 and float16), count FLOPs, and the
first outputs agree with diffusers to float32 / float16 precision. About 10 s.
"""
import json
import math
import os
import sys

import pytest

from npdiffusion.backend import get_backend, is_available, set_backend

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import bench_gpu  # noqa: E402


@pytest.fixture
def restore_backend():
    """bench_gpu.main sets the backend and torch's thread count for the process: put both back."""
    import torch

    previous, threads = get_backend(), torch.get_num_threads()
    yield
    set_backend(previous)
    torch.set_num_threads(threads)


def test_bench_gpu_small_cpu_run(tmp_path, restore_backend, capsys):
    out = tmp_path / "bench.json"
    rc = bench_gpu.main(["--device", "cpu", "--small", "--repeats", "1", "--warmup", "0", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert [r["name"] for r in result["rows"]] == list(bench_gpu.ROWS)
    for r in result["rows"]:
        assert r["flops"] > 0 and r["ours_ms"] > 0 and r["torch_ms"] > 0
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0
        # float32 rows: same weights, same inputs -> diffusers' output to float32 rounding;
        # float16 rows: 11-bit mantissas (measured 1.6e-3 for both).
        assert r["rel_err"] < (1e-4 if r["name"].endswith("fp32") else 2e-2), r
    assert "skipped steps: ours 0" in result["rows"][1]["note"]
    text = capsys.readouterr().out
    assert "train-fp32" in text and "sd-fwd-fp16" in text and "ratio" in text


def test_bench_gpu_only_selects_rows(tmp_path, restore_backend):
    out = tmp_path / "bench.json"
    assert bench_gpu.main(["--device", "cpu", "--small", "--only", "sd-fwd-fp32", "--repeats", "1",
                           "--warmup", "0", "--json", str(out)]) == 0
    assert [r["name"] for r in json.loads(out.read_text())["rows"]] == ["sd-fwd-fp32"]


@pytest.mark.skipif(is_available("cupy"), reason="a GPU is here: tools/gpu_check.sh runs the real benchmark")
def test_bench_gpu_without_gpu_says_so(restore_backend, capsys):
    assert bench_gpu.main(["--device", "gpu"]) == 2
    assert "bench_gpu: error: the 'cupy' backend needs" in capsys.readouterr().err


def test_bench_gpu_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        bench_gpu.parse_args(["--device", "cpu"])
    assert exc.value.code == 2
    assert "--device cpu is a smoke test: add --small" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--repeats", "0"])
