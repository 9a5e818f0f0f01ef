"""One-command acceptance run: transparent decode, tiling, attention sharing, VAE training, Qwen RGBA VAE.

No network and no files outside the repository: the decoder weights are generated from the
published key/shape manifest (tests/data, tests/weightgen.py), the SD1.5 UNet from its
manifest; the attention-sharing units and the training data are generated. Every
measurement is written to the JSON file (``--out``) as soon as it finishes, so a run cut
short still reports; a failed measurement records its error and the run goes on.

Rows (names as in the JSON; S = image side):

- ``decode/S/official``: the official 8-pass scheme (nn.GroupNorm, the 8 views one after
  another at batch 1, clipped, lower median), benchmarks/decode.py's ``official_sequential``.
- ``decode/S/ours_gn_<mode>``: ``decode_rgba`` with GroupNorm ``plain`` (var_mean, pure
  PyTorch), ``triton`` (CUDA with triton) or ``torch`` (the CPU default); ``default``
  says which one ``decode_rgba`` picks here. ``--compile`` adds ``ours_compiled``.
  Time (median), peak memory, max |diff| against the official row of the same size.
- ``decode/S/ours_tiled_T``: ``tile_size=T`` at the largest size: peak memory.
- ``decode/S/limit_XGB``: defaults with ``tile_size="auto"`` while
  ``torch.cuda.set_per_process_memory_fraction`` caps the process at X GiB (default 6);
  it must finish. On a CPU the cap does not exist: the same call, no cap.
- ``decode/S/cpu_fp32_reference`` (``--cpu-reference``): the official scheme in fp32 on the
  CPU at the smallest size; max |diff| of every row of that size against it.
- ``attention/<MODE>``: SD1.5 UNet forward (cond + uncond rows of one group) with the
  attention-sharing units of each SD1.5 mode against without (benchmarks/attention_sharing.py).
- ``qwen_vae/S``: the Qwen-Image-Layered RGBA VAE (lib_layerdiffuse/qwen_vae.py) at the released widths,
  random weights, fp32: one RGBA encode and one layer decode at S x S (640 and 1024 on CUDA): seconds,
  peak memory and the decode's bytes per pixel (what the Neo adapter asks Neo to free before it).
- ``train/vae``: steps/s of the VAE stage through the training CLI
  (``python -m lib_layerdiffuse.training vae --synthetic N ...``) as a subprocess, the flags
  of benchmarks/train_vae.py; the first (warm-up) step is included.

JSON: ``meta`` (torch, device name, free/total memory, triton, settings), ``planned`` (row
names in order), ``rows`` (name -> ``status`` "ok" with its numbers, or "error" with
``error`` and ``traceback``; ``row_wall_seconds``), ``finished``, ``interrupted``,
``wall_seconds``. Exit status 1 when a row failed, 130 when cut (Ctrl-C, SIGTERM).

    python benchmarks/gpu_acceptance.py                     # CUDA: 1024 and 2048, fp16, ~4 min on an H100
    python benchmarks/gpu_acceptance.py --device cpu --quick --out /tmp/acc.json   # 64 and 128, fp32, ~1 min
    python benchmarks/gpu_acceptance.py --compile --cpu-reference    # + torch.compile rows (minutes) and fp32 CPU

``--quick`` runs every path at smoke size (decode 64/128, tile 64 without overlap, a
32-channel SD1.5 UNet at 64x64, tiny VAE widths, single repeats); a CI test runs it.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "benchmarks", ROOT / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import attention_sharing as bench_sharing  # noqa: E402
import decode as bench_decode  # noqa: E402
import decode_passes as bench_passes  # noqa: E402
from weightgen import make_state_dict, manifest_shapes  # noqa: E402

from lib_layerdiffuse import fastnorm, modes, vae  # noqa: E402
from lib_layerdiffuse.attention_sharing import AttentionSharing  # noqa: E402
from lib_layerdiffuse.ldm_unet import SD15_CONFIG, UNetModel  # noqa: E402
from lib_layerdiffuse.tiling import tile_plan  # noqa: E402

GIB = 2**30
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SD15_SHARING_MODES = [m for m in modes.MODES if m.family == "sd15" and m.apply == "attention_sharing"]

# Per-device defaults; --quick is the CPU smoke size (a CI test runs it on 2 cores).
PROFILES = {
    "cuda": dict(sizes=[1024, 2048], tile=1152, repeats=3, warmup=1, unet_width=320, latent=64, attn_repeats=5,
                 train=dict(widths="full", size=256, batch_size=4, steps=40, disc_width=64)),
    "cpu": dict(sizes=[256, 512], tile=256, repeats=2, warmup=0, unet_width=320, latent=16, attn_repeats=2,
                train=dict(widths="tiny", size=32, batch_size=4, steps=20, disc_width=8)),
    "quick": dict(sizes=[64, 128], tile=64, tile_overlap=0, repeats=1, warmup=0, unet_width=32, latent=8, attn_repeats=1,
                  train=dict(widths="tiny", size=32, batch_size=2, steps=3, disc_width=8)),
}  # fmt: skip


# ---------------------------------------------------------------------------------------
# Report: the JSON file, rewritten after every row, and the table


def _fmt(value, scale=1.0, spec=".1f", unit=""):
    return "-" if value is None else f"{value * scale:{spec}}{unit}"


def table_line(name: str, row: dict | None) -> str:
    if row is None:
        return f"{'row':34s} {'status':6s} {'time':>10s} {'peak':>10s} {'max|diff|':>10s}  note"
    if row["status"] != "ok":
        return f"{name:34s} {'ERROR':6s} {row.get('error', '')[:150]}"
    peak = row.get("peak_total_gib", row.get("peak_gib"))
    return (
        f"{name:34s} {'ok':6s} {_fmt(row.get('seconds'), 1000, '.1f', ' ms'):>10s} "
        f"{_fmt(peak, 1, '.2f', ' GiB'):>10s} {_fmt(row.get('max_abs_diff_vs_official'), 1, '.1e'):>10s}"
        f"  {row.get('note', '')}"
    )


class Report:
    def __init__(self, path: Path, meta: dict, planned: list[str]):
        self.path = path
        self.t0 = time.perf_counter()
        self.data = {"meta": meta, "planned": planned, "rows": {}, "finished": False, "wall_seconds": 0.0}
        self.write()

    def write(self) -> None:
        self.data["wall_seconds"] = round(time.perf_counter() - self.t0, 2)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1), encoding="utf-8")
        os.replace(tmp, self.path)

    def add(self, name: str, row: dict) -> None:
        self.data["rows"][name] = row
        self.write()
        print(table_line(name, row), flush=True)

    def measure(self, name: str, fn) -> dict | None:
        """Run ``fn() -> dict of fields``; record the row or its error; never raise (but Ctrl-C)."""
        t = time.perf_counter()
        try:
            fields = fn()
            row = {"status": "ok", **fields}
        except (Exception, SystemExit) as e:  # noqa: BLE001 - a failed row must not stop the others
            row = {"status": "error", "error": f"{type(e).__name__}: {e}"[-4000:],
                   "traceback": traceback.format_exc()[-4000:]}  # fmt: skip
        row["row_wall_seconds"] = round(time.perf_counter() - t, 3)
        _free_memory()
        self.add(name, row)
        return row if row["status"] == "ok" else None

    def finish(self, interrupted: bool = False) -> None:
        self.data["finished"] = not interrupted
        self.data["interrupted"] = interrupted
        self.write()
        print(f"\n{'=' * 100}\nSummary ({self.data['wall_seconds']:.1f} s, {self.path})")
        print(table_line("", None))
        for name in self.data["planned"]:
            row = self.data["rows"].get(name)
            print(table_line(name, row) if row else f"{name:34s} {'-':6s} not run")


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------
# (a), (b): transparent decode


def repeat_timed(fn, device, warmup: int, repeats: int):
    """(last output, median seconds, all seconds, peak GiB above the start, peak GiB in all (CUDA))."""
    for _ in range(warmup):
        fn()
    times, peak, total = [], 0.0, None
    out = None
    for _ in range(repeats):
        out = None  # the previous output does not count towards this call's peak
        out, dt, p = bench_decode.timed(fn, device)
        times.append(dt)
        peak = max(peak, p)
        if device.type == "cuda":
            total = max(total or 0.0, torch.cuda.max_memory_allocated(device) / GIB)
    return out, statistics.median(times), times, peak, total


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float().cpu() - b.float().cpu()).abs().max().item()


def _decode_fields(out, med, times, peak, total, official, extra: dict) -> dict:
    fields = {**extra, "seconds": med, "seconds_all": times, "peak_gib": peak}
    if total is not None:
        fields["peak_total_gib"] = total
    if official is not None:
        fields["max_abs_diff_vs_official"] = _max_diff(out, official["out"])
        fields["speedup_vs_official"] = official["seconds"] / med
    return fields


def _process_free_memory(device) -> int | None:
    """Bytes the decode's defaults think this process may use (None on a CPU)."""
    if device.type != "cuda":
        return None
    fn = getattr(vae, "available_memory", None) or getattr(vae, "_free_cuda_memory", None)
    return fn(device) if fn is not None else None


