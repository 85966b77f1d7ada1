"""Samplers with diffusers' API and numbers: DDPM, DDIM, PNDM/PLMS, Euler, Euler ancestral, Heun, DPM-Solver++.

Each class takes diffusers' config keys (with diffusers' defaults) as keyword arguments, loads any
diffusers scheduler config (``from_config``, ``from_pretrained``) and saves one (``save_config``).
Timesteps and sigmas are small host (NumPy) arrays; ``step`` and ``add_noise`` do their array math
with the active backend (NumPy or CuPy) and keep the sample's dtype. Stochastic steps take their
standard-normal draw as ``noise=`` or draw it from ``rng=`` (a ``numpy.random.Generator``).
The math of every step: docs/schedulers.md.
"""
from npdiffusion.schedulers.base import SchedulerMixin
from npdiffusion.schedulers.ddim import DDIMScheduler
from npdiffusion.schedulers.ddpm import DDPMScheduler
from npdiffusion.schedulers.dpm_multistep import DPMSolverMultistepScheduler
from npdiffusion.schedulers.euler import EulerDiscreteScheduler
from npdiffusion.schedulers.euler_ancestral import EulerAncestralDiscreteScheduler
from npdiffusion.schedulers.heun import HeunDiscreteScheduler
from npdiffusion.schedulers.output import SchedulerOutput
from npdiffusion.schedulers.pndm import PNDMScheduler
from npdiffusion.schedulers.timesteps import spaced_timesteps

__all__ = [
    "SchedulerMixin",
    "SchedulerOutput",
    "spaced_timesteps",
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "DPMSolverMultistepScheduler",
]
