"""``npdiffusion convert SRC DST``: a diffusers pipeline folder <-> one original single-file checkpoint.

    npdiffusion convert MODEL_DIR model.safetensors [--text-encoder-format clip|open_clip]
    npdiffusion convert model.safetensors MODEL_DIR [--config DIR] [--original-config YAML]
                        [--tokenizer DIR] [--prediction-type epsilon|v_prediction|sample] [--extract-ema]

Folder -> file writes model.safetensors (original CompVis/LDM names, tensor by tensor) and model.yaml
beside it; file -> folder writes a diffusers folder that diffusers and npdiffusion load. A .ckpt
(pickle) or a file that is not Stable Diffusion 1.x/2.x is refused on one line. Docs:
docs/checkpoints.md ("Original single-file checkpoints"), docs/cli.md.
"""
from __future__ import annotations

import os

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def add_parser(subparsers):
    p = subparsers.add_parser(
        "convert", help="convert a diffusers folder to an original single-file checkpoint or back",
        description="SRC a diffusers pipeline folder and DST a .safetensors path: write the original single-file "
                    "layout (and DST's .yaml). SRC a .safetensors file and DST a folder: write a diffusers folder. "
                    "Docs: docs/checkpoints.md.")
    p.add_argument("src", metavar="SRC", help="a diffusers pipeline folder or a single-file .safetensors")
    p.add_argument("dst", metavar="DST", help="the .safetensors file or the folder to write")
    p.add_argument("--config", metavar="DIR", default=None,
                   help="file -> folder: a diffusers folder of the same kind of model (configs, tokenizer, scheduler)")
    p.add_argument("--original-config", metavar="YAML", default=None,
                   help="file -> folder: the original inference YAML (default: SRC's .yaml when it exists)")
    p.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="file -> folder: the tokenizer folder when --config is not given (a file holds none)")
    p.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=None,
                   help="file -> folder: the scheduler's prediction type (default: the YAML's, else as diffusers: "
                        "v_prediction for SD 2.x, epsilon for SD 1.x)")
    p.add_argument("--extract-ema", action="store_true", help="file -> folder: use the U-Net's model_ema.* weights")
    p.add_argument("--text-encoder-format", choices=("clip", "open_clip"), default=None,
                   help="folder -> file: SD 1.x CLIP names or SD 2.x OpenCLIP names (default: OpenCLIP for a GELU "
                        "text encoder)")
    return p


def run(args) -> int:
    from npdiffusion.cli import CommandError  # noqa: PLC0415
    from npdiffusion.pipelines.single_file import convert  # noqa: PLC0415

    to_file = os.path.isdir(args.src)
    used = {"--config": args.config, "--original-config": args.original_config, "--tokenizer": args.tokenizer,
            "--prediction-type": args.prediction_type, "--extract-ema": args.extract_ema or None}
    if to_file:
        wrong = [name for name, value in used.items() if value is not None]
        options = {"text_encoder_format": args.text_encoder_format}
    else:
        wrong = ["--text-encoder-format"] if args.text_encoder_format else []
        options = {"config": args.config, "original_config": args.original_config, "tokenizer": args.tokenizer,
                   "prediction_type": args.prediction_type, "extract_ema": args.extract_ema}
    if wrong:
        raise CommandError(f"{', '.join(wrong)} apply to the other direction (SRC {args.src!r} is "
                           f"{'a folder' if to_file else 'a file'})")
    print(convert(args.src, args.dst, **options))
    return 0
