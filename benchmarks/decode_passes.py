"""Fewer augmented passes: each count's error against the official 8-pass decode.

For 1, 2, 4 and 8 passes (``decode_rgba(..., passes=n)``) prints the alpha error against
8 passes (mean |diff| and max |diff|, alpha in [0, 1]), the RGB mean error and the time.
The 8 views are decoded once per image and each subset combined from them exactly as
``decode_rgba`` does (checked against it on the first image).

The weights are generated (tests/weightgen.py), not the published ones, and the inputs
are smooth random images: the figures are a proxy for the disagreement between views,
not the error on real generations. With the real decoder file, pass ``--weights PATH``.

    python benchmarks/decode_passes.py [--size 256] [--images 4] [--weights file.safetensors]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from lib_layerdiffuse.vae import VIEWS, VIEWS_8, TransparentVAEDecoder, _combine, _run_views, decode_rgba  # noqa: E402


def load_decoder(path, device, dtype):
    decoder = TransparentVAEDecoder()
    if path:
        from safetensors.torch import load_file

        decoder.load_state_dict(load_file(path), strict=True)
    else:
        from weightgen import make_state_dict, manifest_shapes

        decoder.load_state_dict(make_state_dict(manifest_shapes("vae_transparent_decoder"), seed=1), strict=True)
    return decoder.to(device, dtype).eval().requires_grad_(False)


def smooth_inputs(size, seed, device, dtype):
    g = torch.Generator().manual_seed(seed)
    pixel = F.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=(size, size), mode="bicubic").clip(0, 1)
    latent = F.interpolate(torch.randn(1, 4, 8, 8, generator=g), size=(size // 8, size // 8), mode="bicubic")
    return pixel.to(device, dtype), latent.to(device, dtype)


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, help="default: 1024 on CUDA, 256 on CPU")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--weights", help="a transparent decoder .safetensors (default: generated weights)")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    size = args.size or (1024 if device.type == "cuda" else 256)
    decoder = load_decoder(args.weights, device, dtype)
    print(
        f"torch {torch.__version__}, {device} {dtype}, {size}x{size}, {args.images} images, "
        f"weights: {args.weights or 'generated (proxy)'}"
    )

    index = {v: i for i, v in enumerate(VIEWS_8)}
    errs = {n: [] for n in VIEWS}
    for img in range(args.images):
        pixel, latent = smooth_inputs(size, img, device, dtype)
        stacked = _run_views(decoder, pixel, latent, VIEWS_8, 1)  # [1, 8, 4, H, W]
        full = _combine(stacked, 8).float()
        for n, views in VIEWS.items():
            out = _combine(stacked[:, [index[v] for v in views]], n).float()
            if img == 0:  # the subsets equal decode_rgba's own
                direct = decode_rgba(decoder, pixel, latent, passes=n)
                assert (direct - out.clip(0, 1)).abs().max() < 1e-5
            d = (out - full).abs()
            errs[n].append((d[:, 0].mean().item(), d[:, 0].max().item(), d[:, 1:].mean().item()))

    times = {}
    pixel, latent = smooth_inputs(size, 0, device, dtype)
    for n in VIEWS:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        decode_rgba(decoder, pixel, latent, passes=n)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times[n] = time.perf_counter() - t

    print("\n| passes | alpha mean abs error vs 8 | alpha max abs error vs 8 | RGB mean abs error vs 8 | time |")
    print("|---|---|---|---|---|")
    for n in VIEWS:
        e = torch.tensor(errs[n])
        print(f"| {n} | {e[:, 0].mean():.4f} | {e[:, 1].max():.3f} | {e[:, 2].mean():.4f} | {1000 * times[n]:.0f} ms |")


if __name__ == "__main__":
    main()
