"""RGBA toolkit: padding, flattening, preview and a PNG writer that keeps alpha.

Images are numpy float32 HxWxC in [0, 1], alpha last (RGBA), unless a function says
otherwise. Conversion to 8 bits happens only when writing, truncating as the official
extension does.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, PngImagePlugin

from .fileio import atomic_write

PYRAMID_STEP = 1.2  # each level of the alpha pyramid is 1/1.2 of the previous one
CELL = 64  # checkerboard cell size of the preview
GREYS = (0.45, 0.55)


def _check_rgba(rgba: np.ndarray, name: str = "rgba") -> np.ndarray:
    rgba = np.asarray(rgba)
    if rgba.ndim != 3 or rgba.shape[2] != 4:
        raise ValueError(f"{name} must be an HxWx4 RGBA array, got shape {rgba.shape}")
    return rgba.astype(np.float32, copy=False)


def _alpha_pyramid(color: np.ndarray, alpha: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(premultiplied colour, alpha) from full size down to a side of 1, coarsest first."""
    levels = []
    c, a = color * alpha, alpha
    while True:
        levels.append((c, a))
        h, w = a.shape[:2]
        if min(h, w) == 1:
            break
        size = (int(w / PYRAMID_STEP), int(h / PYRAMID_STEP))
        c = cv2.resize(c, size, interpolation=cv2.INTER_AREA)
        a = cv2.resize(a, size, interpolation=cv2.INTER_AREA)[:, :, None]
    return levels[::-1]


def pad_rgb(rgba: np.ndarray) -> np.ndarray:
    """RGB with the colour of transparent pixels filled in (push-pull over an alpha pyramid).

    Visible pixels keep their colour; transparent ones get a smooth extrapolation that
    starts from the alpha-weighted mean colour and is refined level by level
    (``fill = premultiplied + upsampled_fill * (1 - alpha)``). This is the format the
    LayerDiffuse models were trained on. Same numbers as the official ``pad_rgb`` given
    ``uint8 / 255``.
    """
    rgba = _check_rgba(rgba)
    levels = _alpha_pyramid(np.ascontiguousarray(rgba[..., :3]), np.ascontiguousarray(rgba[..., 3:]))
    top_c, top_a = levels[0]
    fill = top_c.sum(axis=(0, 1), keepdims=True) / top_a.sum(axis=(0, 1), keepdims=True).clip(1e-8, 1e32)
    for c, a in levels:
        fill = cv2.resize(fill, (c.shape[1], c.shape[0]), interpolation=cv2.INTER_LINEAR)
        fill = c + fill * (1.0 - a)
    return fill.astype(np.float32, copy=False)


def flatten_on_grey(rgba: np.ndarray) -> np.ndarray:
    """RGB composited on 50% grey: ``0.5 + (rgb - 0.5) * alpha`` (how layer inputs reach the VAE)."""
    rgba = _check_rgba(rgba)
    return (0.5 + (rgba[..., :3] - 0.5) * rgba[..., 3:]).astype(np.float32)


