"""Mixed precision: MasterWeights + DynamicLossScaler against torch.amp.GradScaler and a float32 run.

Covers: the loss-scale schedule equals torch.amp.GradScaler("cpu")'s step for step (backoff,
growth, float32 rounding, no growth past float32); unscaled float32 gradients equal torch's
unscale_ bitwise; float16 compute with float32 masters tracks the float32 run while float16
weights alone lose small updates; a non-finite gradient (injected, or a real float16 overflow)
skips the step with masters, module and optimizer state bitwise unchanged, backs the scale off
and counts the skip; a bounded run of skips raises a clear error; an interrupted and resumed run
is bitwise identical to a straight one; bad arguments raise errors naming the argument.
"""
import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.nn.activations import SiLU
from npdiffusion.nn.conv import Conv2d
from npdiffusion.nn.linear import Linear
from npdiffusion.nn.module import Module
from npdiffusion.optim.adamw import AdamW
from npdiffusion.optim.clip_grad import clip_grad_norm_
from npdiffusion.optim.mixed_precision import DynamicLossScaler, MasterWeights, NonFiniteGradientError
from npdiffusion.random import manual_seed


class TinyNet(Module):
    """x (B, 2, 6, 6) -> Conv2d 3x3 (8 ch) -> SiLU -> Linear over channels -> (B, 6, 6, 2)."""

    def __init__(self):
        super().__init__()
        self.conv = Conv2d(2, 8, 3, padding=1)
        self.act = SiLU()
        self.proj = Linear(8, 2)

    def forward(self, x):
        return self.proj(self.act(self.conv(x)).transpose(0, 2, 3, 1))

    def backward(self, dy):
        return self.conv.backward(self.act.backward(self.proj.backward(dy).transpose(0, 3, 1, 2)))


def make_data(steps, batch=4, seed=0):
    """Inputs and targets of a fixed random teacher (host float32 arrays)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((2, 2)).astype(np.float32)
    xs = rng.standard_normal((steps, batch, 2, 6, 6)).astype(np.float32)
    ys = np.tanh(np.einsum("sbchw,cd->sbhwd", xs, w)).astype(np.float32)
    return xs, ys


def mse(out, target):
    """(loss, dL/dout) of mean((out - target)^2), in float32 whatever out's dtype."""
    diff = out.astype(np.float32) - asarray(target)
    return float(to_numpy((diff * diff).mean())), diff * (2.0 / diff.size)


def host(named):
    return {k: to_numpy(v).copy() for k, v in named}


def train_float32(xs, ys, lr):
    manual_seed(7)
    net = TinyNet()
    opt = AdamW(net, lr=lr, weight_decay=0.0)
    losses = []
    for x, y in zip(xs, ys):
        net.zero_grad()
        loss, dout = mse(net(asarray(x)), y)
        net.backward(dout)
        opt.step()
        losses.append(loss)
    return host(net.named_parameters()), losses


def mixed_setup(lr, **scaler_kw):
    manual_seed(7)
    net = TinyNet()
    master = MasterWeights(net, "float16")
    return net, master, AdamW(master, lr=lr, weight_decay=0.0), DynamicLossScaler(**scaler_kw)


def mixed_step(net, master, opt, scaler, x, y, inject=None):
    """One mixed-precision step; ``inject``: a value added to conv.weight's gradient after backward."""
    master.zero_grad()
    loss, dout = mse(net(asarray(x).astype(np.float16)), y)
    net.backward(scaler.scale(dout, dtype=np.float16))
    if inject is not None:
        net.conv.accumulate_grad("weight", asarray(np.full(net.conv.weight.shape, inject, dtype=np.float16)))
    applied = scaler.step(opt)
    scaler.update()
    return loss, applied


# ----------------------------------------------------------------------------- against torch
def torch_scaler_run(pattern, **kw):
    """Scales (and growth trackers) of torch.amp.GradScaler("cpu") after each step of ``pattern``
    (True = that step's gradient is inf)."""
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", **kw)
    out = []
    for bad in pattern:
        scaler.scale(torch.ones(()))                 # initializes the scale lazily, as in training
        p.grad = torch.full((3,), float("inf") if bad else 1.0)
        scaler.step(opt)
        scaler.update()
        out.append((scaler.get_scale(), int(scaler._get_growth_tracker())))
    return out


