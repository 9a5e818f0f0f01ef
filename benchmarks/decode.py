"""Transparent decode speed: the official sequential 8-pass scheme against ``decode_rgba``.

Same weights (random; timings do not depend on values), same inputs, same output
(the max difference is printed). CPU: fp32 at 256x256 by default. CUDA, when present:
fp16 and bf16 at 1024x1024, with peak memory. The two variants alternate, and the
ratio is taken from medians measured in the same run.

    python benchmarks/decode.py [--sizes 256 512] [--repeats 3] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib_layerdiffuse.vae import TransparentVAEDecoder, decode_rgba  # noqa: E402


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


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return out, dt, peak


def run(device, dtype, size, repeats):
    torch.manual_seed(0)
    decoder = TransparentVAEDecoder().to(device, dtype).eval()
    pixel = torch.rand(1, 3, size, size, device=device, dtype=dtype)
    latent = torch.randn(1, 4, size // 8, size // 8, device=device, dtype=dtype)
    variants = {
        "official sequential": lambda: official_sequential(decoder, pixel, latent),
        "ours (decode_rgba)": lambda: decode_rgba(decoder, pixel, latent),
    }
    for fn in variants.values():  # warm-up
        fn()
    times = {k: [] for k in variants}
    peaks = {k: 0.0 for k in variants}
    outs = {}
    for r in range(repeats):
        order = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for name in order:
            outs[name], dt, peak = timed(variants[name], device)
            times[name].append(dt)
            peaks[name] = max(peaks[name], peak)
    diff = (outs["official sequential"].float() - outs["ours (decode_rgba)"].float()).abs().max().item()
    base = statistics.median(times["official sequential"])
    print(f"\n{device.type} {str(dtype).replace('torch.', '')} {size}x{size}, 1 image, 8 passes, {repeats} repeats")
    for name, ts in times.items():
        med = statistics.median(ts)
        mem = f", peak {peaks[name]:.2f} GiB" if device.type == "cuda" else ""
        print(f"  {name:22s} {1000 * med:9.1f} ms/image  x{base / med:5.2f}{mem}")
    print(f"  max |difference| {diff:.2e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", type=int, nargs="*")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}")
    if device.type == "cuda":
        print(torch.cuda.get_device_name(device))
        for dtype in (torch.float16, torch.bfloat16):
            for size in args.sizes or [1024]:
                run(device, dtype, size, args.repeats)
    else:
        for size in args.sizes or [256]:
            run(device, torch.float32, size, args.repeats)


if __name__ == "__main__":
    main()
