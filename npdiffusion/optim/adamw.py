"""``AdamW(module, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)``: torch.optim.AdamW's twin.

Per parameter p with gradient g, at step t = 1, 2, ... (state m, v start at zero, same dtype and
shape as p)::

    p <- p * (1 - lr * weight_decay)                 decoupled weight decay (Loshchilov & Hutter)
    m <- m + (1 - beta1) * (g - m)                   = beta1 m + (1 - beta1) g  (torch's lerp)
    v <- beta2 v + (1 - beta2) g^2
    p <- p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

``lr_ratios`` ({parameter name prefix: r}) gives the parameters under a prefix the learning rate
r * lr (in the weight decay and the step alike): torch's parameter groups with group lr r * lr under a
schedule that scales every group by the same factor (e.g. a text encoder's own learning rate).

The same operations in the same order as torch's single-tensor path, so float64 results agree
to the last bits (torch's CPU kernels fuse some multiply-adds, NumPy does not: about 1 ulp per op).
Each parameter is updated in cache-sized blocks of its flattened entries on the CPU's threads
(npdiffusion/parallel.py): the dozen passes of one block find it in cache. On a module in flat
training storage (npdiffusion/nn/flat_parameters.py) the blocks run over each dtype's whole buffer
instead, one run of parameters per learning rate, with the moments in buffers of the same layout:
the same operations on every entry, so the same bits, without the per-parameter calls.
Derivation of the bias corrections: docs/optim.md ("AdamW"); the flat layout: "Flat training storage".
"""
from __future__ import annotations

from npdiffusion.backend import xp
from npdiffusion.nn import flat_parameters
from npdiffusion.optim.optimizer import Optimizer, check_float
from npdiffusion.parallel import BLOCK_ENTRIES, parallel_for


def _lerp_(start, end, weight: float, tmp) -> None:
    """``start <- start + weight (end - start)`` in place, with torch's two-branch formula."""
    xp.subtract(end, start, out=tmp)
    if abs(weight) < 0.5:
        tmp *= weight
        start += tmp
    else:
        tmp *= 1.0 - weight
        xp.subtract(end, tmp, out=start)


class AdamW(Optimizer):
    """Adam with decoupled weight decay over every parameter of ``module`` (updated in place).

    State: ``exp_avg`` (m) and ``exp_avg_sq`` (v) per parameter, in the parameter's dtype; one
    step counter ``step_count``. ``lr`` may be changed between steps (``LRScheduler`` does).
    """

    slots = ("exp_avg", "exp_avg_sq")

    def __init__(self, module, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, lr_ratios: dict | None = None):
        super().__init__(module, lr)
        self._set_hyperparameters({"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.lr_ratios = {str(k): check_float("AdamW", f"lr_ratios[{k!r}]", v) for k, v in (lr_ratios or {}).items()}

    def _ratio_of(self, name: str) -> float | None:
        """The ratio of the first prefix in ``lr_ratios`` that ``name`` starts with (None: no prefix)."""
        for prefix, ratio in self.lr_ratios.items():
            if name.startswith(prefix):
                return ratio
        return None

    def _lr_of(self, name: str) -> float:
        """The learning rate of parameter ``name``: lr, times its prefix's ratio in ``lr_ratios``."""
        ratio = self._ratio_of(name)
        return self.lr if ratio is None else self.lr * ratio

    def hyperparameters(self) -> dict:
        return {"lr": self.lr, "betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay}

    def _set_hyperparameters(self, hp: dict) -> None:
        betas = hp["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"AdamW: betas must be a pair (beta1, beta2), got {betas!r}")
        self.lr = check_float("AdamW", "lr", hp["lr"])
        self.betas = (check_float("AdamW", "betas[0]", betas[0], 0.0, 1.0, high_open=True),
                      check_float("AdamW", "betas[1]", betas[1], 0.0, 1.0, high_open=True))
        self.eps = check_float("AdamW", "eps", hp["eps"])
        self.weight_decay = check_float("AdamW", "weight_decay", hp["weight_decay"])

    def step(self) -> None:
        """One update of every parameter from its current gradient (see the module docstring)."""
        self.step_count += 1
        t = float(self.step_count)
        (beta1, beta2), eps, wd = self.betas, self.eps, self.weight_decay
        bias_correction2_sqrt = (1.0 - beta2 ** t) ** 0.5

        def update(p, g, m, v, step_size, decay):
            tmp = xp.empty_like(p)
            if wd != 0.0:
                p *= decay
            _lerp_(m, g, 1.0 - beta1, tmp)
            v *= beta2
            xp.multiply(g, 1.0 - beta2, out=tmp)
            tmp *= g
            v += tmp
            xp.sqrt(v, out=tmp)                 # tmp = denom = sqrt(v) / sqrt(bc2) + eps
            tmp /= bias_correction2_sqrt
            tmp += eps
            step = m * -step_size
            step /= tmp
            p += step

        def rates_of(ratio):
            lr = self.lr if ratio is None else self.lr * ratio
            return lr / (1.0 - beta1 ** t), 1.0 - lr * wd             # step_size, decay

        flat = flat_parameters.current(self.module)
        if flat is not None:
            slots = self._flat_slots(flat)
            for k, group in enumerate(flat.groups):
                arrays = (group.params, group.grads, slots["exp_avg"][k], slots["exp_avg_sq"][k])
                for lo, hi, ratio in group.runs(self._ratio_of):
                    rates = rates_of(ratio)
                    parallel_for(lambda a, b, lo=lo, rates=rates: update(*(x[lo + a:lo + b] for x in arrays), *rates),
                                 hi - lo, 1, BLOCK_ENTRIES)
            return
        for name, p, g in self._params_and_grads():
            m = self._slot("exp_avg", name, p)
            v = self._slot("exp_avg_sq", name, p)
            rates = rates_of(self._ratio_of(name))
            if not all(a.flags.c_contiguous for a in (p, m, v)):
                update(p, g, m, v, *rates)      # flat views would be copies
                continue
            flat = [a.reshape(-1) for a in (p, xp.ascontiguousarray(g), m, v)]
            parallel_for(lambda lo, hi: update(*(a[lo:hi] for a in flat), *rates), p.size, 1, BLOCK_ENTRIES)
