"""Start training from a pretrained model folder: find it, check it against the config, load it, and
write the fine-tuned pipeline folder so that it loads wherever the original did.

No arrays here but the loaded models; ``K`` below is a config key such as ``unet.block_out_channels``.

``unet.pretrained = "DIR"`` names either

* a pipeline folder (``model_index.json``; ours or diffusers'): the U-Net is ``DIR/unet``, and the
  VAE, text encoder, tokenizer and noise schedule (``DIR/scheduler/scheduler_config.json``) come
  from ``DIR`` unless the config gives them; or
* a U-Net folder (``config.json`` of a ``UNet2DConditionModel``): when it is the ``unet/`` of a
  pipeline folder, that pipeline supplies the rest as above; a bare U-Net folder (e.g. the
  ``unet/`` a U-Net stage wrote) needs ``unet.vae``, ``unet.text_encoder`` and ``unet.tokenizer``, and
  the schedule is the config's.

The U-Net keeps its own sizes: a size key the config gives (``given_keys``) that disagrees with the
folder's ``config.json`` is refused, naming both. ``write_finetuned_pipeline`` copies the original's
components (their files byte for byte, ``model_index.json`` and the scheduler config included) and
puts the trained ones in their place, so the folder loads in diffusers as the original did.
Docs: docs/training.md ("Fine-tuning a pretrained model").
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass

from npdiffusion.io.pretrained import read_config

UNET_CLASS = "UNet2DConditionModel"
#: config keys (of the U-Net stage's [unet]) that fix the U-Net's sizes, as named in its config.json
SIZE_KEYS = ("block_out_channels", "down_block_types", "layers_per_block", "attention_head_dim", "norm_num_groups")
#: config keys of the noise schedule and the objective, as named in a diffusers scheduler_config.json
SCHEDULE_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type",
                 "rescale_betas_zero_snr")
#: the frozen components that come from the pretrained pipeline unless the config gives them
COMPONENTS = ("vae", "text_encoder", "tokenizer")
SCHEDULER_CONFIG = "scheduler_config.json"


@dataclass(frozen=True)
class PretrainedBase:
    """A pretrained starting point: ``unet`` (its U-Net folder) and ``pipeline`` (the pipeline folder
    that holds the rest, or None for a bare U-Net folder). ``key`` names the config key for messages."""

    unet: str
    pipeline: str | None
    key: str = "unet.pretrained"

    def component(self, name: str) -> str | None:
        """``pipeline/name`` (a component folder), or None for a bare U-Net folder."""
        return None if self.pipeline is None else os.path.join(self.pipeline, name)

    def unet_config(self) -> dict:
        return read_config(self.unet)

    def scheduler_config(self) -> dict | None:
        """The pipeline's scheduler config (None for a bare U-Net folder)."""
        if self.pipeline is None:
            return None
        from npdiffusion.schedulers.base import SchedulerMixin  # noqa: PLC0415 - reads -Infinity as diffusers

        return SchedulerMixin.load_config(os.path.join(self.pipeline, "scheduler"))

    def load_unet(self, dtype="float32"):
        """The pretrained ``UNet2DConditionModel`` with its weights, in ``dtype``."""
        from npdiffusion.models.unet.unet_2d_condition import UNet2DConditionModel  # noqa: PLC0415

        return UNet2DConditionModel.from_pretrained(self.unet, dtype=dtype)


