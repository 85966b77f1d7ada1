"""The ``npdiffusion`` command: ``npdiffusion [--backend numpy|cupy] COMMAND ...`` (docs/cli.md).

Each subcommand is a module of this package listed in ``COMMANDS``; it exposes
``add_parser(subparsers)`` (adds its sub-parser, with its options and help) and ``run(args) -> int``
(the exit code). A new command is one new file and one new line in ``COMMANDS``.

Errors:

* Expected failures (bad arguments, missing or malformed files, the CuPy backend on a machine
  without a GPU) print ONE line, ``npdiffusion <command>: error: <message>``, to stderr and exit
  with code 2. These are ``ValueError``, ``TypeError``, ``KeyError``, ``OSError`` (with
  ``FileNotFoundError``), safetensors' ``SafetensorError``, ``CommandError`` raised by a command
  for a problem the user can fix, and the ``RuntimeError`` of ``--backend`` (or of the
  ``NPDIFFUSION_BACKEND`` environment variable) when the backend cannot start. argparse's own
  usage errors (an unknown option, a value of the wrong type) are one line too, exit code 2.
* Anything else is a bug: its traceback is kept, so it can be reported and fixed.
* Ctrl-C prints one line and exits with 130.
* A command that fails leaves no new output folder behind: the folders of its ``--out`` path that did
  not exist when it started are removed again if they are still empty (what it wrote is kept).

``main(argv=None)`` returns the exit code (the console script passes it to ``sys.exit``);
argparse exits by itself (``SystemExit``) for ``--help``, ``--version`` and usage errors.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

from npdiffusion import __version__
from npdiffusion.backend import BACKENDS, get_backend, set_backend

#: The subcommand modules, in the order ``--help`` lists them: one line per command.
COMMANDS = [
    "npdiffusion.cli.golden",
    "npdiffusion.cli.gradcheck",
    "npdiffusion.cli.toy",
    "npdiffusion.cli.train",
    "npdiffusion.cli.demo",
    "npdiffusion.cli.sample",
    "npdiffusion.cli.img2img",
    "npdiffusion.cli.convert",
    "npdiffusion.cli.inpaint",
]

#: Exit code of an expected failure (the same as argparse's usage errors).
EXIT_ERROR = 2


class CommandError(Exception):
    """A failure the user can fix (reported on one line, exit code 2), raised by a command."""


def _expected_errors() -> tuple:
    errors = [CommandError, ValueError, TypeError, KeyError, OSError]
    try:
        from safetensors import SafetensorError  # noqa: PLC0415 - optional: only when installed
    except ImportError:
        pass
    else:
        errors.append(SafetensorError)
    return tuple(errors)


def _message(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        text = exc.args[0]  # str(KeyError("x")) would add quotes
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())  # one line, whatever the exception held


@contextlib.contextmanager
def _no_new_empty_folders(path):
    """On an exception in the body, remove the folders of ``path`` (itself, then its parents) that did not
    exist on entry, as long as they are empty; ``path=None`` does nothing."""
    created = []
    folder = None if path is None else os.path.abspath(path)
    while folder is not None and not os.path.lexists(folder):
        created.append(folder)                            # deepest first
        parent = os.path.dirname(folder)
        folder = parent if parent != folder else None
    try:
        yield
    except BaseException:
        for folder in created:
            try:
                os.rmdir(folder)                          # only an empty folder; a non-empty one stops here
            except OSError:
                break
        raise


class _Parser(argparse.ArgumentParser):
    """argparse's usage errors (an unknown option, ``--batch-size 1e7`` for an int) as one line too:
    ``npdiffusion <command>: error: <message> (see --help)``, exit code 2."""

    def error(self, message):
        self.exit(EXIT_ERROR, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every command of ``COMMANDS`` registered."""
    parser = _Parser(
        prog="npdiffusion",
        description="Stable Diffusion from scratch on NumPy/CuPy, every backward pass by hand.",
        epilog="Run 'npdiffusion COMMAND --help' for a command's options. Docs: docs/cli.md.",
    )
    parser.add_argument("--version", action="version", version=f"npdiffusion {__version__}")
    parser.add_argument("--backend", metavar="|".join(BACKENDS), default=None,
                        help="array backend: numpy (CPU, the default) or cupy (NVIDIA GPU); "
                             "overrides the NPDIFFUSION_BACKEND environment variable")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(name)
        sub = module.add_parser(subparsers)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    stage = "backend"
    try:
        if args.backend is not None:
            set_backend(args.backend)
        else:
            get_backend()  # starts the backend NPDIFFUSION_BACKEND names (numpy if unset) now
        stage = "command"
        with _no_new_empty_folders(getattr(args, "out", None)):
            return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"npdiffusion {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - sorted into expected (one line) and bugs (re-raised)
        if isinstance(exc, _expected_errors()) or (stage == "backend" and isinstance(exc, RuntimeError)):
            print(f"npdiffusion {args.command}: error: {_message(exc)}", file=sys.stderr)
            return EXIT_ERROR
        raise
