"""LoRA: low-rank adapters on a frozen model (``npdiffusion.nn.lora.LoraLayer``), attached by target names
(``attach``), saved and loaded in diffusers', PEFT's and kohya's file layouts (``files``). Docs: docs/lora.md."""
from npdiffusion.lora.attach import (
    TEXT_ENCODER_TARGETS,
    UNET_ATTENTION_TARGETS,
    LoraAdapters,
    add_lora,
    matching_modules,
    remove_lora,
)
from npdiffusion.lora.files import WEIGHT_NAME, LoraFileError, load_lora, read_lora, save_lora

__all__ = ["LoraAdapters", "add_lora", "remove_lora", "matching_modules", "UNET_ATTENTION_TARGETS",
           "TEXT_ENCODER_TARGETS", "save_lora", "load_lora", "read_lora", "LoraFileError", "WEIGHT_NAME"]