@given(pattern=st.lists(st.booleans(), min_size=1, max_size=40),
       init=st.sampled_from([2.0 ** 16, 3.7, 2.0 ** 127, 1e-3]),
       growth=st.sampled_from([2.0, 1.5, 1.1]), backoff=st.sampled_from([0.5, 0.3, 0.9]),
       interval=st.integers(1, 4))
def test_scale_schedule_equals_torch_gradscaler(backend, pattern, init, growth, backoff, interval):
    kw = dict(init_scale=init, growth_factor=growth, backoff_factor=backoff, growth_interval=interval)
    expected = torch_scaler_run(pattern, **kw)
    net = Linear(3, 1)
    master = MasterWeights(net, "float32")
    opt = AdamW(master, lr=0.1)
    scaler = DynamicLossScaler(**kw, max_consecutive_skips=100)
    for bad, (scale, tracker) in zip(pattern, expected):
        master.zero_grad()
        net.accumulate_grad("weight", asarray(np.full((1, 3), np.inf if bad else 1.0, dtype=np.float32)))
        assert scaler.step(opt) is (not bad)
        scaler.update()
        assert scaler.get_scale() == scale          # exactly: the same float32 value
        assert scaler.growth_tracker == tracker
    assert scaler.skipped_steps == sum(pattern)


def test_unscale_equals_torch_unscale_bitwise(backend):
    rng = np.random.default_rng(3)
    scale = 2.0 ** 13 * 3.0                          # not a power of two: 1/S is rounded
    g16 = (rng.standard_normal((5, 7)) * 10.0 ** rng.uniform(-3, 2, (5, 7))).astype(np.float16)
    p = torch.nn.Parameter(torch.zeros(5, 7))
    topt = torch.optim.SGD([p], lr=0.1)
    tscaler = torch.amp.GradScaler("cpu", init_scale=scale)
    tscaler.scale(torch.ones(()))
    p.grad = torch.from_numpy(g16.astype(np.float32))
    tscaler.unscale_(topt)

    net = Linear(7, 5, bias=False)
    master = MasterWeights(net, "float16")
    scaler = DynamicLossScaler(init_scale=scale)
    master.zero_grad()
    net.accumulate_grad("weight", asarray(g16))
    assert scaler.unscale_(AdamW(master)) is True
    ours = to_numpy(dict(master.named_grads())["weight"])
    assert ours.dtype == np.float32
    assert ours.tobytes() == p.grad.numpy().tobytes()


# ----------------------------------------------------------------------------- training
def train_pure_float16(xs, ys, lr):
    """The same run with float16 weights and float16 AdamW state (no masters, no scaling)."""
    manual_seed(7)
    net = TinyNet().to("float16")
    opt = AdamW(net, lr=lr, weight_decay=0.0, eps=1e-4)   # 1e-8 would round to 0 in float16
    for x, y in zip(xs, ys):
        net.zero_grad()
        net.backward(mse(net(asarray(x).astype(np.float16)), y)[1].astype(np.float16))
        opt.step()
    return host(net.named_parameters())


def relative_errors(params, ref):
    return {n: float(np.max(np.abs(p.astype(np.float32) - ref[n])) / np.max(np.abs(ref[n])))
            for n, p in params.items()}


def test_float16_with_masters_tracks_float32_run(backend):
    xs, ys = make_data(40)
    ref, ref_losses = train_float32(xs, ys, lr=1e-2)
    net, master, opt, scaler = mixed_setup(1e-2)
    losses = [mixed_step(net, master, opt, scaler, x, y)[0] for x, y in zip(xs, ys)]
    assert scaler.skipped_steps == 0
    assert losses[-1] < 0.2 * losses[0] and ref_losses[-1] < 0.2 * ref_losses[0]   # both learn
    # Measured on NumPy: masters within 1.5e-4 of the float32 run after 40 AdamW steps, final
    # losses within 4e-4; float16 weights without masters end up 0.2 to 4.8 away.
    masters = host(master.named_parameters())
    assert all(p.dtype == np.float32 for p in masters.values())
    errors = relative_errors(masters, ref)
    assert max(errors.values()) < 2e-3, errors
    assert abs(losses[-1] - ref_losses[-1]) < 0.01 * ref_losses[-1]
    pure = relative_errors(train_pure_float16(xs, ys, lr=1e-2), ref)
    assert min(pure.values()) > 50 * max(errors.values()), (pure, errors)
    for name, p in net.named_parameters():         # the module holds the masters, rounded
        assert p.dtype == np.float16
        assert np.array_equal(to_numpy(p), masters[name].astype(np.float16))