def find_base(path, key: str = "unet.pretrained") -> PretrainedBase:
    """The ``PretrainedBase`` at ``path`` (see the module docstring); a FileNotFoundError or ValueError
    naming ``key`` and the folder when it is neither a pipeline nor a U-Net folder."""
    from npdiffusion.pipelines.loading import MODEL_INDEX, read_model_index  # noqa: PLC0415

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{key} {path!r} does not exist or is not a folder (expected a pipeline folder "
                                "with model_index.json, or a U-Net folder with config.json)")
    if os.path.isfile(os.path.join(path, MODEL_INDEX)):
        read_model_index(path)                      # every component listed and present, or one clear error
        base = PretrainedBase(os.path.join(path, "unet"), path, key)
    elif os.path.isfile(os.path.join(path, "config.json")):
        parent = os.path.dirname(os.path.abspath(path))
        in_pipeline = os.path.basename(os.path.abspath(path)) == "unet" and \
            os.path.isfile(os.path.join(parent, MODEL_INDEX))
        if in_pipeline:
            read_model_index(parent)
        base = PretrainedBase(path, parent if in_pipeline else None, key)
    else:
        raise ValueError(f"{key} {path!r} is neither a pipeline folder (model_index.json) nor a U-Net folder "
                         "(config.json)")
    found = base.unet_config().get("_class_name")
    if found not in (None, UNET_CLASS):
        raise ValueError(f"{key} {path!r}: {base.unet} holds a {found!r}, not a {UNET_CLASS}")
    return base


def _as_config_value(value):
    """A config.json value in the config's form: lists as tuples, a list of equal ints as the int."""
    if isinstance(value, list):
        if value and all(isinstance(v, int) and v == value[0] for v in value):
            return value[0]
        return tuple(value)
    return value


def check_sizes(base: PretrainedBase, options, given, section: str = "unet") -> None:
    """A ValueError when a size key in ``given`` disagrees with the pretrained U-Net's config.json,
    naming the config's value and the folder's."""
    config = base.unet_config()
    for key in SIZE_KEYS:
        if key not in given or key not in config:
            continue
        ours, theirs = getattr(options, key), _as_config_value(config[key])
        ours_cmp = ours[0] if isinstance(ours, tuple) and isinstance(theirs, int) and len(set(ours)) == 1 else ours
        if ours_cmp != theirs:
            raise ValueError(f"{section}.{key} = {list(ours) if isinstance(ours, tuple) else ours!r} disagrees with "
                             f"the pretrained U-Net {os.path.join(base.unet, 'config.json')}: {key} = "
                             f"{config[key]!r}; a pretrained U-Net keeps its sizes, so remove {section}.{key} from "
                             f"the config (or set {base.key} to another model)")


def schedule_options(base: PretrainedBase, options, given, section: str = "unet"):
    """``options`` with the schedule keys the config does not give taken from the pipeline's scheduler
    config (unchanged for a bare U-Net folder). A ValueError when that schedule cannot be trained on."""
    config = base.scheduler_config()
    if config is None:
        return options
    where = os.path.join(base.pipeline, "scheduler", SCHEDULER_CONFIG)
    if config.get("trained_betas") is not None and not set(SCHEDULE_KEYS[:4]) <= set(given):
        raise ValueError(f"{where} holds trained_betas, which training cannot use; give the schedule in the config "
                         f"({', '.join(f'{section}.{k}' for k in SCHEDULE_KEYS[:4])})")
    fields = {f.name: f for f in dataclasses.fields(options)}
    updates = {}
    for key in SCHEDULE_KEYS:
        if key in given or key not in config:
            continue
        value, choices = config[key], fields[key].metadata.get("choices")
        kind = type(getattr(options, key))
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else \
            isinstance(value, kind) and (kind is not int or not isinstance(value, bool))
        if not ok or (choices is not None and value not in choices):
            expected = f"one of {', '.join(map(repr, choices))}" if choices else f"a {kind.__name__}"
            raise ValueError(f"{where}: {key} must be {expected} to train on it, got {value!r}; give "
                             f"{section}.{key} in the config")
        updates[key] = kind(value)
    return dataclasses.replace(options, **updates)


