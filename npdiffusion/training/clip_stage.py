"""``npdiffusion train clip``: train CLIP's text and image towers from scratch, contrastively.

Shape legend: B batch (B texts and their B images), T = max_length tokens, S image side, E the
projection width.

Per step, captions are tokenized (in the loader's prefetch thread) with the tokenizer the
tokenizer stage wrote, and ``CLIPModel`` (docs/clip.md) computes::

    t = normalize(text_projection(text_model(ids).pooled))        (B, E)
    v = normalize(visual_projection(vision_model(images).pooled))  (B, E)
    Z = exp(logit_scale) t v^T                                    (B, B)
    loss = (CE(Z, diag) + CE(Z^T, diag)) / 2                        the symmetric InfoNCE loss

with the hand-written backward into both towers and ``logit_scale``. Under ``mpiexec -n N`` the
loss is taken over the global batch: the embeddings are all-gathered
(``distributed/global_contrastive.py``). After each optimizer step
``logit_scale`` is clamped to [0, ln 100] as OpenAI's and open_clip's training do. Images enter as
the loader gives them, in [-1, 1] (a model trained from scratch needs no ImageNet statistics).

Outputs in ``output_dir``: ``clip/`` (a transformers ``CLIPModel`` folder, with a
``preprocessor_config.json`` that says so: mean = std = 0.5 after rescaling by 1/255, so that
transformers' ``CLIPImageProcessor`` and CLIP guidance feed it what it was trained on), ``text_encoder/`` (its
text tower as a ``CLIPTextModel`` folder: what the U-Net stage and the pipeline use) and
``tokenizer/`` (a copy of the tokenizer it was trained with). Checkpoints hold ``clip/``.
Docs: docs/training.md ("The CLIP stage").
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy

from npdiffusion.training.config import StageConfig, option, section
from npdiffusion.training.loop import Stage

NAME = "clip"


@dataclass
class CLIPOptions:
    """``[clip]``: the tokenizer, the two towers and the projection."""

    tokenizer: str = option("runs/tokenizer/tokenizer", "the tokenizer/ folder written by `npdiffusion train "
                            "tokenizer`")
    max_length: int = option(0, "tokens per caption (0: the tokenizer's model_max_length)", min=0)
    projection_dim: int = option(64, "width of the shared embedding space", min=1)
    text_hidden_size: int = option(64, "text transformer width", min=1)
    text_layers: int = option(2, "text transformer layers", min=1)
    text_heads: int = option(2, "text attention heads (must divide the width)", min=1)
    text_intermediate_size: int = option(256, "text MLP width", min=1)
    vision_hidden_size: int = option(64, "vision transformer width", min=1)
    vision_layers: int = option(2, "vision transformer layers", min=1)
    vision_heads: int = option(2, "vision attention heads (must divide the width)", min=1)
    vision_intermediate_size: int = option(256, "vision MLP width", min=1)
    patch_size: int = option(4, "vision patch side (must divide data.resolution)", min=1)
    hidden_act: str = option("quick_gelu", "activation of both towers' MLPs",
                             choices=("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu"))
    logit_scale_init_value: float = option(2.6592, "initial log temperature (ln(1/0.07))")


@dataclass
class CLIPStageConfig(StageConfig):
    """The config file of ``npdiffusion train clip``."""

    output_dir: str = option("runs/clip", "folder for checkpoints, losses, clip/, text_encoder/ and tokenizer/")
    clip: CLIPOptions = section(CLIPOptions, "the tokenizer, the towers and the projection")


CONFIG = CLIPStageConfig


def load_tokenizer(folder: str):
    """The trained tokenizer, or a FileNotFoundError that says how to make one."""
    from npdiffusion.models.clip.tokenizer import CLIPTokenizer  # noqa: PLC0415

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"tokenizer folder {folder!r} does not exist: train one first with "
                                "`npdiffusion train tokenizer` (or set clip.tokenizer)")
    return CLIPTokenizer.from_pretrained(folder)


class CLIPStage(Stage):
    """``module`` is the CLIPModel; the loss is its symmetric contrastive loss."""

    name = NAME
    supports_mixed_precision = True

    def __init__(self, config: CLIPStageConfig, dataset):
        from npdiffusion.models.clip.clip_model import CLIPModel  # noqa: PLC0415

        opts = config.clip
        if config.data.resolution % opts.patch_size:
            raise ValueError(f"clip: clip.patch_size {opts.patch_size} must divide data.resolution "
                             f"{config.data.resolution}")
        self.tokenizer = load_tokenizer(opts.tokenizer)
        self.tokenizer_folder = opts.tokenizer
        self.max_length = opts.max_length or self.tokenizer.model_max_length
        tok = self.tokenizer
        text = {"vocab_size": len(tok), "hidden_size": opts.text_hidden_size, "num_hidden_layers": opts.text_layers,
                "num_attention_heads": opts.text_heads, "intermediate_size": opts.text_intermediate_size,
                "max_position_embeddings": self.max_length, "hidden_act": opts.hidden_act,
                "projection_dim": opts.projection_dim, "bos_token_id": tok.bos_token_id,
                "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
        vision = {"hidden_size": opts.vision_hidden_size, "num_hidden_layers": opts.vision_layers,
                  "num_attention_heads": opts.vision_heads, "intermediate_size": opts.vision_intermediate_size,
                  "image_size": config.data.resolution, "patch_size": opts.patch_size, "hidden_act": opts.hidden_act,
                  "projection_dim": opts.projection_dim}
        self.clip = CLIPModel({"text_config": text, "vision_config": vision, "projection_dim": opts.projection_dim,
                               "logit_scale_init_value": opts.logit_scale_init_value})
        self.clip.to(config.train.dtype).train()
        self.module = self.clip
        self.dtype = numpy.dtype(config.train.dtype)

    def collate(self, images, captions, indices, epoch, position):
        """Runs in the prefetch thread: the default batch plus ``input_ids`` (B, T) int64."""
        from npdiffusion.data.loader import default_collate  # noqa: PLC0415

        batch = default_collate(images, captions, indices, epoch, position)
        batch.input_ids = self.tokenizer(captions, max_length=self.max_length)
        return batch

    def train_step(self, batch, rng):
        from npdiffusion.backend import asarray  # noqa: PLC0415

        # host ids: CLIPTextModel range-checks them before they move (device ids would cost two syncs)
        images = asarray(batch.images, dtype=self.clip.dtype)
        if self.comm is None or self.comm.size == 1:
            out = self.clip(batch.input_ids, images)
            self.clip.backward(grad_loss=self.loss_scale)   # fp16: the loss's gradient x S in float32, then cast
            return {"loss": out.loss, "logit_scale": self.clip.logit_scale}
        # N ranks: the loss over the global batch (all-gathered embeddings); this rank's loss_r and
        # gradient shares, which the trainer averages (docs/distributed.md)
        from npdiffusion.distributed.global_contrastive import (  # noqa: PLC0415
            global_contrastive_loss_backward,
            global_contrastive_loss_forward,
        )

        out = self.clip(batch.input_ids, images, return_loss=False)
        loss, cache = global_contrastive_loss_forward(out.text_embeds, out.image_embeds, self.clip.logit_scale,
                                                      self.comm)
        d_text, d_image, d_scale = global_contrastive_loss_backward(self.loss_scale, cache)
        self.clip.backward(grad_text_embeds=d_text, grad_image_embeds=d_image)
        self.clip.accumulate_grad("logit_scale", d_scale)
        return {"loss": loss, "logit_scale": self.clip.logit_scale}

    def after_step(self):
        self.clip.clamp_logit_scale_()
        if self.master_weights is not None:             # fp16: clamp the float32 master as well
            from npdiffusion.backend import xp  # noqa: PLC0415
            from npdiffusion.models.clip.config import LOGIT_SCALE_MAX  # noqa: PLC0415

            master = dict(self.master_weights.named_parameters())["logit_scale"]
            xp.clip(master, 0.0, LOGIT_SCALE_MAX, out=master)

    def save_models(self, folder):
        """clip/ (weights, config and preprocessor_config.json), swapped in as one atomic folder."""
        from npdiffusion.io.atomic_folder import atomic_folder  # noqa: PLC0415

        with atomic_folder(os.path.join(folder, "clip")) as tmp:
            self.clip.save_pretrained(tmp)
            write_image_processor_config(tmp, self.clip.config.vision_config.image_size)

    def load_models(self, folder):
        from npdiffusion.models.clip.pretrained import read_folder  # noqa: PLC0415

        _, state = read_folder(os.path.join(folder, "clip"))
        self.clip.load_state_dict(state)

    def export_models(self, folder):
        """clip/, text_encoder/ (the text tower alone) and a copy of tokenizer/."""
        self.save_models(folder)
        self.clip.text_model.save_pretrained(os.path.join(folder, "text_encoder"))
        target = os.path.join(folder, "tokenizer")
        if os.path.abspath(target) != os.path.abspath(self.tokenizer_folder):
            self.tokenizer.save_pretrained(target)


def write_image_processor_config(folder, image_size: int) -> None:
    """A transformers ``preprocessor_config.json`` for images in [-1, 1]: x / 255, then (x - 0.5) / 0.5."""
    import json  # noqa: PLC0415

    from npdiffusion.io.atomic import atomic_write_text  # noqa: PLC0415

    side = int(image_size)
    config = {"image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True, "do_resize": True,
              "size": {"shortest_edge": side}, "resample": 3, "do_center_crop": True,
              "crop_size": {"height": side, "width": side}, "do_rescale": True, "rescale_factor": 1 / 255,
              "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    atomic_write_text(os.path.join(folder, "preprocessor_config.json"), json.dumps(config, indent=2) + "\n")


def build_stage(config: CLIPStageConfig, dataset) -> CLIPStage:
    return CLIPStage(config, dataset)


def train(config: CLIPStageConfig, resume: bool = False, progress=None, log=print) -> str:
    """Train CLIP (see the module docstring); returns a one-line summary."""
    from npdiffusion.training.stages import run_model_stage  # noqa: PLC0415

    return run_model_stage(config, build_stage, resume=resume, progress=progress, log=log)
