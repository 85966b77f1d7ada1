"""The training stages by name, what each needs, and the helpers every stage shares.

A stage is a module ``npdiffusion.training.<name>_stage`` exposing

* ``CONFIG``: its config dataclass (``npdiffusion.training.config``), read from a TOML file;
* ``train(config, resume=False, progress=None, log=print) -> str``: run it, return a one-line summary.

``npdiffusion train STAGE --config FILE [--resume]`` finds it here. A stage whose file or model is
not in this build yet is reported with ``unavailable_reason(name)``: one line naming what is missing.
Docs: docs/training.md.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

#: name -> (stage module, [(model module the stage needs, what it is)]), in pipeline order.
STAGES = {
    "tokenizer": ("npdiffusion.training.tokenizer_stage",
                  [("npdiffusion.models.clip.bpe_train", "the BPE trainer (train_bpe)")]),
    "clip": ("npdiffusion.training.clip_stage",
             [("npdiffusion.models.clip.clip_model", "the CLIP text and vision models (CLIPModel)")]),
    "vae": ("npdiffusion.training.vae_stage",
            [("npdiffusion.models.vae.autoencoder_kl", "the VAE (AutoencoderKL)")]),
    "unet": ("npdiffusion.training.unet_stage",
             [("npdiffusion.models.unet.unet_2d_condition", "the U-Net (UNet2DConditionModel)"),
              ("npdiffusion.models.vae.autoencoder_kl", "the VAE (AutoencoderKL)"),
              ("npdiffusion.models.clip.text_model", "the CLIP text encoder (CLIPTextModel)")]),
    "dreambooth": ("npdiffusion.training.dreambooth_stage",
                   [("npdiffusion.models.unet.unet_2d_condition", "the U-Net (UNet2DConditionModel)"),
                    ("npdiffusion.models.vae.autoencoder_kl", "the VAE (AutoencoderKL)"),
                    ("npdiffusion.models.clip.text_model", "the CLIP text encoder (CLIPTextModel)")]),
    "lora": ("npdiffusion.training.lora_stage",
             [("npdiffusion.models.unet.unet_2d_condition", "the U-Net (UNet2DConditionModel)"),
              ("npdiffusion.nn.lora", "the LoRA layer (LoraLayer)")]),
}


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def unavailable_reason(name: str) -> str | None:
    """None when stage ``name`` can run in this build, else one line saying which model or file is missing."""
    if name not in STAGES:
        raise KeyError(f"unknown training stage {name!r}; the stages are {', '.join(STAGES)}")
    module, needs = STAGES[name]
    missing = [what + f" ({mod})" for mod, what in needs if not _exists(mod)]
    if missing:
        return (f"the {name} stage is not available in this build: it needs {' and '.join(missing)}, "
                "which is not here yet")
    if not _exists(module):
        return (f"the {name} stage is not available in this build yet: its models exist, but its training code "
                f"({module.replace('.', '/')}.py) is not written yet")
    return None


def load_stage(name: str):
    """The stage module ``name`` (call ``unavailable_reason`` first for a friendly message)."""
    reason = unavailable_reason(name)
    if reason is not None:
        raise ModuleNotFoundError(reason)
    return importlib.import_module(STAGES[name][0])


def dataset_from_config(data):
    """The dataset a ``DataConfig`` describes (``npdiffusion.data.load_dataset``)."""
    from npdiffusion.data import load_dataset  # noqa: PLC0415

    return load_dataset(data.dataset, path=data.path, num_images=data.num_images, resolution=data.resolution,
                        seed=data.seed, caption_column=data.caption_column, shapes=data.shapes)


def refuse_data_parallel(name: str, why: str) -> None:
    """A ``TrainingError`` (one line) when this process is one of N > 1 MPI ranks: stage ``name`` trains in
    one process only, because ``why``."""
    from npdiffusion.distributed.world import get_communicator  # noqa: PLC0415
    from npdiffusion.training.loop import TrainingError  # noqa: PLC0415

    size = get_communicator().size
    if size > 1:
        raise TrainingError(f"the {name} stage cannot run as {size} MPI processes yet: {why}; run it as one "
                            "process (without mpiexec). docs/distributed.md")


def run_model_stage(config, build_stage, *, resume: bool = False, progress=None, log=print) -> str:
    """The ``train`` of a model stage: everything but building the stage itself.

    ``config`` has ``output_dir``, ``data`` (a ``DataConfig``) and ``train`` (a ``TrainConfig``);
    ``build_stage(config, dataset)`` returns the ``Stage`` (its weights drawn after
    ``npdiffusion.random.manual_seed(config.train.seed)``). Checks come first, cheapest first, so a
    bad run fails before any work and touches nothing: the output folder is writable, it holds no
    checkpoints unless resuming, the dataset loads. Then the ``Trainer`` runs; returns its summary.
    """
    from npdiffusion.random import manual_seed  # noqa: PLC0415
    from npdiffusion.training.checkpoint import CheckpointManager, prepare_output_dir  # noqa: PLC0415
    from npdiffusion.training.config import config_to_dict  # noqa: PLC0415
    from npdiffusion.training.loop import Trainer, TrainingError, check_mixed_precision  # noqa: PLC0415

    check_mixed_precision(config.train)
    out = prepare_output_dir(config.output_dir)
    if not resume:
        existing = CheckpointManager(out).checkpoints()
        if existing:
            raise TrainingError(f"output_dir {out!r} already holds checkpoints (newest: "
                                f"{os.path.basename(existing[-1][1])}); pass --resume to continue that run, "
                                "or choose another output_dir")
    dataset = dataset_from_config(config.data)
    manual_seed(config.train.seed)
    stage = build_stage(config, dataset)
    trainer = Trainer(stage, dataset, config.train, out, resume=resume, progress=progress, log=log,
                      config_snapshot=config_to_dict(config))
    return trainer.fit().summary(stage.name) + f"; wrote {out}"
