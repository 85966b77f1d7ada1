"""Score shape images against their prompts: colour, shape and position, each and all together.

    python tools/check_shapes.py FOLDER [--size 32] [--min-joint 0.9]
    python tools/check_shapes.py --dataset 2000 [--seed 0] [--mismatch]

FOLDER holds images with their prompts in the folder-dataset format (metadata.jsonl with file_name
and text, or a .txt beside each image), e.g. generated samples saved with the prompt that made them.
``--dataset N`` scores N ground-truth images of the built-in shapes instead (a sanity check: it
should be at or near 100%); ``--mismatch`` pairs them with shuffled captions (near chance).
The checker itself is ``npdiffusion.evaluation.shape_attributes`` (docs/training.md, "Quality
checks"). Prints one line per attribute, the joint accuracy, and the first few misses; with
``--min-joint`` the exit code is 1 when the joint accuracy is below it.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from npdiffusion.evaluation.shape_attributes import parse_prompt, score  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", help="folder of images with metadata.jsonl or .txt prompts")
    parser.add_argument("--size", type=int, default=32, help="side the images are read at (default 32)")
    parser.add_argument("--dataset", type=int, metavar="N", help="score N ground-truth shapes instead")
    parser.add_argument("--seed", type=int, default=0, help="seed of --dataset (default 0)")
    parser.add_argument("--mismatch", action="store_true", help="with --dataset: shuffle the captions")
    parser.add_argument("--min-joint", type=float, default=None, help="exit 1 below this joint accuracy")
    parser.add_argument("--show", type=int, default=5, help="misses to list (default 5)")
    args = parser.parse_args(argv)
    if (args.folder is None) == (args.dataset is None):
        parser.error("give a FOLDER or --dataset N (not both)")

    if args.dataset is not None:
        from npdiffusion.data.shapes import make_shapes  # noqa: PLC0415

        ds = make_shapes(args.dataset, seed=args.seed, size=args.size)
        images, prompts = ds.images, list(ds.captions)
        names = [f"shapes[{i}]" for i in range(len(prompts))]
        if args.mismatch:
            prompts = [prompts[i] for i in numpy.random.default_rng(args.seed).permutation(len(prompts))]
    else:
        from npdiffusion.data.folder import FolderDataset  # noqa: PLC0415

        ds = FolderDataset(args.folder, size=args.size)
        images, prompts, names = ds.get_images(numpy.arange(len(ds))), list(ds.captions), ds.files
        for name, p in zip(names, prompts):
            try:
                parse_prompt(p)
            except ValueError as exc:
                print(f"check_shapes: error: {name}: {exc}", file=sys.stderr)
                return 2

    result = score(images, prompts)
    print(f"images   {result.n}")
    for attr in ("color", "shape", "position"):
        print(f"{attr:<9}{100 * getattr(result, attr):6.1f}%")
    print(f"joint    {100 * result.joint:6.1f}%")
    misses = numpy.nonzero(~result.correct["joint"])[0][:args.show]
    for i in misses.tolist():
        read = result.read[i]
        print(f"  miss: {names[i]}: prompt {prompts[i]!r}, read {' / '.join(str(x) for x in read)} "
              f"(best shape fit: IoU {result.read.shape_iou[i]:.2f})")
    if args.min_joint is not None and result.joint < args.min_joint:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
