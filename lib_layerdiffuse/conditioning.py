"""Layer images (fg / bg / blend) as the UNet side consumes them.

The input is an RGBA upload; it is flattened on 50% grey, then resized to the generation
size with one of the three official resize modes. SDXL layer modes VAE-encode the result
(posterior mean, deterministic) into a condition latent concatenated after the noisy
latent; SD1.5 fg2bg / bg2fg feed it to the control encoder.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from . import modes as _modes
from .errors import SettingsError
from .rgba import flatten_on_grey


def _hq_resize(x: np.ndarray, width: int, height: int) -> np.ndarray:
    """INTER_AREA when shrinking, LANCZOS4 otherwise (as the official)."""
    if x.shape[0] == height and x.shape[1] == width:
        return x
    shrink = width * height < x.shape[0] * x.shape[1]
    try:
        return cv2.resize(x, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LANCZOS4)
    except cv2.error as e:  # never a bare OpenCV assertion
        raise SettingsError(
            f"A {x.shape[1]}x{x.shape[0]} image could not be resized to {width}x{height} "
            f"({str(e).strip().splitlines()[-1]}). Use an image closer to the generation's shape."
        ) from None


# "Crop and Resize" scales the whole image until it covers the target, then crops. For an
# extreme aspect ratio (a 1x4000 strip to 64x64) that intermediate would be huge (256000x64
# here); above this many times the target's area the crop is taken from the source first.
_CROP_FIRST_RATIO = 4


def resize_image(x: np.ndarray, resize_mode: str, height: int, width: int) -> np.ndarray:
    """HxWxC to ``height`` x ``width``: "Just Resize", "Crop and Resize" or "Resize and Fill".

    Any aspect ratio works: a side that would scale below one pixel keeps one pixel ("Resize
    and Fill"), and a cover that would be far larger than the target is cropped from the
    source before resizing ("Crop and Resize"); ordinary images take the official path.
    """
    if resize_mode not in _modes.RESIZE_MODES:
        raise SettingsError(f"Unknown resize mode {resize_mode!r}; use one of {', '.join(_modes.RESIZE_MODES)}")
    if x.ndim != 3 or x.shape[0] < 1 or x.shape[1] < 1:
        raise SettingsError(f"An image to resize must be HxWxC with at least one pixel, got shape {x.shape}")
    if height < 1 or width < 1:
        raise SettingsError(f"Cannot resize an image to {width}x{height}: width and height must be at least 1.")
    if resize_mode == "Just Resize":
        return np.ascontiguousarray(_hq_resize(x, width, height))
    old_h, old_w = x.shape[:2]
    k_h, k_w = height / old_h, width / old_w
    if resize_mode == "Resize and Fill":
        k = min(k_h, k_w)
        borders = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]], axis=0)
        canvas = np.tile(np.median(borders, axis=0).astype(x.dtype)[None, None], (height, width, 1))
        new_w = min(width, max(1, int(np.round(old_w * k))))
        new_h = min(height, max(1, int(np.round(old_h * k))))
        y = _hq_resize(x, new_w, new_h)
        top, left = max(0, (height - y.shape[0]) // 2), max(0, (width - y.shape[1]) // 2)
        canvas[top : top + y.shape[0], left : left + y.shape[1]] = y
        return np.ascontiguousarray(canvas)
    k = max(k_h, k_w)
    new_w, new_h = int(np.round(old_w * k)), int(np.round(old_h * k))
    if new_w * new_h > _CROP_FIRST_RATIO * width * height:
        # the same centre crop, taken in source pixels (at least one), then resized to the target
        src_w = min(old_w, max(1, int(np.round(width / k))))
        src_h = min(old_h, max(1, int(np.round(height / k))))
        top, left = (old_h - src_h) // 2, (old_w - src_w) // 2
        return np.ascontiguousarray(_hq_resize(x[top : top + src_h, left : left + src_w], width, height))
    y = _hq_resize(x, new_w, new_h)
    top, left = max(0, (y.shape[0] - height) // 2), max(0, (y.shape[1] - width) // 2)
    return np.ascontiguousarray(y[top : top + height, left : left + width])


def as_rgba_float(image) -> np.ndarray:
    """An upload (PIL image, uint8 or float array, RGB or RGBA) as float32 HxWx4 in [0, 1]."""
    arr = np.asarray(image.convert("RGBA") if hasattr(image, "convert") else image)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise SettingsError(f"A layer image must be HxWx3 or HxWx4, got shape {arr.shape}")
    arr = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)
    if arr.shape[2] == 3:
        arr = np.concatenate([arr, np.ones_like(arr[..., :1])], axis=2)
    return arr


def prepare_layer_image(image, resize_mode: str, height: int, width: int) -> np.ndarray:
    """Flatten on grey, then resize: float32 HxWx3 RGB in [0, 1] (the order the official uses)."""
    return resize_image(flatten_on_grey(as_rgba_float(image)), resize_mode, height, width)


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """HxWx3 float to ``[1, 3, H, W]``."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).movedim(-1, 0)[None].float()


def layer_prompt(extra: str | None, main: str) -> str | None:
    """The per-layer prompt: ``extra + ', ' + main``, or None when no extra text is given."""
    if not extra or not extra.strip():
        return None
    return f"{extra}, {main}"


def condition_latent(latents: list[torch.Tensor]) -> torch.Tensor:
    """The concat condition of an SDXL layer mode: its images' latents (diffusion space) in
    the mode's order (fg or bg first, then blend), ``[1, 4 * len, h, w]``."""
    return torch.cat(latents, dim=1)


def check_inputs(mode: _modes.Mode, images: dict, height: int, width: int) -> None:
    """Refuse a generation whose mode lacks a required layer image or has a bad size."""
    missing = [_modes.INPUT_NAMES[k] for k in mode.inputs if images.get(k) is None]
    if missing:
        raise SettingsError(
            f"'{mode.label}' needs a {' and a '.join(missing)} image: upload it in the LayerDiffuse panel."
        )
    if height % 8 or width % 8:
        raise SettingsError(f"LayerDiffuse needs width and height that are multiples of 8, got {width}x{height}.")
