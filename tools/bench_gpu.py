"""Our U-Net on the GPU (CuPy) against PyTorch eager (diffusers) on the same GPU, side by side.

    python tools/bench_gpu.py                           # every row, on the GPU (CuPy + CUDA torch)
    python tools/bench_gpu.py --only train --repeats 20
    python tools/bench_gpu.py --json bench.json         # also write the table as JSON
    python tools/bench_gpu.py --device cpu --small      # tiny sizes on the CPU: a smoke test of the code

Rows (shapes: B batch, 4 latent channels, H x W latents, T context tokens of width Cc):
  train-fp32   one U-Net training step (forward, MSE loss, backward, AdamW) on the benchmark config of
               the U-Net issue: block_out_channels (64, 128, 128), layers_per_block 2, down
               CrossAttnDownBlock2D x2 + DownBlock2D, up UpBlock2D + CrossAttnUpBlock2D x2,
               cross_attention_dim 128, attention_head_dim 8, norm_num_groups 32; B 256, 8x8 latents,
               T 16. torch: diffusers' UNet2DConditionModel + torch.optim.AdamW (its default CUDA path).
  train-amp16  the same step in mixed precision. Ours: the module in float16, float32 master weights
               and dynamic loss scaling (npdiffusion.optim.mixed_precision); torch: autocast(float16)
               + torch.amp.GradScaler, float32 parameters.
  sd-fwd-fp32  the full-size Stable Diffusion 1.5 U-Net (block_out_channels 320/640/1280/1280,
               cross_attention_dim 768, attention_head_dim 8; 860 M parameters, random weights)
               forward in eval mode, B 2, 64x64 latents, T 77.
  sd-fwd-fp16  the same with float16 weights and activations (torch: model.half()).

Method: both models hold the same weights (ours loaded from torch's state dict). Each row is warmed
up (CuPy compiles its kernels on first use), then ours and torch run alternately (A B B A ...) in
this one process; each call is timed with CUDA events on the GPU (cupy.cuda.Event for ours,
torch.cuda.Event for torch; both on the default stream, so host launch overhead that starves the
GPU is included), with perf_counter on the CPU. The table shows the median time of each, the
median of the per-pair ratios ours / torch, and the achieved TFLOP/s of both (FLOPs counted once
by torch's FlopCounterMode on the torch step: forward, plus backward for training rows; the
optimizer's element-wise work is not counted). "rel err" is max|ours - torch| / max|torch| of the
first output, a sanity check of the comparison, not a test. TF32 is off on both sides unless
``--tf32`` (then CUPY_TF32=1 and torch's matmul/cuDNN TF32 flags are set before anything runs).

``--device cpu --small`` runs every row at tiny sizes on NumPy and torch's CPU (the same code
paths; the numbers mean nothing); tests/test_bench_gpu_smoke.py runs it. Results: docs/gpu.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

ROWS = ("train-fp32", "train-amp16", "sd-fwd-fp32", "sd-fwd-fp16")

TRAIN_CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128, 128),
                    layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                          "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                    cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32)
TRAIN_SHAPES = dict(batch=256, side=8, tokens=16)

SD15_CONFIG = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                   layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                         "CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                   cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
SD15_SHAPES = dict(batch=2, side=64, tokens=77)

# --small: the same block types at sizes a 2-core CPU runs in well under a second.
SMALL_TRAIN_CONFIG = {**TRAIN_CONFIG, "block_out_channels": (16, 16, 16), "cross_attention_dim": 16,
                      "attention_head_dim": 2, "norm_num_groups": 8}
SMALL_TRAIN_SHAPES = dict(batch=2, side=8, tokens=4)
SMALL_SD_CONFIG = {**SD15_CONFIG, "block_out_channels": (8, 8, 16, 16), "layers_per_block": 1,
                   "cross_attention_dim": 16, "attention_head_dim": 2, "norm_num_groups": 4, "sample_size": 16}
SMALL_SD_SHAPES = dict(batch=1, side=16, tokens=5)


class BenchError(Exception):
    """A condition the user can fix (no GPU, no CuPy): reported on one line, exit code 2."""


# ----------------------------------------------------------------------------- devices and timers
class Device:
    """Where both sides run, and how to time one call of each."""

    def __init__(self, kind: str, tf32: bool):
        import torch

        self.kind = kind
        self.torch = torch
        if kind == "gpu":
            if tf32:
                os.environ["CUPY_TF32"] = "1"            # read by CuPy when its BLAS handles are made
            from npdiffusion.backend import set_backend
            try:
                set_backend("cupy")
            except RuntimeError as exc:
                raise BenchError(str(exc)) from None
            if not torch.cuda.is_available():
                raise BenchError(f"--device gpu needs a CUDA build of torch with a visible GPU; torch "
                                 f"{torch.__version__} sees none (use --device cpu --small for a smoke test)")
            import cupy

            self.cupy = cupy
            self.torch_device = torch.device("cuda")
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
            self.name = torch.cuda.get_device_name(0)
        else:
            from npdiffusion.backend import set_backend

            set_backend("numpy")
            torch.set_num_threads(1)     # tiny models: torch's threads spin-wait far longer than they work
            self.cupy = None
            self.torch_device = torch.device("cpu")
            self.name = platform.processor() or platform.machine()
        self.tf32 = tf32

    def time_ours(self, fn) -> float:
        """Milliseconds of one call of ``fn`` (our side)."""
        if self.cupy is None:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        start, end = self.cupy.cuda.Event(), self.cupy.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return self.cupy.cuda.get_elapsed_time(start, end)

    def time_torch(self, fn) -> float:
        """Milliseconds of one call of ``fn`` (torch's side)."""
        if self.cupy is None:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        start = self.torch.cuda.Event(enable_timing=True)
        end = self.torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def sync(self):
        if self.cupy is not None:
            self.cupy.cuda.Device().synchronize()
            self.torch.cuda.synchronize()


def alternate(device, ours, theirs, warmup: int, repeats: int):
    """Warm both up, then time them in A B B A order; returns (ours ms list, torch ms list)."""
    for _ in range(warmup):
        ours()
        theirs()
    device.sync()
    a, b = [], []
    for i in range(repeats):
        if i % 2 == 0:
            a.append(device.time_ours(ours))
            b.append(device.time_torch(theirs))
        else:
            b.append(device.time_torch(theirs))
            a.append(device.time_ours(ours))
    return a, b


def count_flops(torch, fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def rel_err(ours, theirs) -> float:
    from npdiffusion.backend import to_numpy

    a = to_numpy(ours).astype(np.float64)
    b = theirs.detach().float().cpu().numpy().astype(np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


# ----------------------------------------------------------------------------- models and inputs
def build_pair(device, config):
    """diffusers' model (random init) and ours with the same weights, both float32."""
    from diffusers import UNet2DConditionModel as TorchUNet

    from npdiffusion.models.unet.unet_2d_condition import UNet2DConditionModel

    torch = device.torch
    torch.manual_seed(0)
    with torch.device(device.torch_device):
        theirs = TorchUNet(**config)
    ours = UNet2DConditionModel(**config)
    load_from_torch(ours, theirs)
    return ours, theirs


def load_from_torch(ours, theirs):
    """Copy torch's weights into ours (device to device on the GPU, through __cuda_array_interface__)."""
    state = {k: (v.detach() if v.is_cuda else v.detach().numpy()) for k, v in theirs.state_dict().items()}
    ours.load_state_dict(state)


def make_inputs(device, shapes, cross_dim):
    """Host draws (NumPy) copied to both sides: latents, integer timesteps, context, target noise."""
    from npdiffusion.backend import asarray

    rng = np.random.default_rng(0)
    b, s, t = shapes["batch"], shapes["side"], shapes["tokens"]
    host = {"x": rng.standard_normal((b, 4, s, s)).astype(np.float32),
            "t": rng.integers(0, 1000, b).astype(np.int64),
            "ctx": rng.standard_normal((b, t, cross_dim)).astype(np.float32),
            "target": rng.standard_normal((b, 4, s, s)).astype(np.float32)}
    ours = {k: asarray(v) for k, v in host.items()}
    theirs = {k: device.torch.from_numpy(v).to(device.torch_device) for k, v in host.items()}
    return ours, theirs


# ----------------------------------------------------------------------------- rows
def train_rows(device, args, config, shapes, wanted):
    """train-fp32 and train-amp16: ours vs torch, one training step each call."""
    torch = device.torch
    import torch.nn.functional as F

    from npdiffusion.ops.losses import mse_loss_backward, mse_loss_forward
    from npdiffusion.optim.adamw import AdamW
    from npdiffusion.optim.mixed_precision import DynamicLossScaler, MasterWeights

    ours, theirs = build_pair(device, config)
    oi, ti = make_inputs(device, shapes, config["cross_attention_dim"])
    rows = []

    if "train-fp32" in wanted:
        out0 = ours(oi["x"], oi["t"], oi["ctx"])
        with torch.no_grad():
            err = rel_err(out0, theirs(ti["x"], ti["t"], ti["ctx"]).sample)
        opt = AdamW(ours, lr=1e-4)
        topt = torch.optim.AdamW(theirs.parameters(), lr=1e-4)

        def step_ours():
            ours.zero_grad()
            loss, cache = mse_loss_forward(ours(oi["x"], oi["t"], oi["ctx"]), oi["target"])
            ours.backward(mse_loss_backward(1.0, cache)[0])
            opt.step()

        def step_theirs():
            topt.zero_grad(set_to_none=True)
            F.mse_loss(theirs(ti["x"], ti["t"], ti["ctx"]).sample, ti["target"]).backward()
            topt.step()

        def fwd_bwd_theirs():
            theirs.zero_grad(set_to_none=True)
            F.mse_loss(theirs(ti["x"], ti["t"], ti["ctx"]).sample, ti["target"]).backward()

        flops = count_flops(torch, fwd_bwd_theirs)
        rows.append(measure(device, "train-fp32", step_ours, step_theirs, flops, err, args))
        del opt, topt

    if "train-amp16" in wanted:
        load_from_torch(ours, theirs)
        master = MasterWeights(ours, "float16")                   # ours now computes in float16
        opt = AdamW(master, lr=1e-4)
        scaler = DynamicLossScaler()
        x16, ctx16 = oi["x"].astype(np.float16), oi["ctx"].astype(np.float16)
        topt = torch.optim.AdamW(theirs.parameters(), lr=1e-4)
        tscaler = torch.amp.GradScaler(device.torch_device.type)
        autocast = torch.autocast(device.torch_device.type, dtype=torch.float16)
        out0 = ours(x16, oi["t"], ctx16)
        with torch.no_grad(), autocast:
            err = rel_err(out0, theirs(ti["x"], ti["t"], ti["ctx"]).sample)

        def step_ours():
            master.zero_grad()
            out = ours(x16, oi["t"], ctx16)
            loss, cache = mse_loss_forward(out.astype(np.float32), oi["target"])
            ours.backward(scaler.scale(mse_loss_backward(1.0, cache)[0], dtype=np.float16))
            scaler.step(opt)
            scaler.update()

        def loss_theirs():
            with autocast:
                out = theirs(ti["x"], ti["t"], ti["ctx"]).sample
            return F.mse_loss(out.float(), ti["target"])

        def step_theirs():
            topt.zero_grad(set_to_none=True)
            tscaler.scale(loss_theirs()).backward()
            tscaler.step(topt)
            tscaler.update()

        def fwd_bwd_theirs():                                     # the FLOP count: no optimizer step
            theirs.zero_grad(set_to_none=True)
            loss_theirs().backward()

        flops = count_flops(torch, fwd_bwd_theirs)
        row = measure(device, "train-amp16", step_ours, step_theirs, flops, err, args)
        row["note"] = f"skipped steps: ours {scaler.skipped_steps}, loss scale ours {scaler.get_scale():g} / " \
                      f"torch {tscaler.get_scale():g}"
        rows.append(row)
    return rows


def sd_rows(device, args, config, shapes, wanted):
    """sd-fwd-fp32 and sd-fwd-fp16: ours vs torch, one eval-mode forward each call."""
    torch = device.torch
    ours, theirs = build_pair(device, config)
    ours.eval()
    theirs.eval()
    oi, ti = make_inputs(device, shapes, config["cross_attention_dim"])
    rows = []
    for name, dtype in (("sd-fwd-fp32", None), ("sd-fwd-fp16", np.float16)):
        if name not in wanted:
            continue
        if dtype is not None:
            ours.to("float16")
            theirs.half()
            x, ctx = oi["x"].astype(np.float16), oi["ctx"].astype(np.float16)
            tx, tctx = ti["x"].half(), ti["ctx"].half()
        else:
            x, ctx, tx, tctx = oi["x"], oi["ctx"], ti["x"], ti["ctx"]

        def fwd_ours():
            return ours(x, oi["t"], ctx)

        def fwd_theirs():
            with torch.no_grad():
                return theirs(tx, ti["t"], tctx).sample

        err = rel_err(fwd_ours(), fwd_theirs())
        flops = count_flops(torch, fwd_theirs)
        rows.append(measure(device, name, fwd_ours, fwd_theirs, flops, err, args))
    return rows


def measure(device, name, ours, theirs, flops, err, args) -> dict:
    a, b = alternate(device, ours, theirs, args.warmup, args.repeats)
    ratios = [x / y for x, y in zip(a, b)]
    ours_ms, torch_ms = statistics.median(a), statistics.median(b)
    row = {"name": name, "ours_ms": ours_ms, "torch_ms": torch_ms, "ratio": statistics.median(ratios),
           "flops": flops, "ours_tflops": flops / (ours_ms * 1e-3) / 1e12,
           "torch_tflops": flops / (torch_ms * 1e-3) / 1e12, "rel_err": err, "repeats": len(a), "note": ""}
    print(format_row(row), flush=True)
    return row


HEADER = f"{'row':<12} {'ours ms':>10} {'torch ms':>10} {'ratio':>7} {'ours TF/s':>10} {'torch TF/s':>10} " \
         f"{'GFLOP':>9} {'rel err':>9}"


def format_row(r) -> str:
    return (f"{r['name']:<12} {r['ours_ms']:>10.2f} {r['torch_ms']:>10.2f} {r['ratio']:>7.2f} "
            f"{r['ours_tflops']:>10.3f} {r['torch_tflops']:>10.3f} {r['flops'] / 1e9:>9.1f} {r['rel_err']:>9.1e}"
            + (f"   {r['note']}" if r.get("note") else ""))


# ----------------------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                   help="gpu: CuPy vs torch CUDA (default); cpu: NumPy vs torch CPU (with --small)")
    p.add_argument("--small", action="store_true", help="tiny configs and shapes (a smoke test of the code paths)")
    p.add_argument("--only", action="append", choices=ROWS + ("train", "sd"), default=None,
                   help="run only these rows (repeatable; 'train' and 'sd' name both rows of a kind)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per side (default 10; 2 with --small)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per side first (default 2; 1 with --small)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convolutions on both sides")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.device == "cpu" and not args.small:
        p.error("--device cpu is a smoke test: add --small (the full sizes take minutes per call on a CPU)")
    args.repeats = args.repeats if args.repeats is not None else (2 if args.small else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.small else 2)
    if args.repeats < 1 or args.warmup < 0:
        p.error(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    wanted = set()
    for o in args.only or ROWS:
        wanted.update(r for r in ROWS if r == o or r.startswith(o + "-"))
    args.wanted = wanted
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        device = Device(args.device, args.tf32)
    except BenchError as exc:
        print(f"bench_gpu: error: {exc}", file=sys.stderr)
        return 2
    torch = device.torch
    versions = {"torch": torch.__version__, "numpy": np.__version__,
                "cupy": device.cupy.__version__ if device.cupy is not None else None}
    print(f"device: {device.name}; torch {versions['torch']}, cupy {versions['cupy']}, numpy {versions['numpy']}; "
          f"TF32 {'on' if device.tf32 else 'off'}; {args.repeats} timed calls per side after {args.warmup} warm-up")
    print(HEADER, flush=True)
    started = time.perf_counter()
    rows = []
    train_cfg, train_shapes = (SMALL_TRAIN_CONFIG, SMALL_TRAIN_SHAPES) if args.small else (TRAIN_CONFIG, TRAIN_SHAPES)
    sd_cfg, sd_shapes = (SMALL_SD_CONFIG, SMALL_SD_SHAPES) if args.small else (SD15_CONFIG, SD15_SHAPES)
    if args.wanted & {"train-fp32", "train-amp16"}:
        rows += train_rows(device, args, train_cfg, train_shapes, args.wanted)
    if args.wanted & {"sd-fwd-fp32", "sd-fwd-fp16"}:
        rows += sd_rows(device, args, sd_cfg, sd_shapes, args.wanted)
    seconds = time.perf_counter() - started
    print(f"({seconds:.1f} s in all; ratio = median of per-pair ours / torch; targets: train-fp32 <= 1.5, "
          "sd-fwd-fp16 <= 1.5)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device.name, "kind": args.device, "small": args.small, "tf32": device.tf32,
                       "versions": versions, "seconds": seconds, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
