"""``npdiffusion toy [--steps N] [--out DIR] [--seed K]``: train a tiny conv denoiser on 8x8 shapes.

The interim "main job": a diffusion-style training loop small enough to finish in seconds on a CPU,
built from the library's hand-written pieces (Conv2d, Linear, SiLU, AdamW).

Data: 8x8 one-channel images of random squares, plus signs, discs and rings at random places, pixels
-1 (background) or +1 (shape). Each step draws a fresh batch x0, a noise level s ~ U(0.1, 0.9) per
image and noise eps, and forms x_t = sqrt(1 - s^2) x0 + s eps (a DDPM-style noisy image).

Model (``ToyDenoiser``), predicting eps from (x_t, s):

    h   = conv_in(x_t) + noise_proj(s)[:, :, None, None]      Conv2d 1->C 3x3 pad 1; Linear 1->C
    out = conv_out(SiLU(h))                                    Conv2d C->1 3x3 pad 1

Loss: mean squared error to eps (predicting zero scores 1.0). Optimizer: AdamW.
Shapes: B batch, C hidden channels, 8x8 images; x (B, 1, 8, 8), s (B, 1), h (B, C, 8, 8).
Prints the running loss on a progress bar, then one summary line with the first and last loss;
with ``--out DIR`` writes ``DIR/losses.png`` (PIL line plot) and ``DIR/losses.csv``, atomically.
Docs: docs/cli.md.
"""
from __future__ import annotations

import math
import os
import time

import numpy

from npdiffusion.backend import asarray, get_backend, xp
from npdiffusion.nn.module import Module

SIDE = 8


# ------------------------------------------------------------------------------------- data
def make_shapes(rng, batch: int) -> numpy.ndarray:
    """``batch`` random 8x8 shape images in {-1, +1}, float32 (batch, 1, 8, 8), vectorized."""
    yy, xx = numpy.mgrid[0:SIDE, 0:SIDE].astype(numpy.float32)           # (8, 8)
    kind = rng.integers(0, 4, size=(batch, 1, 1))
    cy = rng.uniform(1.5, SIDE - 2.5, size=(batch, 1, 1)).astype(numpy.float32)
    cx = rng.uniform(1.5, SIDE - 2.5, size=(batch, 1, 1)).astype(numpy.float32)
    r = rng.uniform(1.2, 2.6, size=(batch, 1, 1)).astype(numpy.float32)
    dy, dx = yy - cy, xx - cx                                            # (batch, 8, 8)
    dist2 = dy * dy + dx * dx
    square = (numpy.abs(dy) <= r * 0.8) & (numpy.abs(dx) <= r * 0.8)
    plus = ((numpy.abs(dy) <= 0.6) & (numpy.abs(dx) <= r)) | ((numpy.abs(dx) <= 0.6) & (numpy.abs(dy) <= r))
    disc = dist2 <= r * r
    ring = disc & (dist2 >= (r - 1.0) ** 2)
    mask = numpy.select([kind == 0, kind == 1, kind == 2], [square, plus, disc], ring)
    return numpy.where(mask, 1.0, -1.0).astype(numpy.float32)[:, None]


def make_batch(rng, batch: int):
    """(x_t, s, eps) on the backend: x_t (B, 1, 8, 8), s (B, 1), eps (B, 1, 8, 8), float32."""
    x0 = make_shapes(rng, batch)
    s = rng.uniform(0.1, 0.9, size=(batch, 1)).astype(numpy.float32)
    eps = rng.standard_normal(x0.shape).astype(numpy.float32)
    x_t = numpy.sqrt(1.0 - s * s)[:, :, None, None] * x0 + s[:, :, None, None] * eps
    return asarray(x_t), asarray(s), asarray(eps)


# ------------------------------------------------------------------------------------ model
class ToyDenoiser(Module):
    """eps_hat = conv_out(SiLU(conv_in(x_t) + noise_proj(s))); x_t (B, 1, 8, 8), s (B, 1)."""

    def __init__(self, channels: int = 32):
        from npdiffusion.nn.activations import SiLU  # noqa: PLC0415 - see _require_layers
        from npdiffusion.nn.conv import Conv2d  # noqa: PLC0415
        from npdiffusion.nn.linear import Linear  # noqa: PLC0415

        super().__init__()
        self.conv_in = Conv2d(1, channels, 3, padding=1)
        self.noise_proj = Linear(1, channels)
        self.act = SiLU()
        self.conv_out = Conv2d(channels, 1, 3, padding=1)

    def forward(self, x_t, s):
        h = self.conv_in(x_t)                                    # (B, C, 8, 8)
        h += self.noise_proj(s)[:, :, None, None]                # broadcast over pixels
        return self.conv_out(self.act(h))                        # (B, 1, 8, 8)

    def backward(self, grad):
        """grad (B, 1, 8, 8) -> (d x_t, d s); accumulates every parameter gradient."""
        dh = self.act.backward(self.conv_out.backward(grad))     # (B, C, 8, 8)
        ds = self.noise_proj.backward(dh.sum(axis=(2, 3)))       # (B, 1)
        dx = self.conv_in.backward(dh)
        return dx, ds


def mse(pred, target):
    """(loss, dloss/dpred) of mean((pred - target)^2), the gradient freshly allocated."""
    diff = pred - target
    loss = float(xp.mean(diff * diff))
    diff *= 2.0 / diff.size
    return loss, diff


