"""Small hand-written modules the protocol tests share (tests/test_nn_module.py,
tests/test_oracle_recorder.py)."""
from __future__ import annotations

from npdiffusion.nn.linear import Linear
from npdiffusion.nn.module import Module, ModuleList


class TwoLayer(Module):
    """y = fc2(fc1(x) * fc1(x)), x (B, 3) -> y (B, 2): a composite whose children sit in a ModuleList,
    each called once, and whose backward chains them in reverse."""

    def __init__(self):
        super().__init__()
        self.blocks = ModuleList([Linear(3, 4), Linear(4, 2)])

    def forward(self, x):
        h = self.blocks[0](x)
        self.save_for_backward(h)
        return self.blocks[1](h * h)

    def backward(self, dy):
        h = self.saved()
        dhh = self.blocks[1].backward(dy)
        return self.blocks[0].backward(2 * h * dhh)
