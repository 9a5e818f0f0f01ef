"""The acceptance run's CPU smoke size: every row measured, ours equal to the official decode.

Runs ``python benchmarks/gpu_acceptance.py --device cpu --quick`` as a subprocess (about a
minute on 2 cores). No timing assertions: only that every row ran and reported numbers.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from tolerance import FP32

from lib_layerdiffuse import modes

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_acceptance.py"
# fp32 on a CPU, ours (plain / torch GroupNorm, channels-last weights) against the official
# 8-pass scheme. The outputs are clipped to [0, 1], but the rounding follows the raw outputs,
# which reach 2.5 on these generated weights and inputs: measured up to 1.3e-5 at 64 and 128 px
# (1 or 2 threads, oneDNN off, ATEN_CPU_CAPABILITY default / avx2 / avx512), ~20x under this.
DIFF_TOL = FP32 * 2.5

DECODE_FIELDS = ("seconds", "peak_gib", "max_abs_diff_vs_official")
FIELDS = {
    "decode": DECODE_FIELDS,
    "attention": ("plain_ms", "shared_ms", "overhead"),
    "train": ("steps_per_s", "samples_per_s", "seconds"),
    "qwen_vae": ("encode_seconds", "decode_seconds", "seconds", "peak_gib", "decode_bytes_per_pixel"),
}


def _number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def test_quick_cpu_run_reports_every_row(tmp_path):
    out = tmp_path / "acceptance.json"
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out)],
        cwd=tmp_path,
        # one thread: on 2 shared cores two threads per op can wait on each other for minutes
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = res.stdout[-4000:] + res.stderr[-4000:]
    assert res.returncode == 0, log
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["finished"] is True and _number(data["wall_seconds"])
    meta = data["meta"]
    assert meta["torch"] and meta["device"] == "cpu" and _number(meta["free_memory_gib"])

    expected = [f"decode/{s}/{v}" for s in (64, 128) for v in ("official", "ours_gn_plain", "ours_gn_torch")]
    expected += ["decode/128/ours_tiled_64", "decode/128/limit_6GB", "train/vae", "qwen_vae/64"]
    expected += [f"attention/{m.key}" for m in modes.MODES if m.family == "sd15" and m.apply == "attention_sharing"]
    rows = data["rows"]
    assert sorted(rows) == sorted(data["planned"]) == sorted(expected), log

    for name, row in rows.items():
        assert row["status"] == "ok" and "error" not in row, (name, row.get("error"))
        for field in FIELDS[name.split("/")[0]]:
            assert _number(row.get(field)), (name, field, row.get(field))
        if name.startswith("decode/") and "tiled" not in name:
            # ours equals the official scheme; the capped decode does not tile on a CPU
            assert row["max_abs_diff_vs_official"] <= DIFF_TOL, (name, row["max_abs_diff_vs_official"])
    tiled = rows["decode/128/ours_tiled_64"]
    assert tiled["tiles"] == 4 and 0 <= tiled["max_abs_diff_vs_official"] <= 1
    assert sum(r["default"] for n, r in rows.items() if n.startswith("decode/64/ours")) == 1
    assert rows["attention/FG_TO_BG_SD15"]["control"] and rows["attention/JOINT_SD15"]["frames"] == 3
    assert rows["train/vae"]["steps"] == 3
    assert rows["qwen_vae/64"]["finite"] is True and rows["qwen_vae/64"]["side"] == 64

    # the start line, each row as it finished and the closing table
    assert res.stdout.startswith("torch "), res.stdout[:500]
    summary = res.stdout.split("\nSummary (", 1)
    assert len(summary) == 2, log
    for name in expected:
        assert name in summary[0] and name in summary[1], name
    assert "max|diff|" in summary[1] and "ERROR" not in res.stdout
