"""Draw the forward process on a synthetic image: docs/images/forward_process.png.

Top row: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (q_sample) at several t, DDPM's linear
schedule (1e-4 .. 0.02, T = 1000). Bottom row: the same chain built step by step with the classic
slip, noise scaled by the variance beta_t instead of the standard deviation sqrt(beta_t): the image
fades to grey and never becomes noise (docs/diffusion.md, "A common slip").

Deterministic (a drawn image, NumPy noise from seed 0); no torch. Usage:

    python tools/plot_forward_process.py [--out docs/images/forward_process.png]
"""
from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from npdiffusion.diffusion.forward import q_sample
from npdiffusion.diffusion.schedules import alphas_cumprod, betas_for

SIDE = 88                       # pixels per panel
TIMESTEPS = (0, 50, 100, 200, 350, 500, 750, 999)


def synthetic_image(side: int = SIDE) -> np.ndarray:
    """A deterministic RGB picture in [-1, 1], (3, side, side): sky gradient, sun, house, grass."""
    img = Image.new("RGB", (side, side))
    draw = ImageDraw.Draw(img)
    for y in range(side):                                   # sky: dark blue to light blue
        f = y / (side - 1)
        draw.line([(0, y), (side, y)], fill=(int(30 + 120 * f), int(60 + 140 * f), int(140 + 100 * f)))
    s = side / 80.0
    draw.rectangle([0, int(60 * s), side, side], fill=(40, 150, 60))                       # grass
    draw.ellipse([int(52 * s), int(8 * s), int(72 * s), int(28 * s)], fill=(250, 210, 40))  # sun
    draw.rectangle([int(14 * s), int(38 * s), int(44 * s), int(64 * s)], fill=(200, 60, 50))  # house
    draw.polygon([(int(10 * s), int(40 * s)), (int(29 * s), int(22 * s)), (int(48 * s), int(40 * s))],
                 fill=(120, 40, 30))                                                       # roof
    draw.rectangle([int(25 * s), int(50 * s), int(33 * s), int(64 * s)], fill=(70, 40, 20))  # door
    return np.asarray(img, dtype=np.float64).transpose(2, 0, 1) / 127.5 - 1.0


def to_uint8(x: np.ndarray) -> np.ndarray:
    """(3, H, W) in about [-1, 1] -> (H, W, 3) uint8, clipped as diffusers' postprocessing does."""
    return (np.clip(x * 0.5 + 0.5, 0.0, 1.0) * 255.0).round().astype(np.uint8).transpose(1, 2, 0)


def render(out_path: str) -> str:
    betas = betas_for("linear", 1000).astype(np.float64)
    abar = alphas_cumprod(betas).astype(np.float64)
    rng = np.random.default_rng(0)
    x0 = synthetic_image()[None]                            # (1, 3, H, W)
    eps = rng.standard_normal(x0.shape)
    correct = [q_sample(x0, t, abar, eps)[0] for t in TIMESTEPS]
    # The slip, step by step: x_t = sqrt(1 - beta_t) x_{t-1} + beta_t eps_t.
    slip, x = [], x0[0]
    for t in range(max(TIMESTEPS) + 1):
        x = np.sqrt(1.0 - betas[t]) * x + betas[t] * rng.standard_normal(x.shape)
        if t in TIMESTEPS:
            slip.append(x0[0] if t == 0 else x)

    cols, line = len(TIMESTEPS), 12
    titles = ("q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps",
              "the slip: x_t = sqrt(1 - beta_t) x_(t-1) + beta_t eps  (variance used as the std)")
    heights = (line + SIDE + 2 * line + 6, line + SIDE + 6)          # title, panels, (labels)
    canvas = Image.new("RGB", (cols * (SIDE + 4) + 4, sum(heights) + 4), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    y0 = 4
    for r, row in enumerate((correct, slip)):
        draw.text((4, y0), titles[r], fill=(0, 0, 0) if r == 0 else (170, 0, 0), font=font)
        for c, (t, x) in enumerate(zip(TIMESTEPS, row)):
            x_pos = 4 + c * (SIDE + 4)
            canvas.paste(Image.fromarray(to_uint8(x)), (x_pos, y0 + line + 2))
            if r == 0:
                draw.text((x_pos + 2, y0 + line + SIDE + 3), f"t = {t}", fill="black", font=font)
                draw.text((x_pos + 2, y0 + 2 * line + SIDE + 3), f"abar = {abar[t]:.3f}", fill="black", font=font)
        y0 += heights[r]
    # Noise does not compress: a 128-colour palette keeps the file small.
    small = canvas.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    small.save(out_path, optimize=True)
    return out_path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "images",
                                                      "forward_process.png"))
    path = render(os.path.normpath(parser.parse_args().out))
    print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
