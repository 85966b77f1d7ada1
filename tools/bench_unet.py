"""Time one U-Net training step (forward + backward + AdamW) against diffusers + torch on the CPU.

    python tools/bench_unet.py                    # the issue's benchmark, ratio ours / torch
    python tools/bench_unet.py --repeats 9 --threads 2
    python tools/bench_unet.py --profile          # cProfile of our step (top functions by time)
    python tools/bench_unet.py --by-op            # our step's time per op, one thread against two
    python tools/bench_unet.py --memory           # peak memory: plain / checkpointing / chunked
    python tools/bench_unet.py --threads 1 --cpu-time   # on a busy machine: CPU time, one thread each

Benchmark (issue 4): UNet2DConditionModel with block_out_channels (64, 128, 128), layers_per_block 2,
down CrossAttnDownBlock2D x2 + DownBlock2D, up UpBlock2D + CrossAttnUpBlock2D x2,
cross_attention_dim 128, attention_head_dim 8 (heads), norm_num_groups 32; batch 32, 8x8x4
latents, 16 context tokens, float32. One step = forward, MSE loss gradient, backward, AdamW.

Method: both models hold the same weights (diffusers' init copied into ours); torch gets as many
threads as NumPy's BLAS uses (threadpoolctl; or --threads for both). After warm-up, ours and
torch run alternately (A B A B ...) in this one process; the report gives the median step time
of each, the median of the per-pair ratios ours / torch, and GFLOP/s (FLOPs of the forward and
backward counted by torch's FlopCounterMode on the torch step; AdamW is a few element-wise passes
and counted as none). Shared machines are noisy: read ratios, and rerun.

--memory measures, on the same model at 32x32 latents (1024 tokens at the top level), the peak
of NumPy allocations (tracemalloc) during forward + backward for the plain model, gradient
checkpointing, query-chunked attention and both; results in docs/benchmarks.md ("U-Net").
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import statistics
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

CONFIG = dict(
    block_out_channels=(64, 128, 128), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32, sample_size=8)


def blas_threads(default: int = 2) -> int:
    """The thread count of NumPy's BLAS (threadpoolctl), or ``default`` without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return default
    np.ones((2, 2)) @ np.ones((2, 2))
    counts = [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]
    return counts[0] if counts else default


from npdiffusion import parallel  # noqa: E402


def set_blas_threads(n: int) -> None:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(n, user_api="blas")


def build(torch, batch: int, size: int, tokens: int, seed: int = 0):
    """diffusers' model and ours with the same weights, inputs and a regression target."""
    from diffusers import UNet2DConditionModel as TorchUNet

    from npdiffusion.models.unet import UNet2DConditionModel

    torch.manual_seed(seed)
    theirs = TorchUNet(**CONFIG).train()
    ours = UNet2DConditionModel(**CONFIG)
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, 4, size, size)).astype(np.float32)
    t = rng.integers(0, 1000, size=batch)
    ctx = rng.standard_normal((batch, tokens, CONFIG["cross_attention_dim"])).astype(np.float32)
    target = rng.standard_normal((batch, 4, size, size)).astype(np.float32)
    return ours, theirs, (sample, t, ctx, target)


