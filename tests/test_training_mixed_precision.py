"""``[train] mixed_precision = "fp16"`` in the CLIP, VAE and U-Net stages, on tiny models.

* fp16 (float16 forward/backward, float32 masters, dynamic loss scaling) ends 40 steps within 1e-2
  (relative) of the float32 run's loss at step 40 (same batches, same draws);
* a run stopped at step k and resumed ends bitwise equal to the straight run: masters, moments,
  loss-scaler state, history;
* an injected inf in a gradient skips the step (masters, module weights, moments bitwise
  unchanged), halves the scale and is counted; a run of overflows stops at
  ``max_consecutive_overflow_steps`` with an error naming it;
* configs: an unknown mode, fp16 with float64, fp16 on a stage without support: one clear error.

CLIP is compared at lr 3e-4: at 3e-3 (the other stages' rate) its tiny contrastive run amplifies
any perturbation ~300x in 40 steps (float32 vs float64: 1.9e-5 apart at step 40, fp16 vs float32:
0.21), so the comparison would measure the dynamics, not the arithmetic (docs/training.md).
"""
import json
import os

import numpy as np
import pytest

from npdiffusion.backend import to_numpy
from npdiffusion.io.pretrained import load_weights
from npdiffusion.io.safetensors import load_file
from npdiffusion.training import clip_stage, tokenizer_stage, unet_stage, vae_stage
from npdiffusion.training.checkpoint import STATE_FILE
from npdiffusion.training.config import ConfigError, DataConfig, TrainConfig, build_config
from npdiffusion.training.loop import Trainer, TrainingError, read_history_csv
from npdiffusion.training.stages import dataset_from_config, run_model_stage

DATA = DataConfig(num_images=16, resolution=8, seed=3)
STEPS = 40


def quiet(*a):
    pass


def _train(**kw):
    return TrainConfig(**{"batch_size": 4, "learning_rate": 3e-3, "checkpointing_steps": 100, "seed": 1,
                          "steps": STEPS, **kw})


#: per stage: the [train] settings of the comparison (loss scales that do not overflow: no skipped
#: step, so the two runs see the same updates), and the stage module
SETTINGS = {"clip": dict(learning_rate=3e-4, loss_scale_init=256.0),
            "vae": dict(loss_scale_init=128.0),
            "unet": dict()}
