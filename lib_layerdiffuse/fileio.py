"""Atomic file writes: a temporary file in the target's folder, fsync'd, renamed over the target.

Temporary files are named ``.<target>.<pid>.<8 random>.tmp``. One left behind by a process
that died mid-write (SIGKILL, power loss) is removed by :func:`clean_stale`, which every
:func:`atomic_write` runs on its folder first; hosts may also call it at start-up. A caller
that knows no other process writes in a folder (the trainer, holding its ``--out`` lock)
removes every one of them at once with :func:`remove_temps`, whatever their age.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

# the process umask, read once (os.umask can only be read by setting it)
_UMASK = os.umask(0)
os.umask(_UMASK)

# ours: ".<target>.<pid>.<mkstemp's 8 characters>.tmp" (older versions wrote no pid)
_TEMP_NAME = re.compile(r"^\..+?\.(?:(?P<pid>\d+)\.)?[a-z0-9_]{8}\.tmp$")
# A temporary file whose writer is gone (dead pid, or our own pid but not being written)
# is stale once untouched for this long (a margin for a writer in another pid namespace);
# any of ours untouched for STALE_AFTER_S is stale whoever wrote it.
DEAD_WRITER_GRACE_S = 60.0
STALE_AFTER_S = 3600.0
_MAX_PREFIX = 200  # keeps ".<name>.<pid>.<8>.tmp" under the usual 255-byte name limit

_live: set[str] = set()  # this process's temporary files being written (absolute paths)
_live_lock = threading.Lock()


def _pid_alive(pid: int) -> bool | None:
    """True / False where the OS can tell, None where it cannot (Windows: os.kill would kill)."""
    if os.name != "posix" or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return None
    return True


def is_stale_temp(path: str | os.PathLike, now: float | None = None) -> bool:
    """Whether ``path`` is one of our temporary files whose writer is gone (see module doc)."""
    path = Path(path)
    m = _TEMP_NAME.match(path.name)
    if m is None:
        return False
    with _live_lock:
        if str(path.absolute()) in _live:
            return False
    try:
        st = path.lstat()
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    age = (time.time() if now is None else now) - st.st_mtime
    if age > STALE_AFTER_S:
        return True
    if m.group("pid") is None or age <= DEAD_WRITER_GRACE_S:
        return False
    pid = int(m.group("pid"))
    return pid == os.getpid() or _pid_alive(pid) is False  # our own but not live: a crashed predecessor


def remove_where(folder: str | os.PathLike, stale) -> list[Path]:
    """Remove the plain files of ``folder`` (not recursive) for which ``stale(path, now)`` is
    true; best effort, never raises. Returns the paths removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        path = Path(entry.path)
        if stale(path, now):
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed


def clean_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove our stale temporary files from ``folder``; returns the paths removed."""
    return remove_where(folder, is_stale_temp)


def _is_ours_not_live(path: Path) -> bool:
    if _TEMP_NAME.match(path.name) is None:
        return False
    with _live_lock:
        return str(path.absolute()) not in _live


def remove_temps(folder: str | os.PathLike, also: tuple[str, ...] = (), skip_marked: str | None = None) -> list[Path]:
    """Remove every temporary file of ours under ``folder`` (recursively), whatever its age or
    writer, except those this process is writing, and the plain files named in ``also``; for
    a caller that knows no other process writes there. Subfolders that hold a file named
    ``skip_marked`` (another run's lock) are not entered. Best effort; returns the paths removed."""
    removed = []
    for sub, dirs, _ in os.walk(folder):
        if skip_marked:
            dirs[:] = [d for d in dirs if not os.path.exists(os.path.join(sub, d, skip_marked))]
        removed += remove_where(sub, lambda p, now: p.name in also or _is_ours_not_live(p))
    return removed


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file by name, so that its data is on disk before it is renamed into place."""
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a directory (the rename's entry), where the OS allows it; never raises."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp)`` on a new temporary file in the folder of ``path``, fsync it, then
    ``os.replace`` it over ``path`` and fsync the folder: the target is either the previous
    complete file or the new one, also after a crash, with the usual permissions (0666 less
    the umask, not mkstemp's 0600). If anything fails (``BaseException`` included), the
    temporary file is removed and the error propagates. Stale temporary files of earlier
    writes in the folder are removed first. Returns ``Path(path)``.
    """
    path = Path(path)
    clean_stale(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:_MAX_PREFIX]}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    key = os.path.abspath(tmp)
    with _live_lock:
        _live.add(key)
    try:
        write(tmp)
        fsync_path(tmp)  # before the chmod: a umask may leave the file read-only
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        with _live_lock:
            _live.discard(key)
    fsync_dir(path.parent)
    return path
