"""Optimizers, EMA, gradient clipping and LR schedules against torch / diffusers, and exact resume."""
import math

import numpy as np
import pytest
import torch

from npdiffusion.backend import asarray, to_numpy
from npdiffusion.io.safetensors import load_file, read_header, save_file
from npdiffusion.nn.linear import Linear
from npdiffusion.nn.module import Module
from npdiffusion.optim.adamw import AdamW
from npdiffusion.optim.clip_grad import clip_grad_norm_, grad_norm
from npdiffusion.optim.ema import EMA
from npdiffusion.optim.lr_schedule import (LRScheduler, constant_with_warmup, cosine_with_warmup, get_scheduler,
                                           linear_with_warmup)
from npdiffusion.optim.optimizer import load_state, save_state
from npdiffusion.optim.sgd import SGD
from npdiffusion.testing import relative_error

diffusers_opt = pytest.importorskip("diffusers.optimization")
diffusers_training = pytest.importorskip("diffusers.training_utils")


class Toy(Module):
    """Parameters of several ranks (2-D, 1-D, 3-D) in a parent and a child module."""

    def __init__(self):
        super().__init__()
        self.lin = Linear(3, 4)
        self.register_parameter("scale", np.zeros((2, 3, 2)))


def make_toy(dtype="float64", seed=0):
    m = Toy().to(dtype)
    rng = np.random.default_rng(seed)
    for _, p in m.named_parameters():
        p[...] = asarray(rng.standard_normal(p.shape), dtype=p.dtype)
    return m


def torch_twins(module):
    return [torch.tensor(to_numpy(p).copy(), requires_grad=True) for _, p in module.named_parameters()]


