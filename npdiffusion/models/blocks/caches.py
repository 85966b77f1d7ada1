"""Freeing what a block kept for its backward once that backward has run.

The module protocol keeps each module's cache (``save_for_backward``) until its next forward.
During a model's backward that would hold every activation of the already-differentiated layers
until the very end; torch's autograd instead frees each saved tensor as soon as its backward ran.
``release_caches(block)`` does the same for a block and all its descendants, so the peak memory
of a backward is what the forward kept plus the temporaries of one block, and with gradient
checkpointing the recomputed activations of one block live only while that block's backward
runs. A second ``backward`` without a new forward then raises the protocol's clear error, as in
torch. Measured effect: docs/benchmarks.md ("U-Net").
"""
from __future__ import annotations


def release_caches(module) -> None:
    """Drop the backward caches of ``module`` and every descendant (parameters and gradients stay)."""
    stack = [module]
    while stack:                                   # iterative walk: no dotted names to build
        m = stack.pop()
        object.__setattr__(m, "_cache", None)
        stack.extend(m.children())
