"""Tiny line plots with Pillow (no matplotlib): loss curves with axes, ticks, labels and a legend.

    from npdiffusion.plotting import line_plot, save_png
    image = line_plot({"train": losses, "held-out": (eval_steps, eval_losses)},
                      title="toy denoiser", xlabel="step", ylabel="loss", logy=True)
    save_png(image, "out/losses.png")          # atomic: complete file or none

A series is ``y`` (plotted against 0, 1, 2, ...) or a pair ``(x, y)`` of equal-length 1-D sequences;
non-finite points break the line instead of wrecking the axes. Tick positions are "nice" numbers
(1, 2 or 5 times a power of ten; powers of ten on a log axis). Used by ``npdiffusion toy`` and by
later training commands for their loss curves (docs/cli.md).
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy
from PIL import Image, ImageDraw, ImageFont

SUPERSAMPLE = 2  # drawing scale before the final down-sampling (anti-aliasing)

# Matplotlib's "tab10" colours: distinguishable, and familiar to readers of loss plots.
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf"]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable bundled font
    except TypeError:
        return ImageFont.load_default()


def _as_xy(name, s):
    if isinstance(s, tuple) and len(s) == 2:
        x, y = (numpy.asarray(v, dtype=numpy.float64) for v in s)
    else:
        y = numpy.asarray(s, dtype=numpy.float64)
        x = numpy.arange(y.size, dtype=numpy.float64)
    if x.ndim != 1 or y.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"line_plot: series {name!r} must be y or (x, y) with equal 1-D lengths, "
                         f"got x shape {x.shape} and y shape {y.shape}")
    return x, y


def nice_ticks(lo: float, hi: float, target: int = 6) -> list:
    """About ``target`` round tick values covering [lo, hi] (steps of 1, 2 or 5 times 10^k)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"nice_ticks: limits must be finite, got {lo!r}, {hi!r}")
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(target - 1, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10)), key=lambda st: abs(math.log(st / raw)))
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    k = 0
    while first + k * step <= hi + 1e-9 * step:
        ticks.append(round(first + k * step, 12))
        k += 1
    return ticks


def _log_ticks(lo: float, hi: float) -> list:
    """Tick values for a log10 axis spanning [10^lo, 10^hi]: powers of ten over long spans,
    1-2-5 over a few decades, round linear values within less than a decade."""
    if hi - lo < 1.0:
        return [t for t in nice_ticks(10.0 ** lo, 10.0 ** hi) if t > 0]
    mults = (1, 2, 5) if hi - lo < 2.5 else (1,)
    ticks = []
    for e in range(math.floor(lo), math.ceil(hi) + 1):
        ticks += [m * 10.0 ** e for m in mults if lo - 1e-9 <= math.log10(m * 10.0 ** e) <= hi + 1e-9]
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        return f"{v:.0e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{v:.6g}"