MODULES = {"clip": clip_stage, "vae": vae_stage, "unet": unet_stage}
MODEL_FOLDER = {"clip": "clip", "vae": "vae", "unet": "unet"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tokenizer, then float32 CLIP and VAE runs (also the U-Net's frozen models) and a float32 U-Net run."""
    root = tmp_path_factory.mktemp("mp")
    tokenizer_stage.train(tokenizer_stage.CONFIG(output_dir=str(root / "tok"), data=DATA,
                                                 tokenizer=tokenizer_stage.TokenizerOptions(model_max_length=8)))
    for name in ("clip", "vae", "unet"):
        run_model_stage(config(root, name, root / f"{name}-float32"), MODULES[name].build_stage, progress=False,
                        log=quiet)
    return root


def config(root, name, out, **train):
    train = _train(**{**SETTINGS[name], **train})
    if name == "clip":
        opts = clip_stage.CLIPOptions(tokenizer=str(root / "tok" / "tokenizer"), text_hidden_size=16, text_layers=1,
                                      text_heads=2, text_intermediate_size=32, vision_hidden_size=16,
                                      vision_layers=1, vision_heads=2, vision_intermediate_size=32, patch_size=4,
                                      projection_dim=16)
        return clip_stage.CONFIG(output_dir=str(out), data=DATA, train=train, clip=opts)
    if name == "vae":
        return vae_stage.CONFIG(output_dir=str(out), data=DATA, train=train,
                                vae=vae_stage.VAEOptions(block_out_channels=(8, 8), norm_num_groups=4))
    opts = unet_stage.UNetOptions(vae=str(root / "vae-float32" / "vae"),
                                  text_encoder=str(root / "clip-float32" / "text_encoder"),
                                  tokenizer=str(root / "clip-float32" / "tokenizer"), block_out_channels=(8, 16),
                                  norm_num_groups=4, attention_head_dim=4)
    return unet_stage.CONFIG(output_dir=str(out), data=DATA, train=train, unet=opts)


def losses(folder):
    return read_history_csv(os.path.join(folder, "losses.csv"))


@pytest.mark.parametrize("name", ["clip", "vae", "unet"])
def test_fp16_training_ends_within_1e_2_of_float32(root, tmp_path, name):
    run_model_stage(config(root, name, tmp_path / "fp16", mixed_precision="fp16"), MODULES[name].build_stage,
                    progress=False, log=quiet)
    ref, got = losses(root / f"{name}-float32"), losses(tmp_path / "fp16")
    assert len(got) == STEPS and not any(r["skipped"] for r in got)
    assert all(r["loss_scale"] == got[0]["loss_scale"] for r in got) and "loss_scale" not in ref[0]
    first, last = ref[-1]["loss"], got[-1]["loss"]
    assert abs(last - first) <= 1e-2 * abs(first), (name, first, last)
    assert ref[-1]["loss"] < ref[0]["loss"] and got[-1]["loss"] < got[0]["loss"]      # both learned
    # the exported model holds the float32 masters, not float16 weights
    weights = load_weights(tmp_path / "fp16" / MODEL_FOLDER[name]) if name != "clip" else \
        load_file(str(tmp_path / "fp16" / "clip" / "model.safetensors"))
    assert {str(w.dtype) for w in weights.values()} == {"float32"}


@pytest.mark.parametrize("name", ["clip", "vae", "unet"])
def test_fp16_resume_is_bitwise(root, tmp_path, name):
    """Straight 8 steps vs 4 + resume to 8, at the default loss scale 2**16: the VAE and CLIP
    overflow at first (skipped steps, scale halved), so the scaler's state is exercised too."""
    kw = dict(mixed_precision="fp16", steps=8, checkpointing_steps=4, loss_scale_init=65536.0, use_ema=True,
              ema_decay=0.9)
    run_model_stage(config(root, name, tmp_path / "ref", **kw), MODULES[name].build_stage, progress=False, log=quiet)
    run_model_stage(config(root, name, tmp_path / "run", **{**kw, "steps": 4}), MODULES[name].build_stage,
                    progress=False, log=quiet)
    run_model_stage(config(root, name, tmp_path / "run", **kw), MODULES[name].build_stage, resume=True,
                    progress=False, log=quiet)
    a, b = tmp_path / "ref" / "checkpoint-8", tmp_path / "run" / "checkpoint-8"
    sa, sb = (json.loads((c / STATE_FILE).read_text()) for c in (a, b))
    assert sa["loss_scaler"] == sb["loss_scaler"] and sa["mixed_precision"] == "fp16"
    for rel in (f"{MODEL_FOLDER[name]}", "optimizer.safetensors", "ema.safetensors"):
        if rel.endswith(".safetensors"):
            x, y = load_file(str(a / rel)), load_file(str(b / rel))
        else:
            x = load_weights(a / rel) if name != "clip" else load_file(str(a / rel / "model.safetensors"))
            y = load_weights(b / rel) if name != "clip" else load_file(str(b / rel / "model.safetensors"))
            assert {str(w.dtype) for w in x.values()} == {"float32"}          # the masters
        assert x.keys() == y.keys() and all(x[k].tobytes() == y[k].tobytes() for k in x), rel
    assert (a / "losses.csv").read_text() == (b / "losses.csv").read_text()      # nan grad norms: compare text
    rows = losses(tmp_path / "ref")
    if name in ("vae", "clip"):
        assert rows[0]["skipped"] == 1 and rows[1]["loss_scale"] == 32768.0 and sa["loss_scaler"]["skipped_steps"] >= 1


class PoisonedVAE(vae_stage.VAEStage):
    """The VAE stage with an inf written into one gradient after the backward, when ``poison``."""

    poison = False

    def train_step(self, batch, rng):
        out = super().train_step(batch, rng)
        if self.poison:
            _, g = next(iter(self.module.named_grads()))
            g[(0,) * g.ndim] = np.inf
        return out


def _snapshot(trainer):
    grab = {}
    for tag, named in (("master", trainer.master.named_parameters()), ("module", trainer.module.named_parameters())):
        for k, v in named:
            grab[f"{tag}:{k}"] = to_numpy(v).tobytes()
    for slot, arrays in trainer.optimizer.state_dict()["state"].items():
        for k, v in arrays.items():
            grab[f"opt:{slot}:{k}"] = to_numpy(v).tobytes()
    return grab


def _poisoned_trainer(root, out, **train):
    cfg = config(root, "vae", out, mixed_precision="fp16", **train)
    stage = PoisonedVAE(cfg, dataset_from_config(cfg.data))
    return stage, Trainer(stage, dataset_from_config(cfg.data), cfg.train, str(out), progress=False, log=quiet)


def test_an_injected_overflow_is_skipped_bitwise_and_the_scale_backs_off(root, tmp_path):
    stage, trainer = _poisoned_trainer(root, tmp_path)
    try:
        assert not trainer._one_step()["skipped"]
        before = _snapshot(trainer)
        stage.poison = True
        row = trainer._one_step()
        assert row["skipped"] == 1 and row["loss_scale"] == 128.0 and np.isfinite(row["loss"])
        assert _snapshot(trainer) == before                     # masters, module, moments untouched
        assert trainer.scaler.get_scale() == 64.0 and trainer.skipped_steps == 1 and trainer.bad_run == 0
        assert trainer.scaler.state_dict()["skipped_steps"] == 1
        stage.poison = False
        row = trainer._one_step()
        assert not row["skipped"] and row["loss_scale"] == 64.0 and trainer.scaler.consecutive_skips == 0
        assert _snapshot(trainer) != before
    finally:
        trainer.loader.close()


def test_consecutive_overflows_stop_at_the_configured_limit(root, tmp_path):
    stage, trainer = _poisoned_trainer(root, tmp_path, max_consecutive_overflow_steps=3)
    stage.poison = True
    with pytest.raises(TrainingError, match=r"3 consecutive fp16 steps had non-finite gradients "
                                            r"\(train.max_consecutive_overflow_steps = 3\)"):
        trainer.fit()
    assert trainer.scaler.get_scale() == 16.0 and trainer.step == 3


def test_mixed_precision_configs_fail_with_one_clear_error(root, tmp_path):
    with pytest.raises(ConfigError, match=r"'train.mixed_precision' must be one of 'no', 'fp16', got str 'bf16'"):
        build_config(vae_stage.CONFIG, {"train": {"mixed_precision": "bf16"}})
    assert TrainConfig().mixed_precision == "no"
    cfg = config(root, "vae", tmp_path / "out", mixed_precision="fp16", dtype="float64")
    with pytest.raises(ValueError, match="needs train.dtype = 'float32', got 'float64'"):
        run_model_stage(cfg, vae_stage.build_stage, progress=False, log=quiet)
    assert not os.path.exists(tmp_path / "out")                 # refused before touching anything

    class NoFP16(vae_stage.VAEStage):
        supports_mixed_precision = False

    cfg = config(root, "vae", tmp_path / "out2", mixed_precision="fp16")
    with pytest.raises(ValueError, match="the 'vae' stage does not support it"):
        Trainer(NoFP16(cfg, dataset_from_config(cfg.data)), dataset_from_config(cfg.data), cfg.train,
                str(tmp_path / "out2"), progress=False, log=quiet)