def checkerboard(height: int, width: int) -> np.ndarray:
    """HxWx1 grey checkerboard of about 64-px cells (0.45 / 0.55), as the official preview.

    The official board has ``H//64 x W//64`` cells stretched to the image, so cells are
    exactly 64 px only at multiples of 64, and it fails below 64 px; there we use one cell
    per side, i.e. a plain 0.45 grey.
    """
    cells = np.indices((max(height // CELL, 1), max(width // CELL, 1))).sum(axis=0) % 2
    cells = cv2.resize(cells.astype(np.float32), (width, height), interpolation=cv2.INTER_NEAREST)
    return (GREYS[0] + cells * (GREYS[1] - GREYS[0]))[..., None].astype(np.float32)


def checkerboard_preview(rgba: np.ndarray) -> np.ndarray:
    """RGB preview of a transparent image over the grey checkerboard: ``fg * a + cb * (1 - a)``."""
    rgba = _check_rgba(rgba)
    cb = checkerboard(*rgba.shape[:2])
    a = rgba[..., 3:]
    return (rgba[..., :3] * a + cb * (1.0 - a)).astype(np.float32)


def from_decoder(y) -> np.ndarray:
    """One decoder result ``[4, H, W]`` (alpha first, a tensor or array) to HxWx4 RGBA."""
    y = y.detach().float().cpu().numpy() if hasattr(y, "detach") else np.asarray(y, dtype=np.float32)
    y = np.clip(y, 0.0, 1.0)
    return np.ascontiguousarray(np.concatenate([y[1:4], y[:1]], axis=0).transpose(1, 2, 0))


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float [0, 1] to uint8 by ``x * 255`` clipped and truncated (as the official)."""
    return (np.asarray(image, dtype=np.float32) * 255.0).clip(0, 255).astype(np.uint8)


def to_pil(rgba: np.ndarray) -> Image.Image:
    """An 8-bit RGBA PIL image with straight alpha."""
    return Image.fromarray(to_uint8(_check_rgba(rgba)))


def write_png(path: str | os.PathLike, image, parameters: str | None = None) -> Path:
    """Write an RGBA PNG (straight alpha, 8 bits) atomically, with the WebUI's
    ``parameters`` text chunk so PNG Info reads the infotext back.

    image: HxWx4 float RGBA in [0, 1], uint8 HxWx4, or a PIL image (kept as it is, but
    must be RGBA). The file appears complete or not at all (temporary file, then rename).
    """
    if isinstance(image, Image.Image):
        if image.mode != "RGBA":
            raise ValueError(f"write_png keeps alpha and needs an RGBA image, got mode {image.mode}")
        pil = image
    else:
        arr = _check_rgba(image) if np.asarray(image).dtype != np.uint8 else np.asarray(image)
        if arr.ndim != 3 or arr.shape[2] != 4:
            raise ValueError(f"write_png keeps alpha and needs an HxWx4 RGBA array, got shape {arr.shape}")
        pil = Image.fromarray(arr) if arr.dtype == np.uint8 else to_pil(arr)
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            pil.save(f, format="PNG", pnginfo=info)

    return atomic_write(path, write)


ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def has_alpha(image: Image.Image) -> bool:
    """Whether a PIL image carries transparency: an alpha band (RGBA, LA, PA) or a
    transparent colour / palette entry (``info["transparency"]``, as PNG's tRNS gives to
    P, L, RGB and 1-bit images)."""
    return image.mode in ALPHA_MODES or "transparency" in image.info


def pil_to_rgba(image: Image.Image) -> np.ndarray:
    """Any PIL image as uint8 HxWx4 straight RGBA, keeping its transparency: LA and P or L
    with a transparent entry keep their alpha; 16-bit greys (PNG ``I;16``) are scaled to 8
    bits (PIL's own conversion clips them to white); images without alpha get 255."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        arr = np.asarray(image)
        grey = (arr.astype(np.float64).clip(0, 65535) / 257.0).round().astype(np.uint8)
        if image.mode == "F":
            grey = (arr.astype(np.float64).clip(0, 1) * 255.0).round().astype(np.uint8)
        alpha = np.full(arr.shape, 255, np.uint8)
        t = image.info.get("transparency")
        if isinstance(t, (int, float)) and image.mode != "F":
            alpha[arr == t] = 0
        return np.ascontiguousarray(np.stack([grey, grey, grey, alpha], axis=-1))
    if image.mode != "RGBA":
        image = image.convert("RGBA")  # P / L / RGB / 1 with a transparent entry, LA, PA: alpha kept
    return np.array(image)


def read_png(path: str | os.PathLike) -> tuple[np.ndarray, str | None]:
    """(HxWx4 uint8 RGBA, parameters text or None) of a PNG.

    RGBA is read as it is; LA, PA and palette / grey / RGB images with a transparent entry
    (tRNS) are converted to RGBA with their alpha. An image without any alpha is refused.
    """
    with Image.open(path) as im:
        im.load()
        if not has_alpha(im):
            raise ValueError(
                f"{path} has no alpha channel (mode {im.mode}, no transparent colour): the transparency was "
                "lost when it was saved. Save the transparent image as an RGBA PNG (LayerDiffuse's own files "
                "are), not as JPEG or through a tool that flattens it."
            )
        return pil_to_rgba(im), im.info.get("parameters")
