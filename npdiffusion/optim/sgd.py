"""``SGD(module, lr, momentum=0.0, weight_decay=0.0, nesterov=False, dampening=0.0)``: torch.optim.SGD's twin.

Per parameter p with gradient g (momentum buffer b, created on the first step as a copy of d)::

    d <- g + weight_decay * p                        (L2 penalty, coupled, as in torch)
    b <- momentum * b + (1 - dampening) * d          (b <- d on the first step)
    d <- d + momentum * b   if nesterov   else   d <- b
    p <- p - lr * d

Derivation: docs/optim.md ("SGD with momentum").
"""
from __future__ import annotations

from npdiffusion.optim.optimizer import Optimizer, check_float


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum over ``module``'s parameters.

    State: ``momentum_buffer`` per parameter (only when ``momentum != 0``), in the parameter's dtype.
    """

    slots = ("momentum_buffer",)

    def __init__(self, module, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False, dampening: float = 0.0):
        super().__init__(module, lr)
        self._set_hyperparameters({"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                                   "nesterov": nesterov, "dampening": dampening})

    def hyperparameters(self) -> dict:
        return {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay,
                "nesterov": self.nesterov, "dampening": self.dampening}

    def _set_hyperparameters(self, hp: dict) -> None:
        self.lr = check_float("SGD", "lr", hp["lr"])
        self.momentum = check_float("SGD", "momentum", hp["momentum"])
        self.weight_decay = check_float("SGD", "weight_decay", hp["weight_decay"])
        self.dampening = check_float("SGD", "dampening", hp["dampening"], 0.0, 1.0)
        if not isinstance(hp["nesterov"], bool):
            raise TypeError(f"SGD: nesterov must be a bool, got {hp['nesterov']!r}")
        self.nesterov = hp["nesterov"]
        if self.nesterov and (self.momentum <= 0.0 or self.dampening != 0.0):
            raise ValueError(f"SGD: nesterov needs momentum > 0 and dampening == 0, got momentum={self.momentum}, "
                             f"dampening={self.dampening}")

    def step(self) -> None:
        """One update of every parameter from its current gradient."""
        self.step_count += 1
        lr, mu, wd, damp = self.lr, self.momentum, self.weight_decay, self.dampening
        for name, p, g in self._params_and_grads():
            d = g
            if wd != 0.0:
                d = g + wd * p
            if mu != 0.0:
                buf = self.state["momentum_buffer"].get(name)
                if buf is None:
                    buf = d.copy()
                    self.state["momentum_buffer"][name] = buf
                else:
                    buf *= mu
                    buf += (1.0 - damp) * d
                d = d + mu * buf if self.nesterov else buf
            p += -lr * d
