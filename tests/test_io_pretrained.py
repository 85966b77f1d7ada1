"""Model-folder helpers against real diffusers / transformers folders, both directions."""
import json

import numpy as np
import pytest
import torch

from npdiffusion.backend import asarray
from npdiffusion.io.pretrained import (DIFFUSERS_VERSION, TRANSFORMERS_VERSION, check_finite, load_weights,
                                       read_config, save_weights, write_config)
from npdiffusion.io.safetensors import SafetensorsError, read_metadata, save_file
from parity import randomize_, torch_state_to_numpy

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

VAE_CONFIG = dict(block_out_channels=[2, 4], norm_num_groups=2, in_channels=3, out_channels=3, latent_channels=4,
                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
CLIP_CONFIG = dict(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=2, vocab_size=1000,
                   bos_token_id=0, eos_token_id=2, pad_token_id=1)


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return randomize_(diffusers.AutoencoderKL(**VAE_CONFIG), seed=1)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return randomize_(transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_CONFIG)), seed=2)


def _assert_same_state(ours: dict, module: torch.nn.Module):
    theirs = torch_state_to_numpy(module)
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        assert np.array_equal(ours[k], v), k


def test_versions_match_the_installed_oracles():
    assert DIFFUSERS_VERSION == diffusers.__version__
    assert TRANSFORMERS_VERSION == transformers.__version__


def test_read_a_folder_written_by_diffusers(tmp_path, vae):
    vae.save_pretrained(tmp_path)
    config = read_config(tmp_path)
    assert config["_class_name"] == "AutoencoderKL"
    assert config["_diffusers_version"] == diffusers.__version__
    for k, v in VAE_CONFIG.items():
        assert config[k] == v
    assert config["scaling_factor"] == vae.config.scaling_factor
    _assert_same_state(load_weights(tmp_path), vae)
    assert read_metadata(tmp_path / "diffusion_pytorch_model.safetensors") == {"format": "pt"}


def test_sharded_and_variant_folders_written_by_diffusers(tmp_path, vae):
    vae.save_pretrained(tmp_path / "sharded", max_shard_size="8KB")
    index = tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json"
    assert index.exists() and len(set(json.loads(index.read_text())["weight_map"].values())) > 1
    _assert_same_state(load_weights(tmp_path / "sharded"), vae)

    vae.to(torch.float16).save_pretrained(tmp_path / "variant", variant="fp16")
    vae.to(torch.float32)
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_weights(tmp_path / "variant")
    half = load_weights(tmp_path / "variant", variant="fp16")
    assert all(v.dtype == np.float16 for v in half.values())
    theirs = torch_state_to_numpy(vae)
    assert all(np.array_equal(half[k], theirs[k].astype(np.float16)) for k in theirs)


def test_diffusers_loads_a_folder_we_wrote(tmp_path, vae):
    state = torch_state_to_numpy(vae)
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    write_config(tmp_path / "ours", config, "AutoencoderKL")
    save_weights(tmp_path / "ours", state, "diffusion_pytorch_model.safetensors")
    loaded = diffusers.AutoencoderKL.from_pretrained(tmp_path / "ours")
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, vae.state_dict()[k]), k
    public = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(vae.config)
    # our config.json is the very file diffusers writes for the same model
    vae.save_pretrained(tmp_path / "theirs")
    assert (tmp_path / "ours" / "config.json").read_text() == (tmp_path / "theirs" / "config.json").read_text()
    assert (tmp_path / "ours" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (tmp_path / "theirs" / "diffusion_pytorch_model.safetensors").read_bytes()


def test_transformers_folder_both_directions(tmp_path, clip):
    clip.save_pretrained(tmp_path / "theirs")
    config = read_config(tmp_path / "theirs")
    assert config["architectures"] == ["CLIPTextModel"] and config["model_type"] == "clip_text_model"
    state = load_weights(tmp_path / "theirs")
    _assert_same_state(state, clip)

    cfg = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "transformers_version")}
    write_config(tmp_path / "ours", cfg, "CLIPTextModel", library="transformers", model_type="clip_text_model")
    save_weights(tmp_path / "ours", state, "model.safetensors")
    written = read_config(tmp_path / "ours")
    assert written == config
    loaded = transformers.CLIPTextModel.from_pretrained(tmp_path / "ours")
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, clip.state_dict()[k]), k
    ids = torch.tensor([[0, 5, 7, 2]])
    assert torch.equal(loaded(ids).last_hidden_state, clip(ids).last_hidden_state)


