"""``npdiffusion train lora`` on the tiny pipeline of pipeline_dummy.py (a folder diffusers saved) and on our
own save of it: only the adapters change (the base U-Net stays bitwise as loaded), a killed-and-resumed run
ends with the same LoRA file bit for bit (dropout's generator included), the file loads in diffusers, the
new 'cross' shapes dataset trains, and bad inputs are one line with exit code 2."""
import os

import numpy as np
import pytest

from npdiffusion import cli
from npdiffusion.io.pretrained import load_weights
from npdiffusion.io.safetensors import load_file
from npdiffusion.lora import UNET_ATTENTION_TARGETS, WEIGHT_NAME, matching_modules
from npdiffusion.training import lora_stage
from npdiffusion.training.config import DataConfig, TrainConfig, config_to_toml, config_to_dict
from npdiffusion.training.loop import Trainer
from npdiffusion.training.stages import run_model_stage
from pipeline_dummy import dummy_folder, our_pipeline

DATA = DataConfig(num_images=24, resolution=32, seed=3, shapes=("cross", "circle"))


def _config(out, steps, model=None, **lora):
    train = TrainConfig(steps=steps, batch_size=4, learning_rate=1e-2, checkpointing_steps=3, seed=2, prefetch=0)
    opts = lora_stage.LoraOptions(model=model or dummy_folder(), rank=2, alpha=3.0, dropout=0.2, **lora)
    return lora_stage.CONFIG(output_dir=str(out), data=DATA, train=train, lora=opts)


def _quiet(*args):
    pass


def test_lora_resumes_bit_exactly(tmp_path):
    summary = lora_stage.train(_config(tmp_path / "ref", 6), progress=False, log=_quiet)
    assert summary.startswith("lora: 6 steps") and WEIGHT_NAME in summary
    run_model_stage(_config(tmp_path / "run", 3), lora_stage.build_stage, progress=False, log=_quiet)
    lora_stage.train(_config(tmp_path / "run", 6), resume=True, progress=False, log=_quiet)
    a, b = load_file(tmp_path / "ref" / WEIGHT_NAME), load_file(tmp_path / "run" / WEIGHT_NAME)
    layers = matching_modules(our_pipeline().unet, UNET_ATTENTION_TARGETS)     # attn1 and attn2: q, k, v, out
    assert sorted(a) == sorted(f"unet.{n}.lora_{m}.weight" for n in layers for m in "AB") and a.keys() == b.keys()
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert all(np.abs(a[k]).max() > 0 for k in a if ".lora_B." in k)        # B left zero: nothing learned


def test_only_the_adapters_train_on_our_own_folder(tmp_path):
    folder = our_pipeline().save_pretrained(tmp_path / "ours")
    cfg = _config(tmp_path / "out", 2, model=str(folder), unet_targets=("to_k", "to_v", "conv1"))
    from npdiffusion.training.stages import dataset_from_config

    dataset = dataset_from_config(cfg.data)
    stage = lora_stage.build_stage(cfg, dataset)
    first = {k: v.copy() for k, v in stage.adapters.named_parameters()}
    Trainer(stage, dataset, cfg.train, cfg.output_dir, progress=False, log=_quiet).fit()
    base = {k.replace(".base_layer", ""): v for k, v in stage.unet.state_dict().items() if ".lora_" not in k}
    saved = load_weights(os.path.join(folder, "unet"))
    assert base.keys() == saved.keys() and all(np.array_equal(base[k], saved[k]) for k in saved)
    assert all(not np.array_equal(first[k], v) for k, v in stage.adapters.named_parameters())
    assert any(k.endswith("resnets.0.conv1.lora_A.weight") for k in first)


def test_trained_file_loads_in_diffusers(tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline
    from parity import torch_threads

    lora_stage.train(_config(tmp_path, 1), progress=False, log=_quiet)
    with torch_threads(1):
        pipe = StableDiffusionPipeline.from_pretrained(dummy_folder())
        before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
        pipe.load_lora_weights(str(tmp_path), weight_name=WEIGHT_NAME)
    ours = load_file(tmp_path / WEIGHT_NAME)
    theirs = {k.replace(".default_0", ""): v for k, v in pipe.unet.state_dict().items() if ".lora_" in k}
    assert len(theirs) == len(ours)
    assert all(torch.equal(theirs[k[len("unet."):]], torch.from_numpy(v)) for k, v in ours.items())
    assert pipe.unet.peft_config["default_0"].lora_alpha == 3.0 and pipe.unet.peft_config["default_0"].r == 2
    assert len(before) < len(pipe.unet.state_dict())


def _cli(capsys, tmp_path, cfg):
    path = tmp_path / "cfg.toml"
    path.write_text(config_to_toml(config_to_dict(cfg)))
    code = cli.main(["train", "lora", "--config", str(path), "--no-progress"])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("change,message", [
    (dict(model="/nonexistent"), "lora.model '/nonexistent' is not a model folder"),
    (dict(unet_targets=("to_qq",)), "targets ('to_qq',) match no Linear or Conv2d layer"),
    (dict(unet_targets=("attn1",)), "'down_blocks.1.attentions.0.transformer_blocks.0.attn1' is a Attention"),
    (dict(dropout=1.0), "lora.dropout must be below 1"),
])
def test_bad_inputs_are_one_line(capsys, tmp_path, change, message):
    cfg = _config(tmp_path / "out", 1)
    for k, v in change.items():
        setattr(cfg.lora, k, v)
    code, err = _cli(capsys, tmp_path, cfg)
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not os.path.exists(tmp_path / "out" / "checkpoint-1")


def test_bad_shapes_name_is_one_line(capsys, tmp_path):
    cfg = _config(tmp_path / "out", 1)
    cfg.data.shapes = ("cross", "star")
    code, err = _cli(capsys, tmp_path, cfg)
    assert code == 2 and "shapes must be names from ('circle', 'square', 'triangle', 'cross', 'bar')" in err, err