def torch_step_fn(torch, theirs, data):
    import torch.nn.functional as F
    sample, t, ctx, target = (torch.tensor(a) for a in data)
    opt = torch.optim.AdamW(theirs.parameters(), lr=1e-4)

    def step():
        pred = theirs(sample, t, ctx).sample
        F.mse_loss(pred, target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def our_step_fn(ours, data):
    from npdiffusion.optim.adamw import AdamW
    sample, t, ctx, target = data
    opt = AdamW(ours, lr=1e-4)
    scale = 2.0 / target.size

    def step():
        pred = ours(sample, t, ctx)
        grad = pred - target                                   # d mean((pred - target)^2) / d pred
        grad *= scale
        ours.backward(grad)
        opt.step()
        ours.zero_grad()
    return step


def count_flops(torch, theirs, data) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    import torch.nn.functional as F
    sample, t, ctx, target = (torch.tensor(a) for a in data)
    with FlopCounterMode(display=False) as counter:
        F.mse_loss(theirs(sample, t, ctx).sample, target).backward()
    theirs.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def bench(args, torch) -> None:
    ours, theirs, data = build(torch, args.batch, args.size, args.tokens)
    flops = count_flops(torch, theirs, data)
    a, b = our_step_fn(ours, data), torch_step_fn(torch, theirs, data)
    for _ in range(args.warmup):
        a()
        b()
    clock = time.process_time if args.cpu_time else time.perf_counter
    times_a, times_b, ratios = [], [], []
    for _ in range(args.repeats):
        gc.collect()
        t0 = clock()
        a()
        t1 = clock()
        b()
        t2 = clock()
        times_a.append(t1 - t0)
        times_b.append(t2 - t1)
        ratios.append((t1 - t0) / (t2 - t1))
    ta, tb = statistics.median(times_a), statistics.median(times_b)
    print(f"U-Net training step, batch {args.batch}, {args.size}x{args.size}x4 latents, {args.tokens} tokens, "
          f"float32, {args.threads} threads, {args.repeats} alternating pairs"
          + (", process CPU time" if args.cpu_time else ", wall-clock time"))
    print(f"  FLOPs (forward + backward, torch's counter): {flops / 1e9:.1f} GFLOP")
    print(f"  npdiffusion: {ta * 1e3:8.1f} ms  ({flops / ta / 1e9:6.1f} GFLOP/s)")
    print(f"  torch:       {tb * 1e3:8.1f} ms  ({flops / tb / 1e9:6.1f} GFLOP/s)")
    print(f"  ratio ours / torch (median of pairs): {statistics.median(ratios):.2f}  "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})")


def profile(args, torch) -> None:
    ours, _, data = build(torch, args.batch, args.size, args.tokens)
    step = our_step_fn(ours, data)
    for _ in range(args.warmup):
        step()
    prof = cProfile.Profile(time.process_time) if args.cpu_time else cProfile.Profile()
    prof.enable()
    for _ in range(args.repeats):
        step()
    prof.disable()
    print(f"cProfile of {args.repeats} npdiffusion steps (tottime, top {args.top}):")
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)


# The ops whose time --by-op reports: (module, function) pairs, wrapped wherever they are imported.
BY_OP = [("npdiffusion.ops.conv", "conv2d_forward"), ("npdiffusion.ops.conv", "conv2d_backward"),
         ("npdiffusion.ops.linear", "linear_forward"), ("npdiffusion.ops.linear", "linear_backward"),
         ("npdiffusion.ops.attention", "attention_forward"), ("npdiffusion.ops.attention", "attention_backward"),
         ("npdiffusion.ops.geglu", "geglu_forward"), ("npdiffusion.ops.geglu", "geglu_backward"),
         ("npdiffusion.ops.norm", "group_norm_forward"), ("npdiffusion.ops.norm", "group_norm_backward"),
         ("npdiffusion.ops.norm", "layer_norm_forward"), ("npdiffusion.ops.norm", "layer_norm_backward"),
         ("npdiffusion.ops.activations", "silu_forward"), ("npdiffusion.ops.activations", "silu_backward"),
         ("npdiffusion.optim.adamw", "AdamW.step")]


def _wrap_ops(totals):
    """Replace each BY_OP function, in every loaded npdiffusion module that holds it, by a timer
    adding its wall time to ``totals[name]`` (nested calls are not double counted: none nest)."""
    import importlib

    for module_name, name in BY_OP:
        owner = importlib.import_module(module_name)
        cls, _, attr = name.rpartition(".")
        holder = getattr(owner, cls) if cls else owner
        original = getattr(holder, attr)

        def timed(*a, _f=original, _name=name, **k):
            t0 = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                totals[_name] = totals.get(_name, 0.0) + time.perf_counter() - t0

        setattr(holder, attr, timed)
        if not cls:
            for mod in list(sys.modules.values()):
                if getattr(mod, "__name__", "").startswith("npdiffusion") and getattr(mod, attr, None) is original:
                    setattr(mod, attr, timed)


