"""Time forward + backward of our core ops against torch on the CPU, side by side.

    python tools/bench_ops.py                 # the three reference rows
    python tools/bench_ops.py --extra         # plus more convolution shapes
    python tools/bench_ops.py --repeats 40 --only conv

Rows (float32):
  conv3x3     Conv2d 64 -> 64, 3x3, padding 1, on (16, 64, 32, 32)      vs torch.nn.Conv2d
  groupnorm   group_norm, 32 groups, affine, on the same (16, 64, 32, 32) vs F.group_norm
  attention   self-attention, batch 16, 8 heads of 64, 256 tokens         vs F.scaled_dot_product_attention
With --extra: the U-Net downsampler (3x3 stride 2), a 1x1 convolution and a wider 3x3 at 16x16.

Method: torch gets as many threads as NumPy's BLAS uses (threadpoolctl, else 2; or --threads).
Each row is warmed up, then ours and torch run alternately (A B B A ...) in this one process;
the table shows the median time of each, the median of the per-pair ratios ours / torch, and
GFLOP/s of both (FLOPs counted by torch's FlopCounterMode on the torch step, analytic for
attention; group norm has no GEMM and shows none). A row whose op module does not exist yet is
skipped with a note. Shared machines are noisy: read ratios, not absolute times, and rerun;
``--clean`` keeps only the pairs during which no other process used the CPU (Linux).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def blas_threads(default: int = 2) -> int:
    """The thread count of NumPy's BLAS (threadpoolctl), or ``default`` without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return default
    np.ones((2, 2)) @ np.ones((2, 2))  # make sure the BLAS library is loaded
    counts = [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]
    return counts[0] if counts else default


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


# ----------------------------------------------------------------------------- rows
def conv_row(torch, name, b, cin, cout, side, k, stride, padding):
    """Conv2d module forward + backward, ours vs torch.nn.Conv2d, shared weights."""
    def build():
        from npdiffusion.nn.conv import Conv2d

        rng = np.random.default_rng(0)
        theirs = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=padding)
        ours = Conv2d(cin, cout, k, stride=stride, padding=padding)
        ours.load_state_dict({n: p.detach().numpy() for n, p in theirs.state_dict().items()})
        x = rng.standard_normal((b, cin, side, side)).astype(np.float32)
        y = theirs(torch.from_numpy(x))
        dy = rng.standard_normal(tuple(y.shape)).astype(np.float32)
        xt, dyt = torch.from_numpy(x).requires_grad_(True), torch.from_numpy(dy)

        def run_ours():
            ours.zero_grad()
            ours.forward(x)
            ours.backward(dy)

        def run_theirs():
            xt.grad = None
            theirs.zero_grad(set_to_none=True)
            theirs(xt).backward(dyt)

        return run_ours, run_theirs, None
    shape = f"{cin}->{cout} {k}x{k} s{stride} p{padding} on ({b},{cin},{side},{side})"
    return name, shape, build


def groupnorm_row(torch, b=16, c=64, side=32, groups=32):
    def build():
        from npdiffusion.ops.norm import group_norm_backward, group_norm_forward

        rng = np.random.default_rng(1)
        x = rng.standard_normal((b, c, side, side)).astype(np.float32)
        w = (1 + 0.1 * rng.standard_normal(c)).astype(np.float32)
        bias = (0.1 * rng.standard_normal(c)).astype(np.float32)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        xt = torch.from_numpy(x).requires_grad_(True)
        wt, bt = torch.from_numpy(w).requires_grad_(True), torch.from_numpy(bias).requires_grad_(True)
        dyt = torch.from_numpy(dy)

        def run_ours():
            _, cache = group_norm_forward(x, groups, w, bias, 1e-5)
            group_norm_backward(dy, cache)

        def run_theirs():
            xt.grad = wt.grad = bt.grad = None
            torch.nn.functional.group_norm(xt, groups, wt, bt, 1e-5).backward(dyt)

        return run_ours, run_theirs, None
    return "groupnorm", f"{groups} groups on ({b},{c},{side},{side})", build


def attention_row(torch, b=16, heads=8, tokens=256, d=64):
    def build():
        from npdiffusion.ops.attention import attention_backward, attention_forward

        rng = np.random.default_rng(2)
        q, k, v, do = (rng.standard_normal((b, heads, tokens, d)).astype(np.float32) for _ in range(4))
        qt, kt, vt = (torch.from_numpy(a).requires_grad_(True) for a in (q, k, v))
        dot = torch.from_numpy(do)

        def run_ours():
            _, cache = attention_forward(q, k, v)
            attention_backward(do, cache)

        def run_theirs():
            qt.grad = kt.grad = vt.grad = None
            torch.nn.functional.scaled_dot_product_attention(qt, kt, vt).backward(dot)

        # QK^T and PV forward (2 GEMMs), four GEMMs backward: 6 * 2 * B*H*T*T*d.
        return run_ours, run_theirs, 12.0 * b * heads * tokens * tokens * d
    return "attention", f"B{b} {heads}x{d} heads, {tokens} tokens", build


