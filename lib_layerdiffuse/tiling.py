"""Tiled transparent decode: overlapping latent-aligned tiles, feathered blending.

For outputs whose whole decode does not fit the GPU (hires fix, 2048 and above). Each tile
is decoded on its own (with the full augmentation) and the tiles are blended with weights
that ramp linearly across the overlap, so seams fade instead of cutting. The decoder sees
the whole image through its attention layers at 1/64 size, so a tiled decode differs from
the whole one; the error is measured in tests/test_fast_decode.py and benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ALIGN = 8  # one latent pixel: tile edges must fall on the latent grid


def tile_plan(size: int, tile: int, overlap: int | None = None) -> list[int]:
    """Start offsets of tiles of side ``min(tile, size)`` covering ``size`` pixels.

    The tiles are spread evenly (each overlap at least ``overlap``, default ``tile // 4``),
    starts on multiples of 8, the first at 0 and the last ending at ``size``.
    """
    if size % ALIGN or tile % ALIGN:
        raise ValueError(f"size {size} and tile {tile} must be multiples of {ALIGN}")
    if tile >= size:
        return [0]
    overlap = default_overlap(tile) if overlap is None else overlap
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, {tile}), got {overlap}")
    n = -(-(size - overlap) // (tile - overlap))
    n = max(n, 2)
    span = (size - tile) // ALIGN
    return [round(i * span / (n - 1)) * ALIGN for i in range(n)]


def default_overlap(tile: int) -> int:
    return max(ALIGN, tile // 4 // ALIGN * ALIGN)


def _ramp(length: int, start: int, size: int, overlap: int, device) -> torch.Tensor:
    """1-D blend weight of a tile: linear ramps over ``overlap`` on sides with a neighbour."""
    pos = torch.arange(length, device=device, dtype=torch.float32) + 0.5
    w = torch.ones(length, device=device)
    if overlap > 0:
        if start > 0:
            w = torch.minimum(w, pos / overlap)
        if start + length < size:
            w = torch.minimum(w, (length - pos) / overlap)
    return w


def decode_tiled(
    decode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    pixel: torch.Tensor,
    latent: torch.Tensor,
    tile: int,
    overlap: int | None = None,
) -> torch.Tensor:
    """Blend ``decode(pixel_tile, latent_tile)`` (``[B, 4, h, w]`` float) over a tile grid.

    pixel ``[B, 3, H, W]`` and latent ``[B, 4, H/8, W/8]``; returns float32 ``[B, 4, H, W]``.
    Accumulates in fp32 on pixel's device: 20 bytes per pixel beyond the tiles' own decode.
    """
    b, _, h, w = pixel.shape
    overlap = default_overlap(tile) if overlap is None else overlap
    ys, xs = tile_plan(h, tile, overlap), tile_plan(w, tile, overlap)
    th, tw = min(tile, h), min(tile, w)
    acc = torch.zeros(b, 4, h, w, device=pixel.device, dtype=torch.float32)
    wsum = torch.zeros(h, w, device=pixel.device, dtype=torch.float32)
    for y in ys:
        wy = _ramp(th, y, h, overlap, pixel.device)
        for x in xs:
            wt = wy[:, None] * _ramp(tw, x, w, overlap, pixel.device)[None, :]
            out = decode(
                pixel[..., y : y + th, x : x + tw],
                latent[..., y // ALIGN : (y + th) // ALIGN, x // ALIGN : (x + tw) // ALIGN],
            )
            acc[..., y : y + th, x : x + tw] += out.float() * wt
            wsum[y : y + th, x : x + tw] += wt
    return acc / wsum
