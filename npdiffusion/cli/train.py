"""``npdiffusion train {tokenizer,clip,vae,unet} --config FILE [--resume]``: one training stage.

Each stage reads its TOML config (``--print-config`` shows a complete one with every default and
what it means), checks it strictly (an unknown key or a value of the wrong type is one error line
naming the key, the expected type and what came), checks that the output folder is writable and
the dataset usable, and only then trains. ``--resume`` continues from the newest checkpoint in the
config's ``output_dir``. A stage whose model is not in this build yet prints one line saying which.
Every expected failure is one line on stderr and exit code 2 (docs/cli.md); checkpoints already
written are never touched by a failure. Docs: docs/training.md.
"""
from __future__ import annotations

from npdiffusion.training.stages import STAGES


def add_parser(subparsers):
    p = subparsers.add_parser(
        "train", help="train one stage (tokenizer, clip, vae, unet) from a TOML config, resumably",
        description="Train one stage of a text-to-image model: the BPE tokenizer, the CLIP text and vision "
                    "encoders (contrastive), the VAE (reconstruction + KL) or the latent-diffusion U-Net. "
                    "Checkpoints are written atomically into the config's output_dir; --resume continues "
                    "the newest one exactly. Docs: docs/training.md.")
    p.add_argument("stage", choices=list(STAGES), help="which stage to train")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="TOML config of the stage (see --print-config for every key and default)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in output_dir (a new run if there is none)")
    p.add_argument("--print-config", action="store_true",
                   help="print a complete config with every default and its meaning, then exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args) -> int:
    from npdiffusion.cli import CommandError  # noqa: PLC0415
    from npdiffusion.data.dataset import MissingDependencyError  # noqa: PLC0415
    from npdiffusion.training.config import config_template, load_config  # noqa: PLC0415
    from npdiffusion.training.loop import TrainingError  # noqa: PLC0415
    from npdiffusion.training.stages import load_stage, unavailable_reason  # noqa: PLC0415

    reason = unavailable_reason(args.stage)
    if reason is not None:
        raise CommandError(reason)
    stage = load_stage(args.stage)
    if args.print_config:
        print(config_template(stage.CONFIG, title=f"npdiffusion train {args.stage} --config FILE"), end="")
        return 0
    if args.config is None:
        raise CommandError(f"--config FILE is required (npdiffusion train {args.stage} --print-config shows "
                           "a complete one to start from)")
    config = load_config(args.config, stage.CONFIG)
    try:
        summary = stage.train(config, resume=args.resume, progress=False if args.no_progress else None)
    except (TrainingError, MissingDependencyError) as exc:
        raise CommandError(str(exc)) from None
    from npdiffusion.distributed.world import get_communicator  # noqa: PLC0415

    if get_communicator().is_root:  # data-parallel (mpiexec -n N): one summary, from rank 0
        print(summary)
    return 0
