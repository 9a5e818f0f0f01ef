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
    return cv2.resize(x, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LANCZOS4)


def resize_image(x: np.ndarray, resize_mode: str, height: int, width: int) -> np.ndarray:
    """HxWxC to ``height`` x ``width``: "Just Resize", "Crop and Resize" or "Resize and Fill"."""
    if resize_mode not in _modes.RESIZE_MODES:
        raise SettingsError(f"Unknown resize mode {resize_mode!r}; use one of {', '.join(_modes.RESIZE_MODES)}")
    if resize_mode == "Just Resize":
        return np.ascontiguousarray(_hq_resize(x, width, height))
    old_h, old_w = x.shape[:2]
    k_h, k_w = height / old_h, width / old_w
    if resize_mode == "Resize and Fill":
        k = min(k_h, k_w)
        borders = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]], axis=0)
        canvas = np.tile(np.median(borders, axis=0).astype(x.dtype)[None, None], (height, width, 1))
        y = _hq_resize(x, int(np.round(old_w * k)), int(np.round(old_h * k)))
        top, left = max(0, (height - y.shape[0]) // 2), max(0, (width - y.shape[1]) // 2)
        canvas[top : top + y.shape[0], left : left + y.shape[1]] = y
        return np.ascontiguousarray(canvas)
    k = max(k_h, k_w)
    y = _hq_resize(x, int(np.round(old_w * k)), int(np.round(old_h * k)))
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