def component_folders(base: PretrainedBase, options, given, section: str = "unet") -> dict:
    """{vae, text_encoder, tokenizer: folder}: the config's where given, else the pipeline's; a
    ValueError for a bare U-Net folder whose config lacks one."""
    out = {}
    for name in COMPONENTS:
        if name in given or base.pipeline is None:
            if name not in given:
                raise ValueError(f"{base.key} {base.unet!r} is a U-Net folder outside a pipeline folder, so "
                                 f"{section}.{name} must name the {name} folder to use with it")
            out[name] = getattr(options, name)
        else:
            out[name] = base.component(name)
    return out


def scheduler_overrides(base: PretrainedBase, options, given) -> dict:
    """The schedule keys the config gives whose values differ from the pipeline's scheduler config."""
    config = base.scheduler_config() or {}
    return {k: getattr(options, k) for k in SCHEDULE_KEYS if k in given and config.get(k) != getattr(options, k)}


def write_finetuned_pipeline(base: PretrainedBase, folder, components: dict, overrides: dict) -> str:
    """Write the pipeline folder ``folder`` (atomically, ``io.atomic_folder``): each of ``components``
    ({name: source folder}: the trained U-Net, the frozen or trained others) copied byte for byte, and
    the original's ``model_index.json`` and ``scheduler/`` (its config updated with ``overrides``, the
    schedule keys the config changed). Needs a pipeline base. Returns ``folder``."""
    from npdiffusion.io.atomic import atomic_write_text  # noqa: PLC0415
    from npdiffusion.io.atomic_folder import atomic_folder  # noqa: PLC0415
    from npdiffusion.pipelines.loading import MODEL_INDEX  # noqa: PLC0415

    if base.pipeline is None:
        raise ValueError("write_finetuned_pipeline: the pretrained base is a bare U-Net folder, not a pipeline")
    folder = os.fspath(folder)
    with atomic_folder(folder) as tmp:
        for name, source in components.items():
            shutil.copytree(source, os.path.join(tmp, name))
        shutil.copytree(os.path.join(base.pipeline, "scheduler"), os.path.join(tmp, "scheduler"))
        if overrides:
            config = dict(base.scheduler_config(), **overrides)
            atomic_write_text(os.path.join(tmp, "scheduler", SCHEDULER_CONFIG),
                              json.dumps(config, indent=2, sort_keys=True, allow_nan=True) + "\n")
        shutil.copyfile(os.path.join(base.pipeline, MODEL_INDEX), os.path.join(tmp, MODEL_INDEX))
    return folder


@dataclass(frozen=True)
class PretrainedStart:
    """Everything a stage needs to start from ``options.pretrained`` (``open_start``): the ``base``,
    the ``options`` with the pipeline's schedule filled in, the component ``folders`` ({vae,
    text_encoder, tokenizer: folder}) and the scheduler ``overrides`` for the written pipeline."""

    base: PretrainedBase
    options: object
    folders: dict
    overrides: dict

    def scheduler(self):
        """The pipeline's own scheduler (class and config, overrides applied), or None for a bare U-Net."""
        from npdiffusion.pipelines.loading import read_model_index, scheduler_class  # noqa: PLC0415

        if self.base.pipeline is None:
            return None
        cls = scheduler_class(read_model_index(self.base.pipeline)["scheduler"][1])
        return cls.from_config(dict(self.base.scheduler_config(), **self.overrides))


def open_start(options, section: str = "unet") -> PretrainedStart:
    """Check ``options.pretrained`` against ``options`` (a config section with ``pretrained``, the
    ``SIZE_KEYS``, ``SCHEDULE_KEYS`` and ``COMPONENTS`` keys) and resolve it; reads configs only."""
    from npdiffusion.training.config import given_keys  # noqa: PLC0415

    given = given_keys(options)
    base = find_base(options.pretrained, f"{section}.pretrained")
    check_sizes(base, options, given, section)
    resolved = schedule_options(base, options, given, section)
    return PretrainedStart(base, resolved, component_folders(base, options, given, section),
                           scheduler_overrides(base, resolved, given))
