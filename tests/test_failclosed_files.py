"""Fail closed on files: fsync before the rename, stale temporary files cleaned, downloads that
leave nothing half-written, and a directory or dead link where a weight file belongs named as such."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import types
import uuid
from pathlib import Path

import numpy as np
import pytest

from lib_layerdiffuse import fileio
from lib_layerdiffuse import rgba as R
from lib_layerdiffuse.errors import WeightFileError
from lib_layerdiffuse.hosts import common

ROOT = Path(__file__).resolve().parent.parent
OLD = time.time() - 2 * fileio.DEAD_WRITER_GRACE_S  # an mtime past the grace period
ANCIENT = time.time() - 2 * fileio.STALE_AFTER_S


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _touch(path: Path, mtime: float, data: bytes = b"half") -> Path:
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))
    return path


# -- atomic_write: fsync, then rename, then the folder ------------------------------------------


def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(dst).name))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    R.write_png(tmp_path / "a.png", np.ones((2, 2, 4), np.float32))
    if sys.platform.startswith("linux"):
        assert events == [("fsync", "file"), ("replace", "a.png"), ("fsync", "dir")]
    else:
        assert events[0][0] == "fsync" and ("replace", "a.png") in events
    assert sorted(os.listdir(tmp_path)) == ["a.png"]


def test_atomic_write_works_with_a_read_only_umask(tmp_path, monkeypatch):
    """The fsync opens the file before the chmod that a umask like 0o277 makes read-only."""
    monkeypatch.setattr(fileio, "_UMASK", 0o277)
    path = fileio.atomic_write(tmp_path / "ro.bin", lambda tmp: Path(tmp).write_bytes(b"x"))
    assert path.read_bytes() == b"x" and (path.stat().st_mode & 0o777) == 0o400


# -- stale temporary files ----------------------------------------------------------------------


def test_stale_temporary_files_are_cleaned_at_the_next_write(tmp_path):
    dead = _dead_pid()
    stale = [
        _touch(tmp_path / f".a.png.{dead}.abcdefgh.tmp", OLD),  # a dead writer, past the grace
        _touch(tmp_path / f".b.png.{os.getpid()}.k2j4h5g6.tmp", OLD),  # our pid, not being written
        _touch(tmp_path / ".c.png.q1w2e3r4.tmp", ANCIENT),  # an older version's name, an hour old
        _touch(tmp_path / f".d.png.{os.getppid()}.zzzzzzzz.tmp", ANCIENT),  # a live writer, an hour idle
    ]
    kept = [
        _touch(tmp_path / f".e.png.{dead}.abcdefgh.tmp", time.time()),  # within the grace period
        _touch(tmp_path / f".f.png.{os.getppid()}.abcdefgh.tmp", OLD),  # a live writer (our parent)
        _touch(tmp_path / ".g.png.q1w2e3r4.tmp", OLD),  # no pid: only the hour rule
        _touch(tmp_path / "notes.tmp", ANCIENT),  # not our pattern
        _touch(tmp_path / ".h.png.abc.tmp", ANCIENT),  # not our pattern
    ]
    (tmp_path / f".dir.{dead}.abcdefgh.tmp").mkdir()  # not a file: never touched
    os.utime(tmp_path / f".dir.{dead}.abcdefgh.tmp", (OLD, OLD))
    R.write_png(tmp_path / "new.png", np.ones((2, 2, 4), np.float32))
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)
    assert (tmp_path / f".dir.{dead}.abcdefgh.tmp").is_dir()
    assert fileio.clean_stale(tmp_path / "absent") == []


def test_a_write_in_progress_is_never_cleaned(tmp_path):
    """Another thread's temporary file in the same folder is live, whatever its age."""
    seen = {}

    def write(tmp):
        Path(tmp).write_bytes(b"in progress")
        os.utime(tmp, (ANCIENT, ANCIENT))
        seen["removed"] = fileio.clean_stale(tmp_path)
        seen["exists"] = os.path.exists(tmp)
        Path(tmp).write_bytes(b"done")

    fileio.atomic_write(tmp_path / "x.bin", write)
    assert seen == {"removed": [], "exists": True}
    assert (tmp_path / "x.bin").read_bytes() == b"done" and os.listdir(tmp_path) == ["x.bin"]


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_a_write_killed_with_sigkill_leaves_a_temp_file_that_the_next_write_removes(tmp_path):
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from lib_layerdiffuse.fileio import atomic_write
        def write(tmp):
            open(tmp, "wb").write(b"half a file")
            print("writing", flush=True)
            time.sleep(60)
        atomic_write({str(tmp_path / "out.png")!r}, write)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(left) == 1 and f".{proc.pid}." in left[0].name  # what SIGKILL leaves
    os.utime(left[0], (OLD, OLD))
    R.write_png(tmp_path / "out.png", np.ones((2, 2, 4), np.float32))
    assert sorted(os.listdir(tmp_path)) == ["out.png"]


# -- downloads on the WebUI hosts ----------------------------------------------------------------


class Host(common.WebUIHost):
    def __init__(self, folder: Path):
        self.folder = folder

    def models_dir(self) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        return self.folder


NAME = "vae_transparent_encoder"  # no pinned digest: any encoder-shaped file is accepted
FILE = f"{NAME}.safetensors"