def line_plot(series: Mapping, *, title: str | None = None, xlabel: str | None = None,
              ylabel: str | None = None, logy: bool = False, size=(800, 480),
              colors=None) -> Image.Image:
    """Draw the named ``series`` as lines on one pair of axes; returns an RGB ``PIL.Image``.

    ``logy`` puts y on a log10 axis (only positive values are drawn). ``size`` is (width, height)
    in pixels. Raises ValueError when there is nothing finite to draw.
    """
    if not isinstance(series, Mapping) or not series:
        raise ValueError("line_plot: series must be a non-empty mapping of name -> y or (x, y)")
    width, height = (int(v) for v in size)
    if width < 200 or height < 150:
        raise ValueError(f"line_plot: size must be at least (200, 150) pixels, got {size!r}")
    colors = list(colors or COLORS)
    data = {}
    for name, s in series.items():
        x, y = _as_xy(name, s)
        ok = numpy.isfinite(x) & numpy.isfinite(y) & ((y > 0) if logy else True)
        data[name] = (x, numpy.log10(numpy.where(ok, y, 1.0)) if logy else y, ok)
    finite = [(x[ok], y[ok]) for x, y, ok in data.values() if ok.any()]
    if not finite:
        raise ValueError("line_plot: no finite" + (" positive" if logy else "") + " point to draw")
    xs = numpy.concatenate([x for x, _ in finite])
    ys = numpy.concatenate([y for _, y in finite])
    x0, x1 = float(xs.min()), float(xs.max())
    y0, y1 = float(ys.min()), float(ys.max())
    if x1 == x0:
        x0, x1 = x0 - 1.0, x1 + 1.0
    if y1 == y0:
        pad = abs(y0) * 0.1 or 1.0
        y0, y1 = y0 - pad, y1 + pad
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad

    # Drawn at SUPERSAMPLE times the size and scaled down at the end: smooth, anti-aliased lines.
    sc = SUPERSAMPLE
    font, small = _font(16 * sc), _font(13 * sc)
    image = Image.new("RGB", (width * sc, height * sc), "white")
    draw = ImageDraw.Draw(image)
    left, right = 78 * sc, (width - 20) * sc
    top, bottom = (44 if title else 20) * sc, (height - (58 if xlabel else 40)) * sc

    def px(x):
        return left + (x - x0) / (x1 - x0) * (right - left)

    def py(y):
        return bottom - (y - y0) / (y1 - y0) * (bottom - top)

    # grid, ticks and tick labels
    yticks = _log_ticks(y0, y1) if logy else nice_ticks(y0, y1)
    for t in yticks:
        yy = py(math.log10(t) if logy else t)
        draw.line([(left, yy), (right, yy)], fill="#e6e6e6", width=sc)
        draw.line([(left - 5 * sc, yy), (left, yy)], fill="black", width=sc)
        draw.text((left - 8 * sc, yy), _fmt(t), fill="black", font=small, anchor="rm")
    for t in nice_ticks(x0, x1):
        xx = px(t)
        draw.line([(xx, top), (xx, bottom)], fill="#e6e6e6", width=sc)
        draw.line([(xx, bottom), (xx, bottom + 5 * sc)], fill="black", width=sc)
        draw.text((xx, bottom + 8 * sc), _fmt(t), fill="black", font=small, anchor="mt")
    draw.rectangle([left, top, right, bottom], outline="black", width=sc)

    # the lines, broken at non-finite points
    for k, (name, (x, y, ok)) in enumerate(data.items()):
        color = colors[k % len(colors)]
        points = numpy.stack([px(x), py(numpy.where(ok, y, y0))], axis=1)     # (P, 2) pixels
        edges = numpy.flatnonzero(numpy.diff(ok.astype(numpy.int8))) + 1     # where ok flips
        for run_points, run_ok in zip(numpy.split(points, edges), numpy.split(ok, edges)):
            if run_ok.size and run_ok[0]:
                _polyline(draw, [tuple(p) for p in run_points.tolist()], color, 2 * sc)

    # title, axis labels, legend
    if title:
        draw.text(((left + right) / 2, 12 * sc), title, fill="black", font=font, anchor="mt")
    if xlabel:
        draw.text(((left + right) / 2, (height - 8) * sc), xlabel, fill="black", font=font, anchor="mb")
    if ylabel:
        label = Image.new("RGB", (int(draw.textlength(ylabel, font=font)) + 4 * sc, 22 * sc), "white")
        ImageDraw.Draw(label).text((2 * sc, 2 * sc), ylabel, fill="black", font=font)
        label = label.rotate(90, expand=True)
        image.paste(label, (4 * sc, int((top + bottom) / 2 - label.height / 2)))
    names = list(data)
    box_w = max(int(draw.textlength(n, font=small)) for n in names) + 40 * sc
    box_h = (18 * len(names) + 8) * sc
    bx, by = right - box_w - 8 * sc, top + 8 * sc
    draw.rectangle([bx, by, bx + box_w, by + box_h], fill="white", outline="#999999", width=sc)
    for k, name in enumerate(names):
        yy = by + (13 + 18 * k) * sc
        draw.line([(bx + 6 * sc, yy), (bx + 26 * sc, yy)], fill=colors[k % len(colors)], width=3 * sc)
        draw.text((bx + 32 * sc, yy), name, fill="black", font=small, anchor="lm")
    return image.resize((width, height), Image.LANCZOS)


def _polyline(draw, points, color, width):
    if len(points) == 1:
        (x, y), = points
        draw.ellipse([x - width, y - width, x + width, y + width], fill=color)
    elif points:
        draw.line(points, fill=color, width=width, joint="curve")


def save_png(image: Image.Image, path) -> None:
    """Write ``image`` as a PNG at ``path`` atomically: the file appears complete or not at all."""
    import io  # noqa: PLC0415

    from npdiffusion.io.atomic import atomic_write_bytes  # noqa: PLC0415

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
