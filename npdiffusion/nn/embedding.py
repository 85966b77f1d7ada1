"""``Embedding(num_embeddings, embedding_dim)``, torch.nn.Embedding's twin (a learned lookup table).

Shapes: ids (...) integers in [0, V) -> y (..., D); weight (V, D), initialized N(0, 1) as torch.
Ops and derivation: npdiffusion/ops/embedding.py, docs/ops/embeddings.md.
"""
from __future__ import annotations

from npdiffusion.backend import asarray, is_array
from npdiffusion.checks import check_positive_int
from npdiffusion.nn.init import normal
from npdiffusion.nn.module import Module
from npdiffusion.ops.embedding import check_ids, embedding_backward, embedding_forward


class Embedding(Module):
    """y = weight[ids]. ``backward(dy)`` accumulates weight's gradient (repeated ids add up) and
    returns None: integer ids have no gradient (module protocol: integer inputs get none)."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings = check_positive_int("num_embeddings", num_embeddings)
        self.embedding_dim = check_positive_int("embedding_dim", embedding_dim)
        self.register_parameter("weight", normal((num_embeddings, embedding_dim), std=1.0))

    def forward(self, ids):
        if not is_array(ids):
            raise TypeError(f"Embedding: ids must be an integer array, got {type(ids).__name__}")
        # The range check runs where the ids are: on host ids before they move (free); on device
        # ids it waits for the device, so the models hand over host ids (issue #18).
        check_ids(ids, self.num_embeddings, "Embedding")
        y, cache = embedding_forward(asarray(ids), self.weight, checked=True)
        self.save_for_backward(cache)
        return y

    def backward(self, dy):
        """dy (..., embedding_dim) -> None (integer ids get no gradient); accumulates the weight's."""
        if not self.requires_grad:                            # frozen: nothing to compute
            self.saved()
            return None
        _, dweight = embedding_backward(dy, self.saved())
        self.accumulate_grad("weight", dweight)
        return None

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"
