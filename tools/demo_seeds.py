"""The demo over several training seeds: time per stage and accuracy per attribute, at several samplings.

    python tools/demo_seeds.py --seeds 0,1,2 --work demo-seeds              # a table for docs/benchmarks.md
    python tools/demo_seeds.py --seeds 0,1,2 --work demo-seeds --write-spread   # ... and the report's spread
    python tools/demo_seeds.py --models A/model,B/model                      # score model folders only

Per seed S: ``npdiffusion demo --seed S --out WORK/seed-S --no-progress [--processes N]`` (skipped when
WORK/seed-S/report.json exists, so a stopped run resumes), then its model is sampled again:

* the report's sampling (its ``report.json``: the demo's sampler, steps and guidance, and scale 1),
  not redone;
* the model folder's own scheduler (the one written with it: the demo's DPM-Solver++ 2M SDE on the training schedule and
  prediction type, as diffusers loads it) with ``--steps`` steps at each ``--guidance`` scale.

Every sampling uses the report's prompts and seeds (``random_prompts``, seed 1234; seeds 0..S-1 per
prompt; ``--prompts P --images-per-prompt S``), read by the attribute checker. Shapes: P prompts x S
seeds = N images (32 x 32 x 3), prompt-major.

Writes ``--table`` (markdown: time per stage, wall and CPU, and one accuracy row per seed and sampling
with the min-max over seeds) and prints it. ``--write-spread`` also writes
npdiffusion/training/demo/measured.py, which the demo's report quotes next to its own figure while the
demo's settings are the ones measured (``settings_fingerprint``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import textwrap
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import study_common as sc  # noqa: E402

SPREAD_FILE = os.path.join(sc.REPO, "npdiffusion", "training", "demo", "measured.py")
ATTRIBUTES = ("color", "shape", "position", "joint")


def seed_list(text: str) -> list:
    """``"0,1,2"`` -> [0, 1, 2] (each an int >= 0)."""
    vals = sc.number_list(text, 0.0)
    if any(v != int(v) for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}")
    return [int(v) for v in vals]


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="demo_seeds.py")
    p.add_argument("--seeds", type=seed_list, default=None, help="training seeds, comma-separated (default 0,1,2)")
    p.add_argument("--work", metavar="DIR", default="demo-seeds", help="one demo folder per seed: DIR/seed-S")
    p.add_argument("--models", default=None, metavar="DIRS",
                   help="comma-separated model folders to score instead of training (no time table)")
    p.add_argument("--processes", type=sc.positive_int, default=None,
                   help="npdiffusion demo --processes (default: the demo's, every core)")
    p.add_argument("--guidance", type=sc.number_list, default=[1.0, 4.0],
                   help="guidance scales for the saved scheduler (default 1,4; the report's is added)")
    p.add_argument("--steps", type=sc.positive_int, default=30, help="steps of the saved scheduler (default 30)")
    p.add_argument("--prompts", type=sc.positive_int, default=sc.EVAL_PROMPTS)
    p.add_argument("--images-per-prompt", type=sc.positive_int, default=sc.EVAL_SEEDS)
    p.add_argument("--table", default=None, metavar="MD", help="also write the tables to this file")
    p.add_argument("--write-spread", action="store_true",
                   help="write npdiffusion/training/demo/measured.py (the report's spread over seeds)")
    p.add_argument("--quick", action="store_true", help="npdiffusion demo --quick (a smoke test of this script)")
    return p.parse_args(argv)


def train_seed(seed: int, work: str, processes, quick: bool) -> dict:
    """Run the demo for ``seed`` (unless WORK/seed-S/report.json exists); its report.json, plus ``folder``."""
    folder = os.path.join(work, f"seed-{seed}")
    record = os.path.join(folder, "report.json")
    if not os.path.isfile(record):
        command = [sys.executable, "-m", "npdiffusion", "demo", "--seed", str(seed), "--out", folder, "--no-progress"]
        command += (["--processes", str(processes)] if processes else []) + (["--quick"] if quick else [])
        print(" ".join(command), flush=True)
        t0 = time.perf_counter()
        done = subprocess.run(command, env={**os.environ, "PYTHONPATH": sc.REPO}, check=False)
        if done.returncode != 0:
            raise sc.StudyError(f"the demo for seed {seed} failed (exit code {done.returncode}); see its output above")
        print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    with open(record, encoding="utf-8") as f:
        return {**json.load(f), "folder": folder}


def sample_scores(model: str, guidance: list, steps: int, n_prompts: int, n_images: int) -> dict:
    """``{label: ShapeScore.as_dict()}`` of the model folder's own scheduler, ``steps`` steps, each scale."""
    from npdiffusion.evaluation.shape_attributes import score  # noqa: PLC0415

    pipe = sc.load_pipeline(model)
    prompts = sc.random_prompts(n_prompts)
    seeds = list(range(n_images))
    flat = [p for p in prompts for _ in seeds]
    name = type(pipe.scheduler).__name__.replace("Scheduler", "")
    return {f"{name} {steps}, guidance {g:g}": score(sc.generate(pipe, prompts, seeds, g, steps), flat).as_dict()
            for g in guidance}


