"""npdiffusion: Stable Diffusion from scratch on NumPy (CPU) and CuPy (GPU), every backward by hand.

Choose the array backend once, before building models::

    import npdiffusion
    npdiffusion.set_backend("cupy")   # or NPDIFFUSION_BACKEND=cupy in the environment
"""
from npdiffusion.backend import get_backend, set_backend

__version__ = "0.1.0"

__all__ = ["set_backend", "get_backend", "__version__"]
