"""The trainer fails closed (issue 21): weights that are not finite, a loss that turns NaN,
an output folder that overlaps the data or is in use by another run, captions that are not
UTF-8, an --out that cannot be a folder, Ctrl-C, and the temporary files a killed run left.
Every case is a real CLI run on tiny files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from training_helpers import one_thread, tiny_checkpoint_state, write_rgba_folder  # noqa: F401

from lib_layerdiffuse.training import checkpoint as ckpt
from lib_layerdiffuse.training import cli
from lib_layerdiffuse.training import data as tdata

ROOT = Path(__file__).resolve().parent.parent
# a vae-stage run of about a second: tiny widths, a 1-step stand-in VAE
TINY_VAE_RUN = ["--synthetic", "8", "--batch-size", "2", "--size", "32", "--widths", "tiny", "--disc-width", "8",
                "--vae-width", "8", "--vae-steps", "1", "--sample-every", "0", "--eval-count", "0"]  # fmt: skip


def _one_error_line(err: str, prefix: str = "error: ") -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    return lines[0]


def _temps(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(".tmp"))


# ---------------------------------------------------------------------------------------
# Item 6: weights that are not finite, a loss that becomes NaN


@pytest.mark.parametrize(
    "stage, key",
    [
        ("vae", "first_stage_model.decoder.conv_in.weight"),
        ("layers", "model.diffusion_model.input_blocks.1.1.proj_in.weight"),
        ("layers", "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"),
    ],
)
def test_checkpoint_with_nan_is_refused_naming_the_tensor(tmp_path, capsys, stage, key):
    state = tiny_checkpoint_state("sd15")
    state[key].view(-1)[3] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, str(path))
    out = tmp_path / "run"
    args = [stage, "--checkpoint", str(path), "--synthetic", "4", "--out", str(out), "--steps", "1",
            "--batch-size", "2", "--size", "32", "--eval-count", "0", "--sample-every", "0"]  # fmt: skip
    args += ["--widths", "tiny", "--disc-width", "8"] if stage == "vae" else ["--frames", "fg", "--rank", "2"]
    assert cli.main(args) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert key in line and "1 NaN of" in line and str(path) in line, line
    assert not list(out.glob("*.safetensors"))  # nothing trained, nothing exported


def test_encoder_file_and_resume_state_with_inf_are_refused(tmp_path, capsys):
    from lib_layerdiffuse.training.models import TrainEncoder, Widths

    enc = TrainEncoder(Widths.named("tiny").encoder)
    state = ckpt.encoder_export_state(enc, 0.1, torch.float32)
    state["blocks.4.bias"][1] = float("inf")
    enc_file = ckpt.atomic_save(state, tmp_path / "enc.safetensors")
    out = tmp_path / "diff"
    args = ["diffusion", "--synthetic", "4", "--encoder", str(enc_file), "--out", str(out), "--steps", "1",
            "--batch-size", "2", "--size", "32", "--eval-count", "0", "--sample-every", "0", "--rank", "2",
            "--vae-width", "8", "--vae-steps", "1"]  # fmt: skip
    assert cli.main(args) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "blocks.4.bias" in line and "inf" in line and str(enc_file) in line, line

    # a resume state whose weights hold inf is not resumed
    out = tmp_path / "vae"
    base = ["vae", "--out", str(out), *TINY_VAE_RUN]
    assert cli.main([*base, "--steps", "1"]) == 0
    tensors = load_file(str(out / ckpt.STATE_FILE))
    name = sorted(k for k in tensors if k.startswith("model.pair.decoder"))[0]
    tensors[name].view(-1)[0] = float("-inf")
    ckpt.atomic_save(tensors, out / ckpt.STATE_FILE, ckpt.read_metadata(out / ckpt.STATE_FILE))
    capsys.readouterr()
    assert cli.main([*base, "--steps", "2"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "cannot be resumed" in line and name in line and "inf" in line, line


def test_a_loss_that_becomes_nan_stops_the_run_keeping_the_last_good_state(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["vae", "--frozen-vae", "training_helpers:vae_nan_from_call_3", "--out", str(out), *TINY_VAE_RUN,
            "--steps", "6", "--save-every", "1", "--log-every", "1"]  # fmt: skip
    assert cli.main(args) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "step 3" in line and "nan" in line.lower() and "last saved state is step 2" in line, line
    # the state and the export are step 2's, finite; no record of the bad step
    assert ckpt.read_metadata(out / ckpt.STATE_FILE)["step"] == "2"
    assert ckpt.read_metadata(out / ckpt.DECODER_FILE)["step"] == "2"
    assert all(torch.isfinite(v).all() for k, v in load_file(str(out / ckpt.STATE_FILE)).items() if "model." in k)
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert not (out / "summary.json").exists()


def test_an_update_that_breaks_the_weights_stops_at_its_step_before_its_sample(tmp_path, capsys):
    # step 2's loss is finite, its optimizer step makes the weights NaN: no sample, state or
    # metrics line of step 2 (a sample drawn from NaN weights is a black image)
    out = tmp_path / "run"
    args = ["vae", "--frozen-vae", "training_helpers:vae_nan_gradient_from_step_2", "--out", str(out),
            *TINY_VAE_RUN, "--steps", "4", "--save-every", "5", "--sample-every", "1", "--log-every", "1"]  # fmt: skip
    assert cli.main(args) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "stopped at step 2" in line and "weights no longer finite" in line, line
    assert "no state was saved yet" in line, line
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_0000001.png"]
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]
    assert not (out / ckpt.STATE_FILE).exists() and not (out / "summary.json").exists()


# ---------------------------------------------------------------------------------------
# Items 7 and 11: the output folder


def test_out_overlapping_data_is_refused_before_anything_is_created(tmp_path, capsys):
    data = write_rgba_folder(tmp_path / "data", {})
    (tmp_path / "link").symlink_to(data, target_is_directory=True)
    for out in (data / "run", data, tmp_path / "link" / "run", data / "a" / ".." / "run"):
        assert cli.main(["vae", "--data", str(data), "--out", str(out), *TINY_VAE_RUN[2:]]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert "--out" in line and "--data" in line and "inside" in line, line
    assert sorted(p.name for p in data.iterdir()) == [f"img{i}.png" for i in range(4)]  # nothing created
    # the reverse: data inside the output folder
    assert cli.main(["vae", "--data", str(data), "--out", str(tmp_path), *TINY_VAE_RUN[2:]]) == 2
    assert "inside" in _one_error_line(capsys.readouterr().err)


def test_out_that_cannot_be_a_folder_is_one_error_line(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [(a_file, "is a file"), (a_file / "run", "is a file"), (tmp_path / ("x" * 300), "cannot create")]
    for out, words in cases:
        assert cli.main(["vae", "--out", str(out), *TINY_VAE_RUN]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert line.startswith("error: --out") and words in line, line
    assert a_file.read_text() == "x"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into a read-only folder")
def test_out_in_a_read_only_folder_is_one_error_line(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for out in (ro / "run", ro):  # to create, or existing and not writable
            assert cli.main(["vae", "--out", str(out), *TINY_VAE_RUN]) == 2
            line = _one_error_line(capsys.readouterr().err)
            assert line.startswith("error: --out") and "Permission denied" in line, line
    finally:
        ro.chmod(0o755)


def test_out_denied_by_the_os_is_one_error_line_even_as_root(tmp_path, capsys, monkeypatch):
    """The read-only folder test above cannot run as root (root writes anywhere, and CI may run as root): the same
    refusal through the two calls the trainer makes, failing as the OS fails them for a user without the right."""
    import errno

    ro = tmp_path / "ro"
    ro.mkdir()
    real_mkdir, real_open = Path.mkdir, os.open

    def denied(path):
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    def mkdir(self, *args, **kwargs):
        if ro in Path(self).parents:  # creating inside the folder
            raise denied(self)
        return real_mkdir(self, *args, **kwargs)

    def open_(path, *args, **kwargs):
        if ro in Path(path).parents:  # a file inside the folder (the run's lock first)
            raise denied(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)
    for out in (ro / "run", ro):  # to create, or existing and not writable
        assert cli.main(["vae", "--out", str(out), *TINY_VAE_RUN]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert line.startswith("error: --out") and "Permission denied" in line, line
    monkeypatch.undo()
    assert list(ro.iterdir()) == []  # nothing created


@pytest.mark.skipif(os.name != "posix", reason="flock is the POSIX lock")
@pytest.mark.parametrize("code", ["ENOLCK", "ENOSYS", "EOPNOTSUPP"])
@pytest.mark.parametrize("fresh", [True, False])
def test_out_on_a_file_system_without_locks_is_refused_naming_it(tmp_path, capsys, monkeypatch, code, fresh):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    out = tmp_path / "run"
    if not fresh:
        out.mkdir()
    assert cli.main(["vae", "--out", str(out), *TINY_VAE_RUN]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: --out {out}") and "does not support file locks" in line, line
    assert "local disk" in line and "cannot create" not in line, line
    # nothing left: no empty train.lock, and a folder the refused run made is removed
    assert (list(out.iterdir()) == []) if not fresh else not out.exists()


# ---------------------------------------------------------------------------------------
# Items 8, 11 and 20: one run per --out, Ctrl-C, temporary files of a killed run


def _start(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "lib_layerdiffuse.training", "vae", "--out", str(out), *TINY_VAE_RUN,
           "--steps", "100000", "--save-every", "1", *extra]  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(job: subprocess.Popen, out: Path, step: int) -> None:
    state, deadline = out / ckpt.STATE_FILE, time.time() + 120
    while not (state.exists() and int(ckpt.read_metadata(state)["step"]) >= step):
        assert job.poll() is None, job.communicate()
        assert time.time() < deadline, "the run did not reach its step"
        time.sleep(0.2)


def test_second_run_on_one_out_is_refused_and_a_killed_ones_lock_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    first = _start(out)
    try:
        _wait_for_step(first, out, 1)
        before = set(os.listdir(out))
        assert cli.main(["vae", "--out", str(out), *TINY_VAE_RUN, "--steps", "2"]) == 1
        line = _one_error_line(capsys.readouterr().err)
        assert f"PID {first.pid}" in line and "train.lock" in line, line
        assert first.poll() is None  # the first run goes on
        # the refused run wrote nothing (the first one goes on writing: its own files and temporaries)
        new = set(os.listdir(out)) - before
        assert not (out / "summary.json").exists() and not any(f".{os.getpid()}." in n for n in new), new
        assert {n for n in new if f".{first.pid}." not in n} <= {"loss.png"}, new
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    step = int(ckpt.read_metadata(out / ckpt.STATE_FILE)["step"])
    assert cli.main(["vae", "--out", str(out), *TINY_VAE_RUN, "--steps", str(step + 1)]) == 0
    printed = capsys.readouterr().out
    assert f"PID {first.pid}" in printed and "ended without releasing" in printed, printed
    assert json.loads((out / "summary.json").read_text())["step"] == step + 1
    assert not (out / "train.lock").exists()  # released at the end


def test_ctrl_c_prints_one_line_and_keeps_the_last_state(tmp_path):
    out = tmp_path / "run"
    job = _start(out)
    try:
        _wait_for_step(job, out, 2)
        job.send_signal(signal.SIGINT)
        _, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    assert job.returncode == 130, err
    line = _one_error_line(err, prefix="interrupted at step ")
    assert "run the same command to resume" in line, line
    saved = int(ckpt.read_metadata(out / ckpt.STATE_FILE)["step"])
    assert f"last saved state: step {saved}" in line, line
    assert any(k.startswith("model.") for k in load_file(str(out / ckpt.STATE_FILE)))
    assert not _temps(out) and not (out / "train.lock").exists()


def _plant_temps(out: Path) -> list[Path]:
    """A temporary file of each kind the trainer writes, as a run killed mid-write leaves them
    (fresh, and named with this process's PID, which is alive)."""
    pid = os.getpid()
    (out / "samples").mkdir(parents=True, exist_ok=True)
    paths = [out / f".{ckpt.STATE_FILE}.{pid}.abcd1234.tmp", out / f".{ckpt.DECODER_FILE}.{pid}.efgh5678.tmp",
             out / f".metrics.jsonl.{pid}.ijkl9012.tmp", out / f".loss.png.{pid}.mnop3456.tmp",
             out / "loss.png.tmp", out / "samples" / f".step_0000001.png.{pid}.qrst7890.tmp"]  # fmt: skip
    for p in paths:
        p.write_bytes(b"half a file")
    return paths


def test_temporary_files_of_a_killed_run_are_removed_at_the_next_start(tmp_path, capsys):
    out = tmp_path / "run"
    planted = _plant_temps(out)
    assert cli.main(["vae", "--out", str(out), *TINY_VAE_RUN, "--steps", "1"]) == 0
    assert not _temps(out) and not any(p.exists() for p in planted)
    _plant_temps(out)
    assert cli.main(["vae", "--out", str(out), *TINY_VAE_RUN, "--steps", "2"]) == 0  # a resume
    assert not _temps(out)
    assert json.loads((out / "summary.json").read_text())["step"] == 2


# ---------------------------------------------------------------------------------------
# Item 9: captions that are not UTF-8


def test_caption_not_in_utf8_is_refused_naming_the_file(tmp_path, capsys):
    data = write_rgba_folder(tmp_path / "data", {0: "a glass"})
    (data / "img1.txt").write_bytes("café crème".encode("latin-1"))
    (data / "img2.txt").write_bytes("\ufeffa bottle".encode("utf-8"))  # a BOM (Windows Notepad) is fine
    out = tmp_path / "run"
    assert cli.main(["vae", "--data", str(data), "--out", str(out), *TINY_VAE_RUN[2:], "--steps", "1"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert str(data / "img1.txt") in line and "UTF-8" in line and "byte 0xe9" in line, line

    (data / "img1.txt").write_text("café crème", encoding="utf-8")
    assert tdata.RGBAFolder(data, 32).captions[:3] == ["a glass", "café crème", "a bottle"]
    (data / "metadata.jsonl").write_bytes(b'{"file_name": "img3.png", "text": "na\xefve"}\n')
    with pytest.raises(tdata.NoUsableImagesError, match="metadata.jsonl.*UTF-8"):
        tdata.RGBAFolder(data, 32)

    t = tmp_path / "trip"
    for f in tdata.FRAME_NAMES:
        write_rgba_folder(t / f, {}, n=1)
    (t / "img0.txt").write_bytes("déjà vu".encode("cp1252"))
    with pytest.raises(tdata.NoUsableImagesError, match="img0.txt.*UTF-8"):
        tdata.TripletFolder(t, 32)


@pytest.mark.skipif(os.name != "posix", reason="fork and flock")
@pytest.mark.parametrize("worker_closes", [True, False])
def test_a_forked_worker_does_not_keep_the_lock_of_a_dead_run(tmp_path, worker_closes):
    """DataLoader workers are forked and share the lock's open file: after the run itself dies they
    kept --out locked for seconds (a rerun was refused naming the dead PID). Their worker_init_fn
    closes it (outdir.close_inherited_locks)."""
    import fcntl
    import time

    from lib_layerdiffuse.training import outdir

    out = tmp_path / "run"
    outdir.open_out(out, None)
    lock = outdir._held[str(outdir._real(out))]
    child = os.fork()
    if child == 0:  # the worker
        if worker_closes:
            outdir.close_inherited_locks(0)
        time.sleep(3)
        os._exit(0)
    try:
        time.sleep(0.5)
        os.close(lock.fd)  # the run dies (its worker lives on)
        lock.fd = None
        fd = os.open(out / outdir.LOCK_FILE, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            free = True
        except OSError:
            free = False
        finally:
            os.close(fd)
        assert free is worker_closes
    finally:
        os.waitpid(child, 0)
        outdir._held.pop(str(outdir._real(out)), None)


def test_the_start_leaves_a_nested_runs_temporary_files_alone(tmp_path, capsys):
    """--out may hold another run's --out (its own train.lock): that run's files are not ours to clean."""
    out = tmp_path / "runs"
    inner = out / "a"
    inner.mkdir(parents=True)
    (inner / "train.lock").write_text("pid 1\n")
    theirs = inner / f".{ckpt.STATE_FILE}.{os.getpid()}.abcd1234.tmp"
    theirs.write_bytes(b"being written")
    ours = out / f".{ckpt.STATE_FILE}.{os.getpid()}.efgh5678.tmp"
    ours.write_bytes(b"left by a killed run")
    from lib_layerdiffuse.training import outdir

    outdir.open_out(out, None)
    try:
        assert theirs.exists() and not ours.exists()
    finally:
        outdir.release(out)