def grad_sequence(module, steps, seed=1, scale_range=(-3, 1)):
    """Per step: name -> gradient, magnitudes spread over several decades (tiny v exercises eps)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        out.append({name: rng.standard_normal(p.shape) * 10.0 ** rng.uniform(*scale_range)
                    for name, p in module.named_parameters()})
    return out


def set_grads(module, grads, twins=None):
    module.zero_grad()
    for name, g in module.named_grads():
        g[...] = asarray(grads[name], dtype=g.dtype)
    if twins is not None:
        dtype = next(iter(twins)).dtype
        for t, (name, _) in zip(twins, module.named_parameters()):
            t.grad = torch.tensor(grads[name], dtype=dtype)


def assert_close(ours, theirs, rtol, what):
    err = relative_error(to_numpy(ours), theirs.detach().numpy() if torch.is_tensor(theirs) else theirs,
                         floor=1e-30)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:g}"
    return err


# ============================================================================ AdamW
@pytest.mark.parametrize("hp", [
    dict(),
    dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
    dict(lr=3e-3, weight_decay=0.0),
    dict(lr=1e-2, betas=(0.3, 0.9)),   # beta1 < 0.5: torch's other lerp branch
    dict(lr=1e-2, betas=(0.0, 0.5)),
], ids=["defaults", "custom", "no-decay", "small-beta1", "beta1-zero"])
@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-14), ("float32", 1e-6)])
def test_adamw_matches_torch_over_20_steps(backend, hp, dtype, rtol):
    ours = make_toy(dtype)
    twins = torch_twins(ours)
    ids = [id(p) for _, p in ours.named_parameters()]
    opt = AdamW(ours, **hp)
    topt = torch.optim.AdamW(twins, **hp)
    for step, grads in enumerate(grad_sequence(ours, 20)):
        set_grads(ours, grads, twins)
        opt.step()
        topt.step()
        for t, (name, p) in zip(twins, ours.named_parameters()):
            assert_close(p, t, rtol, f"step {step + 1} param {name}")
            st = topt.state[t]
            assert_close(opt.state["exp_avg"][name], st["exp_avg"], rtol, f"step {step + 1} exp_avg {name}")
            assert_close(opt.state["exp_avg_sq"][name], st["exp_avg_sq"], rtol, f"step {step + 1} exp_avg_sq {name}")
    assert [id(p) for _, p in ours.named_parameters()] == ids, "parameters must be updated in place"
    assert all(p.dtype == np.dtype(dtype) for _, p in ours.named_parameters())
    assert all(a.dtype == np.dtype(dtype) for slot in opt.state.values() for a in slot.values())
    assert opt.step_count == 20 == int(topt.state[twins[0]]["step"])


def steps_match_torch(ours, twins, steppers, seed, before=lambda step: None):
    """20 steps of random gradients: each of ``steppers`` (optimizers, then schedules) steps, and every
    parameter of ``ours`` stays within 1e-14 (relative) of its torch twin."""
    for step, grads in enumerate(grad_sequence(ours, 20, seed=seed)):
        before(step)
        set_grads(ours, grads, twins)
        for s in steppers:
            s.step()
        for t, (pname, p) in zip(twins, ours.named_parameters()):
            assert_close(p, t, 1e-14, f"step {step + 1} param {pname}")


@pytest.mark.parametrize("name,kwargs", [("cosine", dict(num_warmup_steps=4, num_training_steps=20)),
                                         ("constant_with_warmup", dict(num_warmup_steps=5)),
                                         ("linear", dict(num_warmup_steps=3, num_training_steps=15))])
def test_adamw_with_lr_schedule_matches_torch_and_diffusers(backend, name, kwargs):
    ours = make_toy("float64", seed=4)
    twins = torch_twins(ours)
    opt = AdamW(ours, lr=2e-2, weight_decay=0.05)
    sched = get_scheduler(name, opt, **kwargs)
    topt = torch.optim.AdamW(twins, lr=2e-2, weight_decay=0.05)
    tsched = diffusers_opt.get_scheduler(name, topt, **kwargs)

    def same_lr(step):
        assert opt.lr == topt.param_groups[0]["lr"], f"lr before step {step}"

    steps_match_torch(ours, twins, (opt, topt, sched, tsched), seed=5, before=same_lr)
    assert opt.lr == topt.param_groups[0]["lr"] and sched.get_last_lr() == tsched.get_last_lr()[0]


def test_adamw_lr_ratios_are_torch_parameter_groups(backend):
    """lr_ratios {"lin.": 0.1}: the Linear's parameters at a tenth of the learning rate, under a cosine
    schedule, equal torch's AdamW with two parameter groups (group lr 0.1 lr and lr) and diffusers' schedule."""
    ours = make_toy("float64", seed=6)
    twins = torch_twins(ours)
    names = [n for n, _ in ours.named_parameters()]
    opt = AdamW(ours, lr=2e-2, weight_decay=0.05, lr_ratios={"lin.": 0.1})
    sched = get_scheduler("cosine", opt, num_warmup_steps=3, num_training_steps=20)
    slow = [t for t, n in zip(twins, names) if n.startswith("lin.")]
    fast = [t for t, n in zip(twins, names) if not n.startswith("lin.")]
    assert slow and fast
    topt = torch.optim.AdamW([{"params": slow, "lr": 2e-2 * 0.1}, {"params": fast}], lr=2e-2, weight_decay=0.05)
    tsched = diffusers_opt.get_scheduler("cosine", topt, num_warmup_steps=3, num_training_steps=20)
    # the groups' lr is (lr * 0.1) * f here, (lr * f) * 0.1 in torch: one rounding apart
    steps_match_torch(ours, twins, (opt, topt, sched, tsched), seed=7)
    start = {n: to_numpy(p) for n, p in make_toy("float64", seed=6).named_parameters()}
    moved = {n: float(np.abs(to_numpy(p) - start[n]).max()) for n, p in ours.named_parameters()}
    assert moved["lin.weight"] < 0.3 * moved["scale"]                 # the slow group moved less
    with pytest.raises(ValueError, match="lr_ratios"):
        AdamW(ours, lr_ratios={"lin.": -1.0})


def test_schedule_factors_equal_diffusers_exactly():
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    for warmup, total in [(0, 10), (1, 10), (7, 30), (10, 10)]:
        for name, fn in [("constant_with_warmup", lambda s: constant_with_warmup(s, warmup)),
                         ("cosine", lambda s: cosine_with_warmup(s, warmup, total)),
                         ("linear", lambda s: linear_with_warmup(s, warmup, total))]:
            dummy.param_groups[0]["lr"] = 1.0
            dummy.param_groups[0].pop("initial_lr", None)
            tsched = diffusers_opt.get_scheduler(name, dummy, num_warmup_steps=warmup, num_training_steps=total)
            for s in range(total + 5):
                assert fn(s) == dummy.param_groups[0]["lr"], (name, warmup, total, s)
                dummy.step()  # no gradients: changes nothing, keeps torch's call-order check quiet
                tsched.step()


def test_cosine_min_ratio_floor_and_scheduler_state():
    f = [cosine_with_warmup(s, 5, 25, min_ratio=0.1) for s in range(31)]
    assert f[0] == 0.0 and f[5] == 1.0 and abs(f[25] - 0.1) < 1e-15 and min(f[5:]) >= 0.1 - 1e-15
    assert all(a >= b for a, b in zip(f[5:25], f[6:26]))
    assert abs(f[15] - (0.1 + 0.9 * 0.5)) < 1e-15
    m = make_toy()
    opt = SGD(m, lr=0.5)
    sched = LRScheduler(opt, lambda s: constant_with_warmup(s, 4))
    assert opt.lr == 0.0
    for _ in range(3):
        sched.step()
    state = sched.state_dict()
    opt2 = SGD(make_toy(), lr=0.5)
    sched2 = LRScheduler(opt2, lambda s: constant_with_warmup(s, 4))
    sched2.load_state_dict(state)
    assert opt2.lr == opt.lr == 0.5 * 3 / 4 and sched2.step_count == 3
    with pytest.raises(ValueError, match="name must be one of"):
        get_scheduler("polynomial", opt)
    with pytest.raises(ValueError, match="needs num_training_steps"):
        get_scheduler("cosine", opt, num_warmup_steps=2)
    with pytest.raises(TypeError, match="fn must be a function"):
        LRScheduler(opt, 3)


# ============================================================================ SGD
@pytest.mark.parametrize("hp", [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, weight_decay=0.01),
    dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.001),
    dict(lr=0.05, momentum=0.5, dampening=0.3),
], ids=["plain", "momentum", "momentum-wd", "nesterov", "dampening"])
def test_sgd_matches_torch(backend, hp):
    ours = make_toy("float64", seed=2)
    twins = torch_twins(ours)
    opt = SGD(ours, **hp)
    topt = torch.optim.SGD(twins, **hp)
    ids = [id(p) for _, p in ours.named_parameters()]
    for step, grads in enumerate(grad_sequence(ours, 12, seed=3)):
        set_grads(ours, grads, twins)
        opt.step()
        topt.step()
        for t, (name, p) in zip(twins, ours.named_parameters()):
            assert_close(p, t, 1e-14, f"step {step + 1} param {name}")
            if hp.get("momentum"):
                assert_close(opt.state["momentum_buffer"][name], topt.state[t]["momentum_buffer"], 1e-14, "buffer")
    assert [id(p) for _, p in ours.named_parameters()] == ids


def test_zero_grad_passes_through():
    m = make_toy()
    set_grads(m, grad_sequence(m, 1)[0])
    AdamW(m).zero_grad()
    assert all(g is None for mod in m.modules() for g in mod._grads.values())


# ============================================================================ EMA
@pytest.mark.parametrize("ours_kw,theirs_kw", [
    (dict(decay=0.9), dict(decay=0.9)),
    (dict(decay=0.999, min_decay=0.3, update_after_step=2), dict(decay=0.999, min_decay=0.3, update_after_step=2)),
    (dict(decay=0.99, warmup="power", power=0.75, inv_gamma=2.0),
     dict(decay=0.99, use_ema_warmup=True, power=0.75, inv_gamma=2.0)),
    (dict(decay=0.7, warmup="none", update_after_step=1), dict(decay=0.7, min_decay=0.7)),
], ids=["diffusers-default", "after-step-min", "power", "constant"])
def test_ema_matches_diffusers_ema_model(backend, ours_kw, theirs_kw):
    m = make_toy("float64", seed=6)
    twins = torch_twins(m)
    ema = EMA(m, **ours_kw)
    tema = diffusers_training.EMAModel(twins, **theirs_kw)
    rng = np.random.default_rng(8)
    for step in range(15):
        for t, (_, p) in zip(twins, m.named_parameters()):  # a "training step": new weights
            new = to_numpy(p) + rng.standard_normal(p.shape) * 0.1
            p[...] = asarray(new)
            with torch.no_grad():
                t.copy_(torch.tensor(new))
        decay = ema.update()
        tema.step(twins)
        assert decay == tema.cur_decay_value, f"decay at update {step + 1}"
        for s, (name, _) in zip(tema.shadow_params, m.named_parameters()):
            assert np.array_equal(to_numpy(ema.shadow[name]), s.numpy()), f"update {step + 1}: {name}"


def test_ema_copy_to_store_restore_in_place():
    m = make_toy(seed=1)
    ema = EMA(m, decay=0.5, warmup="none")
    before = {n: to_numpy(p).copy() for n, p in m.named_parameters()}
    ids = [id(p) for _, p in m.named_parameters()]
    for _, p in m.named_parameters():
        p += 1.0
    ema.update()  # shadow = 0.5 * old + 0.5 * (old + 1) = old + 0.5
    ema.store()
    ema.copy_to()
    for n, p in m.named_parameters():
        assert np.allclose(to_numpy(p), before[n] + 0.5, rtol=0, atol=1e-15)
    ema.restore()
    for n, p in m.named_parameters():
        assert np.allclose(to_numpy(p), before[n] + 1.0, rtol=0, atol=1e-15)
    assert [id(p) for _, p in m.named_parameters()] == ids
    other = make_toy(seed=9)
    ema.copy_to(other)
    assert np.allclose(to_numpy(other.scale), before["scale"] + 0.5)
    with pytest.raises(RuntimeError, match="call store"):
        ema.restore()
    with pytest.raises(KeyError, match="has no moving average"):
        ema.copy_to(Linear(2, 2))
    with pytest.raises(ValueError, match="warmup must be one of"):
        EMA(m, warmup="linear")
    with pytest.raises(ValueError, match=r"decay must be in \[0.0, 1.0\]"):
        EMA(m, decay=1.5)


# ============================================================================ clipping
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-14), ("float32", 1e-6)])
def test_clip_grad_norm_matches_torch(backend, norm_type, max_norm, dtype, rtol):
    m = make_toy(dtype)
    twins = torch_twins(m)
    grads = grad_sequence(m, 1, seed=11, scale_range=(0, 0))[0]
    set_grads(m, grads, twins)
    before = {n: to_numpy(g).copy() for n, g in m.named_grads()}
    total = clip_grad_norm_(m, max_norm, norm_type=norm_type)
    ttotal = torch.nn.utils.clip_grad_norm_(twins, max_norm, norm_type=norm_type)
    assert isinstance(total, float)
    assert abs(total - float(ttotal)) <= rtol * float(ttotal)
    for t, (name, g) in zip(twins, m.named_grads()):
        assert_close(g, t.grad, rtol, f"clipped grad {name}")
        if max_norm > total:
            assert np.array_equal(to_numpy(g), before[name]), "no clipping below max_norm"
    assert grad_norm(m, norm_type) <= max(max_norm, total) * (1 + 1e-6)


def test_clip_grad_norm_nonfinite(backend):
    m = make_toy()
    grads = grad_sequence(m, 1)[0]
    grads["scale"][0, 0, 0] = np.inf
    set_grads(m, grads)
    before = {n: to_numpy(g).copy() for n, g in m.named_grads()}
    assert clip_grad_norm_(m, 1.0) == math.inf
    assert all(np.array_equal(to_numpy(g), before[n]) for n, g in m.named_grads())
    with pytest.raises(RuntimeError, match="total norm of order 2.0 of the gradients is inf"):
        clip_grad_norm_(m, 1.0, error_if_nonfinite=True)
    with pytest.raises(ValueError, match="max_norm must be in"):
        clip_grad_norm_(m, -1.0)


# ============================================================================ exact resume
def _train(module, opt, ema, sched, grads):
    for g in grads:
        set_grads(module, g)
        clip_grad_norm_(module, 1.0)
        opt.step()
        sched.step()
        ema.update()


@pytest.mark.parametrize("make_opt", [lambda m: AdamW(m, lr=1e-2, weight_decay=0.1),
                                      lambda m: SGD(m, lr=0.1, momentum=0.9, nesterov=True)], ids=["adamw", "sgd"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_resume_from_safetensors_files_is_bit_identical(backend, tmp_path, make_opt, dtype):
    K, k = 8, 3
    grads = grad_sequence(make_toy(dtype), K, seed=21)
    schedule = lambda s: cosine_with_warmup(s, 2, K)  # noqa: E731

    straight = make_toy(dtype)
    opt, ema = make_opt(straight), EMA(straight, decay=0.9)
    sched = LRScheduler(opt, schedule)
    _train(straight, opt, ema, sched, grads)

    first = make_toy(dtype)
    opt1, ema1 = make_opt(first), EMA(first, decay=0.9)
    sched1 = LRScheduler(opt1, schedule)
    _train(first, opt1, ema1, sched1, grads[:k])
    save_file(first.state_dict(), tmp_path / "model.safetensors")
    save_state(tmp_path / "optimizer.safetensors", opt1.state_dict())
    save_state(tmp_path / "ema.safetensors", ema1.state_dict())
    save_state(tmp_path / "scheduler.safetensors", sched1.state_dict())

    resumed = make_toy(dtype, seed=99)  # different initial weights: everything must come from the files
    resumed.load_state_dict(load_file(tmp_path / "model.safetensors"))
    opt2, ema2 = make_opt(resumed), EMA(resumed, decay=0.5)
    opt2.lr = 123.0
    sched2 = LRScheduler(opt2, schedule)
    opt2.load_state_dict(load_state(tmp_path / "optimizer.safetensors"))
    ema2.load_state_dict(load_state(tmp_path / "ema.safetensors"))
    sched2.load_state_dict(load_state(tmp_path / "scheduler.safetensors"))
    _train(resumed, opt2, ema2, sched2, grads[k:])

    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert to_numpy(a).tobytes() == to_numpy(b).tobytes(), name
    for slot in opt.state:
        for name, a in opt.state[slot].items():
            assert to_numpy(a).tobytes() == to_numpy(opt2.state[slot][name]).tobytes(), (slot, name)
    for name, a in ema.shadow.items():
        assert to_numpy(a).tobytes() == to_numpy(ema2.shadow[name]).tobytes(), name
    assert opt.step_count == opt2.step_count == K and ema.optimization_step == ema2.optimization_step
    assert opt.lr == opt2.lr and opt.hyperparameters() == opt2.hyperparameters()

    names = set(read_header(tmp_path / "optimizer.safetensors").tensors)
    slots = ("exp_avg", "exp_avg_sq") if isinstance(opt, AdamW) else ("momentum_buffer",)
    assert names == {f"{s}.{n}" for s in slots for n, _ in straight.named_parameters()}


def test_optimizer_argument_and_state_errors():
    m = make_toy()
    with pytest.raises(TypeError, match="module must be an npdiffusion Module"):
        AdamW([1, 2])
    with pytest.raises(ValueError, match=r"AdamW: betas\[1\] must be in \[0.0, 1.0\)"):
        AdamW(m, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="AdamW: betas must be a pair"):
        AdamW(m, betas=0.9)
    with pytest.raises(ValueError, match="AdamW: lr must be in"):
        AdamW(m, lr=-1.0)
    with pytest.raises(ValueError, match="lr must be in"):
        AdamW(m, lr=float("nan"))
    with pytest.raises(TypeError, match="eps must be a number"):
        AdamW(m, eps="small")
    with pytest.raises(ValueError, match="nesterov needs momentum > 0"):
        SGD(m, lr=0.1, nesterov=True)
    opt = AdamW(m)
    set_grads(m, grad_sequence(m, 1)[0])
    opt.step()
    state = opt.state_dict()
    with pytest.raises(ValueError, match="expected a state dict of type 'SGD', got 'AdamW'"):
        SGD(m, lr=0.1).load_state_dict(state)
    bad = {**state, "state": {"exp_avg": {"nope": np.zeros(1)}}}
    with pytest.raises(KeyError, match="'nope', which is not a parameter"):
        AdamW(m).load_state_dict(bad)
    bad = {**state, "state": {"exp_avg": {"scale": np.zeros(3)}}}
    with pytest.raises(ValueError, match=r"exp_avg' of 'scale' has shape \(3,\), parameter has \(2, 3, 2\)"):
        AdamW(m).load_state_dict(bad)
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        AdamW(m).load_state_dict({**state, "step": -1})
