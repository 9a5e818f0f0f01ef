"""The script's settings: one object from UI values, API arguments or an infotext.

Positional arguments follow the official extension's order, so its API clients work
unchanged: enabled, method, weight, ending_step (Stop At), fg_image, bg_image,
blend_image, resize_mode, output_origin, fg_additional_prompt, bg_additional_prompt,
blend_additional_prompt. A single dict as the first argument is the named form
(``stop_at`` or ``ending_step``). The infotext uses the official ``layerdiffusion_*`` keys.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import io
from dataclasses import dataclass, field, fields, replace

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import modes as _modes
from .errors import SettingsError

ARG_ORDER = (
    "enabled", "method", "weight", "stop_at", "fg_image", "bg_image", "blend_image", "resize_mode",
    "output_origin", "fg_additional_prompt", "bg_additional_prompt", "blend_additional_prompt",
)  # fmt: skip
IMAGES = ("fg_image", "bg_image", "blend_image")
PROMPTS = ("fg_additional_prompt", "bg_additional_prompt", "blend_additional_prompt")
INFOTEXT_KEYS = {  # field -> official infotext key
    "enabled": "layerdiffusion_enabled",
    "method": "layerdiffusion_method",
    "weight": "layerdiffusion_weight",
    "stop_at": "layerdiffusion_ending_step",
    "fg_image": "layerdiffusion_fg_image",
    "bg_image": "layerdiffusion_bg_image",
    "blend_image": "layerdiffusion_blend_image",
    "resize_mode": "layerdiffusion_resize_mode",
    "fg_additional_prompt": "layerdiffusion_fg_additional_prompt",
    "bg_additional_prompt": "layerdiffusion_bg_additional_prompt",
    "blend_additional_prompt": "layerdiffusion_blend_additional_prompt",
}
ALIASES = {"ending_step": "stop_at", "method_label": "method"}


@dataclass
class Settings:
    enabled: bool = False
    method: str = _modes.DEFAULT.label
    weight: float = 1.0
    stop_at: float = 1.0
    fg_image: np.ndarray | None = field(default=None, repr=False)
    bg_image: np.ndarray | None = field(default=None, repr=False)
    blend_image: np.ndarray | None = field(default=None, repr=False)
    resize_mode: str = _modes.DEFAULT_RESIZE
    output_origin: bool = False
    fg_additional_prompt: str = ""
    bg_additional_prompt: str = ""
    blend_additional_prompt: str = ""

    @property
    def mode(self) -> _modes.Mode:
        return _modes.resolve(self.method)

    def image(self, which: str):
        """ "fg" / "bg" / "blend" -> the uploaded RGBA array or None."""
        return getattr(self, f"{which}_image")

    def prompt(self, which: str) -> str:
        return getattr(self, f"{which}_additional_prompt")

    @classmethod
    def from_args(cls, args) -> Settings:
        """From the script's positional args, or a single dict (the named API form)."""
        args = list(args)
        if args and isinstance(args[0], dict):
            # the named form; A1111's API fills the remaining positions with UI defaults
            return cls.from_dict(args[0])
        if len(args) > len(ARG_ORDER):
            raise SettingsError(
                f"LayerDiffuse takes at most {len(ARG_ORDER)} arguments ({', '.join(ARG_ORDER)}), got {len(args)}"
            )
        return cls.from_dict(dict(zip(ARG_ORDER, args, strict=False)))

    @classmethod
    def from_dict(cls, values: dict, *, lenient_enabled: bool = False) -> Settings:
        """Key names and ``enabled`` are always checked; the other values only when enabled
        (a disabled request reads nothing else, images included). ``enabled`` must be a
        boolean; ``lenient_enabled`` also takes the text an infotext holds ("True")."""
        known = {f.name for f in fields(cls)}
        clean = {}
        for key, value in values.items():
            name = ALIASES.get(key, key)
            if name not in known:
                close = difflib.get_close_matches(str(key), [*ARG_ORDER, *ALIASES], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise SettingsError(f"unknown setting {key!r}{hint}; known settings: {', '.join(ARG_ORDER)}")
            if value is not None:  # missing or null means the default
                clean[name] = value
        enabled = clean.get("enabled", False)
        if not isinstance(enabled, (bool, np.bool_)) and not lenient_enabled:
            raise SettingsError(f"enabled must be true or false (a JSON boolean), got {enabled!r}")
        if not _to_bool("enabled", enabled):
            return cls()
        return cls()._validated(clean)

    def _validated(self, values: dict) -> Settings:
        out = {}
        for name, value in values.items():
            if name in ("enabled", "output_origin"):
                out[name] = _to_bool(name, value)
            elif name in ("weight", "stop_at"):
                out[name] = _to_float(name, value, 0.0, 2.0 if name == "weight" else 1.0)
                if name == "stop_at" and out[name] <= 0.0:
                    raise SettingsError(
                        "stop_at (Stop At) must be above 0: at 0 LayerDiffuse would take no part in sampling. "
                        "Use a value in (0, 1]; 1 keeps it on to the end."
                    )
            elif name == "method":
                try:
                    out[name] = _modes.resolve(value).label
                except ValueError as e:
                    raise SettingsError(str(e)) from None
            elif name == "resize_mode":
                out[name] = _to_resize_mode(value)
            elif name in IMAGES:
                out[name] = decode_image(name, value)
            else:
                if not isinstance(value, str):
                    raise SettingsError(f"{name} must be text, got {type(value).__name__}")
                out[name] = value
        return replace(self, **out)

    def infotext(self) -> dict:
        """The ``layerdiffusion_*`` keys for ``p.extra_generation_params``."""
        mode = self.mode
        out = {
            INFOTEXT_KEYS["enabled"]: True,
            INFOTEXT_KEYS["method"]: mode.label,
            INFOTEXT_KEYS["weight"]: self.weight,
            INFOTEXT_KEYS["stop_at"]: self.stop_at,
            INFOTEXT_KEYS["resize_mode"]: self.resize_mode,
        }
        for which in ("fg", "bg", "blend"):
            out[INFOTEXT_KEYS[f"{which}_image"]] = self.image(which) is not None
            if self.prompt(which):
                out[INFOTEXT_KEYS[f"{which}_additional_prompt"]] = self.prompt(which)
        return out

    @classmethod
    def from_infotext(cls, params: dict) -> Settings:
        """Settings back from parsed infotext (images are not stored; legacy labels resolve)."""
        values = {}
        for name, key in INFOTEXT_KEYS.items():
            if key in params and name not in IMAGES:
                values[name] = params[key]
        return cls.from_dict(values, lenient_enabled=True)


def _to_bool(name, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise SettingsError(f"{name} must be true or false, got {value!r}")


def _to_float(name, value, lo, hi) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name} must be a number between {lo} and {hi}, got {value!r}") from None
    if not lo <= x <= hi:
        raise SettingsError(f"{name} must be between {lo} and {hi}, got {x}")
    return x


def _to_resize_mode(value) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(_modes.RESIZE_MODES):
        return _modes.RESIZE_MODES[value]
    for m in _modes.RESIZE_MODES:
        if str(value).strip().lower() == m.lower():
            return m
    raise SettingsError(f"resize_mode must be one of {', '.join(_modes.RESIZE_MODES)}, got {value!r}")


def decode_image(name: str, value) -> np.ndarray:
    """A layer image from the UI (PIL / numpy / Gradio dict) or the API (base64, data URL) as uint8 RGBA."""
    if isinstance(value, dict):  # gradio image editor values
        value = value.get("image", value.get("background", value.get("composite")))
    if isinstance(value, str):
        text = value.split(",", 1)[1] if value.startswith("data:") else value
        try:
            value = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
            value.load()
        except (binascii.Error, ValueError, UnidentifiedImageError, OSError):
            raise SettingsError(f"{name} is not a base64-encoded image (PNG with alpha recommended)") from None
    if isinstance(value, Image.Image):
        return np.array(value.convert("RGBA"))
    arr = np.asarray(value)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.size == 0:
        raise SettingsError(f"{name} must be an RGB or RGBA image, got an array of shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = (
            (np.clip(arr.astype(np.float32), 0, 1) * 255).astype(np.uint8)
            if arr.max() <= 1.0
            else arr.clip(0, 255).astype(np.uint8)
        )
    if arr.shape[2] == 3:
        arr = np.concatenate([arr, np.full(arr.shape[:2] + (1,), 255, np.uint8)], axis=2)
    return arr
