"""The output folder of a run (``--out``): checked, created and held by one run at a time.

* :func:`check_folders` (pure, every rank, and the command line before any work): ``--out``
  must be a folder or creatable as one, and must not overlap ``--data`` either way: an output
  folder inside the data would have the next run train on its own samples.
* :func:`open_out` (rank 0): creates the folder, takes ``<out>/train.lock`` and removes the
  temporary files a killed run left there. The lock is an advisory ``flock`` (Windows: a
  byte-range ``msvcrt`` lock) that the OS drops when its process ends, even by SIGKILL, so it
  can never outlive its run on a local disk; the file holds the run's PID, host and start
  time for the refusal of a second run. A clean end removes the file: one still there when
  a run takes the lock is the record of a run that was killed, and the run says so. A file
system without ``flock`` support is refused naming that (no unlocked mode), and the lock file
and folder the refused run made are removed.

Every problem with the folder is a :class:`UsageError` (one ``error:`` line, exit 2) naming
``--out``; a folder in use by another run is a :class:`TrainingError` (exit 1).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

from ..fileio import remove_temps
from .errors import TrainingError, UsageError

LOCK_FILE = "train.lock"
# temporary files of older versions of the trainer (loss.png was written through this name)
LEGACY_TEMPS = ("loss.png.tmp",)

_held: dict[str, _Lock] = {}  # real path of an --out -> this process's lock on it


def _real(path: str | os.PathLike) -> Path:
    """The absolute path with every symlink of its existing part resolved ('..' after a link too)."""
    return Path(os.path.realpath(os.path.abspath(path)))


def check_folders(out: str | os.PathLike, data: str | os.PathLike | None) -> None:
    """:class:`UsageError` where ``out`` cannot be the run's folder (a file, or under one) or
    overlaps ``data``; creates nothing. Paths are compared resolved (symlinks, ``..``)."""
    real = _real(out)
    existing = next(p for p in (real, *real.parents) if os.path.lexists(p))
    if not existing.is_dir():
        where = "" if existing == real else f" ({existing} is a file)"
        what = "is a file" if existing == real else "is under a file"
        raise UsageError(f"--out {out} {what}, not a folder{where}: give a folder for the run's files")
    if data is None:
        return
    data_real = _real(data)
    if real == data_real or data_real in real.parents:
        raise UsageError(f"--out {out} is inside --data {data}: the run's samples would become training data of "
                         "the next run; give an --out outside the data folder")  # fmt: skip
    if real in data_real.parents:
        raise UsageError(f"--data {data} is inside --out {out}: keep the data outside the run's output folder "
                         "(its samples and exports are written there)")  # fmt: skip


def _os_error(out, e: OSError) -> UsageError:
    reason = e.strerror or type(e).__name__
    return UsageError(f"--out {out}: cannot create or write the folder ({reason}: {e.filename or out}); "
                      "give a folder you can write to")  # fmt: skip


class _Lock:
    """``<out>/train.lock``, held (see the module doc)."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> dict | None:
        """Take the lock; returns the record a killed run left in the file (None after a clean
        end). :class:`TrainingError` naming the holder where another run holds it."""
        for _ in range(20):  # the file may be removed by a run that ends between open and lock
            created = not os.path.lexists(self.path)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666)
            try:
                try:
                    locked = _try_lock(fd)
                except OSError as e:
                    if e.errno not in _NO_LOCKS:
                        raise
                    if created:  # no empty train.lock left behind
                        os.unlink(self.path)
                    raise UsageError(f"--out {self.path.parent}: its file system does not support file locks "
                                     f"({e.strerror or e}), which keep a second run off the folder; put --out on "
                                     "a local disk") from None  # fmt: skip
                if not locked:
                    raise self._in_use(_read(fd))
                if os.name == "posix" and os.fstat(fd).st_ino != _inode(self.path):
                    os.close(fd)  # we locked a file that its holder removed as it ended: again
                    continue
                previous = _read(fd)
                record = {"pid": os.getpid(), "host": socket.gethostname(),
                          "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}  # fmt: skip
                os.lseek(fd, 0, os.SEEK_SET)
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps(record).encode("utf-8"))
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            self.fd = fd
            return previous
        raise TrainingError(f"{self.path}: could not take the lock (the file kept changing); run again")

    def _in_use(self, holder: dict | None) -> TrainingError:
        h = holder or {}
        who = f"PID {h.get('pid', '?')} on host {h.get('host', '?')}, started {h.get('started', '?')}"
        return TrainingError(f"--out {self.path.parent} is in use by another run ({who}; it holds {self.path}): "
                             "wait for it to end or stop it, or give another --out. The OS drops the lock when "
                             f"its process ends; only where it outlived its run (a network file system) delete "
                             f"{self.path}")  # fmt: skip

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if os.name == "posix":
                os.unlink(self.path)  # while held: the next run finds no record, i.e. a clean end
            else:
                os.ftruncate(self.fd, 0)  # Windows cannot remove an open file
        except OSError:
            pass
        os.close(self.fd)  # drops the lock
        self.fd = None


# flock's errors on a file system without lock support (some network and FUSE mounts)
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, getattr(errno, "EOPNOTSUPP", -1), getattr(errno, "ENOTSUP", -1)}


def _try_lock(fd: int) -> bool:
    try:
        if os.name == "posix":
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            import msvcrt

            os.lseek(fd, 1 << 20, os.SEEK_SET)  # a byte past the record, which others must read
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES, errno.EDEADLK):
            return False
        raise
    return True


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _read(fd: int) -> dict | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 65536).decode("utf-8", "replace").strip()
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return {}


def open_out(out: str | os.PathLike, data: str | os.PathLike | None, label: str = "train") -> Path:
    """Rank 0: check and create ``out``, take its lock for this run and remove the temporary
    files a killed run left in it. Returns the folder. Release with :func:`release`."""
    check_folders(out, data)
    folder = Path(out)
    lock = _Lock(folder)
    made = not os.path.lexists(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        previous = lock.acquire()
    except (OSError, UsageError) as e:
        if made:  # a refused run leaves no folder it made (only the last part of the path)
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise (_os_error(out, e) if isinstance(e, OSError) else e) from None
    _held[str(_real(out))] = lock
    removed = remove_temps(folder, also=LEGACY_TEMPS, skip_marked=LOCK_FILE)  # a nested --out is another run's
    if previous is not None:
        who = f"PID {previous.get('pid', '?')} on host {previous.get('host', '?')}"
        print(f"[{label}] note: the previous run on {folder} ({who}) ended without releasing it (killed?); "
              f"this run takes it over and removed {len(removed)} temporary file(s) it left", flush=True)  # fmt: skip
    elif removed:
        print(f"[{label}] note: removed {len(removed)} temporary file(s) a killed run left in {folder}", flush=True)
    return folder


def release(out: str | os.PathLike) -> None:
    """Release this process's lock on ``out`` (no-op where it holds none)."""
    lock = _held.pop(str(_real(out)), None)
    if lock is not None:
        lock.release()


def close_inherited_locks(_worker_id: int = 0) -> None:
    """A DataLoader worker's ``worker_init_fn``: forked workers share the lock's open file, which
    would keep ``--out`` locked after the run itself was killed until they notice; they close it."""
    for lock in list(_held.values()):
        if getattr(lock, "fd", None) is not None:
            try:
                os.close(lock.fd)
            except OSError:
                pass
            lock.fd = None
