"""Atomic file writes: a temporary file in the target's folder, renamed over the target."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp)`` on a new temporary file (mode 0600, from ``mkstemp``) in the folder
    of ``path``, then ``os.replace`` it over ``path``: the target is either the previous
    complete file or the new one. If anything fails (``BaseException`` included), the
    temporary file is removed and the error propagates. Returns ``Path(path)``.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
