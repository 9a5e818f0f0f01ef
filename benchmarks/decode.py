"""Transparent decode speed and memory: the official sequential 8-pass scheme against ours.

Same weights (random; timings do not depend on values), same inputs. Variants alternate
in order and each ratio is taken from medians measured in the same run.

- CUDA (fp16 by default): sizes 512 / 1024 / 2048; official sequential (nn.GroupNorm,
  8 batch-1 passes), ours (``decode_rgba`` defaults: fast GroupNorm, memory-adaptive
  batching), at 2048 also ours tiled (``--tile``), optionally ours compiled (``--compile``,
  compile time printed). Peak memory from ``torch.cuda.max_memory_allocated``.
- CPU (fp32): sizes 256 / 512; official sequential and ours. Peak memory is the process's
  resident-set peak above its level before the call (Linux ``VmHWM``, reset per call).
- ``--norms``: one decoder forward with each GroupNorm implementation (torch / plain /
  triton where available), the basis of the per-device default.

    python benchmarks/decode.py [--sizes 256 512] [--repeats 3] [--device cuda] [--dtype fp16]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib_layerdiffuse import fastnorm  # noqa: E402
from lib_layerdiffuse.vae import TransparentVAEDecoder, compile_decoder, decode_rgba, set_group_norm_mode  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@torch.no_grad()
def official_sequential(decoder, pixel, latent):
    """The official estimate_augmented: 8 batch-1 passes in turn, clip, undo, lower median."""
    results = []
    for flip in (False, True):
        for k in range(4):
            p, lat = (pixel.flip(3), latent.flip(3)) if flip else (pixel, latent)
            y = decoder(p.rot90(k, (2, 3)), lat.rot90(k, (2, 3))).clip(0, 1).rot90(-k, (2, 3))
            results.append(y.flip(3) if flip else y)
    return torch.stack(results).median(dim=0).values


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def timed(fn, device):
    """(output, seconds, peak GiB above the level before the call)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        try:  # "5" resets the resident-set peak (VmHWM) of this process
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        base = _status("VmRSS")
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status("VmHWM")
    return out, dt, (peak - base) / 2**30


class Official:
    """The decoder as the official code runs it: nn.GroupNorm (mode "torch")."""

    def __init__(self, decoder):
        self.decoder = decoder

    def __call__(self, pixel, latent):
        set_group_norm_mode(self.decoder, "torch")
        try:
            return official_sequential(self.decoder, pixel, latent)
        finally:
            set_group_norm_mode(self.decoder, "auto")


def compare(variants: dict, device, repeats: int, title: str, reference: str):
    for name, fn in variants.items():  # warm-up (and compilation)
        _, dt, _ = timed(fn, device)
        if "compiled" in name:
            print(f"  ({name}: first call incl. compilation {dt:.1f} s)")
    times = {k: [] for k in variants}
    peaks = {k: 0.0 for k in variants}
    outs = {}
    for r in range(repeats):
        order = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for name in order:
            outs[name], dt, peak = timed(variants[name], device)
            times[name].append(dt)
            peaks[name] = max(peaks[name], peak)
    base = statistics.median(times[reference])
    ref = outs[reference].float()
    print(f"\n{title}, {repeats} repeats (median; ratio = {reference} time / variant time)")
    for name, ts in times.items():
        med = statistics.median(ts)
        d = outs[name].float() - ref
        rel = (d.norm() / ref.norm()).item()
        print(
            f"  {name:26s} {1000 * med:10.1f} ms  x{base / med:6.2f}  peak {peaks[name]:6.2f} GiB"
            f"  max|diff| {d.abs().max().item():.2e}  relL2 {rel:.1e}"
        )
    return {k: statistics.median(v) for k, v in times.items()}


def run(device, dtype, size, repeats, tile=None, compiled=False):
    torch.manual_seed(0)
    decoder = TransparentVAEDecoder().to(device, dtype).eval().requires_grad_(False)
    pixel = torch.rand(1, 3, size, size, device=device, dtype=dtype)
    latent = torch.randn(1, 4, size // 8, size // 8, device=device, dtype=dtype)
    # its own copy: on CPU decode_rgba switches our decoder to channels-last weights in place
    official = Official(copy.deepcopy(decoder) if device.type == "cpu" else decoder)
    variants = {
        "official sequential": lambda: official(pixel, latent),
        "ours (decode_rgba)": lambda: decode_rgba(decoder, pixel, latent),
    }
    if tile:
        variants[f"ours tiled {tile}"] = lambda: decode_rgba(decoder, pixel, latent, tile_size=tile)
    if compiled:
        cdec = compile_decoder(decoder)
        variants["ours compiled"] = lambda: decode_rgba(cdec, pixel, latent)
    name = str(dtype).replace("torch.", "")
    compare(variants, device, repeats, f"{device.type} {name} {size}x{size}, 1 image, 8 passes", "official sequential")


def run_norms(device, dtype, size, repeats):
    torch.manual_seed(0)
    decoder = TransparentVAEDecoder().to(device, dtype).eval().requires_grad_(False)
    pixel = torch.rand(1, 3, size, size, device=device, dtype=dtype)
    latent = torch.randn(1, 4, size // 8, size // 8, device=device, dtype=dtype)
    modes = ["torch", "plain"] + (["triton"] if fastnorm.HAS_TRITON and device.type == "cuda" else [])

    def one(mode):
        def fn():
            set_group_norm_mode(decoder, mode)
            with torch.no_grad():
                return decoder(pixel, latent)

        return fn

    name = str(dtype).replace("torch.", "")
    compare(
        {f"groupnorm {m}": one(m) for m in modes},
        device,
        repeats,
        f"{device.type} {name} {size}x{size}, one decoder forward (batch 1)",
        "groupnorm torch",
    )
    set_group_norm_mode(decoder, "auto")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), help="default: fp16 on CUDA, fp32 on CPU")
    ap.add_argument("--sizes", type=int, nargs="*")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tile", type=int, default=1152, help="tile side for the tiled variant at 2048 (GPU)")
    ap.add_argument("--compile", action="store_true", help="add a torch.compile variant (slow to build)")
    ap.add_argument("--norms", action="store_true", help="compare GroupNorm implementations instead")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("fp16" if cuda else "fp32")]
    sizes = args.sizes or ([512, 1024, 2048] if cuda else [256, 512])
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}, triton {fastnorm.HAS_TRITON}"
    )
    if cuda:
        print(torch.cuda.get_device_name(device))
    for size in sizes:
        if args.norms:
            run_norms(device, dtype, size, args.repeats)
        else:
            run(
                device,
                dtype,
                size,
                args.repeats,
                tile=args.tile if cuda and size >= 2048 else None,
                compiled=args.compile,
            )


if __name__ == "__main__":
    main()