def by_op(args, torch) -> None:
    """Our step's time per op at one thread and at args.threads, alternating, in one process."""
    import npdiffusion.models.unet  # noqa: F401 - load every module that imports an op first

    ours, _, data = build(torch, args.batch, args.size, args.tokens)
    step = our_step_fn(ours, data)
    totals, per = {}, {}
    _wrap_ops(totals)
    counts = (1, args.threads)
    for n in counts:
        set_blas_threads(n)
        parallel.set_num_threads(n)
        for _ in range(args.warmup):
            step()
    for _ in range(args.repeats):
        for n in counts:
            set_blas_threads(n)
            parallel.set_num_threads(n)
            totals.clear()
            t0 = time.perf_counter()
            step()
            totals["step"] = time.perf_counter() - t0
            for k, v in totals.items():
                per.setdefault((n, k), []).append(v)
    print(f"npdiffusion U-Net step by op, ms per step (median of {args.repeats}), "
          f"1 thread vs {args.threads}, wall clock:")
    names = sorted({k for _, k in per if k != "step"}, key=lambda k: -statistics.median(per[(1, k)]))
    for k in names + ["step"]:
        a, b = statistics.median(per[(1, k)]) * 1e3, statistics.median(per[(args.threads, k)]) * 1e3
        print(f"  {k:<22} {a:8.1f} {b:8.1f}   x{a / max(b, 1e-9):.2f}")
    rest = [statistics.median(per[(n, "step")]) - sum(statistics.median(per[(n, k)]) for k in names)
            for n in counts]
    print(f"  {'everything else':<22} {rest[0] * 1e3:8.1f} {rest[1] * 1e3:8.1f}")


def memory(args, torch) -> None:
    """Peak traced NumPy memory of forward + backward for each memory option (float32)."""
    size = args.memory_size
    ours, _, data = build(torch, args.memory_batch, size, args.tokens)
    sample, t, ctx, target = data
    rows = []
    for name, ckpt, chunk in (("plain", False, None), ("gradient checkpointing", True, None),
                              (f"chunked attention ({args.chunk} query rows)", False, args.chunk),
                              ("both", True, args.chunk)):
        ours.enable_gradient_checkpointing(ckpt)
        ours.set_attention_chunk_size(chunk)
        ours.zero_grad()
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        t0 = time.perf_counter()
        pred = ours(sample, t, ctx)
        after_forward = tracemalloc.get_traced_memory()[0] - base
        ours.backward(pred - target)
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        del pred
        ours.zero_grad()
        rows.append((name, after_forward, peak, elapsed))
    print(f"Peak memory of forward + backward (tracemalloc, NumPy allocations, parameters excluded), "
          f"batch {args.memory_batch}, {size}x{size}x4 latents ({size * size} tokens at the top level), "
          f"{args.tokens} context tokens, float32:")
    print(f"  {'option':<36} {'kept after forward':>20} {'peak':>12} {'time':>9}")
    for name, kept, peak, elapsed in rows:
        print(f"  {name:<36} {kept / 2**20:17.0f} MiB {peak / 2**20:9.0f} MiB {elapsed:8.2f} s")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=8)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="threads for both (default: NumPy's BLAS count)")
    p.add_argument("--cpu-time", action="store_true",
                   help="time with process CPU time instead of wall clock (meaningful with --threads 1 on a "
                        "busy machine: other processes' load does not count)")
    p.add_argument("--profile", action="store_true", help="cProfile our step instead of the comparison")
    p.add_argument("--by-op", action="store_true",
                   help="our step's time per op at one thread and at --threads, instead of the comparison")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--memory", action="store_true", help="peak memory of plain / checkpointing / chunked")
    p.add_argument("--memory-size", type=int, default=32)
    p.add_argument("--memory-batch", type=int, default=4)
    p.add_argument("--chunk", type=int, default=128, help="query rows per attention chunk (--memory)")
    args = p.parse_args(argv)
    import torch
    args.threads = args.threads or blas_threads()
    set_blas_threads(args.threads)
    torch.set_num_threads(args.threads)
    parallel.set_num_threads(args.threads)          # our element-wise threads too
    if args.profile:
        profile(args, torch)
    elif args.by_op:
        by_op(args, torch)
    elif args.memory:
        memory(args, torch)
    else:
        bench(args, torch)


if __name__ == "__main__":
    main()
