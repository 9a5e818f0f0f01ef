"""Overhead of SD1.5 attention sharing: a UNet forward with our units against the plain one.

SD1.5 UNet layout (lib_layerdiffuse.ldm_unet, random weights), a batch of cond + uncond
rows for one group of frames, modes with 1 frame, 2 frames + control and 3 frames. The
two variants alternate and each ratio comes from medians measured in the same run.
CPU: fp32, small latent (CI size). CUDA: fp16 at 512x512 (64x64 latent).

    python benchmarks/attention_sharing.py [--latent 16] [--repeats 3] [--device cuda]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib_layerdiffuse.attention_sharing import AttentionSharing  # noqa: E402
from lib_layerdiffuse.ldm_unet import SD15_CONFIG, UNetModel  # noqa: E402

CASES = [("transparent", 1, False), ("fg2bg / bg2fg", 2, True), ("joint", 3, False)]


def random_state(module: torch.nn.Module, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in module.state_dict().items():
        fan_in = math.prod(v.shape[1:]) if v.ndim > 1 else 1
        out[k] = torch.randn(v.shape, generator=g) / math.sqrt(fan_in) * (0.05 if v.ndim == 1 else 1)
    return out


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--latent", type=int, help="latent side (default: 64 on CUDA, 16 on CPU)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    side = args.latent or (64 if device.type == "cuda" else 16)
    torch.manual_seed(0)
    with torch.device("meta"):
        unet = UNetModel(**SD15_CONFIG)
    unet.load_state_dict(random_state(unet, 0), assign=True)
    unet = unet.to(device, dtype).eval()
    print(
        f"torch {torch.__version__}, {device} {str(dtype).replace('torch.', '')}, latent {side}x{side}, threads {torch.get_num_threads()}"
    )
    for name, frames, control in CASES:
        p, s = bench_case(unet, frames, control, side, device, dtype, args.repeats)
        extra = " + control" if control else ""
        print(
            f"  {name:14s} frames {frames}{extra:10s} plain {1000 * p:8.1f} ms   shared {1000 * s:8.1f} ms   x{s / p:.2f}"
        )


def bench_case(unet, frames, control, side, device, dtype, repeats):
    rows = 2 * frames  # one group, cond and uncond
    x = torch.randn(rows, 4, side, side, device=device, dtype=dtype)
    t = torch.full((rows,), 500, device=device)
    ctx = torch.randn(rows, 77, 768, device=device, dtype=dtype)
    with torch.device("meta"):
        sharing = AttentionSharing(unet, frames, control)
    sharing.load_state_dict(random_state(sharing, 1))
    sharing.to(device, dtype)
    sharing.state.cond_mark = torch.tensor([0.0] * frames + [1.0] * frames, device=device)
    if control:
        sharing.set_control(torch.rand(1, 3, side * 8, side * 8, device=device))

    def plain():
        unet(x, t, ctx)

    def shared():
        sharing.install()
        try:
            unet(x, t, ctx)
        finally:
            sharing.restore()

    for fn in (plain, shared):
        fn()
    times = {"plain": [], "shared": []}
    for r in range(repeats):
        order = [("plain", plain), ("shared", shared)]
        for key, fn in order if r % 2 == 0 else order[::-1]:
            times[key].append(timed(fn, device))
    return statistics.median(times["plain"]), statistics.median(times["shared"])


if __name__ == "__main__":
    with torch.no_grad():
        main()