def test_write_config_converts_values_and_validates(tmp_path):
    path = write_config(tmp_path / "new" / "deeper", {"a": (1, 2), "b": np.float32(0.5), "c": np.arange(2),
                                                      "d": {"e": np.int64(3)}}, "Thing")
    assert json.loads(open(path).read()) == {"a": [1, 2], "b": 0.5, "c": [0, 1], "d": {"e": 3},
                                             "_class_name": "Thing", "_diffusers_version": DIFFUSERS_VERSION}
    assert open(path).read().endswith("}\n")
    with pytest.raises(ValueError, match="library must be one of"):
        write_config(tmp_path, {}, "X", library="flax")
    with pytest.raises(ValueError, match="NaN or infinite"):
        write_config(tmp_path, {"x": float("nan")}, "X")
    with pytest.raises(TypeError, match=r"config\['f'\] is a set, which JSON cannot hold"):
        write_config(tmp_path, {"f": {1}}, "X")
    with pytest.raises(TypeError, match="class_name must be a non-empty str"):
        write_config(tmp_path, {}, "")
    transformers_cfg = json.loads(open(write_config(tmp_path, {"h": 1}, "M", library="transformers")).read())
    assert transformers_cfg == {"h": 1, "architectures": ["M"], "transformers_version": TRANSFORMERS_VERSION}


def test_read_config_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder .*missing.* does not exist"):
        read_config(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=f"no config.json in model folder '{tmp_path}'"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text('{"a": ')
    with pytest.raises(ValueError, match="config.json' is not valid JSON"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(ValueError, match="must hold a JSON object, got a JSON list"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ValueError, match="not UTF-8"):
        read_config(tmp_path)


def test_load_weights_file_choice_and_errors(tmp_path):
    a = {"w": np.ones(2, np.float32)}
    b = {"w": np.zeros(2, np.float32)}
    save_weights(tmp_path, a, "model.safetensors")
    assert np.array_equal(load_weights(tmp_path)["w"], a["w"])
    save_weights(tmp_path, b, "diffusion_pytorch_model.safetensors")
    assert np.array_equal(load_weights(tmp_path)["w"], b["w"])  # first name in the list wins
    assert np.array_equal(load_weights(tmp_path, "model.safetensors")["w"], a["w"])
    with pytest.raises(FileNotFoundError, match=r"no weights in model folder .*looked for \['x.safetensors'\]"):
        load_weights(tmp_path, ("x.safetensors",))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights(tmp_path / "nope")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(SafetensorsError, match="bad.safetensors"):
        load_weights(tmp_path, "bad.safetensors")


def test_sharded_index_is_validated(tmp_path):
    save_file({"a": np.ones(1, np.float32)}, tmp_path / "s-1.safetensors")
    save_file({"b": np.ones(1, np.float32)}, tmp_path / "s-2.safetensors")
    index = tmp_path / "model.safetensors.index.json"

    def write(weight_map):
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    write({"a": "s-1.safetensors", "b": "s-2.safetensors"})
    assert set(load_weights(tmp_path, "model.safetensors")) == {"a", "b"}
    write({"a": "../s-1.safetensors"})
    with pytest.raises(ValueError, match="plain .safetensors file names"):
        load_weights(tmp_path, "model.safetensors")
    write({"a": "s-1.bin"})
    with pytest.raises(ValueError, match="plain .safetensors file names"):
        load_weights(tmp_path, "model.safetensors")
    write({"a": "s-3.safetensors"})
    with pytest.raises(FileNotFoundError, match="shard 's-3.safetensors'"):
        load_weights(tmp_path, "model.safetensors")
    write({"a": "s-2.safetensors"})
    with pytest.raises(ValueError, match=r"lacks tensors the index assigns to it: \['a'\]"):
        load_weights(tmp_path, "model.safetensors")
    save_file({"a": np.ones(1, np.float32), "b": np.ones(1, np.float32)}, tmp_path / "s-2.safetensors")
    write({"a": "s-1.safetensors", "b": "s-2.safetensors"})
    with pytest.raises(ValueError, match="'a' appears in more than one shard"):
        load_weights(tmp_path, "model.safetensors")
    index.write_text('{"weight_map": [1]}')
    with pytest.raises(ValueError, match="needs a 'weight_map' object"):
        load_weights(tmp_path, "model.safetensors")


def test_non_finite_weights_are_refused_naming_the_tensor(backend, tmp_path):
    state = {"ok": asarray(np.ones(3, np.float32)), "ids": asarray(np.arange(3)),
             "bad": asarray(np.array([1.0, np.nan, np.inf], np.float32))}
    with pytest.raises(ValueError, match=r"src: tensor 'bad' of shape \(3,\) holds 2 non-finite values"):
        check_finite(state, "src")
    check_finite({k: v for k, v in state.items() if k != "bad"}, "src")
    save_weights(tmp_path, state, "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors: tensor 'bad'"):
        load_weights(tmp_path)
    assert np.isnan(load_weights(tmp_path, verify_finite=False)["bad"][1])
