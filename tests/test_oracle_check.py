"""golden check (npdiffusion/oracle/check.py and the CLI): verdicts, the first divergence, and a clear
per-key report for missing keys, shape and dtype mismatches, non-finite values and unreadable or
malformed candidate files (never a traceback)."""
import json
import os

import numpy as np
import pytest

from npdiffusion.cli import main
from npdiffusion.io.safetensors import load_file, save_file
from npdiffusion.oracle import GoldenFormatError, check_golden, export_golden


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """A golden folder of diffusers' FeedForward (GEGLU) layer, and its tensors and manifest."""
    d = tmp_path_factory.mktemp("golden_ff")
    manifest = export_golden("op:feedforward", d, seed=3)
    return str(d), load_file(os.path.join(d, "golden.safetensors")), manifest


def _write(tmp_path, tensors, name="cand.safetensors"):
    path = tmp_path / name
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path)
    return str(path)


def _required(manifest):
    return [e["key"] for e in manifest["keys"] if e["required"]]


def test_golden_tensors_pass_and_cli_exits_zero(golden, tmp_path, capsys):
    d, tensors, manifest = golden
    report = check_golden(d, dict(tensors))
    assert report.passed and report.first_divergence is None
    assert len(report.compared) == len(manifest["keys"])
    path = _write(tmp_path, {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in tensors.items()})
    assert main(["golden", "check", d, path]) == 0
    out = capsys.readouterr().out
    assert "-- forward" in out and "-- backward" in out and "RESULT: PASS" in out


def test_perturbed_activation_names_its_layer_in_forward_and_cli_exits_one(golden, tmp_path, capsys):
    d, tensors, _ = golden
    cand = dict(tensors)
    key = "act/net.0.proj/output"
    bad = cand[key].copy()
    bad[1, 2, 3] += 0.1
    cand[key] = bad
    report = check_golden(d, cand)
    assert not report.passed
    first = report.first_forward_divergence
    assert first.layer == "net.0.proj" and first.key == key and first.worst_index == (1, 2, 3)
    assert first.max_abs == pytest.approx(0.1)
    assert report.first_divergence is first and report.first_backward_divergence is None
    assert main(["golden", "check", d, _write(tmp_path, cand)]) == 1
    out = capsys.readouterr().out
    assert "first divergence: layer 'net.0.proj' at act/net.0.proj/output" in out and "RESULT: FAIL" in out


def test_perturbed_gradient_names_its_layer_in_backward(golden):
    d, tensors, _ = golden
    cand = dict(tensors)
    key = "grad/net.2/input.0"
    cand[key] = cand[key] * 1.01
    report = check_golden(d, cand)
    assert report.first_forward_divergence is None
    assert report.first_backward_divergence.layer == "net.2"
    assert report.first_backward_divergence.key == key


def test_missing_required_key_fails_missing_optional_does_not(golden, capsys, tmp_path):
    d, tensors, manifest = golden
    optional = [e["key"] for e in manifest["keys"] if not e["required"] and e["phase"] == "forward"]
    cand = {k: v for k, v in tensors.items() if k != optional[0]}
    report = check_golden(d, cand)
    assert report.passed and [r.key for r in report.absent_optional] == [optional[0]]
    req = _required(manifest)[0]
    cand = {k: v for k, v in tensors.items() if k != req}
    report = check_golden(d, cand)
    assert not report.passed and [r.key for r in report.missing_required] == [req]
    assert report.first_divergence is None                   # missing is not a divergence
    assert main(["golden", "check", d, _write(tmp_path, cand)]) == 1
    out = capsys.readouterr().out
    assert f"missing required keys (1): {req}" in out and "MISSING" in out