def test_loss_scaling_is_exact_in_float32(backend):
    """Every backward is linear in its upstream gradient, and a power-of-two scale commutes with
    rounding (barring overflow and underflow): float32 compute with S = 2^16 reproduces the plain
    float32 run bit for bit. So does MasterWeights without a scaler (gradients loaded unscaled)."""
    xs, ys = make_data(6)
    ref, _ = train_float32(xs, ys, lr=1e-2)
    for use_scaler in (True, False):
        manual_seed(7)
        net = TinyNet()
        master = MasterWeights(net, "float32")
        opt = AdamW(master, lr=1e-2, weight_decay=0.0)
        scaler = DynamicLossScaler(init_scale=2.0 ** 16)
        for x, y in zip(xs, ys):
            master.zero_grad()
            dout = mse(net(asarray(x)), y)[1]
            if use_scaler:
                net.backward(scaler.scale(dout))
                assert scaler.step(opt)
                scaler.update()
            else:
                net.backward(dout)
                opt.step()
                master.copy_to_module()
        for name, p in host(master.named_parameters()).items():
            assert p.tobytes() == ref[name].tobytes(), (use_scaler, name)


def test_float16_weights_alone_lose_small_updates(backend):
    """AdamW moves a weight by at most lr = 1e-4 per step here: less than half a float16 ulp
    (2^-12 / 2) for |w| >= 0.25, so such a float16 weight never changes, while its master does."""
    xs, ys = make_data(10)
    manual_seed(7)
    start = host(TinyNet().named_parameters())["proj.weight"]
    big = np.abs(start) >= 0.25                      # Linear(8, 2) init: U(-0.354, 0.354)
    assert big.sum() >= 3
    net16 = train_pure_float16(xs, ys, lr=1e-4)["proj.weight"]
    assert np.array_equal(net16[big], start.astype(np.float16)[big])      # frozen
    net, master, opt, scaler = mixed_setup(1e-4, init_scale=2.0 ** 10)
    for x, y in zip(xs, ys):
        mixed_step(net, master, opt, scaler, x, y)
    moved = to_numpy(dict(master.named_parameters())["proj.weight"])
    assert (moved[big] != start[big]).all()          # every float32 master moved
    assert np.abs(moved - start).max() > 4e-4        # by several float16 half-ulps in all


# ----------------------------------------------------------------------------- skipped steps
def snapshot(master, net, opt):
    state = opt.state_dict()
    return (host(master.named_parameters()), host(net.named_parameters()), opt.step_count,
            {slot: {k: to_numpy(v).copy() for k, v in arrays.items()} for slot, arrays in state["state"].items()})


def assert_bitwise_equal(a, b):
    masters_a, module_a, step_a, state_a = a
    masters_b, module_b, step_b, state_b = b
    assert step_a == step_b
    for d1, d2 in ((masters_a, masters_b), (module_a, module_b)):
        assert d1.keys() == d2.keys()
        for k in d1:
            assert d1[k].tobytes() == d2[k].tobytes(), k
    for slot in state_a:
        for k in state_a[slot]:
            assert state_a[slot][k].tobytes() == state_b[slot][k].tobytes(), (slot, k)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_injected_nonfinite_gradient_skips_step_bitwise(backend, bad):
    xs, ys = make_data(4)
    net, master, opt, scaler = mixed_setup(1e-2)
    for x, y in zip(xs[:2], ys[:2]):
        assert mixed_step(net, master, opt, scaler, x, y)[1]
    before = snapshot(master, net, opt)
    scale = scaler.get_scale()
    _, applied = mixed_step(net, master, opt, scaler, xs[2], ys[2], inject=bad)
    assert applied is False
    assert_bitwise_equal(snapshot(master, net, opt), before)
    assert master.nonfinite == ["conv.weight"]
    assert scaler.get_scale() == scale * 0.5
    assert (scaler.skipped_steps, scaler.consecutive_skips, scaler.growth_tracker) == (1, 1, 0)
    assert mixed_step(net, master, opt, scaler, xs[3], ys[3])[1]       # training goes on
    assert (scaler.skipped_steps, scaler.consecutive_skips, opt.step_count) == (1, 0, 3)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("bad", [None, np.inf])
