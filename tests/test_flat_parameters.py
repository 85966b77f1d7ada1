"""Flat training storage (npdiffusion/nn/flat_parameters.py): the same training, bit for bit, as per parameter.

Two copies of one model train side by side, one per parameter and one flattened; AdamW (with two
learning rates), the EMA and the clipping must give the same bits, the gradient norm the same
value within the rounding bound of a sum of squares, and the state files must be interchangeable.
The block sizes are shrunk so that blocks straddle parameters.
"""
import numpy as np
import pytest

from npdiffusion.backend import asarray, to_numpy, xp
from npdiffusion.nn import flat_parameters
from npdiffusion.nn.flat_parameters import flatten_parameters
from npdiffusion.nn.linear import Linear
from npdiffusion.nn.module import Module
from npdiffusion.optim import adamw, ema as ema_module
from npdiffusion.optim.adamw import AdamW
from npdiffusion.optim.clip_grad import clip_grads_with_norm_, grad_norm
from npdiffusion.optim.ema import EMA
from npdiffusion.optim.mixed_precision import MasterWeights
from npdiffusion.optim.optimizer import load_state, save_state


class Child(Module):
    def __init__(self):
        super().__init__()
        self.proj = Linear(4, 3)
        self.register_parameter("unused", np.zeros((2, 5)))    # never reached: a zero gradient