def ours_group_norms(device) -> list[str]:
    """GroupNorm implementations of our decode to measure here: plain, triton where it exists,
    and the device default (torch on CPU)."""
    out = ["plain"]
    if device.type == "cuda" and fastnorm.HAS_TRITON:
        out.append("triton")
    default = fastnorm.resolve_mode("auto", device)
    if default not in out:
        out.append(default)
    return out


def decode_rows(cfg) -> list[str]:
    names = []
    for size in cfg.sizes:
        names.append(f"decode/{size}/official")
        names += [f"decode/{size}/ours_gn_{gn}" for gn in ours_group_norms(cfg.device)]
        if cfg.compile:
            names.append(f"decode/{size}/ours_compiled")
    big = max(cfg.sizes)
    names.append(f"decode/{big}/ours_tiled_{cfg.tile}")
    names.append(f"decode/{big}/limit_{cfg.limit_gb:g}GB")
    if cfg.cpu_reference:
        names.append(f"decode/{min(cfg.sizes)}/cpu_fp32_reference")
    return names


def run_decode(report: Report, cfg) -> None:
    device, dtype = cfg.device, cfg.dtype
    decoder = bench_passes.load_decoder(None, device, dtype)  # generated weights, published layout
    # its own copy on CPU: decode_rgba switches our decoder to channels-last weights in place there
    official = bench_decode.Official(copy.deepcopy(decoder) if device.type == "cpu" else decoder)
    default_gn = fastnorm.resolve_mode("auto", device)
    outputs: dict[int, dict[str, torch.Tensor]] = {}
    officials: dict[int, dict] = {}
    compiled = vae.compile_decoder(decoder) if cfg.compile else None
    dname = str(dtype).replace("torch.", "")

    for size in cfg.sizes:
        pixel, latent = bench_passes.smooth_inputs(size, 0, device, dtype)
        outputs[size] = {}
        base = {"size": size, "dtype": dname}

        def official_row(size=size, pixel=pixel, latent=latent, base=base):
            out, med, times, peak, total = repeat_timed(
                lambda: official(pixel, latent), device, cfg.warmup, cfg.repeats
            )
            officials[size] = {"out": out.float().cpu(), "seconds": med}
            outputs[size]["official"] = officials[size]["out"]
            extra = {**base, "group_norm": "torch", "views_per_batch": 1, "note": "8 passes, batch 1, nn.GroupNorm"}
            return _decode_fields(out, med, times, peak, total, officials[size], extra)

        report.measure(f"decode/{size}/official", official_row)

        for gn in ours_group_norms(device):

            def ours_row(gn=gn, size=size, pixel=pixel, latent=latent, base=base):
                per = vae.default_views_per_batch(device, dtype, size, size)

                def fn():
                    vae.set_group_norm_mode(decoder, gn)
                    try:
                        return vae.decode_rgba(decoder, pixel, latent)
                    finally:
                        vae.set_group_norm_mode(decoder, "auto")

                out, med, times, peak, total = repeat_timed(fn, device, cfg.warmup, cfg.repeats)
                outputs[size][f"ours_gn_{gn}"] = out.float().cpu()
                default = gn == default_gn
                extra = {**base, "group_norm": gn, "default": default, "views_per_batch": per,
                         "note": f"gn {gn}{' (default)' if default else ''}, {per} views/forward"}  # fmt: skip
                fields = _decode_fields(out, med, times, peak, total, officials.get(size), extra)
                if "speedup_vs_official" in fields:
                    fields["note"] += f", x{fields['speedup_vs_official']:.2f} vs official"
                return fields

            report.measure(f"decode/{size}/ours_gn_{gn}", ours_row)

        if compiled is not None:

            def compiled_row(size=size, pixel=pixel, latent=latent, base=base):
                t = time.perf_counter()
                vae.decode_rgba(compiled, pixel, latent)  # compiles (one graph per input shape)
                _sync(device)
                first = time.perf_counter() - t
                out, med, times, peak, total = repeat_timed(
                    lambda: vae.decode_rgba(compiled, pixel, latent), device, cfg.warmup, cfg.repeats
                )
                outputs[size]["ours_compiled"] = out.float().cpu()
                extra = {**base, "first_call_seconds": first, "note": f"first call (compiling) {first:.1f} s"}
                return _decode_fields(out, med, times, peak, total, officials.get(size), extra)

            report.measure(f"decode/{size}/ours_compiled", compiled_row)

    big = max(cfg.sizes)
    pixel, latent = bench_passes.smooth_inputs(big, 0, device, dtype)
    base = {"size": big, "dtype": dname}

    def tiled_row():
        tiles = len(tile_plan(big, cfg.tile, cfg.tile_overlap)) ** 2
        out, med, times, peak, total = repeat_timed(
            lambda: vae.decode_rgba(decoder, pixel, latent, tile_size=cfg.tile, tile_overlap=cfg.tile_overlap),
            device, cfg.warmup, cfg.repeats,
        )  # fmt: skip
        overlap = "default overlap" if cfg.tile_overlap is None else f"overlap {cfg.tile_overlap}"
        extra = {**base, "tile_size": cfg.tile, "tile_overlap": cfg.tile_overlap, "tiles": tiles,
                 "note": f"{tiles} tiles of {cfg.tile}, {overlap}; diff: tiling changes the result"}  # fmt: skip
        return _decode_fields(out, med, times, peak, total, officials.get(big), extra)

    report.measure(f"decode/{big}/ours_tiled_{cfg.tile}", tiled_row)

    def limited_row():
        limit = cfg.limit_gb * GIB
        fields = {**base, "limit_gib": cfg.limit_gb, "limit_applied": device.type == "cuda"}
        if device.type == "cuda":
            _free_memory()
            total_mem = torch.cuda.get_device_properties(device).total_memory
            fraction = min(1.0, limit / total_mem)
            fields["memory_fraction"] = fraction
            torch.cuda.set_per_process_memory_fraction(fraction, device)
        try:
            # what "auto" and the views-per-batch default see (they should see the cap)
            free = _process_free_memory(device)
            if free is not None:
                fields["free_gib_seen_by_defaults"] = free / GIB
            fields["auto_tile_size"] = vae.default_tile_size(device, dtype, big, big)
            fields["views_per_batch"] = vae.default_views_per_batch(device, dtype, big, big)
            out, med, times, peak, total = repeat_timed(
                lambda: vae.decode_rgba(decoder, pixel, latent, tile_size="auto"), device, 0, 1
            )
        finally:
            if device.type == "cuda":
                torch.cuda.set_per_process_memory_fraction(1.0, device)
        fields["note"] = (
            f"cap {cfg.limit_gb:g} GiB, auto tile {fields['auto_tile_size']}, {fields['views_per_batch']} views/forward"
            if device.type == "cuda"
            else "no cap on CPU (same call)"
        )
        return _decode_fields(out, med, times, peak, total, officials.get(big), fields)

    report.measure(f"decode/{big}/limit_{cfg.limit_gb:g}GB", limited_row)

    if cfg.cpu_reference:
        small = min(cfg.sizes)

        def reference_row():
            cpu = torch.device("cpu")
            pixel, latent = bench_passes.smooth_inputs(small, 0, device, dtype)  # the same (rounded) inputs
            ref_decoder = bench_passes.load_decoder(None, cpu, torch.float32)
            t = time.perf_counter()
            ref = bench_decode.Official(ref_decoder)(pixel.float().cpu(), latent.float().cpu()).float()
            dt = time.perf_counter() - t
            diffs = {f"max_abs_diff_{k}_vs_cpu_fp32": _max_diff(v, ref) for k, v in outputs.get(small, {}).items()}
            worst = max(diffs.values(), default=float("nan"))
            return {"size": small, "dtype": "float32", "seconds": dt, **diffs,
                    "note": f"official scheme, CPU fp32; worst row vs it {worst:.1e}"}  # fmt: skip

        report.measure(f"decode/{small}/cpu_fp32_reference", reference_row)