def test_unchecked_unscale_with_reported_finiteness_equals_the_checked_step(backend, bad):
    """unscale_(check=False) + record_finite (the training loop's one-read path) applies or skips a
    step exactly as the checked unscale_ does, and names the culprit on a skip."""
    xs, ys = make_data(3)
    runs = []
    for checked in (True, False):
        manual_seed(0)
        net, master, opt, scaler = mixed_setup(1e-2)
        names = []
        for i, (x, y) in enumerate(zip(xs, ys)):
            master.zero_grad()
            _, dout = mse(net(asarray(x).astype(np.float16)), y)
            net.backward(scaler.scale(dout, dtype=np.float16))
            if bad is not None and i == 1:
                net.conv.accumulate_grad("weight", asarray(np.full(net.conv.weight.shape, bad, dtype=np.float16)))
            if checked:
                scaler.unscale_(opt)
            else:
                assert scaler.unscale_(opt, check=False) is None
                with pytest.raises(RuntimeError, match="record_finite"):
                    scaler.step(opt)
                finite = all(bool(np.isfinite(to_numpy(g)).all()) for _, g in master.named_grads())
                scaler.record_finite(finite, opt)
            scaler.step(opt)
            names.append(list(scaler._nonfinite))
            scaler.update()
        runs.append((snapshot(master, net, opt), scaler.get_scale(), scaler.skipped_steps, names))
    assert_bitwise_equal(runs[0][0], runs[1][0])
    assert runs[0][1:] == runs[1][1:]
    assert runs[1][3] == ([[], ["conv.weight"], []] if bad is not None else [[], [], []])
    with pytest.raises(RuntimeError, match="unscale_.*check=False"):
        DynamicLossScaler().record_finite(True, opt)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")          # NumPy's overflow warnings, on purpose
def test_float16_overflow_backs_off_until_finite(backend):
    """With S = 2^30, S * dL/dout overflows float16 (max 65504): the scaler halves S, skipping
    steps without touching the weights, until the scaled gradients fit; then training proceeds."""
    xs, ys = make_data(30)
    net, master, opt, scaler = mixed_setup(1e-2, init_scale=2.0 ** 30)
    start = host(master.named_parameters())
    applied = [mixed_step(net, master, opt, scaler, x, y)[1] for x, y in zip(xs, ys)]
    k = applied.index(True)
    assert k >= 5 and not any(applied[:k]) and all(applied[k:])
    assert scaler.skipped_steps == k
    assert scaler.get_scale() == 2.0 ** (30 - k)
    assert opt.step_count == len(xs) - k
    assert all(not np.array_equal(v, to_numpy(dict(master.named_parameters())[n])) for n, v in start.items())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_bounded_run_of_skips_raises(backend):
    xs, ys = make_data(8)
    net, master, opt, scaler = mixed_setup(1e-2, max_consecutive_skips=3)
    mixed_step(net, master, opt, scaler, xs[0], ys[0], inject=np.nan)
    mixed_step(net, master, opt, scaler, xs[1], ys[1], inject=np.nan)
    mixed_step(net, master, opt, scaler, xs[2], ys[2])                 # a good step resets the run
    assert scaler.consecutive_skips == 0
    mixed_step(net, master, opt, scaler, xs[3], ys[3], inject=np.nan)
    mixed_step(net, master, opt, scaler, xs[4], ys[4], inject=np.nan)
    with pytest.raises(NonFiniteGradientError, match=r"3 steps in a row had non-finite gradients \(last in "
                                                     r"'conv.weight'\); the loss scale went from 16384 down to 2048"):
        mixed_step(net, master, opt, scaler, xs[5], ys[5], inject=np.nan)
    assert scaler.skipped_steps == 5 and opt.step_count == 1


