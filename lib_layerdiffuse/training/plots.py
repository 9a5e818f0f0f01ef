"""The loss curve of a run (``<out>/loss.png``), drawn with PIL (matplotlib is not a
dependency of the trainer): one panel per logged value of ``metrics.jsonl``, each scaled to
its own range, step on the x axis. A resumed run appends to ``metrics.jsonl``; where a step
was logged twice (a run stopped after its last checkpoint and resumed) the later record wins.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..fileio import atomic_write

WIDTH, PANEL, MARGIN = 720, 150, 56  # pixels: image width, panel height, left/right margin
LINE, GRID, TEXT = (31, 119, 180), (225, 225, 225), (40, 40, 40)


def read_metrics(path: Path) -> list[dict]:
    """The records of ``metrics.jsonl``, one per step (the last written wins), in step order;
    lines that do not parse (a line cut short when a run was killed) are skipped."""
    by_step: dict[int, dict] = {}
    if not Path(path).is_file():
        return []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
            by_step[int(rec["step"])] = rec
        except (ValueError, KeyError, TypeError):
            continue
    return [by_step[s] for s in sorted(by_step)]


def series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """``{name: [(step, value), ...]}`` of every numeric value, in order of first appearance."""
    out: dict[str, list[tuple[int, float]]] = {}
    for rec in records:
        for k, v in rec.items():
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool):
                out.setdefault(k, []).append((int(rec["step"]), float(v)))
    return out


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def draw(curves: dict[str, list[tuple[int, float]]], title: str = "") -> Image.Image:
    """One white panel per curve: the polyline of its finite values (a gap where a value is
    NaN or infinite), min/max labels on the y axis, first/last step on the x axis."""
    font = ImageFont.load_default()
    head = 22 if title else 0
    img = Image.new("RGB", (WIDTH, head + PANEL * max(1, len(curves))), "white")
    d = ImageDraw.Draw(img)
    if title:
        d.text((MARGIN, 5), title, fill=TEXT, font=font)
    if not curves:
        d.text((MARGIN, head + PANEL // 2), "no losses logged", fill=TEXT, font=font)
        return img
    steps = [s for pts in curves.values() for s, _ in pts]
    s0, s1 = min(steps), max(steps)
    x0, x1 = MARGIN, WIDTH - MARGIN // 2
    for i, (name, pts) in enumerate(curves.items()):
        top = head + i * PANEL
        y0, y1 = top + 20, top + PANEL - 22  # plot area (y0 above)
        d.rectangle([x0, y0, x1, y1], outline=GRID)
        d.text((x0, top + 4), name, fill=TEXT, font=font)
        finite = [v for _, v in pts if math.isfinite(v)]
        if not finite:
            d.text((x0 + 8, (y0 + y1) // 2), "no finite value", fill=TEXT, font=font)
            continue
        lo, hi = min(finite), max(finite)
        span = hi - lo or max(abs(hi), 1e-12)  # a flat curve sits in the middle
        base = lo if hi > lo else lo - span / 2

        d.text((4, y0 - 2), _fmt(base + span), fill=TEXT, font=font)  # the axis range, not the data's
        d.text((4, y1 - 10), _fmt(base), fill=TEXT, font=font)
        d.text((x0, y1 + 4), f"step {s0}", fill=TEXT, font=font)
        last = f"step {s1}  last {_fmt(pts[-1][1])}"
        d.text((x1 - d.textlength(last, font=font), y1 + 4), last, fill=TEXT, font=font)
        run: list[tuple[float, float]] = []
        for s, v in [*pts, (s1, math.nan)]:  # the NaN sentinel flushes the last run
            if math.isfinite(v):
                fx = 0.5 if s1 == s0 else (s - s0) / (s1 - s0)
                run.append((x0 + fx * (x1 - x0), y1 - (v - base) / span * (y1 - y0)))
                continue
            if len(run) > 1:
                d.line(run, fill=LINE, width=2)
            elif run:
                (cx, cy), r = run[0], 3
                d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=LINE)
            run = []
    return img


def write_loss_curve(metrics: Path, png: Path, title: str = "") -> Path:
    """Draw ``metrics`` (a ``metrics.jsonl``) into ``png`` (written whole, then renamed: a
    temporary file that :func:`lib_layerdiffuse.fileio.remove_temps` knows)."""
    img = draw(series(read_metrics(metrics)), title)
    return atomic_write(png, lambda tmp: img.save(tmp, format="PNG"))
