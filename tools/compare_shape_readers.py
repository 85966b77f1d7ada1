"""The shape reader before and after 2026-12-07 on a demo model's own samples, with a picture of where they differ.

    python tools/compare_shape_readers.py --model demo-out/model [--also MORE/model ...] --out docs/images/shape_reader.png

Shape legend: N = 50 prompts x 4 seeds = 200 images per model, uint8 (N, 32, 32, 3).

Each model samples the demo report's 200 images (``training.demo.evaluate``'s prompts, seeds, sampler,
steps and guidance; ``--guidance``, ``--prompts``, ``--seeds`` change them, ``--quick`` is a smoke test). Every image is read once
(``shape_attributes.read_attributes``) and its shape decided twice:

* **fill ratio** (the reader until 2026-12-07): foreground / bounding-box area, a triangle below 0.64,
  a square from 0.92, a circle between (``FILL_TRIANGLE_BELOW``, ``FILL_SQUARE_FROM``);
* **template fit** (the reader now): the best intersection over union with the renderer's own masks at
  the foreground's area and centroid (docs/training.md, "Quality checks").

Printed and written to OUT.md: per model, the shape and all-three accuracy under both, and how the
images they disagree on were read (prompted shape: fill ratio -> template). OUT.png shows up to
``--show`` of those images, enlarged, each labelled with its prompt and both readings, so that a reader
of the docs can judge them by eye. Docs: docs/benchmarks.md ("The shape reader").
"""
from __future__ import annotations

import collections
import os
import sys

import numpy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import study_common as sc  # noqa: E402

FILL_TRIANGLE_BELOW = 0.64      # the thresholds of the reader until 2026-12-07
FILL_SQUARE_FROM = 0.92


def fill_ratio_shapes(fill) -> list:
    """The old reader's shape of each image from its fill ratio (N,) (NaN: no foreground -> None)."""
    kind = numpy.where(fill < FILL_TRIANGLE_BELOW, "triangle", numpy.where(fill >= FILL_SQUARE_FROM, "square", "circle"))
    return [None if numpy.isnan(f) else str(k) for f, k in zip(fill.tolist(), kind.tolist())]


def compare(model: str, guidance: float, prompts: list, seeds: list, flat: list) -> dict:
    """Both readings of ``model``'s report samples: accuracies, the disagreements and their images."""
    from npdiffusion.evaluation.shape_attributes import parse_prompt, read_attributes  # noqa: PLC0415
    from npdiffusion.training.demo import eval_scheduler  # noqa: PLC0415

    pipe = sc.load_pipeline(model)
    pipe.scheduler = eval_scheduler(pipe.scheduler.config)
    images = sc.generate(pipe, prompts, seeds, guidance, sc.EVAL_STEPS)
    read = read_attributes(images)
    want = [parse_prompt(p) for p in flat]
    old = fill_ratio_shapes(read.fill_ratio)
    rest = [read.color[i] == w[0] and read.position[i] == w[2] for i, w in enumerate(want)]
    out = {"model": model, "n": len(flat)}
    for name, shapes in (("fill", old), ("template", read.shape)):
        right = [s == w[1] for s, w in zip(shapes, want)]
        out[name] = {"shape": float(numpy.mean(right)), "joint": float(numpy.mean([a and b for a, b in zip(right, rest)]))}
    differ = [i for i in range(len(flat)) if old[i] != read.shape[i]]
    out["disagreements"] = collections.Counter(f"{want[i][1]}: {old[i]} -> {read.shape[i]}" for i in differ)
    out["examples"] = [(images[i], flat[i], old[i], read.shape[i], float(read.fill_ratio[i]), float(read.shape_iou[i]))
                       for i in differ]
    return out


def picture(examples: list, path: str) -> None:
    from PIL import Image  # noqa: PLC0415

    from npdiffusion.pipelines.image_utils import image_grid  # noqa: PLC0415

    tiles = [Image.fromarray(img) for img, *_ in examples]
    labels = [f"{prompt[2:]}: fill {fill:.2f} -> {old}; fit {iou:.2f} -> {new}"
              for _, prompt, old, new, fill, iou in examples]
    sc.save_figure(image_grid(tiles, labels, cols=4, min_tile=160, font_size=10), path)


def run(args) -> str:
    prompts, seeds, flat = sc.prompts_and_seeds(args)
    results = [compare(m, args.guidance, prompts, seeds, flat) for m in [args.model, *args.also]]
    rows = [[r["model"], sc.pct(r["fill"]["shape"]), sc.pct(r["template"]["shape"]), sc.pct(r["fill"]["joint"]),
             sc.pct(r["template"]["joint"]), "; ".join(f"{k} ({v})" for k, v in sorted(r["disagreements"].items())) or "-"]
            for r in results]
    table = sc.markdown_table(["model", "shape: fill ratio", "shape: template", "all three: fill ratio",
                               "all three: template", "disagreements (prompted: fill -> template)"], rows)
    png, md = sc.out_paths(args.out)
    examples = [e for r in results for e in r["examples"]][:args.show]
    if examples:
        picture(examples, png)
    return sc.write_table(md, f"The shape reader: fill ratio against template fit ({len(prompts)} prompts x "
                          f"{len(seeds)} seeds, {sc.EVAL_STEPS} steps, guidance {args.guidance:g})", table)


def main(argv=None) -> int:
    p = sc.add_common_args(__doc__.splitlines()[0], "shape_reader.png")
    p.add_argument("--also", action="append", default=[], metavar="DIR", help="another model folder (repeatable)")
    p.add_argument("--guidance", type=float, default=sc.GUIDANCE_SCALE, help="guidance scale (the report's)")
    p.add_argument("--show", type=sc.positive_int, default=16, help="disagreements drawn in OUT.png")
    return sc.run_main(lambda av: run(p.parse_args(av)), argv)


if __name__ == "__main__":
    sys.exit(main())