# ----------------------------------------------------------------------------- resume, helpers
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_resume_is_bitwise_identical(backend):
    xs, ys = make_data(8)
    kw = dict(init_scale=2.0 ** 8, growth_interval=2)
    net, master, opt, scaler = mixed_setup(1e-2, **kw)
    for i, (x, y) in enumerate(zip(xs, ys)):
        mixed_step(net, master, opt, scaler, x, y, inject=np.inf if i == 5 else None)
    straight = host(master.named_parameters())

    net, master, opt, scaler = mixed_setup(1e-2, **kw)
    for x, y in zip(xs[:4], ys[:4]):
        mixed_step(net, master, opt, scaler, x, y)
    saved = (host(master.named_parameters()), json.dumps(scaler.state_dict()),
             {**opt.state_dict(), "state": {s: {k: to_numpy(v).copy() for k, v in a.items()}
                                            for s, a in opt.state_dict()["state"].items()}})
    net, master, opt, scaler = mixed_setup(0.5, init_scale=1.0)          # different on purpose
    master.load_state_dict(saved[0])
    scaler.load_state_dict(json.loads(saved[1]))
    opt.load_state_dict(saved[2])
    assert scaler.get_scale() == 2.0 ** 10                 # 4 good steps, growth every 2
    for i, (x, y) in enumerate(zip(xs[4:], ys[4:]), start=4):
        mixed_step(net, master, opt, scaler, x, y, inject=np.inf if i == 5 else None)
    for name, v in host(master.named_parameters()).items():
        assert v.tobytes() == straight[name].tobytes(), name


def test_masters_copy_then_round_and_work_with_clipping(backend):
    manual_seed(2)
    net = TinyNet()
    original = host(net.named_parameters())
    master = MasterWeights(net, "float16")
    assert net.dtype == np.float16 and master.dtype == np.float32
    for name, p in master.named_parameters():
        assert to_numpy(p).tobytes() == original[name].tobytes()
        assert np.array_equal(to_numpy(dict(net.named_parameters())[name]), original[name].astype(np.float16))
    master.zero_grad()
    assert all(float(np.abs(to_numpy(g)).max()) == 0.0 for _, g in master.named_grads())
    net.proj.accumulate_grad("weight", asarray(np.full((2, 8), 3.0, dtype=np.float16)))
    DynamicLossScaler(init_scale=2.0).unscale_(AdamW(master))
    total = clip_grad_norm_(master, 1.0)
    assert total == pytest.approx(1.5 * 4.0)       # 16 entries of 3 / 2: norm 1.5 * sqrt(16)
    g = to_numpy(dict(master.named_grads())["proj.weight"])
    assert np.linalg.norm(g) == pytest.approx(1.0, rel=1e-5)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="growth_factor must be > 1, got 1.0"):
        DynamicLossScaler(growth_factor=1.0)
    with pytest.raises(ValueError, match=r"backoff_factor must be in \(0.0, 1.0\), got 1.5"):
        DynamicLossScaler(backoff_factor=1.5)
    with pytest.raises(ValueError, match="growth_interval must be a positive int, got 0"):
        DynamicLossScaler(growth_interval=0)
    with pytest.raises(ValueError, match="max_consecutive_skips must be a positive int, got 2.5"):
        DynamicLossScaler(max_consecutive_skips=2.5)
    with pytest.raises(ValueError, match="init_scale must be in"):
        DynamicLossScaler(init_scale=-1.0)
    with pytest.raises(ValueError, match="compute_dtype 'bfloat16' is not available: NumPy has no bfloat16"):
        MasterWeights(Linear(2, 2), "bfloat16")
    with pytest.raises(ValueError, match=r"compute_dtype must be one of \('float16', 'float32'\), got 'int8'"):
        MasterWeights(Linear(2, 2), "int8")
    with pytest.raises(TypeError, match="module must be an npdiffusion Module"):
        MasterWeights(object())
    scaler = DynamicLossScaler()
    with pytest.raises(TypeError, match="grad must be a floating array, got int64"):
        scaler.scale(np.arange(3))
    with pytest.raises(RuntimeError, match=r"no gradients were checked this step; call unscale_\(optimizer\)"):
        scaler.update()
    opt = AdamW(MasterWeights(Linear(2, 2)))
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="already called for this step"):
        scaler.unscale_(opt)
    with pytest.raises(KeyError, match=r"missing \['bias'\]"):
        opt.module.load_state_dict({"weight": np.zeros((2, 2), np.float32)})