def cached_sample_scores(folder: str, guidance: list, args) -> dict:
    """``sample_scores`` of FOLDER/model, kept in FOLDER/samplings.json (keyed by the sampling and the number
    of prompts and images) so that a rerun over more seeds does not sample the finished ones again."""
    from npdiffusion.io.atomic import atomic_write_text  # noqa: PLC0415

    path = os.path.join(folder, "samplings.json")
    cache = json.load(open(path, encoding="utf-8")) if os.path.isfile(path) else {}
    key = f"{args.prompts}x{args.images_per_prompt}"
    want = [g for g in guidance if f"{key} {args.steps} {g:g}" not in cache]
    if want:
        fresh = sample_scores(os.path.join(folder, "model"), want, args.steps, args.prompts, args.images_per_prompt)
        for g, (label, d) in zip(want, fresh.items()):
            cache[f"{key} {args.steps} {g:g}"] = [label, d]
        atomic_write_text(path, json.dumps(cache, indent=1))
    return dict(cache[f"{key} {args.steps} {g:g}"] for g in guidance)


def report_scores(record: dict) -> dict:
    """The demo report's own two samplings, labelled like ``sample_scores``."""
    s = record["sampling"]
    name = s["scheduler"].replace("Scheduler", "")
    return {f"{name} {s['steps']}, guidance {s['guidance_scale']:g} (report)": record["scores"]["guided"],
            f"{name} {s['steps']}, guidance 1 (report)": record["scores"]["unguided"]}


def resample_report(model: str, n_prompts: int, n_images: int) -> dict:
    """The report's two samplings redone on a model folder (``--models``), labelled as ``report_scores``."""
    from npdiffusion.training.demo import EVAL_SCHEDULER, eval_scheduler, evaluate  # noqa: PLC0415

    pipe = sc.load_pipeline(model)
    pipe.scheduler = eval_scheduler(pipe.scheduler.config)
    scores = evaluate(pipe, n_prompts, n_images, sc.GUIDANCE_SCALE, sc.EVAL_STEPS)
    record = {"sampling": {"scheduler": EVAL_SCHEDULER, "steps": sc.EVAL_STEPS, "guidance_scale": sc.GUIDANCE_SCALE},
              "scores": {k: v.as_dict() for k, v in scores.items()}}
    return report_scores(record)


def time_table(records: dict) -> str:
    rows = []
    for seed, r in records.items():
        sec, cpu = r["seconds"], r["cpu_seconds"]

        def cell(*names):
            return f"{sum(sec[n] for n in names):.0f} ({sum(cpu.get(n, 0.0) for n in names):.0f})"

        rows.append([seed, max(r["processes"].values()), cell("tokenizer", "clip"), cell("vae"), cell("unet"),
                     cell("evaluation", "pictures"), f"{r['total_seconds'] / 60:.1f} ({sum(cpu.values()) / 60:.1f})"])
    return sc.markdown_table(["seed", "processes", "tokenizer + CLIP s (CPU)", "VAE s (CPU)", "U-Net s (CPU)",
                              "report s (CPU)", "total min (CPU)"], rows)


