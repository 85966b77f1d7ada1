"""What a scheduler's ``step`` returns: :class:`SchedulerOutput`, or its tuple with ``return_dict=False``.

Shapes: prev_sample, pred_original_sample (B, C, H, W) (any shape with a batch axis first).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from npdiffusion.outputs import BaseOutput


@dataclass
class SchedulerOutput(BaseOutput):
    """What ``step`` returns: ``prev_sample`` (B, ...) and, for schedulers that form one,
    ``pred_original_sample`` (the model's x0 estimate, (B, ...)). Indexing ``out[0]`` works as in
    diffusers (over the fields that are not None); ``to_tuple()`` gives them as a tuple."""

    prev_sample: Any
    pred_original_sample: Any = None


def step_output(return_dict: bool, prev_sample, pred_original_sample=None):
    """What ``step`` returns: a :class:`SchedulerOutput`, or with ``return_dict=False`` its tuple
    (``(prev_sample, pred_original_sample)``, or ``(prev_sample,)`` for schedulers that form no x0)."""
    out = SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
    return out if return_dict else out.to_tuple()
