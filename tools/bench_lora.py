"""Step time of LoRA fine-tuning against full fine-tuning of the same U-Net (ours, CPU).

    python tools/bench_lora.py                         # the demo's U-Net config, batch 32
    python tools/bench_lora.py --model /tmp/lora-demo-base/model --repeats 9

Shapes: B batch, L latent channels, h latent side, T tokens, D context width.

One step = forward, MSE loss gradient, backward, clip and AdamW, as ``npdiffusion train`` runs it:

* full: every U-Net weight trainable: backward computes dx and every dW; AdamW over all parameters;
* lora: rank-r adapters on to_q, to_k, to_v, to_out.0 (``add_lora``), the base frozen: backward
  computes dx and the adapters' dA, dB only (no dW product); AdamW over the adapters.

The two run alternately (A B A B ...) after warm-up; the report gives each one's median wall time and
CPU time per step (the machine is shared: CPU time is the steadier figure) and the medians of the
per-pair ratios lora / full. Results: docs/benchmarks.md ("LoRA").
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

#: the demo's U-Net (npdiffusion/training/demo/settings.py): 8x8x8 latents of the 3-level VAE, text width 64
DEMO = dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, attention_head_dim=8,
            norm_num_groups=8, in_channels=8, out_channels=8, sample_size=8)


def build_unet(model):
    from npdiffusion.models.unet import UNet2DConditionModel

    if model:
        return UNet2DConditionModel.from_pretrained(os.path.join(model, "unet"))
    from npdiffusion.random import manual_seed

    manual_seed(0)
    return UNet2DConditionModel(**DEMO)


def make_step(unet, module, batch, tokens):
    """A closure running one training step of ``unet`` with AdamW on ``module``'s parameters."""
    from npdiffusion.optim.adamw import AdamW
    from npdiffusion.optim.clip_grad import clip_grad_norm_

    cfg = unet.config
    rng = np.random.default_rng(0)
    side = cfg["sample_size"]
    x = rng.standard_normal((batch, cfg["in_channels"], side, side)).astype(np.float32)
    ctx = rng.standard_normal((batch, tokens, cfg["cross_attention_dim"])).astype(np.float32)
    t = rng.integers(0, 1000, batch)
    target = rng.standard_normal((batch, cfg["out_channels"], side, side)).astype(np.float32)
    opt = AdamW(module, lr=1e-4)

    def step():
        module.zero_grad()
        out = unet(x, t, ctx)
        unet.backward((out - target) * np.float32(2.0 / out.size))
        clip_grad_norm_(module, 1.0)
        opt.step()

    return step


def timed(step):
    w, c = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - w, time.process_time() - c


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a pipeline folder whose unet/ to use (default: the demo's "
                        "U-Net config with fresh weights)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)

    from npdiffusion.lora import UNET_ATTENTION_TARGETS, add_lora

    full_unet = build_unet(args.model).train()
    lora_unet = build_unet(args.model).train()
    adapters = add_lora(lora_unet, UNET_ATTENTION_TARGETS, args.rank)
    steps = {"full": make_step(full_unet, full_unet, args.batch, args.tokens),
             "lora": make_step(lora_unet, adapters, args.batch, args.tokens)}
    for step in steps.values():
        step()
        step()
    times = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            times[name].append(timed(step))
    print(f"U-Net {full_unet.num_parameters():,} parameters, LoRA rank {args.rank} on "
          f"{', '.join(UNET_ATTENTION_TARGETS)}: "
          f"{adapters.num_parameters():,} trainable; batch {args.batch}, {args.repeats} pairs")
    for name in steps:
        wall = statistics.median(t[0] for t in times[name])
        cpu = statistics.median(t[1] for t in times[name])
        print(f"{name:5s} step: {1000 * wall:8.1f} ms wall, {1000 * cpu:8.1f} ms CPU")
    for k, what in ((0, "wall"), (1, "CPU")):
        ratio = statistics.median(a[k] / b[k] for a, b in zip(times["lora"], times["full"]))
        print(f"lora / full ({what}, median of pairs): {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
