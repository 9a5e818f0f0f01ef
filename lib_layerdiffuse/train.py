"""Command line for training: ``python -m lib_layerdiffuse.train <stage> ...`` is
``python -m lib_layerdiffuse.training <stage> ...`` (lib_layerdiffuse/training/cli.py)."""

import sys

from .training.cli import build_parser, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
