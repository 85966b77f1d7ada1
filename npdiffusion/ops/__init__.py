"""Stateless ops as forward/backward pairs.

Each ``<op>_forward(...)`` returns ``(output, cache)`` where the cache holds exactly what
``<op>_backward(grad_output, cache)`` needs; the backward returns the gradient of each input and
parameter, in the forward's argument order (None for one that gets no gradient).
Op bodies use only the active array module (``npdiffusion.backend.xp``).
"""
