"""Modules with parameters, mirroring torch.nn / diffusers names so state dicts interchange."""
from npdiffusion.nn.activations import GELU, QuickGELU, SiLU
from npdiffusion.nn.attention import Attention
from npdiffusion.nn.conv import Conv2d
from npdiffusion.nn.dropout import Dropout
from npdiffusion.nn.embedding import Embedding
from npdiffusion.nn.feedforward import GEGLU, FeedForward
from npdiffusion.nn.linear import Linear
from npdiffusion.nn.module import Module, ModuleList, StateDictError, no_cache
from npdiffusion.nn.norm import GroupNorm, LayerNorm

__all__ = ["Module", "ModuleList", "StateDictError", "no_cache", "Linear", "Conv2d", "GroupNorm",
           "LayerNorm", "Embedding", "SiLU", "GELU", "QuickGELU", "Dropout", "Attention",
           "FeedForward", "GEGLU"]
