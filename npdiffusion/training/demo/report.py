"""The demo's ``report.md`` and one-line summary: time per stage, the scores as Markdown tables, the
settings. ``shapes_report`` / ``digits_report`` take what ``run_demo`` measured (a ``DemoRun``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from npdiffusion.training.demo.settings import EVAL_SCHEDULER, GUIDANCE_SCALE, demo_settings, settings_fingerprint

PICTURES = "Pictures: samples.png (prompts x seeds), diffusion.png (noising and denoising), losses.png."


@dataclass
class DemoRun:
    """What a demo run measured, for its report: seconds per stage and in all, each stage's summary line,
    the evaluation's prompts, seeds and steps, and where the model and pictures were written; the
    training ``seed``, the MPI ranks ``processes`` and the ``cpu`` seconds (its ranks' included) of each
    stage (``{stage: N}``, ``{stage: seconds}``)."""

    out: str
    model: str
    dataset: str
    quick: bool
    blas_one: bool
    times: dict
    summaries: dict
    total: float
    train_seconds: float
    n_prompts: int
    n_seeds: int
    steps: int
    seed: int = 0
    processes: dict = None
    cpu: dict = None

    @property
    def most_processes(self) -> int:
        """The most MPI ranks any stage trained with (1: every stage in one process)."""
        return max((self.processes or {}).values(), default=1)

    def processes_phrase(self) -> str:
        """"2 processes" / "1 process", for the summary line."""
        n = self.most_processes
        return f"{n} process" + ("es" if n > 1 else "")


def _frame(run: DemoRun, title: str, trained_on: str, body: list[str]) -> str:
    """The report around its results ``body``: title, what was trained, time per stage, settings."""
    settings_json = json.dumps(demo_settings(run.quick, run.dataset), indent=1)
    ranks, cpu = run.processes or {}, run.cpu or {}
    timing = ["## Time per stage", "", "| stage | seconds | CPU seconds | processes | summary |", "|---|---|---|---|---|",
              *[f"| {n} | {t:.1f} | {cpu.get(n, 0.0):.1f} | {ranks.get(n, 1)} | {run.summaries.get(n, '')} |"
                for n, t in run.times.items()],
              f"| total | {run.total:.1f} | {sum(cpu.values()):.1f} | | |", ""]
    lines = [
        f"# {title}", "",
        f"Trained from scratch on {trained_on} in {run.total / 60:.1f} min "
        f"({'quick settings' if run.quick else 'demo settings'}, training seed {run.seed}; "
        f"BLAS limited to one thread: {run.blas_one}).", "",
        f"Processes: {_processes_sentence(run)}", "",
        *timing, *body,
        "## Settings (each stage's full config is in configs/)", "", "```json", settings_json, "```", "",
        PICTURES, "",
    ]
    return "\n".join(lines)


def _processes_sentence(run: DemoRun) -> str:
    ranks = run.processes or {}
    parallel = [n for n, k in ranks.items() if k > 1]
    if not parallel:
        return "every stage trained in one process."
    return (", ".join(f"{n} as {ranks[n]} MPI ranks" for n in parallel) + "; "
            + ", ".join(n for n, k in ranks.items() if k == 1) + " in one process (npdiffusion demo --processes).")


def spread_sentence(spread: dict | None = None) -> str:
    """The spread over training seeds that tools/demo_seeds.py last measured (measured.py), when it measured
    the demo's current settings; else a sentence saying it has not been measured for them."""
    if spread is None:
        from npdiffusion.training.demo.measured import SPREAD as spread  # noqa: PLC0415
    if not spread or spread.get("settings") != settings_fingerprint():
        return ("Spread over training seeds: not measured for these settings yet (python tools/demo_seeds.py "
                "--write-spread).")
    parts = "; ".join(f"{sampling}: {100 * lo:.1f}-{100 * hi:.1f}%" for sampling, (lo, hi) in spread["all_three"].items())
    lo, hi = spread["cpu_minutes"]
    return (f"Over training seeds {', '.join(str(s) for s in spread['seeds'])} (tools/demo_seeds.py, {spread['date']}; "
            f"{spread['processes']} processes, {lo:.1f}-{hi:.1f} CPU minutes each), all three right: {parts}.")


def _wrote(run: DemoRun) -> str:
    return f"wrote {run.model}, samples.png, diffusion.png, losses.png, report.md in {run.out}"


def shapes_report(run: DemoRun, scores: dict, num_images: int) -> tuple[str, str]:
    """(report.md text, summary line) of the shapes demo; ``scores``: ``{"guided", "unguided"}`` ShapeScores."""
    body = [
        f"## Attribute accuracy ({run.n_prompts} random prompts x {run.n_seeds} seeds, {run.steps} steps of "
        f"{EVAL_SCHEDULER})", "",
        f"Guided: classifier-free guidance scale {GUIDANCE_SCALE}; unguided: scale 1 (the conditional model "
        "alone). Read by npdiffusion.evaluation.shape_attributes (hue, centroid, best-fitting shape template).", "",
        score_rows(scores), "",
        *([] if run.quick else [spread_sentence(), ""]),
    ]
    text = _frame(run, "npdiffusion demo report", f"{num_images} synthetic 32x32 shapes", body)
    guided, unguided = scores["guided"].as_dict(), scores["unguided"].as_dict()
    summary = (f"demo: trained tokenizer+CLIP, VAE and U-Net in {run.train_seconds / 60:.1f} min with "
               f"{run.processes_phrase()} (total {run.total / 60:.1f} min); prompts followed (colour, shape and position all right) "
               f"{100 * guided['joint']:.0f}% with guidance {GUIDANCE_SCALE}, {100 * unguided['joint']:.0f}% without; "
               f"{_wrote(run)}")
    return text, summary


def digits_report(run: DemoRun, scores: dict, num_images: int, resolution: int, real: float, vae: float,
                  n_vae: int) -> tuple[str, str]:
    """(report.md text, summary line) of the digits demo; ``scores``: ``{"guided", "unguided"}`` DigitScores,
    ``real`` / ``vae`` the classifier's accuracy on the real digits and on ``n_vae`` VAE round trips."""
    guided, unguided = scores["guided"], scores["unguided"]
    body = [
        f"## Digit accuracy ({run.n_prompts} prompts x {run.n_seeds} seeds, {run.steps} steps of {EVAL_SCHEDULER})", "",
        f"Share of samples of \"a handwritten digit {{zero ... nine}}\" that the digits classifier "
        f"(npdiffusion.evaluation.digits: an SVC fitted to the real 8x8 digits; a sample is read after "
        f"block-averaging it back to 8x8) reads as the prompted digit. Guided: classifier-free guidance "
        f"scale {GUIDANCE_SCALE}; unguided: scale 1 (the conditional model alone). Chance is 10%.", "",
        digit_rows(scores), "",
        f"Ceilings: the classifier reads {100 * real:.1f}% of the {num_images} real digits at this size; after "
        f"the VAE's encode and decode, {100 * vae:.1f}% of {n_vae} of them (about the ceiling of "
        "any U-Net on these latents).", "",
        "Confusion with guidance (rows: the prompted digit; columns: the digit read):", "",
        confusion_rows(guided), "",
    ]
    trained_on = (f"scikit-learn's {num_images} handwritten digits (8x8, upscaled to {resolution}x{resolution})")
    text = _frame(run, "npdiffusion demo report: handwritten digits", trained_on, body)
    summary = (f"demo: trained tokenizer+CLIP, VAE and U-Net on the digits in {run.train_seconds / 60:.1f} min "
               f"with {run.processes_phrase()} (total {run.total / 60:.1f} min); prompted digit recognized in {100 * guided.overall:.0f}% of "
               f"samples with guidance {GUIDANCE_SCALE}, {100 * unguided.overall:.0f}% without; {_wrote(run)}")
    return text, summary


def report_record(run: DemoRun, scores: dict) -> dict:
    """report.json: what report.md says, for tools (tools/demo_seeds.py): seed, processes, seconds and CPU
    seconds per stage, the sampling settings and the scores (``as_dict`` of each, or a DigitScore's
    overall accuracy)."""
    def plain(s):
        return s.as_dict() if hasattr(s, "as_dict") else {"n": int(s.n), "overall": float(s.overall)}

    return {"dataset": run.dataset, "quick": run.quick, "seed": run.seed, "processes": run.processes or {},
            "seconds": run.times, "cpu_seconds": run.cpu or {}, "total_seconds": run.total,
            "sampling": {"scheduler": EVAL_SCHEDULER, "steps": run.steps, "guidance_scale": GUIDANCE_SCALE,
                         "prompts": run.n_prompts, "seeds": run.n_seeds},
            "scores": {name: plain(s) for name, s in scores.items()}}


def digit_rows(scores: dict) -> str:
    """Markdown: one row per prompted digit and one overall, one column per sampling (guided, unguided)."""
    from npdiffusion.data.digits import DIGIT_NAMES  # noqa: PLC0415

    names = list(scores)
    lines = ["| digit | " + " | ".join(names) + " | samples |", "|---|" + "---|" * len(names) + "---|"]
    first = scores[names[0]]
    for d, name in enumerate(DIGIT_NAMES):
        cells = " | ".join(f"{100 * scores[n].per_digit[d]:.1f}%" for n in names)
        lines.append(f"| {name} | {cells} | {int(first.counts[d])} |")
    lines.append("| **all** | " + " | ".join(f"**{100 * scores[n].overall:.1f}%**" for n in names)
                 + f" | {first.n} |")
    return "\n".join(lines)


def confusion_rows(score) -> str:
    """Markdown confusion matrix of a ``DigitScore``: rows the prompted digit, columns the digit read."""
    lines = ["| prompted, read as: | " + " | ".join(str(d) for d in range(10)) + " |", "|---|" + "---|" * 10]
    lines += [f"| {d} | " + " | ".join(str(int(c)) for c in score.confusion[d]) + " |" for d in range(10)]
    return "\n".join(lines)


def score_rows(scores: dict) -> str:
    """Markdown: one row per sampling (guided, unguided), the share right of each attribute and of all three."""
    lines = ["| sampling | colour | shape | position | all three |", "|---|---|---|---|---|"]
    for name, s in scores.items():
        d = s.as_dict()
        lines.append(f"| {name} | {100 * d['color']:.1f}% | {100 * d['shape']:.1f}% | {100 * d['position']:.1f}% "
                     f"| {100 * d['joint']:.1f}% |")
    return "\n".join(lines)