def _require_layers():
    """Import the layers the toy model needs, turning a missing one into a one-line error."""
    from npdiffusion.cli import CommandError  # noqa: PLC0415

    for path in ("npdiffusion.nn.conv", "npdiffusion.nn.activations", "npdiffusion.optim.adamw"):
        try:
            __import__(path)
        except ModuleNotFoundError as exc:
            if exc.name != path:
                raise
            raise CommandError(f"this build of npdiffusion has no {path} yet, which the toy model needs") from None


# -------------------------------------------------------------------------------- command
def add_parser(subparsers):
    p = subparsers.add_parser(
        "toy", help="train a tiny conv denoiser on generated 8x8 shapes (the interim main job)",
        description="Train a 2-layer conv net (Conv2d 3x3 -> SiLU -> Conv2d, noise level through a "
                    "Linear) to predict the noise added to generated 8x8 shapes, with AdamW. Shows "
                    "the running loss, prints the first and last loss, and with --out writes "
                    "losses.png and losses.csv.")
    p.add_argument("--steps", type=int, default=600, metavar="N", help="training steps (default 600)")
    p.add_argument("--batch-size", type=int, default=64, metavar="B", help="images per step (default 64)")
    p.add_argument("--channels", type=int, default=32, metavar="C", help="hidden channels (default 32)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    p.add_argument("--seed", type=int, default=0, metavar="K", help="seed of weights and data (default 0)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="folder for losses.png and losses.csv (created if missing)")
    return p


def _check_args(args):
    for name in ("steps", "batch_size", "channels"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive int, got {value}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    from npdiffusion.memory import check_memory, toy_bytes  # noqa: PLC0415

    check_memory(f"training with --batch-size {args.batch_size} --channels {args.channels}",
                 toy_bytes(args.batch_size, args.channels), "lower --batch-size or --channels")


def run(args) -> int:
    from tqdm import tqdm  # noqa: PLC0415

    from npdiffusion.cli import CommandError  # noqa: PLC0415
    from npdiffusion.random import manual_seed  # noqa: PLC0415

    _check_args(args)
    _require_layers()
    from npdiffusion.optim.adamw import AdamW  # noqa: PLC0415

    if args.out is not None:  # fail now, not after training
        from npdiffusion.io.atomic import check_writable  # noqa: PLC0415

        os.makedirs(args.out, exist_ok=True)
        check_writable(args.out)

    manual_seed(args.seed)
    model = ToyDenoiser(args.channels)
    optimizer = AdamW(model, lr=args.lr, weight_decay=1e-4)
    data_rng = numpy.random.default_rng(args.seed)
    held_out = make_batch(numpy.random.default_rng([args.seed, 1]), 256)

    def evaluate():
        model.eval()
        loss, _ = mse(model(held_out[0], held_out[1]), held_out[2])
        model.train()
        return loss

    eval_every = max(1, args.steps // 20)
    train_losses, eval_steps, eval_losses = [], [0], [evaluate()]
    running = None
    start = time.perf_counter()
    bar = tqdm(range(1, args.steps + 1), desc="toy", unit="step", disable=None, dynamic_ncols=True)
    for step in bar:
        x_t, s, eps = make_batch(data_rng, args.batch_size)
        loss, dpred = mse(model(x_t, s), eps)
        if not math.isfinite(loss):
            raise CommandError(f"the loss became {loss} at step {step}; try a smaller --lr")
        model.zero_grad()
        model.backward(dpred)
        optimizer.step()
        train_losses.append(loss)
        running = loss if running is None else 0.95 * running + 0.05 * loss
        if step % 10 == 0 or step == args.steps:
            bar.set_postfix(loss=f"{running:.4f}")
        if step % eval_every == 0 or step == args.steps:
            eval_steps.append(step)
            eval_losses.append(evaluate())
    bar.close()
    seconds = time.perf_counter() - start

    first, last = train_losses[0], float(numpy.mean(train_losses[-max(1, args.steps // 20):]))
    summary = (f"toy: {args.steps} steps in {seconds:.1f} s on {get_backend()}: train loss {first:.4f} -> "
               f"{last:.4f}, held-out loss {eval_losses[0]:.4f} -> {eval_losses[-1]:.4f}")
    if args.out is not None:
        _write_outputs(args.out, train_losses, eval_steps, eval_losses)
        summary += f"; wrote {os.path.join(args.out, 'losses.png')}"
    print(summary)
    return 0


def _write_outputs(out, train_losses, eval_steps, eval_losses):
    from npdiffusion.io.atomic import atomic_write_text  # noqa: PLC0415
    from npdiffusion.plotting import line_plot, save_png  # noqa: PLC0415

    steps = numpy.arange(1, len(train_losses) + 1)
    losses = numpy.asarray(train_losses)
    window = max(1, len(losses) // 25)
    smooth = numpy.convolve(losses, numpy.ones(window) / window, mode="valid")      # running mean
    image = line_plot({"train (per step)": (steps, losses),
                       f"train (mean of {window})": (steps[window - 1:], smooth),
                       "held-out": (numpy.asarray(eval_steps), numpy.asarray(eval_losses))},
                      title="npdiffusion toy: 8x8 shape denoiser", xlabel="step",
                      ylabel="loss (MSE to the noise)", logy=True)
    save_png(image, os.path.join(out, "losses.png"))
    held = dict(zip(eval_steps, eval_losses))
    rows = ["step,train_loss,heldout_loss", f"0,,{held[0]!r}"]
    rows += [f"{k},{v!r},{held[k]!r}" if k in held else f"{k},{v!r}," for k, v in enumerate(train_losses, 1)]
    atomic_write_text(os.path.join(out, "losses.csv"), "\n".join(rows) + "\n")