# ----------------------------------------------------------------------------- timing
class ForeignCpu:
    """CPU ticks used by *other* processes while a call ran (Linux /proc; None elsewhere).

    Busy ticks of the whole machine (including steal) minus this process's own ticks. On a
    shared machine, ``--clean`` keeps only the pairs during which this was zero.
    """

    def __init__(self):
        self.ok = os.path.exists("/proc/stat") and os.path.exists("/proc/self/stat")

    def snapshot(self):
        if not self.ok:
            return None
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:9]]
        with open("/proc/self/stat") as f:
            own = f.read()
        fields = own[own.rindex(")") + 2:].split()
        busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]        # user nice system irq softirq steal
        return busy, int(fields[11]) + int(fields[12])          # utime + stime of this process

    @staticmethod
    def ticks(a, b):
        return None if a is None else (b[0] - a[0]) - (b[1] - a[1])


def count_flops(torch, fn):
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() or None


def time_pair(run_ours, run_theirs, repeats, warmup, clean=False, clean_timeout=600.0):
    """Median time of each, median per-pair ratio and the number of pairs kept.

    Runs ``repeats`` alternating pairs. With ``clean``, a pair during which other processes used
    the CPU is discarded and run again, for at most ``clean_timeout`` seconds per row.
    """
    for _ in range(warmup):
        run_ours()
        run_theirs()
    probe = ForeignCpu()
    ours, theirs, ratios = [], [], []
    deadline = time.monotonic() + clean_timeout
    tries = 0
    while len(ratios) < repeats:
        if clean and tries >= repeats and time.monotonic() > deadline:
            break
        order = (0, 1) if tries % 2 == 0 else (1, 0)    # A B, then B A: neither always goes first
        tries += 1
        t = [0.0, 0.0]
        s0 = probe.snapshot()
        for which in order:
            fn = run_ours if which == 0 else run_theirs
            t0 = time.perf_counter()
            fn()
            t[which] = time.perf_counter() - t0
        if clean and probe.ok and probe.ticks(s0, probe.snapshot()) > 0:
            continue
        ours.append(t[0])
        theirs.append(t[1])
        ratios.append(t[0] / t[1])
    if not ratios:
        return None
    return statistics.median(ours), statistics.median(theirs), statistics.median(ratios), len(ratios)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=30, help="timed pairs per row (default 30)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="BLAS and torch threads (default: BLAS's)")
    ap.add_argument("--only", default=None, help="comma-separated row names (conv3x3, groupnorm, attention, ...)")
    ap.add_argument("--extra", action="store_true", help="also time more convolution shapes")
    ap.add_argument("--clean", action="store_true",
                    help="keep only pairs during which no other process used the CPU (Linux; shared machines)")
    ap.add_argument("--clean-timeout", type=float, default=600.0,
                    help="with --clean, give up on a row after this many seconds (default 600)")
    args = ap.parse_args(argv)

    import torch

    limiter = None
    if args.threads is not None:
        try:
            from threadpoolctl import threadpool_limits
            limiter = threadpool_limits(limits=args.threads, user_api="blas")
        except ImportError:
            print("note: threadpoolctl is not installed; set OPENBLAS_NUM_THREADS instead")
        threads = args.threads
    else:
        threads = blas_threads()
    torch.set_num_threads(threads)
    from npdiffusion import parallel

    parallel.set_num_threads(threads)               # our element-wise threads too

    rows = [conv_row(torch, "conv3x3", 16, 64, 64, 32, 3, 1, 1), groupnorm_row(torch), attention_row(torch)]
    if args.extra:
        rows += [conv_row(torch, "conv3x3-s2", 16, 64, 64, 32, 3, 2, 1),
                 conv_row(torch, "conv1x1", 16, 64, 128, 32, 1, 1, 0),
                 conv_row(torch, "conv3x3-wide", 8, 128, 128, 16, 3, 1, 1)]
    if args.only:
        wanted = {w.strip() for w in args.only.split(",")}
        rows = [r for r in rows if r[0] in wanted or r[0].split("-")[0] in wanted]

    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs; numpy {np.__version__} "
          f"({threads} BLAS threads), torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"{args.repeats} alternating pairs per row after {args.warmup} warm-up pairs"
          + (", quiet pairs only" if args.clean else ""))
    header = (f"{'row':<13} {'shape':<40} {'ours ms':>8} {'torch ms':>9} {'ratio':>6} {'ours GF/s':>10} "
              f"{'torch GF/s':>11} {'pairs':>6}")
    print(header)
    print("-" * len(header))
    for name, shape, build in rows:
        try:
            run_ours, run_theirs, flops = build()
        except ImportError as exc:
            print(f"{name:<13} skipped: its op module is not available yet ({exc})")
            continue
        if flops is None:
            flops = count_flops(torch, run_theirs)
        timing = time_pair(run_ours, run_theirs, args.repeats, args.warmup, args.clean, args.clean_timeout)
        if timing is None:
            print(f"{name:<13} no quiet pair within {args.clean_timeout:g} s: the machine is busy, try later")
            continue
        t_ours, t_theirs, ratio, kept = timing
        gf = (lambda t: f"{flops / t / 1e9:10.1f}") if flops else (lambda t: f"{'-':>10}")
        print(f"{name:<13} {shape:<40} {t_ours * 1e3:8.2f} {t_theirs * 1e3:9.2f} {ratio:6.2f} "
              f"{gf(t_ours)} {gf(t_theirs):>11} {kept:6d}", flush=True)
    if limiter is not None:
        limiter.restore_original_limits()


if __name__ == "__main__":
    main()