@pytest.fixture
def downloader(monkeypatch):
    """A stand-in for A1111's modelloader.load_file_from_url with its semantics: an existing
    file under the target name is returned as it is; otherwise torch.hub's download through a
    ``<dst>.<hex>.partial`` temporary, moved into place. ``serve`` says what the "server" sends."""
    state = types.SimpleNamespace(serve=None, calls=[], fail=None)

    def load_file_from_url(url, *, model_dir, progress=True, file_name=None, hash_prefix=None):
        dst = os.path.join(model_dir, file_name)
        state.calls.append(file_name)
        if os.path.exists(dst):
            return dst  # A1111 reuses whatever is there
        tmp = f"{dst}.{uuid.uuid4().hex}.partial"
        try:
            with open(tmp, "wb") as f:
                data = Path(state.serve).read_bytes() if state.serve else b""
                f.write(data[: len(data) // 2])
                if state.fail is not None:
                    raise state.fail
                f.write(data[len(data) // 2 :])
            shutil.move(tmp, dst)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return dst

    modules = types.ModuleType("modules")
    modelloader = types.ModuleType("modules.modelloader")
    modelloader.load_file_from_url = load_file_from_url
    modules.modelloader = modelloader
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.modelloader", modelloader)
    return state


def test_download_checks_fsyncs_and_renames(tmp_path, downloader, encoder_file, monkeypatch):
    downloader.serve = encoder_file
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    path = Host(tmp_path / "models").weight_path(NAME)
    assert path == tmp_path / "models" / FILE and path.read_bytes() == encoder_file.read_bytes()
    assert os.listdir(tmp_path / "models") == [FILE]
    if sys.platform.startswith("linux"):
        assert synced == [str(tmp_path / "models" / (FILE + ".part")), str(tmp_path / "models")]
    assert Host(tmp_path / "models").weight_path(NAME) == path and downloader.calls == [FILE + ".part"]


def test_a_stale_part_is_removed_before_the_download(tmp_path, downloader, encoder_file):
    """A1111's downloader returns an existing .part as if it were the download: a stale one
    (a killed earlier download) would be checked, refused as truncated, and never fixed."""
    models = tmp_path / "models"
    models.mkdir()
    _touch(models / (FILE + ".part"), time.time(), encoder_file.read_bytes()[:1000])
    dead_partial = _touch(models / f"layer_sd15_joint.safetensors.part.{uuid.uuid4().hex}.partial", OLD)
    fresh_other = _touch(models / "layer_xl_fg2ble.safetensors.part", time.time())  # maybe another process's
    unrelated = _touch(models / "my_notes.part", OLD)
    downloader.serve = encoder_file
    path = Host(models).weight_path(NAME)
    assert path.read_bytes() == encoder_file.read_bytes()
    assert not dead_partial.exists() and fresh_other.exists() and unrelated.exists()
    removed = common.clean_partial_downloads(models)
    assert removed == [] and fresh_other.exists()
    os.utime(fresh_other, (OLD, OLD))
    assert common.clean_partial_downloads(models) == [fresh_other]


@pytest.mark.parametrize(
    "case",
    ["offline", "interrupted download", "rejected file", "interrupted check", "unreadable part", "rename fails"],
)
def test_no_part_is_left_behind(tmp_path, downloader, encoder_file, monkeypatch, case):
    models = tmp_path / "models"
    downloader.serve = encoder_file
    expect = WeightFileError
    if case == "offline":
        downloader.fail = OSError("offline")
        match = "LayerDiffuse needs vae_transparent_encoder.safetensors and could not download it"
    elif case == "interrupted download":
        downloader.fail = KeyboardInterrupt()
        expect, match = KeyboardInterrupt, None
    elif case == "rejected file":
        junk = tmp_path / "junk"
        junk.write_bytes(b"<html>rate limited</html>" * 40)
        downloader.serve = junk
        match = "is not a safetensors file"
    elif case == "interrupted check":

        def stop(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(common, "verify_file", stop)
        expect, match = KeyboardInterrupt, None
    elif case == "unreadable part":

        def unreadable(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(common, "verify_file", unreadable)
        match = r"the downloaded file could not be checked or moved into place \(PermissionError"
    else:
        real_replace = os.replace

        def replace(src, dst):
            if str(src).endswith(".part"):
                raise OSError(28, "No space left on device")
            return real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        match = "could not be checked or moved into place"
    with pytest.raises(expect, match=match):
        Host(models).weight_path(NAME)
    assert os.listdir(models) == []


def test_a_wrong_digest_leaves_no_part(tmp_path, downloader, encoder_file, monkeypatch):
    from dataclasses import replace

    pinned = replace(common.FILES[NAME], sha256="0" * 64)
    monkeypatch.setitem(common.FILES, NAME, pinned)
    downloader.serve = encoder_file
    with pytest.raises(WeightFileError, match="wrong SHA-256; it was deleted"):
        Host(tmp_path / "models").weight_path(NAME)
    assert os.listdir(tmp_path / "models") == []


def test_a_directory_where_the_weight_belongs_is_named(tmp_path, downloader):
    models = tmp_path / "models"
    (models / FILE).mkdir(parents=True)
    with pytest.raises(WeightFileError, match=rf"{FILE} is a directory, not a weight file; remove it and try again"):
        Host(models).weight_path(NAME)
    assert downloader.calls == []  # not "could not download it (offline)"


def test_a_broken_link_where_the_weight_belongs_is_named(tmp_path, downloader):
    models = tmp_path / "models"
    models.mkdir()
    (models / FILE).symlink_to(tmp_path / "moved_away.safetensors")
    with pytest.raises(
        WeightFileError,
        match=rf"{FILE} is a broken link \(to .*moved_away\.safetensors, which does not exist\); remove it and try",
    ) as info:
        Host(models).weight_path(NAME)
    assert "huggingface.co" in str(info.value) and downloader.calls == []
    assert (models / FILE).is_symlink()  # the user's link is not ours to remove


def test_a_link_to_a_good_file_is_used(tmp_path, downloader, encoder_file):
    models = tmp_path / "models"
    models.mkdir()
    (models / FILE).symlink_to(encoder_file)
    assert Host(models).weight_path(NAME) == models / FILE and downloader.calls == []