# ---------------------------------------------------------------------------------------
# (c): SD1.5 attention sharing


def build_unet(width: int, device, dtype) -> UNetModel:
    """The SD1.5 UNet; at full width with weights generated from its manifest."""
    config = {**SD15_CONFIG, "model_channels": width}
    with torch.device("meta"):
        unet = UNetModel(**config)
    if width == SD15_CONFIG["model_channels"]:
        prefix = "diffusion_model."
        shapes = {k[len(prefix) :]: v for k, v in manifest_shapes("base_unet_sd15_ldm").items() if k.startswith(prefix)}
        state = make_state_dict(shapes, seed=3)
    else:  # narrow (quick runs): the same module tree, so the same units and code paths
        state = bench_sharing.random_state(unet, 0)
    unet.load_state_dict(state, strict=True, assign=True)
    del state
    return unet.to(device, dtype).eval().requires_grad_(False)


def attention_rows(cfg) -> list[str]:
    return [f"attention/{m.key}" for m in SD15_SHARING_MODES]


def run_attention(report: Report, cfg) -> None:
    device, dtype = cfg.device, cfg.dtype
    holder: dict = {}

    def get_unet():
        if "unet" not in holder:
            t = time.perf_counter()
            holder["unet"] = build_unet(cfg.unet_width, device, dtype)
            holder["build_seconds"] = time.perf_counter() - t
        return holder["unet"]

    for mode in SD15_SHARING_MODES:

        def row(mode=mode):
            unet = get_unet()
            control = mode.control is not None
            layout = None
            if cfg.unet_width == SD15_CONFIG["model_channels"]:  # the units' layout is the published file's
                with torch.device("meta"):
                    probe = AttentionSharing(unet, mode.group, control)
                layout = {k: list(v.shape) for k, v in probe.state_dict().items()} == manifest_shapes(mode.unet_file)
            with torch.no_grad():
                plain, shared = bench_sharing.bench_case(
                    unet, mode.group, control, cfg.latent, device, dtype, cfg.attn_repeats
                )
            fields = {"mode": mode.label, "frames": mode.group, "control": control, "latent": cfg.latent,
                      "image_side": cfg.latent * 8, "rows": 2 * mode.group, "model_channels": cfg.unet_width,
                      "dtype": str(dtype).replace("torch.", ""), "plain_ms": 1000 * plain, "shared_ms": 1000 * shared,
                      "overhead": shared / plain, "seconds": shared,
                      "note": f"{mode.group} frame(s){' + control' if control else ''}: plain {1000 * plain:.1f} ms,"
                              f" shared x{shared / plain:.2f}"}  # fmt: skip
            if layout is not None:
                fields["layout_matches_file"] = layout
            return fields

        report.measure(f"attention/{mode.key}", row)
    if "build_seconds" in holder:
        report.data["meta"]["unet_build_seconds"] = holder["build_seconds"]
    holder.clear()
    _free_memory()


