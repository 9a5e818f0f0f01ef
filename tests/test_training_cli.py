"""The training CLI fails clearly: one ``error:`` line, no traceback, exit 2 for a bad
command line and 1 for a run it refuses; bad images are skipped and counted."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from training_helpers import one_thread  # noqa: F401  (autouse fixture)

from lib_layerdiffuse.training import checkpoint as ckpt
from lib_layerdiffuse.training import cli
from lib_layerdiffuse.training import data as tdata

# a vae-stage run that takes about a second: tiny widths, a 1-step stand-in VAE
TINY_VAE_RUN = ["--synthetic", "8", "--batch-size", "2", "--size", "32", "--widths", "tiny", "--disc-width", "8",
                "--vae-width", "8", "--vae-steps", "1", "--sample-every", "0", "--eval-count", "0"]  # fmt: skip


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--steps", "0"], "--steps: must be at least 1, got 0"),
        (["--batch-size", "0"], "--batch-size: must be at least 1"),
        (["--grad-accum", "0"], "--grad-accum: must be at least 1"),
        (["--save-every", "0"], "--save-every: must be at least 1"),
        (["--log-every", "0"], "--log-every: must be at least 1"),
        (["--steps", "x"], "--steps: expected a whole number"),
        (["--offset-dropout", "2"], "--offset-dropout: must be in [0.0, 1.0)"),
        (["--offset-dropout", "1"], "--offset-dropout: must be in [0.0, 1.0)"),
        (["--offset-dropout", "-0.1"], "--offset-dropout: must be in [0.0, 1.0)"),
        (["--offset-dropout", "nan"], "--offset-dropout: must be in"),
        (["--lr", "0"], "--lr: must be in (0.0, 1.0]"),
        (["--lr", "1e39"], "--lr: must be in (0.0, 1.0]"),  # was an AdamW traceback (float32 overflow)
        (["--lr", "inf"], "--lr: must be in (0.0, 1.0]"),
        (["--disc-lr", "2"], "--disc-lr: must be in (0.0, 1.0]"),
        (["--batch-size", "3", "--grad-accum", "2"], "multiple of --grad-accum 2"),
        (["--size", "36"], "--size 36 must be a multiple of 8"),
    ],
)
def test_usage_errors_are_one_line_exit_2(tmp_path, capsys, args, words):
    rc = cli.main(["vae", "--synthetic", "8", "--out", str(tmp_path / "o"), *args])
    assert rc == 2
    assert words in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()  # refused before any work


@pytest.mark.parametrize(
    "argv, words",
    [
        (["layers", "--synthetic", "8", "--rank", "0"], "--rank: must be at least 1"),
        (["diffusion", "--synthetic", "8", "--rank", "0", "--encoder", "e"], "--rank: must be at least 1"),
        (["diffusion", "--synthetic", "8"], "--encoder is required"),
        (["vae"], "one of the arguments --data --synthetic is required"),
        (["layers", "--synthetic", "8", "--latent-scale", "-1"], "--latent-scale must be a positive number"),
        (["nosuchstage"], "invalid choice"),
        (
            ["layers", "--synthetic", "8", "--cache-embeddings"],
            "--cache-embeddings keeps the text encoders' embeddings: it needs --checkpoint",
        ),
    ],
)
def test_more_usage_errors(tmp_path, capsys, argv, words):
    assert cli.main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert words in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()  # refused before any work


def test_resume_past_steps_refused_lr_applied_corrupt_state_explained(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["vae", "--out", str(out), *TINY_VAE_RUN]
    assert cli.main([*base, "--steps", "1", "--lr", "1e-3"]) == 0
    capsys.readouterr()

    # nothing left to train: refused, nothing rewritten
    before = (out / ckpt.STATE_FILE).read_bytes()
    assert cli.main([*base, "--steps", "1"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "at step 1 and --steps is 1" in line and "--no-resume" in line
    assert (out / ckpt.STATE_FILE).read_bytes() == before

    # --lr on resume replaces the saved learning rate, and the run says so
    assert cli.main([*base, "--steps", "2", "--lr", "1e-4"]) == 0
    printed = capsys.readouterr().out
    assert "learning rate of 'g': 0.001 (saved) -> 0.0001 (this run's --lr)" in printed
    groups = json.loads(ckpt.read_metadata(out / ckpt.STATE_FILE)["optim"])
    assert groups["g.param_groups"][0]["lr"] == 1e-4 and groups["d.param_groups"][0]["lr"] == 1e-4

    # a damaged state names the way out; --no-resume starts over
    (out / ckpt.STATE_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert cli.main([*base, "--steps", "3"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "cannot be resumed" in line and "--no-resume" in line
    assert cli.main([*base, "--steps", "1", "--no-resume"]) == 0
    assert json.loads((out / "summary.json").read_text())["step"] == 1


def test_state_that_does_not_fit_is_explained(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["vae", "--out", str(out), *TINY_VAE_RUN]
    assert cli.main([*base, "--steps", "1"]) == 0
    state = ckpt.read_metadata(out / ckpt.STATE_FILE)
    from safetensors.torch import load_file

    tensors = load_file(str(out / ckpt.STATE_FILE))
    tensors.pop(sorted(k for k in tensors if k.startswith("model."))[0])  # one weight lost
    ckpt.atomic_save(tensors, out / ckpt.STATE_FILE, state)
    capsys.readouterr()
    assert cli.main([*base, "--steps", "2"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "cannot be resumed" in line and "Missing key" in line and "--no-resume" in line


def _png(path, arr):
    Image.fromarray(arr).save(path)


def _png_header_only(path, width: int, height: int) -> None:
    """A PNG whose header claims ``width x height`` (a decompression bomb's header); no pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    idat = zlib.compress(b"\0" * 16)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _rgba(seed: int, size: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (size, size, 4), dtype=np.uint8)
    img[:8, :, 3] = 0
    img[8:, :, 3] = 255
    return img


def test_unreadable_and_oversized_images_are_skipped_and_counted(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        _png(data / f"ok{i}.png", _rgba(i))
    good = (data / "ok0.png").read_bytes()
    (data / "truncated.png").write_bytes(good[: len(good) // 2])
    (data / "garbage.png").write_bytes(b"not an image")
    _png_header_only(data / "bomb.png", 30000, 30000)  # 900 MP: PIL's own bomb error
    _png_header_only(data / "big.png", 9000, 9000)  # above our cap, below PIL's

    ds = tdata.RGBAFolder(data, 32)
    assert len(ds) == 4
    assert ds.rejected == {"oversized (more than 8192x8192 pixels)": 2, "unreadable (OSError)": 1,
                           "unreadable (UnidentifiedImageError)": 1}  # fmt: skip

    out = tmp_path / "run"
    args = ["vae", "--data", str(data), "--out", str(out), *TINY_VAE_RUN[2:], "--steps", "1"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "[vae] data: 4 images from" in printed and "skipped 4:" in printed


def test_triplet_with_unreadable_background_is_skipped(tmp_path):
    for d in ("fg", "bg", "blend"):
        (tmp_path / d).mkdir()
    for i in range(2):
        _png(tmp_path / "fg" / f"{i}.png", _rgba(i))
        _png(tmp_path / "bg" / f"{i}.png", _rgba(i + 5)[..., :3])
        _png(tmp_path / "blend" / f"{i}.png", _rgba(i + 9)[..., :3])
    (tmp_path / "bg" / "1.png").write_bytes(b"broken")
    ds = tdata.TripletFolder(tmp_path, 32)
    assert ds.names == ["0"] and ds.rejected == {"bg unreadable (UnidentifiedImageError)": 1}
    assert "skipped 1: 1 bg unreadable" in tdata.describe(ds)


@pytest.mark.parametrize("stage", ["vae", "diffusion", "layers"])
def test_each_option_and_its_default_are_defined_once(stage):
    """The command line and the config dataclass (lib_layerdiffuse/training/config.py) hold the
    same options, and a command line that gives only the required values builds the config
    that code building the dataclass directly gets: the defaults cannot drift apart."""
    from lib_layerdiffuse.training import config

    cls = {"vae": config.VAEStageConfig, "diffusion": config.DiffusionStageConfig,
           "layers": config.LayersStageConfig}[stage]  # fmt: skip
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "stage").choices[stage]
    options = {a.dest for a in sub._actions if a.dest != "help"}
    assert options - cli.CLI_ONLY == set(cls.__dataclass_fields__)
    for source in ({"synthetic": 4}, {"data": "d"}):  # with --data, synthetic keeps its default
        given = {"out": "runs/x", **source, **({"encoder": "enc.safetensors"} if stage == "diffusion" else {})}
        built, _ = cli._config(parser.parse_args([stage, *(w for k, v in given.items() for w in (f"--{k}", str(v)))]))
        assert built == cls(**given)


def test_an_option_cannot_carry_its_own_default():
    from lib_layerdiffuse.training import config

    o = cli._Options(cli._Parser(), config.VAEStageConfig)
    with pytest.raises(TypeError, match="the default is VAEStageConfig.steps's"):
        o.add("--steps", type=int, default=5)
    with pytest.raises(TypeError, match="no field 'stepz'"):
        o.add("--stepz", type=int)