class Net(Module):
    """x (B, 3) -> lin -> (child.proj + frozen) -> (B, 3); ``frozen`` computes input gradients only."""

    def __init__(self):
        super().__init__()
        self.lin = Linear(3, 4)
        self.child = Child()
        self.frozen = Linear(4, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        h = self.lin(x)
        return self.child.proj(h) + self.frozen(h)

    def backward(self, dy):
        return self.lin.backward(self.child.proj.backward(dy) + self.frozen.backward(dy))


def make_net(dtype, seed=0):
    net = Net().to(dtype)
    rng = np.random.default_rng(seed)
    for _, p in net.named_parameters():
        p[...] = asarray(rng.standard_normal(p.shape), dtype=p.dtype)
    return net


def host(named):
    return {n: to_numpy(a).copy() for n, a in named}


def assert_same_bits(a: dict, b: dict, what):
    assert list(a) == list(b), what
    for name in a:
        x, y = to_numpy(a[name]), to_numpy(b[name])
        assert x.dtype == y.dtype and x.shape == y.shape, (what, name)
        assert x.tobytes() == y.tobytes(), (what, name)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few entries, so that the flat paths cut across parameters."""
    monkeypatch.setattr(adamw, "BLOCK_ENTRIES", 7)
    monkeypatch.setattr(ema_module, "BLOCK_ENTRIES", 5)


def test_flatten_makes_views_and_keeps_the_module_protocol(backend):
    net = make_net("float64")
    before = host(net.named_parameters())
    flat = flatten_parameters(net)
    assert [g.dtype for g in flat.groups] == [np.float64]
    group = flat.groups[0]
    assert group.size == net.num_parameters() == sum(v.size for v in before.values())
    assert_same_bits(host(net.named_parameters()), before, "values kept")
    group.params[...] = group.params * 2.0                    # the parameters are views of the buffer
    for name, p in net.named_parameters():
        assert np.array_equal(to_numpy(p), 2.0 * before[name]), name
    x = asarray(np.random.default_rng(1).standard_normal((5, 3)))
    for _ in range(2):                                        # two backwards accumulate
        net(x)
        net.backward(xp.ones((5, 3)))
    grads = host(net.named_grads())
    assert np.array_equal(to_numpy(group.grads), np.concatenate([g.ravel() for g in grads.values()]))
    assert not grads["frozen.weight"].any() and not grads["child.unused"].any()
    assert grads["lin.weight"].any() and grads["child.proj.weight"].any()
    ids = [id(g) for _, g in net.named_grads()]
    net.zero_grad()
    assert not to_numpy(group.grads).any()
    assert [id(g) for _, g in net.named_grads()] == ids, "zero_grad keeps the views"
    net.child.zero_grad()                                     # a part of the module: in place as well
    assert net.child.proj._grads["weight"] is flat.named_views()["child.proj.weight"][1]
    w = np.full((3, 4), 0.5)
    net.child.proj.weight = w                                 # setting a parameter writes into the view
    assert np.array_equal(to_numpy(flat.named_views()["child.proj.weight"][0]), w)
    assert flat_parameters.current(net) is flat


def test_a_shared_parameter_is_refused():
    net = make_net("float64")
    net.again = net.lin                                       # the same Linear under two names
    with pytest.raises(ValueError, match="'again.weight' appears twice"):
        flatten_parameters(net)


def train(net, dtype, steps, flat, max_norm):
    """``steps`` steps of AdamW (two learning rates) + EMA + clipping on ``net``; returns
    (optimizer, ema, norms)."""
    if flat:
        flatten_parameters(net)
    opt = AdamW(net, lr=1e-2, weight_decay=0.1, lr_ratios={"child.": 0.25})
    ema = EMA(net, decay=0.9, warmup="none")
    rng = np.random.default_rng(5)
    norms = []
    for _ in range(steps):
        net.zero_grad()
        net(asarray(rng.standard_normal((6, 3)), dtype=dtype))
        net.backward(asarray(rng.standard_normal((6, 3)) * 10.0 ** rng.uniform(-3, 1), dtype=dtype))
        norms.append(grad_norm(net))
        clip_grads_with_norm_(net, max_norm, norms[-1])
        opt.step()
        ema.update()
    return opt, ema, norms


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_flat_training_equals_per_parameter_bit_for_bit(backend, small_blocks, dtype, tmp_path):
    runs = {flat: train(make_net(dtype), dtype, 6, flat, max_norm=1.0) for flat in (False, True)}
    (opt, ema, norms), (flat_opt, flat_ema, flat_norms) = runs[False], runs[True]
    assert_same_bits(host(flat_opt.module.named_parameters()), host(opt.module.named_parameters()), "parameters")
    for slot in AdamW.slots:
        assert_same_bits(flat_opt.state[slot], opt.state[slot], slot)
    assert_same_bits(flat_ema.shadow, ema.shadow, "EMA")
    assert flat_norms == norms                                 # per-parameter views: the same sums, the same bits
    # State files: the same tensors, and each layout resumes from the other's file bit for bit.
    save_state(tmp_path / "flat.safetensors", flat_opt.state_dict())
    save_state(tmp_path / "per.safetensors", opt.state_dict())
    assert_same_bits(load_state(tmp_path / "flat.safetensors")["state"]["exp_avg"],
                     load_state(tmp_path / "per.safetensors")["state"]["exp_avg"], "saved moments")
    resumed = {}
    for flat, path in ((True, "per.safetensors"), (False, "flat.safetensors")):
        net = make_net(dtype, seed=3)
        if flat:
            flatten_parameters(net)
        o = AdamW(net, lr=1e-2, lr_ratios={"child.": 0.25})
        o.load_state_dict(load_state(tmp_path / path))
        for _, g in net.named_grads():
            g[...] = 0.5
        o.step()
        resumed[flat] = host(net.named_parameters())
    assert_same_bits(resumed[True], resumed[False], "resumed across layouts")


def test_to_dtype_and_changes_after_flattening_are_followed(backend):
    net = make_net("float32")
    ref = make_net("float32")
    flat = flatten_parameters(net)
    opt, ref_opt = AdamW(net, lr=1e-2), AdamW(ref, lr=1e-2)
    net.to("float64")                                         # the flattened module: flattened again
    ref.to("float64")
    for o in (opt, ref_opt):
        for _, g in o.module.named_grads():
            g[...] = 1.0
        o.step()
    again = flat_parameters.current(net)
    assert again is not flat and [g.dtype for g in again.groups] == [np.float64]
    views = again.named_views()
    assert all(p is views[n][0] for n, p in net.named_parameters())
    net.child.extra = Linear(2, 2)                            # a new layer after flattening
    ref.child.extra = Linear(2, 2)
    net.child.extra.to("float64")
    ref.child.extra.to("float64")
    net.child.extra.weight[...] = ref.child.extra.weight
    net.child.extra.bias[...] = ref.child.extra.bias
    for o in (opt, ref_opt):
        o.module.zero_grad()
        for _, g in o.module.named_grads():
            g[...] = 0.25
        o.step()
    newest = flat_parameters.current(net)
    assert newest is not again and "child.extra.weight" in newest.order
    assert_same_bits(host(net.named_parameters()), host(ref.named_parameters()), "after to() and a new layer")
    for slot in AdamW.slots:                                  # (the new layer's moments come last per parameter)
        assert_same_bits(dict(sorted(opt.state[slot].items())), dict(sorted(ref_opt.state[slot].items())), slot)


def test_master_weights_over_a_flat_module_equal_the_per_parameter_path(backend):
    nets = [make_net("float32", seed=2) for _ in range(2)]
    masters = [MasterWeights(net, "float16") for net in nets]
    flatten_parameters(nets[1])
    x = asarray(np.random.default_rng(0).standard_normal((4, 3)), dtype="float16")
    for net in nets:
        net(x)
        net.backward(xp.full((4, 3), 3.0, dtype=xp.float16))
    oks = [m.load_grads(0.5) for m in masters]
    assert oks == [True, True]
    assert_same_bits(host(masters[1].named_grads()), host(masters[0].named_grads()), "master gradients")
    for m in masters:
        for _, p in m.named_parameters():
            p += 1e-3
        m.copy_to_module()
    assert_same_bits(host(nets[1].named_parameters()), host(nets[0].named_parameters()), "module weights")
    for net in nets:
        net.child.proj._grads["bias"][1] = np.inf
    assert [m.load_grads(1.0) for m in masters] == [False, False]
    assert masters[1].nonfinite == masters[0].nonfinite == ["child.proj.bias"]