# ---------------------------------------------------------------------------------------
# (d): VAE-stage training through the CLI


def train_rows(cfg) -> list[str]:
    return ["train/vae"]


def training_cli() -> list[str]:
    """The training command line: ``python -m lib_layerdiffuse.training`` (the older
    ``lib_layerdiffuse.train`` where a checkout predates it)."""
    new = (ROOT / "lib_layerdiffuse" / "training" / "__main__.py").exists()
    return [sys.executable, "-m", "lib_layerdiffuse.training" if new else "lib_layerdiffuse.train"]


def run_train(report: Report, cfg) -> None:
    t = cfg.train
    steps = cfg.train_steps or t["steps"]

    def row():
        with tempfile.TemporaryDirectory() as tmp:
            # the flags of benchmarks/train_vae.py: a throw-away stand-in VAE (1 step), no samples,
            # no evaluation, one export at the end; --steps timed steps, the first (warm-up) included
            cmd = training_cli() + [
                "vae", "--synthetic", str(max(64, t["batch_size"] * steps)), "--out", str(Path(tmp) / "run"),
                "--steps", str(steps), "--batch-size", str(t["batch_size"]), "--size", str(t["size"]),
                "--widths", t["widths"], "--disc-width", str(t["disc_width"]), "--vae-steps", "1",
                "--vae-width", "8", "--sample-every", "0", "--save-every", str(10**9), "--eval-count", "0",
                "--log-every", str(steps), "--export-dtype", "fp16", "--no-resume", "--device", cfg.device.type,
            ]  # fmt: skip
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
            env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
            start = time.perf_counter()
            res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=cfg.train_timeout)
            wall = time.perf_counter() - start
        lines = [x for x in res.stdout.splitlines() if x.startswith("[vae] {")]
        if res.returncode != 0 or not lines:
            raise RuntimeError(f"training CLI exit {res.returncode}: {(res.stdout + res.stderr)[-1500:]}")
        summary = json.loads(lines[-1][len("[vae] ") :])
        sps = summary["steps_run"] / summary["seconds"]
        return {"cli": " ".join(["python"] + cmd[1:4] + ["..."]), "widths": t["widths"], "size": t["size"],
                "batch_size": t["batch_size"], "steps": summary["steps_run"], "seconds": summary["seconds"],
                "steps_per_s": sps, "samples_per_s": sps * t["batch_size"], "peak_mem_mb": summary.get("peak_mem_mb"),
                "subprocess_wall_seconds": wall, "includes_first_step": True,
                "note": f"{sps:.2f} steps/s ({t['widths']} widths, {t['size']} px, batch {t['batch_size']})"}  # fmt: skip

    report.measure("train/vae", row)