def accuracy_table(scores: dict) -> str:
    """``scores``: {row label: {sampling: as_dict}}; one row per label and sampling, then min-max rows."""
    rows = [[label, sampling, *[sc.pct(d[a]) for a in ATTRIBUTES]]
            for label, by_sampling in scores.items() for sampling, d in by_sampling.items()]
    if len(scores) > 1:
        for sampling in next(iter(scores.values())):
            vals = [by[sampling] for by in scores.values() if sampling in by]
            rows.append(["**min-max**", sampling, *[f"{100 * min(v[a] for v in vals):.1f}-{100 * max(v[a] for v in vals):.1f}%"
                                                    for a in ATTRIBUTES]])
    return sc.markdown_table(["model", "sampling", "colour", "shape", "position", "all three"], rows)


def spread(records: dict, scores: dict, steps: int) -> dict:
    """What measured.py holds: the settings fingerprint, seeds, date, and min-max of "all three" per sampling."""
    from npdiffusion.training.demo.settings import settings_fingerprint  # noqa: PLC0415

    samplings = next(iter(scores.values()))
    return {"settings": settings_fingerprint(), "seeds": list(records), "date": datetime.date.today().isoformat(),
            "processes": max(max(r["processes"].values()) for r in records.values()),
            "minutes": [min(r["total_seconds"] for r in records.values()) / 60,
                        max(r["total_seconds"] for r in records.values()) / 60],
            "cpu_minutes": [min(sum(r["cpu_seconds"].values()) for r in records.values()) / 60,
                            max(sum(r["cpu_seconds"].values()) for r in records.values()) / 60],
            "all_three": {s: [min(by[s]["joint"] for by in scores.values()), max(by[s]["joint"] for by in scores.values())]
                          for s in samplings}, "steps": steps}


def write_spread(data: dict) -> None:
    from npdiffusion.io.atomic import atomic_write_text  # noqa: PLC0415

    doc = ("The demo over training seeds, as tools/demo_seeds.py --write-spread last measured it (written by that "
           "tool; do not edit). ``SPREAD``: ``settings`` (settings_fingerprint() of the demo measured), ``seeds``, "
           "``date``, ``processes``, ``minutes`` / ``cpu_minutes`` (min, max wall / CPU minutes), ``all_three`` "
           "({sampling: [min, max]} share of samples with colour, shape and position right).")
    atomic_write_text(SPREAD_FILE, '"""' + textwrap.fill(doc, 104) + '\n"""\n' + f"SPREAD = {json.dumps(data, indent=1)}\n")
    print(f"wrote {SPREAD_FILE}")


def run(argv=None) -> dict:
    args = parse(argv)
    guidance = sorted(set(args.guidance) | {sc.GUIDANCE_SCALE})
    scores, records = {}, {}
    if args.models:
        for model in args.models.split(","):
            scores[model] = {**resample_report(model, args.prompts, args.images_per_prompt),
                             **sample_scores(model, guidance, args.steps, args.prompts, args.images_per_prompt)}
            print(model, json.dumps(scores[model]), flush=True)
        text = accuracy_table(scores)
    else:
        for seed in args.seeds or [0, 1, 2]:
            records[seed] = train_seed(seed, args.work, args.processes, args.quick)
            scores[f"seed {seed}"] = {**report_scores(records[seed]),
                                      **cached_sample_scores(records[seed]["folder"], guidance, args)}
        text = time_table(records) + "\n" + accuracy_table(scores)
        if args.write_spread:
            write_spread(spread(records, scores, args.steps))
    if not args.table:
        print(text)
    else:
        sc.write_table(args.table, "npdiffusion demo over training seeds (tools/demo_seeds.py)", text,
                       f"Command: python tools/demo_seeds.py {' '.join(argv if argv is not None else sys.argv[1:])}. "
                       "Times: seconds wall (CPU seconds, the MPI ranks' included).")
    return {"records": records, "scores": scores}


if __name__ == "__main__":
    sys.exit(sc.run_main(run))
