"""Study: attribute accuracy and time versus the number of denoising steps, for every sampler.

    python tools/study_steps.py --model demo-out/model            # docs/images/study_steps.{png,md}

Shapes: P prompts x S seeds = N images (32 x 32 x 3), prompt-major; latents (N, C, 8, 8).

For each scheduler of ``npdiffusion.schedulers`` (DDPM, DDIM, PNDM/PLMS, Euler, Euler ancestral, Heun,
DPM-Solver++ multistep; built from the model's scheduler config, DDPM/DDIM without clipping, PNDM
with ``skip_prk_steps`` as Stable Diffusion sets it) and each step count in --steps (default 2, 4,
8, 16, 32, 64, 250), the same N images (fixed prompts, one NumPy seed per image) are generated with
classifier-free guidance --guidance (default the demo's 4.0) and scored by the attribute checker.
Time is the wall time of the whole batch divided by N (seconds per image, text encoding and VAE
decoding included); "U-Net calls" is the number of guided model evaluations per image (Heun calls the
model twice per step except the last: 2S - 1).

Figure: one panel per scheduler (accuracy of colour, shape, position and all three against log2 of
the steps), and a last panel with every scheduler's joint accuracy against seconds per image (which
sampler gets there first). Table: one row per (scheduler, steps).
"""
from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import study_common as sc  # noqa: E402

STEPS = [2, 4, 8, 16, 32, 64, 250]
QUICK_STEPS = [2, 3]
HEADERS = ["scheduler", "steps", "U-Net calls", "colour", "shape", "position", "all three", "s / image"]


def parse(argv):
    p = sc.add_common_args(__doc__.splitlines()[0], "docs/images/study_steps.png")
    p.add_argument("--steps", type=sc.int_list, default=None,
                   help=f"comma-separated step counts (default {','.join(map(str, STEPS))}; --quick 2,3)")
    p.add_argument("--schedulers", default=None,
                   help=f"comma-separated subset of {','.join(sc.SCHEDULERS)} (default: all that take the model's "
                        "prediction type; PNDM and Euler-A take epsilon and v only, as in diffusers)")
    p.add_argument("--guidance", type=float, default=sc.GUIDANCE_SCALE,
                   help=f"classifier-free guidance scale (default {sc.GUIDANCE_SCALE}, the demo's)")
    return p.parse_args(argv)


def run(argv=None) -> dict:
    """Run the study; returns {(scheduler, steps): {"colour", "shape", "position", "joint", "seconds", "calls"}}."""
    args = parse(argv)
    png, md = sc.out_paths(args.out)
    names = [s.strip() for s in (args.schedulers or ",".join(sc.SCHEDULERS)).split(",") if s.strip()]
    for n in names:
        if n not in sc.SCHEDULERS:
            raise sc.StudyError(f"--schedulers: {n!r} is not one of {', '.join(sc.SCHEDULERS)}")
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    pipe = sc.load_pipeline(args.model)
    base = dict(pipe.scheduler.config)
    if args.schedulers is None:                                         # the default: what the model allows
        names = [n for n in names if sc.takes_prediction_type(n, base)]
    prompts, seeds, flat = sc.prompts_and_seeds(args)
    sc.generate(pipe, prompts[:1], seeds[:1], args.guidance, 2)       # warm-up: the first timed row is not penalised
    results = {}
    for name in names:
        for n in steps:
            pipe.scheduler = sc.make_scheduler(name, base)
            pipe.scheduler.set_timesteps(n)
            calls = len(pipe.scheduler.timesteps)
            with sc.Timer() as t:
                images = sc.generate(pipe, prompts, seeds, args.guidance, n)
            r = sc.score_images(images, flat)
            r.update(seconds=t.seconds / len(flat), calls=calls)
            results[(name, n)] = r
            print(f"{name:>12} {n:>4} steps: joint {sc.pct(r['joint'])}, {r['seconds']:.3f} s/image", flush=True)
    rows = [[name, n, r["calls"], sc.pct(r["colour"]), sc.pct(r["shape"]), sc.pct(r["position"]),
             sc.pct(r["joint"]), f"{r['seconds']:.3f}"] for (name, n), r in results.items()]
    notes = (f"{len(prompts)} prompts x {len(seeds)} seeds = {len(flat)} images per row (the demo's evaluation "
             f"prompts, seeds 0..{len(seeds) - 1}), classifier-free guidance {args.guidance:g}, model {args.model}. "
             "Accuracy read by npdiffusion.evaluation.shape_attributes; s / image = wall time of the batch / images.")
    sc.write_table(md, "Accuracy and time versus steps, per scheduler", sc.markdown_table(HEADERS, rows), notes)
    sc.save_figure(figure(results, names, steps), png)
    return results


def figure(results: dict, names: list, steps: list):
    """One accuracy-vs-log2(steps) panel per scheduler, then joint accuracy vs seconds per image."""
    from npdiffusion.plotting import line_plot  # noqa: PLC0415

    size = (520, 340)
    x = [math.log2(n) for n in steps]
    panels = []
    for name in names:
        series = {label: (x, [100.0 * results[(name, n)][key] for n in steps])
                  for key, label in (("colour", "colour"), ("shape", "shape"), ("position", "position"),
                                     ("joint", "all three"))}
        panels.append(line_plot(series, title=name, xlabel="log2(steps)", ylabel="accuracy %", size=size))
    frontier = {name: ([results[(name, n)]["seconds"] for n in steps],
                       [100.0 * results[(name, n)]["joint"] for n in steps]) for name in names}
    panels.append(line_plot(frontier, title="all three right vs time", xlabel="seconds per image",
                            ylabel="accuracy %", size=size))
    return sc.paste_grid(panels, cols=min(4, len(panels)))


def main(argv=None) -> int:
    return sc.run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
