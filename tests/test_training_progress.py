"""What a run shows while and after it trains: the progress bar on a terminal (log lines
otherwise), ``loss.png`` drawn with PIL, and TensorBoard event logs where the package is
importable (a stand-in module here: tensorboard is not a dependency)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import io
import json
import math
import sys
import types

import numpy as np
import pytest
from PIL import Image
from training_helpers import one_thread, write_tiny_checkpoint  # noqa: F401  (one_thread: autouse fixture)

from lib_layerdiffuse.training import cli, plots
from lib_layerdiffuse.training.runner import Progress, format_seconds


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_lines_otherwise():
    tty = _Terminal()
    bar = Progress(total=100, start=0, enabled=True, log_every=10, label="layers", stream=tty)
    for step in range(100):
        bar.update(step, {"loss": 1.0 / (step + 1)})
        assert "\n" not in tty.getvalue()  # redrawn in place until the end
    bar.close()
    text = tty.getvalue()
    draws = text.split("\r")[1:]
    assert 2 <= len(draws) < 50  # the first step, the last, and at most 10 redraws a second between
    last = draws[-1]
    assert last.startswith("[layers] " + "#" * Progress.BAR + " 100/100 loss=0.01 ") and text.endswith("\n")
    assert "steps/s ETA 0 s" in last

    log = io.StringIO()  # a file or a pipe: a line every log_every steps and at the last
    bar = Progress(total=25, start=5, enabled=True, log_every=10, label="vae", stream=log)
    for step in range(5, 25):
        bar.update(step, {"loss": 0.5})
    bar.close()
    lines = log.getvalue().splitlines()
    assert [ln.split()[2] for ln in lines] == ["10/25", "20/25", "25/25"] and "\r" not in log.getvalue()
    assert all("loss=0.5 (" in ln and "steps/s, ETA " in ln for ln in lines)

    quiet = _Terminal()  # other ranks: nothing
    bar = Progress(total=5, start=0, enabled=False, log_every=1, label="x", stream=quiet)
    bar.update(0, {"loss": 1.0})
    bar.close()
    assert quiet.getvalue() == ""
    assert [format_seconds(t) for t in (0.4, 59, 185, 7620)] == ["0 s", "59 s", "3 min 05 s", "2 h 07 min"]


def _line_pixels(img: Image.Image, panel: int, head: int) -> int:
    a = np.asarray(img)[head + panel * plots.PANEL : head + (panel + 1) * plots.PANEL]
    return int((np.abs(a.astype(int) - plots.LINE).sum(axis=2) == 0).sum())


def test_loss_curve_panels_gaps_and_resumed_steps(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    recs = [{"step": s, "loss": 2.0 / s, "disc": math.nan} for s in range(1, 21)]
    recs += [{"step": 20, "loss": 7.0, "disc": math.nan}]  # a resumed run logged step 20 again: it wins
    text = "\n".join(json.dumps(r) for r in recs) + '\n{"step": 21, "lo'  # cut short by a kill
    metrics.write_text(text)
    got = plots.read_metrics(metrics)
    assert [r["step"] for r in got] == list(range(1, 21)) and got[-1]["loss"] == 7.0
    curves = plots.series(got)
    assert list(curves) == ["loss", "disc"] and curves["loss"][0] == (1, 2.0)

    png = plots.write_loss_curve(metrics, tmp_path / "loss.png", "layers: runs/x")
    img = Image.open(png).convert("RGB")
    assert img.size == (plots.WIDTH, 22 + 2 * plots.PANEL)
    assert _line_pixels(img, 0, 22) > 200  # the loss curve
    assert _line_pixels(img, 1, 22) == 0  # all NaN: no line, a note instead
    # a single logged step is a dot; no metrics at all is an empty panel, never an error
    metrics.write_text(json.dumps({"step": 1, "loss": 0.3}) + "\n")
    assert _line_pixels(Image.open(plots.write_loss_curve(metrics, png)).convert("RGB"), 0, 0) > 10
    plots.write_loss_curve(tmp_path / "none.jsonl", png)
    assert not list(tmp_path.glob("*.tmp"))


class _Writer:
    instances: list = []

    def __init__(self, log_dir: str):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        _Writer.instances.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, float(value), int(step)))

    def close(self):
        self.closed = True


def _vae_run(tmp_path, name, ckpt_file) -> int:
    return cli.main(["vae", "--checkpoint", str(ckpt_file), "--synthetic", "8", "--out", str(tmp_path / name),
                     "--widths", "tiny", "--disc-width", "8", "--size", "32", "--batch-size", "2", "--steps", "3",
                     "--log-every", "1", "--eval-count", "0", "--sample-every", "0"])  # fmt: skip


def test_runs_write_loss_png_and_tensorboard_only_where_importable(tmp_path, monkeypatch, capsys):
    ckpt_file = write_tiny_checkpoint(tmp_path / "sd15.safetensors", "sd15")
    if importlib.util.find_spec("tensorboard") is None:
        assert _vae_run(tmp_path, "plain", ckpt_file) == 0
        assert (tmp_path / "plain" / "loss.png").is_file() and not (tmp_path / "plain" / "tensorboard").exists()

    # a stand-in tensorboard package: the run writes its averaged logs to it, rank 0 only
    package = types.ModuleType("tensorboard")
    package.__spec__ = importlib.machinery.ModuleSpec("tensorboard", None)
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = _Writer
    monkeypatch.setitem(sys.modules, "tensorboard", package)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    _Writer.instances.clear()
    assert _vae_run(tmp_path, "tb", ckpt_file) == 0
    (writer,) = _Writer.instances
    assert writer.log_dir == str(tmp_path / "tb" / "tensorboard") and writer.closed
    losses = [(v, s) for tag, v, s in writer.scalars if tag == "train/loss"]
    logged = [json.loads(line) for line in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()]
    assert losses == [(pytest.approx(r["loss"]), r["step"]) for r in logged] and [s for _, s in losses] == [1, 2, 3]
    assert Image.open(tmp_path / "tb" / "loss.png").size[0] == plots.WIDTH
