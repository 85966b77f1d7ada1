"""The digits quality check: an SVC trained on the real digits reads generated ones.

    python tools/digits_classifier.py --self-check           # held-out accuracy on real digits
    python tools/digits_classifier.py MODEL_FOLDER [--seeds 10] [--steps 20] [--guidance 4]

A thin wrapper of ``npdiffusion.evaluation.digits`` (the classifier, how a generated S x S image is
read back at 8x8, the scores). With a model folder, it generates ``--seeds`` images of each of the
ten prompts "a handwritten digit {zero ... nine}" (our pipeline, DPM-Solver++, the given guidance)
and prints the share whose predicted digit is the prompted one, per digit and overall (the
acceptance: at least 90%). ``npdiffusion demo --dataset digits`` reports the same with and without
guidance. Needs scikit-learn (the ``digits`` extra). Docs: docs/training.md ("Quality checks").
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from npdiffusion.data.dataset import MissingDependencyError  # noqa: E402
from npdiffusion.data.digits import DIGIT_NAMES, digit_caption  # noqa: E402
from npdiffusion.evaluation.digits import (  # noqa: E402,F401 - read_digits, to_source_scale: the old names
    read_digits,
    score,
    self_check,
    to_source_scale,
    train_classifier,
)

PROG = "digits_classifier"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", help="a pipeline folder trained on the digits")
    p.add_argument("--self-check", action="store_true", help="train on 80%% of the real digits, score the rest "
                   "and the real digits through the 32x32 round trip")
    p.add_argument("--seeds", type=int, default=10, help="images per digit (seeds 0..N-1)")
    p.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.steps < 1:
        p.error(f"--seeds and --steps must be >= 1, got {args.seeds} and {args.steps}")
    try:
        if args.self_check:
            r = self_check(32)
            print(f"held-out accuracy on real 8x8 digits: {100 * r['held_out']:.1f}%; real digits upscaled to "
                  f"32x32 and read back: {100 * r['round_trip']:.1f}%")
            return 0
        if not args.model:
            p.error("give a MODEL folder or --self-check")
        clf, _ = train_classifier()
        from npdiffusion.pipelines.stable_diffusion import StableDiffusionPipeline  # noqa: PLC0415
        from npdiffusion.training.demo import generate  # noqa: PLC0415

        pipe = StableDiffusionPipeline.from_pretrained(args.model)
        prompts = [digit_caption(d) for d in range(10)]
        images = generate(pipe, prompts, list(range(args.seeds)), args.guidance, args.steps)
        s = score(images, [d for d in range(10) for _ in range(args.seeds)], clf)
    except (MissingDependencyError, OSError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    per = " ".join(f"{DIGIT_NAMES[d]} {100 * s.per_digit[d]:.0f}%" for d in range(10))
    print(f"prompted digit recognized in {100 * s.overall:.1f}% of {s.n} samples ({per})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
