"""Upscaling an image that has alpha: the colour through any RGB upscaler, the alpha beside it.

RGB upscalers (ESRGAN-like models) drop the alpha, and the colour under fully transparent
pixels is arbitrary (often black): upscaled, it bleeds into the visible edge as a dark halo.
So the colour is padded first: fully transparent pixels get the colour pushed out from the
visible ones (:func:`.rgba.pad_rgb`, the push-pull fill of the transparent encoder) while
every pixel with alpha > 0 keeps its own. The alpha is resized on its own with Lanczos,
clamped to the range of its source neighbourhood (no ringing: flat 0 and 255 areas stay
exact up to one source pixel from an edge), placed as the colour was, and recombined.

PIL images in and out (8-bit); no WebUI. :func:`upscale_rgba` is the whole operation for an
upscaler given as a callable; a host whose own step does the RGB upscale calls
:func:`split` before it and :func:`place_alpha` / :func:`combine` after it
(``hosts/extras.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from .rgba import has_alpha, pad_rgb, pil_to_rgba

LANCZOS = Image.Resampling.LANCZOS
_NEIGHBOURS = np.ones((3, 3), np.uint8)


@dataclass
class Split:
    """An image with transparency taken apart for an RGB upscaler."""

    rgb: Image.Image  # padded colour, RGB: what the upscaler gets
    alpha: np.ndarray  # HxW uint8, the source's alpha
    source: Image.Image  # the image as it came


def split(image: Image.Image) -> Split | None:
    """The padded colour and the alpha of ``image``; None when it has no transparency (no alpha
    band or transparent colour, or every pixel opaque): such images need nothing from us."""
    if not has_alpha(image):
        return None
    rgba = pil_to_rgba(image)
    alpha = np.ascontiguousarray(rgba[..., 3])
    if alpha.min() == 255:
        return None
    return Split(Image.fromarray(pad_colour(rgba), "RGB"), alpha, image)


def pad_colour(rgba: np.ndarray) -> np.ndarray:
    """HxWx3 uint8: the colour of a uint8 RGBA array, fully transparent pixels filled from the
    visible ones (pixels with any alpha keep theirs, so nothing visible changes)."""
    fill = pad_rgb(rgba.astype(np.float32) / 255.0)
    fill = (fill * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
    return np.where(rgba[..., 3:] > 0, rgba[..., :3], fill)


def resize_alpha(alpha: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HxW uint8 alpha resized to ``size`` (width, height) with Lanczos.

    When enlarging, each pixel is clamped to the min / max of the 3x3 source pixels around it
    (nearest-mapped), which removes Lanczos' over- and undershoot: no faint alpha around a cut-out
    and no dents inside opaque areas. Shrinking is left plain (the clamp would drop thin lines).
    """
    w, h = (int(v) for v in size)
    sh, sw = alpha.shape
    if (w, h) == (sw, sh):
        return alpha.copy()
    out = np.asarray(Image.fromarray(alpha, "L").resize((w, h), LANCZOS))
    if w < sw or h < sh:
        return np.ascontiguousarray(out)
    lo = cv2.resize(cv2.erode(alpha, _NEIGHBOURS), (w, h), interpolation=cv2.INTER_NEAREST)
    hi = cv2.resize(cv2.dilate(alpha, _NEIGHBOURS), (w, h), interpolation=cv2.INTER_NEAREST)
    return np.clip(out, lo, hi)


def place_alpha(alpha: np.ndarray, size: tuple[int, int], inner: tuple[int, int] | None = None) -> np.ndarray:
    """The alpha for a colour image of ``size`` (width, height) made from the source.

    ``inner`` None: the whole source was stretched to ``size``. Otherwise the source was resized
    to ``inner`` and centred on a ``size`` canvas (cropped where larger, as "crop to fit" does);
    uncovered canvas is transparent.
    """
    w, h = (int(v) for v in size)
    if inner is None:
        return resize_alpha(alpha, (w, h))
    iw, ih = (int(v) for v in inner)
    resized = resize_alpha(alpha, (iw, ih))
    x, y = w // 2 - iw // 2, h // 2 - ih // 2  # the paste box of PIL's Image.paste, may be negative
    out = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + iw, w), min(y + ih, h)
    if x1 > x0 and y1 > y0:
        out[y0:y1, x0:x1] = resized[y0 - y : y1 - y, x0 - x : x1 - x]
    return out


def is_stretch(source: tuple[int, int], size: tuple[int, int], slack: int = 0) -> bool:
    """Whether ``size`` is ``source`` scaled by one factor, each side rounded down by less than
    ``slack + 1`` pixels (upscalers round their sides down to a multiple of 8: slack 8)."""
    (sw, sh), (w, h) = source, size
    # w = floor(sw * s) - dw, h = floor(sh * s) - dh with 0 <= dw, dh <= slack: the ranges of s overlap
    return max(w / sw, h / sh) < min((w + slack + 1) / sw, (h + slack + 1) / sh)


def combine(rgb: Image.Image, alpha: np.ndarray) -> Image.Image:
    """RGBA from an upscaled colour image and an alpha of the same size."""
    if rgb.mode != "RGB":
        rgb = rgb.convert("RGB")
    if rgb.size != (alpha.shape[1], alpha.shape[0]):
        raise ValueError(f"colour {rgb.size} and alpha {alpha.shape[1]}x{alpha.shape[0]} differ in size")
    return Image.merge("RGBA", (*rgb.split(), Image.fromarray(np.ascontiguousarray(alpha), "L")))


def upscale_rgba(
    image: Image.Image, size: tuple[int, int], upscale_rgb: Callable[[Image.Image, tuple[int, int]], Image.Image]
) -> Image.Image:
    """``image`` upscaled by ``upscale_rgb(rgb_image, (width, height))`` keeping its alpha.

    An image without transparency goes to ``upscale_rgb`` as it is, and its result is returned.
    With transparency: the padded colour is upscaled, the alpha resized to the result's size
    (the whole image stretched to it) and the two combined into RGBA.
    """
    parts = split(image)
    if parts is None:
        return upscale_rgb(image, size)
    rgb = upscale_rgb(parts.rgb, size)
    return combine(rgb, place_alpha(parts.alpha, rgb.size))
