"""Does limiting OpenBLAS to one thread speed up small-model training on a 2-core machine?

    python tools/bench_blas_threads.py [--steps 10] [--rounds 3]

Times training steps (forward, hand-written backward, AdamW) of a few small models with the BLAS
thread count set to 1 and to the default, alternating in ONE process (threadpoolctl switches it;
threadpoolctl is a test/tool-side helper here, not a dependency of npdiffusion), and prints the
median milliseconds per step of each. The machine's load average is printed too: OpenBLAS threads
spin while they wait, so when other processes share the cores, extra BLAS threads can cost far more
than they save. Models:

* ``toy``: the loop tests' stage (conv 3->4, B=8, 8x8): pure overhead.
* ``conv32`` / ``conv64``: three 3x3 convs, C channels, B=32, 32x32 images.
* ``vae``: a small AutoencoderKL (block_out_channels 32/64, 1 layer per block, 8 groups), B=16,
  32x32, reconstruction + KL loss: the size the shapes demo trains.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from npdiffusion.backend import asarray  # noqa: E402
from npdiffusion.nn.activations import SiLU  # noqa: E402
from npdiffusion.nn.conv import Conv2d  # noqa: E402
from npdiffusion.nn.module import Module  # noqa: E402
from npdiffusion.optim.adamw import AdamW  # noqa: E402
from npdiffusion.random import manual_seed  # noqa: E402


class ConvStack(Module):
    def __init__(self, c):
        super().__init__()
        self.c1, self.a1 = Conv2d(3, c, 3, padding=1), SiLU()
        self.c2, self.a2 = Conv2d(c, c, 3, padding=1), SiLU()
        self.c3 = Conv2d(c, 3, 3, padding=1)

    def forward(self, x):
        return self.c3(self.a2(self.c2(self.a1(self.c1(x)))))

    def backward(self, g):
        return self.c1.backward(self.a1.backward(self.c2.backward(self.a2.backward(self.c3.backward(g)))))


def conv_step(c, b, s):
    manual_seed(0)
    net = ConvStack(c)
    opt = AdamW(net, lr=1e-3)
    x = asarray(np.random.default_rng(0).standard_normal((b, 3, s, s)).astype(np.float32))

    def step():
        net.zero_grad()
        y = net(x)
        net.backward((y - x) * (2.0 / y.size))
        opt.step()
    return step


def toy_step():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from test_training_loop import ToyStage  # noqa: PLC0415

    from npdiffusion.data.loader import default_collate  # noqa: PLC0415
    from npdiffusion.data.shapes import make_shapes  # noqa: PLC0415

    stage = ToyStage(seed=0, dtype="float32")
    opt = AdamW(stage.module, lr=1e-3)
    ds = make_shapes(8, seed=0, size=8)
    batch = default_collate(ds.images, ds.captions, np.arange(8), 0, 0)
    rng = np.random.default_rng(0)

    def step():
        stage.module.zero_grad()
        stage.train_step(batch, rng)
        opt.step()
    return step


def vae_step():
    from npdiffusion.models.vae.autoencoder_kl import AutoencoderKL  # noqa: PLC0415
    from npdiffusion.models.vae.loss import KLAutoencoderLoss  # noqa: PLC0415

    manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8)
    objective = KLAutoencoderLoss(vae, beta=1e-6)
    opt = AdamW(vae, lr=1e-3)
    x = asarray(np.random.default_rng(0).uniform(-1, 1, (16, 3, 32, 32)).astype(np.float32))
    gen = np.random.default_rng(1)

    def step():
        vae.zero_grad()
        objective(x, generator=gen)
        objective.backward()
        opt.step()
    return step


def main(argv=None):
    from threadpoolctl import threadpool_info, threadpool_limits  # noqa: PLC0415 - tool-side only

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--models", nargs="*", default=["toy", "conv32", "conv64", "vae"])
    args = p.parse_args(argv)
    default = max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")
    builders = {"toy": toy_step, "conv32": lambda: conv_step(32, 32, 32), "conv64": lambda: conv_step(64, 32, 32),
                "vae": vae_step}
    print(f"load average {os.getloadavg()}, {os.cpu_count()} CPUs, default BLAS threads {default}")
    print(f"{'model':<8} {'1 thread ms':>12} {f'{default} threads ms':>14} {'ratio':>7}")
    for name in args.models:
        step = builders[name]()
        step()
        times = {1: [], default: []}
        for _ in range(args.rounds):
            for n in (1, default):
                with threadpool_limits(limits=n, user_api="blas"):
                    step()
                    t = time.perf_counter()
                    for _ in range(args.steps):
                        step()
                    times[n].append((time.perf_counter() - t) / args.steps * 1000)
        one, many = statistics.median(times[1]), statistics.median(times[default])
        print(f"{name:<8} {one:12.1f} {many:14.1f} {many / one:7.2f}")
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