# ---------------------------------------------------------------------------------------


def environment(device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "triton": fastnorm.HAS_TRITON, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}  # fmt: skip
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        env.update(device_name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   free_memory_gib=free / GIB, total_memory_gib=total / GIB)  # fmt: skip
    else:
        env["device_name"] = platform.processor() or platform.machine()
        try:
            info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
            env["free_memory_gib"] = int(info["MemAvailable"].split()[0]) * 1024 / GIB
            env["total_memory_gib"] = int(info["MemTotal"].split()[0]) * 1024 / GIB
        except (OSError, KeyError, ValueError):
            pass
    if fastnorm.HAS_TRITON:
        env["triton_version"] = getattr(fastnorm.triton, "__version__", None)
    return env


# ---------------------------------------------------------------------------------------
# (e): the Qwen-Image-Layered RGBA VAE (lib_layerdiffuse/qwen_vae.py), fp32 as the decompose method runs it

QWEN_SIDES = {"cuda": [640, 1024], "cpu": [256], "quick": [64]}  # the model's two buckets on a GPU


def qwen_rows(cfg) -> list[str]:
    return [f"qwen_vae/{side}" for side in cfg.qwen_sides]


def run_qwen_vae(report: Report, cfg) -> None:
    """Encode one RGBA image and decode one layer at each side, the released widths (quick: base width 8), random
    weights: seconds and peak memory; ``decode_bytes_per_pixel`` is what the Neo adapter's room request assumes
    (lib_layerdiffuse/hosts/forge.py: VAE_BYTES_PER_PIXEL)."""
    from lib_layerdiffuse.qwen_vae import QwenVAEConfig, expected_shapes, load_vae

    device = cfg.device
    config = QwenVAEConfig(4, 8 if cfg.quick else 96, 16, (1, 2, 4, 4), 2, (False, True, True))
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=gen) * (0.02 if len(shape) > 1 else 1.0)
             for k, shape in expected_shapes(config).items()}  # fmt: skip
    for k in [k for k in state if k.endswith("gamma") or ".norm" in k and k.endswith("weight")]:
        state[k] = torch.ones_like(state[k])
    vae = load_vae(state).to(device)
    del state
    for side in cfg.qwen_sides:

        def row(side=side):
            x = torch.rand(1, 4, side, side, device=device) * 2 - 1
            z = torch.randn(1, 16, side // 8, side // 8, device=device)
            with torch.no_grad():
                _, enc, enc_all, enc_peak, _ = repeat_timed(lambda: vae.encode_mean(x), device, cfg.warmup,
                                                            cfg.repeats)  # fmt: skip
                out, dec, dec_all, dec_peak, total = repeat_timed(lambda: vae.decode(z), device, cfg.warmup,
                                                                  cfg.repeats)  # fmt: skip
            fields = {"side": side, "base_dim": config.base_dim, "dtype": "float32", "encode_seconds": enc,
                      "decode_seconds": dec, "seconds": enc + dec, "encode_peak_gib": enc_peak, "peak_gib": dec_peak,
                      "decode_bytes_per_pixel": dec_peak * GIB / (side * side), "finite": bool(torch.isfinite(out).all()),
                      "note": f"encode {enc:.2f} s, decode {dec:.2f} s per layer"}  # fmt: skip
            if total is not None:
                fields["peak_total_gib"] = total
            return fields

        report.measure(f"qwen_vae/{side}", row)
    vae.to("cpu")  # the caller's next section gets the device memory back
    _free_memory()


SECTIONS = {"decode": (decode_rows, run_decode), "attention": (attention_rows, run_attention),
            "train": (train_rows, run_train), "qwen": (qwen_rows, run_qwen_vae)}  # fmt: skip


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes and few iterations (a CPU smoke run)")
    ap.add_argument("--out", default="gpu_acceptance.json", help="JSON report, rewritten after every row")
    ap.add_argument("--dtype", choices=list(DTYPES), help="default: fp16 on CUDA, fp32 on CPU")
    ap.add_argument("--sizes", type=int, nargs="+", help="decode sides (multiples of 64); the largest is tiled")
    ap.add_argument("--tile", type=int, help="tile side of the tiled row")
    ap.add_argument("--tile-overlap", type=int, help="tile overlap of the tiled row (default: decode_rgba's)")
    ap.add_argument("--limit-gb", type=float, default=6.0, help="GiB the capped decode may use (CUDA)")
    ap.add_argument("--repeats", type=int, help="timed calls per decode row (median)")
    ap.add_argument("--train-steps", type=int, help="steps of the training row")
    ap.add_argument("--only", nargs="+", choices=list(SECTIONS), help="run only these sections")
    ap.add_argument("--compile", action="store_true", help="add a torch.compile decode row per size (slow to build)")
    ap.add_argument("--cpu-reference", action="store_true", help="fp32 CPU official decode at the smallest size")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("CUDA is not available here; pass --device cpu")
    profile = PROFILES["quick" if args.quick else ("cuda" if device.type == "cuda" else "cpu")]
    cfg = SimpleNamespace(**profile)
    cfg.device = device
    cfg.dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    cfg.sizes = args.sizes or profile["sizes"]
    cfg.tile = args.tile or profile["tile"]
    cfg.tile_overlap = args.tile_overlap if args.tile_overlap is not None else profile.get("tile_overlap")
    cfg.repeats = args.repeats or profile["repeats"]
    cfg.limit_gb, cfg.train_steps = args.limit_gb, args.train_steps
    cfg.train_timeout = 900
    cfg.compile, cfg.cpu_reference, cfg.quick = args.compile, args.cpu_reference, args.quick
    cfg.sections = args.only or list(SECTIONS)
    cfg.qwen_sides = QWEN_SIDES["quick" if args.quick else device.type if device.type in QWEN_SIDES else "cpu"]
    cfg.out = Path(args.out)
    return cfg, args


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    cfg, args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # `timeout` cuts the run: the summary still prints
    env = environment(cfg.device)
    print(f"torch {env['torch']}, device {env['device']} ({env['device_name']}), "
          f"free memory {_fmt(env.get('free_memory_gib'), 1, '.1f', ' GiB')} of "
          f"{_fmt(env.get('total_memory_gib'), 1, '.1f', ' GiB')}, triton {env['triton']}, "
          f"dtype {str(cfg.dtype).replace('torch.', '')}, {'quick' if cfg.quick else 'full'} run", flush=True)  # fmt: skip
    planned = [name for s in cfg.sections for name in SECTIONS[s][0](cfg)]
    settings = {k: (str(v) if isinstance(v, torch.device | torch.dtype | Path) else v) for k, v in vars(cfg).items()}
    meta = {**env, "argv": sys.argv[1:] if argv is None else list(argv), "settings": settings,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    report = Report(cfg.out, meta, planned)
    print(f"writing {cfg.out}; {len(planned)} rows planned\n{table_line('', None)}", flush=True)
    try:
        for s in cfg.sections:
            SECTIONS[s][1](report, cfg)
    except KeyboardInterrupt:
        report.finish(interrupted=True)
        return 130
    report.finish()
    failed = [n for n, r in report.data["rows"].items() if r["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
