"""Optimizers and training helpers that work on a whole ``Module`` and update it in place.

* ``AdamW``, ``SGD``: torch.optim twins (same update, same order of operations).
* ``EMA``: moving average of weights with diffusers' ``EMAModel`` decay rules.
* ``clip_grad_norm_``: global gradient-norm clipping.
* ``LRScheduler`` + factor functions ``constant_with_warmup``, ``cosine_with_warmup``,
  ``linear_with_warmup``, and ``get_scheduler`` (diffusers' names).
* ``MasterWeights`` / ``DynamicLossScaler``: mixed precision (float32 masters, loss scaling).
* ``save_state`` / ``load_state``: optimizer / EMA / scheduler state in a safetensors file.

Derivations: docs/optim.md.
"""
from npdiffusion.optim.adamw import AdamW
from npdiffusion.optim.clip_grad import clip_grad_norm_, grad_norm
from npdiffusion.optim.ema import EMA
from npdiffusion.optim.mixed_precision import DynamicLossScaler, MasterWeights, NonFiniteGradientError
from npdiffusion.optim.lr_schedule import (LRScheduler, constant_with_warmup, cosine_with_warmup, get_scheduler,
                                           linear_with_warmup)
from npdiffusion.optim.optimizer import Optimizer, load_state, save_state
from npdiffusion.optim.sgd import SGD

__all__ = ["Optimizer", "AdamW", "SGD", "EMA", "clip_grad_norm_", "grad_norm", "LRScheduler",
           "constant_with_warmup", "cosine_with_warmup", "linear_with_warmup", "get_scheduler",
           "save_state", "load_state", "MasterWeights", "DynamicLossScaler", "NonFiniteGradientError"]
