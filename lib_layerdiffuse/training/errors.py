"""The trainer's refusals: a clear message, printed by the CLI as one ``error: ...`` line.

:class:`TrainingError` subclasses ``ValueError`` so that callers that caught the stages'
``ValueError`` before keep working.
"""

from __future__ import annotations


class TrainingError(ValueError):
    """A run the trainer refuses (bad data, a state it cannot resume, a checkpoint it cannot
    read); the message says what to do. The CLI exits 1 with it, without a traceback."""


class UsageError(TrainingError):
    """A command line the trainer refuses before doing any work (the CLI exits 2)."""


class Interrupted(Exception):
    """Ctrl-C during training; the message says at which step and what was kept. The CLI
    prints it as one line and exits 130 (128 + SIGINT), as a shell does."""
