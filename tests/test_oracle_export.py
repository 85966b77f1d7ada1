"""golden export (npdiffusion/oracle/export.py, specs.py and the CLI): byte-identical reruns, the
manifest (key order by phase, required keys, the loss, tolerances), closed-form values for a
linear layer, float32 exports, any Module, --from-pretrained, and clear errors."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from npdiffusion.cli import main
from npdiffusion.io.safetensors import load_file, read_metadata
from npdiffusion.models.vae import AutoencoderKL
from npdiffusion.nn.linear import Linear
from npdiffusion.oracle import check_golden, export_golden, randomize_weights
from npdiffusion.oracle.manifest import PHASES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("manifest.json", "golden.safetensors", "config.json")


def _digests(folder):
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest() for f in FILES}


@pytest.mark.parametrize("model", ["unet", "vae", "text-encoder", "clip", "scheduler:dpm_multistep", "op:attention"])
def test_same_command_twice_gives_byte_identical_files(tmp_path, model, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert main(["golden", "export", "--model", model, "--seed", "7", "--out", str(out)]) == 0
    assert _digests(a) == _digests(b)
    assert "golden export:" in capsys.readouterr().out


def test_export_is_identical_in_a_fresh_process(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    export_golden("unet", a, seed=1)
    env = dict(os.environ, PYTHONHASHSEED="123")
    subprocess.run([sys.executable, "-m", "npdiffusion", "golden", "export", "--model", "unet", "--seed", "1",
                    "--out", str(b)], check=True, cwd=ROOT, env=env, capture_output=True)
    assert _digests(a) == _digests(b)


def test_manifest_orders_keys_by_phase_and_marks_required_keys(tmp_path):
    m = export_golden("unet", tmp_path, seed=0)
    tensors = load_file(tmp_path / "golden.safetensors")
    keys = [e["key"] for e in m["keys"]]
    assert set(keys) == set(tensors)
    ranks = [PHASES.index(e["phase"]) for e in m["keys"]]
    assert ranks == sorted(ranks)
    entry = {e["key"]: e for e in m["keys"]}
    # forward order: conv_in before the first down block's resnet, which precedes conv_out
    assert keys.index("act/conv_in/output") < keys.index("act/down_blocks.0.resnets.0/output") \
        < keys.index("act/conv_out/output")
    # backward order: conv_out's gradients first among the layers
    assert keys.index("grad/conv_out/output") < keys.index("grad/conv_in/output")
    # required: outputs of layers with parameters, their output gradients, parameter and input grads
    assert entry["act/down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k/output"]["required"]
    assert entry["grad/mid_block/output"]["required"]
    assert entry["param_grad/time_embedding.linear_1.weight"]["required"]
    assert entry["input_grad/encoder_hidden_states"]["required"] and entry["output/sample"]["required"]
    assert not entry["act/conv_in/input.0"]["required"] and not entry["param/conv_in.weight"]["required"]
    assert not entry["act/time_proj/output"]["required"]                  # no parameters: optional
    assert "input_grad/timestep" not in entry                             # integer timesteps: no gradient
    # shapes and dtypes as stored
    for e in m["keys"]:
        assert list(tensors[e["key"]].shape) == e["shape"] and tensors[e["key"]].dtype.name == e["dtype"]
    # the loss: output_grad is the seeded projection, loss = sum(P * output)
    p = np.random.default_rng([0, 2]).standard_normal(tensors["output/sample"].shape)
    np.testing.assert_array_equal(tensors["output_grad/sample"], p)
    assert float(tensors["loss"]) == pytest.approx(float(np.sum(p * tensors["output/sample"])), rel=1e-12)
    assert m["loss"]["outputs"] == ["sample"] and m["dtype"] == "float64" and m["seed"] == 0
    assert m["layers"][0] == {"name": "time_proj", "class": "Timesteps"}
    assert read_metadata(tmp_path / "golden.safetensors") == {"format": "npdiffusion-golden"}
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["_class_name"] == "UNet2DConditionModel" and cfg["block_out_channels"] == [4, 8]


def test_linear_golden_matches_closed_forms(tmp_path):
    """y = x W^T + b; with L = sum(P y): dx = P W, dW = P^T x, db = sum P (summed over rows)."""
    export_golden("op:linear", tmp_path, seed=5)
    t = load_file(tmp_path / "golden.safetensors")
    x, w, b, p = t["input/x"], t["param/weight"], t["param/bias"], t["output_grad/output"]
    np.testing.assert_allclose(t["output/output"], x @ w.T + b, rtol=1e-13)
    np.testing.assert_allclose(t["input_grad/x"], p @ w, rtol=1e-13)
    np.testing.assert_allclose(t["param_grad/weight"], p.reshape(-1, 3).T @ x.reshape(-1, 4), rtol=1e-13)
    np.testing.assert_allclose(t["param_grad/bias"], p.reshape(-1, 3).sum(0), rtol=1e-13)
    assert float(t["loss"]) == pytest.approx(float(np.sum(p * t["output/output"])), rel=1e-13)


def test_tolerances_flag_rounding_noise(tmp_path):
    """The key bias of an attention has a zero gradient in exact arithmetic (softmax ignores a shift
    shared by all keys): its float32 error is pure noise and the manifest says so."""
    m = export_golden("op:cross_attention", tmp_path, config={"kwargs": {"bias": True}})
    entry = {e["key"]: e for e in m["keys"]}
    noise = entry["param_grad/to_k.bias"]
    assert noise.get("noise") is True
    assert noise["rtol"]["float32"] == pytest.approx(1000 * noise["float32_error"])   # NOISE_SAFETY
    assert noise["atol"]["float32"] > 0 and "atol" not in entry["param_grad/to_v.bias"]
    assert not entry["param_grad/to_v.bias"].get("noise")
    ordinary = entry["act/to_q/output"]
    assert ordinary["rtol"] == {"float32": 1e-4, "float64": 1e-9} and 0 < ordinary["float32_error"] < 1e-5


def test_float32_export_and_self_check(tmp_path):
    m = export_golden("vae", tmp_path, dtype="float32", seed=2)
    t = load_file(tmp_path / "golden.safetensors")
    assert m["dtype"] == "float32" and t["output/sample"].dtype == np.float32
    assert check_golden(tmp_path, dict(t)).passed


def test_any_module_with_named_inputs(tmp_path):
    lin = randomize_weights(Linear(3, 2).to("float64"), seed=0)
    x = np.random.default_rng(0).standard_normal((4, 3))
    m = export_golden(lin, tmp_path, inputs={"features": x})
    keys = [e["key"] for e in m["keys"]]
    assert {"input/features", "output/output", "input_grad/features", "param_grad/weight"} <= set(keys)
    assert lin.dtype == np.float64                                 # the module is left as it came


def test_from_pretrained_uses_the_folder_weights(tmp_path):
    vae = randomize_weights(AutoencoderKL(block_out_channels=[2, 4], norm_num_groups=2,
                                          down_block_types=["DownEncoderBlock2D"] * 2,
                                          up_block_types=["UpDecoderBlock2D"] * 2), seed=9)
    vae.save_pretrained(tmp_path / "vae")
    main(["golden", "export", "--model", "vae", "--from-pretrained", str(tmp_path / "vae"), "--out",
          str(tmp_path / "g")])
    t = load_file(tmp_path / "g" / "golden.safetensors")
    for k, v in vae.state_dict().items():
        np.testing.assert_array_equal(t[f"param/{k}"], np.asarray(v, dtype=np.float64))


@pytest.mark.parametrize("argv,message", [
    (["--model", "unet2"], "unknown model 'unet2'"),
    (["--model", "op:nope"], "unknown op 'nope'"),
    (["--model", "scheduler:nope"], "unknown scheduler 'nope'"),
    (["--model", "op:linear", "--from-pretrained", "."], "--from-pretrained works with the models"),
    (["--model", "unet", "--config", "/no/such/file.json"], "--config: no such file"),
    (["--model", "unet", "--seed", "-1"], "--seed must be a non-negative int"),
    (["--model", "op:linear", "--config", "BADJSON"], "is not valid JSON"),
])
def test_export_errors_are_one_line(tmp_path, capsys, argv, message):
    argv = [a if a != "BADJSON" else str(tmp_path / "bad.json") for a in argv]
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["golden", "export", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
