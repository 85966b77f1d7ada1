"""``python -m npdiffusion ...``: the same as the ``npdiffusion`` command (docs/cli.md)."""
import sys

from npdiffusion.cli import main

if __name__ == "__main__":
    sys.exit(main())
