"""``npdiffusion demo [--out DIR] [--dataset shapes|digits] [--seed S] [--processes N] [--quick]``: train a
text-to-image model from nothing.

Runs the tokenizer + CLIP, VAE and U-Net stages on 10,000 synthetic captioned shapes (about 9 CPU
minutes: about 5 minutes on a quiet 2-core machine with the ``mpi`` extra, docs/benchmarks.md), then
writes DIR/model (a diffusers pipeline folder), DIR/samples.png, DIR/diffusion.png, DIR/losses.png and
DIR/report.md (and report.json), and prints a one-line summary. ``--dataset digits`` trains the same
stages on scikit-learn's 1,797 handwritten digits ("a handwritten digit seven"; needs scikit-learn, the
``digits`` extra) and reports how often a digits classifier reads the prompted digit. ``--seed S`` is
every stage's training seed (initial weights, data order, noise draws). ``--processes N`` (default:
every core this process may use) trains the CLIP, VAE and U-Net stages as N MPI ranks through the ``mpiexec``
of the ``mpi`` extra; without it the demo says so in one line and trains in one process
(npdiffusion/training/demo/processes.py). ``--quick`` runs the same steps at toy sizes (a smoke test
whose images are noise).
Docs: docs/training.md ("The demo", "Digits").
"""
from __future__ import annotations

DATASET_CHOICES = ("shapes", "digits")


def add_parser(subparsers):
    p = subparsers.add_parser(
        "demo", help="train a whole text-to-image model on synthetic shapes (or digits) and show what it learned",
        description="Train the tokenizer, CLIP, the VAE and the latent-diffusion U-Net from scratch on the "
                    "built-in captioned shapes ('a red circle in the top left') or, with --dataset digits, on "
                    "scikit-learn's handwritten digits ('a handwritten digit seven'), then write the model folder "
                    "(loads in diffusers), sample grids, loss curves and a report with the prompt-following "
                    "accuracy. Docs: docs/training.md.")
    p.add_argument("--out", metavar="DIR", default="npdiffusion-demo",
                   help="output folder (created; must not hold an earlier demo's checkpoints)")
    p.add_argument("--dataset", choices=DATASET_CHOICES, default="shapes",
                   help="shapes (default: 10,000 synthetic captioned shapes) or digits (scikit-learn's 1,797 "
                        "handwritten digits at 32x32; needs scikit-learn)")
    p.add_argument("--seed", type=int, default=None, metavar="S",
                   help="seed of every stage's training: initial weights, data order, noise draws (default: the "
                        "demo's own, 0)")
    p.add_argument("--processes", type=int, default=None, metavar="N",
                   help="MPI processes for the CLIP, VAE and U-Net stages (default: the cores this process may use; "
                        "one process, said in one line, when mpi4py or mpiexec is missing)")
    p.add_argument("--quick", action="store_true", help="toy sizes: a smoke test of the whole run (noise images)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run(args) -> int:
    from npdiffusion.cli import CommandError  # noqa: PLC0415
    from npdiffusion.data.dataset import MissingDependencyError  # noqa: PLC0415
    from npdiffusion.training.demo import run_demo  # noqa: PLC0415
    from npdiffusion.training.loop import TrainingError  # noqa: PLC0415

    try:
        summary = run_demo(args.out, quick=args.quick, progress=False if args.no_progress else None,
                           dataset=args.dataset, processes=args.processes,
                           **({} if args.seed is None else {"seed": args.seed}))
    except (TrainingError, MissingDependencyError) as exc:
        raise CommandError(str(exc)) from None
    print(summary)
    return 0
