"""``npdiffusion golden export|check``: golden vectors for other implementations, and their check.

    npdiffusion golden export --model {unet,vae,text-encoder,clip,scheduler:NAME,op:NAME}
                              [--config FILE | --from-pretrained DIR] [--dtype float64|float32]
                              [--seed K] --out DIR
    npdiffusion golden check DIR CANDIDATE.safetensors [--only-failures] [--rtol-scale X]

``export`` writes DIR/manifest.json, DIR/golden.safetensors and DIR/config.json (see
npdiffusion/oracle and docs/oracle.md). ``check`` prints the per-key table (forward, then
backward), the first diverging layer in forward and in backward, and exits with 0 when the
candidate passes, 1 when it does not (keys over tolerance, required keys missing, an unreadable
candidate file), 2 for a usage error or a bad golden folder.
"""
from __future__ import annotations

import os

from npdiffusion.oracle import check_golden, export_golden
from npdiffusion.oracle.specs import MODELS, OPS, SCHEDULERS


def add_parser(subparsers):
    p = subparsers.add_parser(
        "golden", help="export golden vectors (activations and gradients by layer) or check another "
                       "implementation's dump against them",
        description="Golden vectors for implementations of Stable Diffusion in other stacks, and a "
                    "divergence finder. Docs: docs/oracle.md.")
    sub = p.add_subparsers(dest="golden_command", metavar="{export,check}", required=True)
    e = sub.add_parser(
        "export", help="run a model forward and backward and write every tensor by layer name",
        description="Write DIR/manifest.json, DIR/golden.safetensors and DIR/config.json: weights, inputs, "
                    "outputs, every layer's activations and gradients, the gradient of a seeded scalar loss "
                    "with respect to the inputs and every parameter, and recommended tolerances.")
    e.add_argument("--model", required=True, metavar="NAME",
                   help=f"{', '.join(MODELS)}, op:NAME ({', '.join(OPS)}) or scheduler:NAME "
                        f"({', '.join(SCHEDULERS)})")
    src = e.add_mutually_exclusive_group()
    src.add_argument("--config", metavar="FILE", default=None,
                     help="JSON config (diffusers/transformers keys for the models; {\"kwargs\", \"inputs\"} "
                          "for op:NAME; scheduler config keys for scheduler:NAME); default: a tiny config")
    src.add_argument("--from-pretrained", metavar="DIR", default=None,
                     help="a model folder whose weights to use instead of seeded random ones")
    e.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                   help="precision of the golden run (default float64)")
    e.add_argument("--seed", type=int, default=0, metavar="K", help="seed of weights, inputs and the loss (default 0)")
    e.add_argument("--out", required=True, metavar="DIR", help="output folder (created if needed)")
    c = sub.add_parser(
        "check", help="compare a candidate dump with a golden folder",
        description="Compare CANDIDATE.safetensors (another implementation's tensors under the golden key "
                    "names) with the golden folder DIR: a per-key table, the first diverging layer in "
                    "forward and backward. Exit 0 on success, 1 on a failure.")
    c.add_argument("golden_dir", metavar="DIR")
    c.add_argument("candidate", metavar="CANDIDATE.safetensors")
    c.add_argument("--only-failures", action="store_true", help="print only the failing rows of the table")
    c.add_argument("--rtol-scale", type=float, default=1.0, metavar="X",
                   help="multiply every recommended tolerance by X (default 1)")
    return p


def _size(path) -> str:
    n = os.path.getsize(path)
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def run(args) -> int:
    if args.golden_command == "export":
        if args.seed < 0:
            raise ValueError(f"--seed must be a non-negative int, got {args.seed}")
        manifest = export_golden(args.model, args.out, dtype=args.dtype, seed=args.seed, config=args.config,
                                 from_pretrained=args.from_pretrained)
        keys = manifest["keys"]
        required = sum(e["required"] for e in keys)
        print(f"golden export: {manifest['model']} ({manifest['class']}), {manifest['dtype']}, seed {manifest['seed']}")
        print(f"  {len(keys)} tensors ({required} required of a candidate), {len(manifest['layers'])} layer calls")
        if manifest["loss"] is not None:
            print(f"  loss = {manifest['loss']['value']!r} over outputs {', '.join(manifest['loss']['outputs'])}")
        tensors = os.path.join(args.out, "golden.safetensors")
        print(f"  wrote {os.path.join(args.out, 'manifest.json')}, {tensors} ({_size(tensors)}), "
              f"{os.path.join(args.out, 'config.json')}")
        return 0
    report = check_golden(args.golden_dir, args.candidate, rtol_scale=args.rtol_scale)
    if report.error is None:
        table = report.table(only_failures=args.only_failures)
        if table:
            print(table)
    print(report.summary())
    return 0 if report.passed else 1
