"""Modules with parameters, mirroring torch.nn / diffusers names so state dicts interchange."""
from npdiffusion.nn.linear import Linear
from npdiffusion.nn.module import Module, ModuleList, StateDictError

__all__ = ["Module", "ModuleList", "StateDictError", "Linear"]