def test_shape_dtype_and_non_finite_problems_are_reported_per_key(golden):
    d, tensors, _ = golden
    cand = dict(tensors)
    cand["act/net.2/output"] = np.zeros((5, 5))                                   # other size: SHAPE
    cand["output/output"] = tensors["output/output"].reshape(-1)                  # same size: compared
    cand["param_grad/net.2.bias"] = tensors["param_grad/net.2.bias"].astype(np.int64)   # DTYPE
    g = tensors["grad/net.0/input.0"].copy()
    g[0, 0, 0] = np.nan
    cand["grad/net.0/input.0"] = g                                                # NON-FINITE
    cand["act/not_a_layer/output"] = np.zeros(3)                                  # extra: ignored
    report = check_golden(d, cand)
    by_key = {r.key: r for r in report.results}
    assert by_key["act/net.2/output"].status == "SHAPE"
    assert "candidate shape (5, 5)" in by_key["act/net.2/output"].note
    assert by_key["output/output"].status == "ok" and "reshaped" in by_key["output/output"].note
    assert by_key["param_grad/net.2.bias"].status == "DTYPE"
    assert by_key["grad/net.0/input.0"].status == "NON-FINITE" and by_key["grad/net.0/input.0"].worst_index == (0, 0, 0)
    assert report.extra_keys == ["act/not_a_layer/output"]
    text = str(report)
    for k in ("act/net.2/output", "param_grad/net.2.bias", "grad/net.0/input.0"):
        assert k in text


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all",
                                     (100).to_bytes(8, "little") + b'{"a": 1}' + b" " * 92])
def test_malformed_candidate_files_give_a_report_not_a_traceback(golden, tmp_path, capsys, content):
    d, _, _ = golden
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    report = check_golden(d, str(path))
    assert not report.passed and "not a valid safetensors file" in report.error
    assert main(["golden", "check", d, str(path)]) == 1
    captured = capsys.readouterr()
    assert "error: candidate file is not a valid safetensors file" in captured.out
    assert "Traceback" not in captured.out + captured.err


def test_missing_candidate_file(golden, tmp_path):
    d, _, _ = golden
    report = check_golden(d, str(tmp_path / "nope.safetensors"))
    assert not report.passed and "does not exist" in report.error


def test_bad_golden_folders_raise_a_clear_error_and_cli_exits_two(golden, tmp_path, capsys):
    d, tensors, _ = golden
    cand = _write(tmp_path, tensors)
    with pytest.raises(GoldenFormatError, match="has no manifest.json"):
        check_golden(str(tmp_path), cand)
    bad = tmp_path / "g"
    bad.mkdir()
    (bad / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(GoldenFormatError, match="not an npdiffusion golden manifest"):
        check_golden(str(bad), cand)
    assert main(["golden", "check", str(bad), cand]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "npdiffusion golden: error:" in err


def test_rtol_scale_loosens_every_tolerance(golden):
    d, tensors, _ = golden
    cand = {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in tensors.items()}  # float32 tolerances
    cand["act/net.0.proj/output"] = cand["act/net.0.proj/output"] * np.float32(1 + 3e-4)
    assert not check_golden(d, cand).passed
    assert check_golden(d, cand, rtol_scale=10.0).passed
    with pytest.raises(ValueError, match="rtol_scale must be a positive number"):
        check_golden(d, cand, rtol_scale=0)


def test_noise_key_with_an_exactly_zero_golden_uses_its_absolute_bound(tmp_path):
    """A rounding-noise key (attention key bias gradient) whose golden value is exactly zero:
    a noise-sized candidate passes through the absolute bound, a real-sized one fails."""
    d = tmp_path / "golden"
    manifest = export_golden("op:cross_attention", d, config={"kwargs": {"bias": True}})
    entry = {e["key"]: e for e in manifest["keys"]}["param_grad/to_k.bias"]
    assert entry.get("noise") is True
    tensors = dict(load_file(d / "golden.safetensors"))
    tensors["param_grad/to_k.bias"] = np.zeros_like(tensors["param_grad/to_k.bias"])
    save_file(tensors, d / "golden.safetensors")                      # the golden came out 0.0
    atol = entry["atol"]["float64"]
    for scale, passes in ((0.5, True), (1e6, False)):
        cand = dict(tensors)
        cand["param_grad/to_k.bias"] = np.full_like(tensors["param_grad/to_k.bias"], scale * atol)
        report = check_golden(d, _write(tmp_path, cand))
        row = next(r for r in report.results if r.key == "param_grad/to_k.bias")
        assert (row.status == "ok") is passes, (scale, row)
