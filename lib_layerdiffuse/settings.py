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
from .rgba import pil_to_rgba

ARG_ORDER = (
    "enabled", "method", "weight", "stop_at", "fg_image", "bg_image", "blend_image", "resize_mode",
    "output_origin", "fg_additional_prompt", "bg_additional_prompt", "blend_additional_prompt",
    "layers", "resolution", "true_cfg", "normalize",  # ours, after the official twelve: Qwen-Image-Layered
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
    "layers": "layerdiffusion_layers",
    "resolution": "layerdiffusion_resolution",
    "true_cfg": "layerdiffusion_true_cfg",
    "normalize": "layerdiffusion_cfg_normalize",
}
DECOMPOSE_FIELDS = ("layers", "resolution", "true_cfg", "normalize")  # read by the decompose method only
# Layers: the pipeline accepts any count (frame k of the layer-3D RoPE is simply position k); its
# default is 4 and the model's documentation speaks of 3 to 10 layers. 2 is the smallest split into
# layers at all; above 10 nothing documents the model's behaviour, and each layer adds a frame of tokens.
LAYERS_RANGE = (2, 10)
TRUE_CFG_RANGE = (1.0, 20.0)  # 1 = off (no negative pass), the pipeline's default 4
ALIASES = {"ending_step": "stop_at", "method_label": "method"}
# Stop At's threshold is the sigma at timestep (1 - stop_at) * 999 (unet.percent_to_sigma): txt2img's
# first step is at timestep 999, so below one timestep whether that step runs with LayerDiffuse
# depends on rounding; from here on it always does.
MIN_STOP_AT = 0.001
XYZ_AXES = (  # (field, axis label, value type): the X/Y/Z plot axes; values are checked like any argument
    ("method", "Method", str),
    ("weight", "Weight", float),
    ("stop_at", "Stop At", float),
)


TITLE = "LayerDiffuse"  # the script's title (scripts/layerdiffuse.py): its key in the API's alwayson_scripts
_ARGS_HELP = (
    f"a list of at most {len(ARG_ORDER)} values in this order: "
    + ", ".join("stop_at (ending_step)" if n == "stop_at" else n for n in ARG_ORDER)
    + '; or a list holding one object with those names, e.g. [{"enabled": true, "method": "..."}]'
)


def check_args(args, *, request: bool = False) -> list:
    """The shape of the script's arguments, as a list; raises :class:`SettingsError` saying what they
    must be.

    ``request=True`` checks the ``args`` value of an API request as sent (hosts/common.py checks it
    before the API spreads it over the script's positions, where a 13th value would be dropped and a
    string split into characters): a list or tuple of at most 12 values, or the named form, one object
    alone (a bare object is taken as ``[object]``). Otherwise ``args`` are the script's positional
    arguments, where the host has filled the positions after a named form with UI defaults.
    """
    if request and isinstance(args, dict):
        args = [args]
    if not isinstance(args, (list, tuple)):
        kinds = {str: "a string", bool: "a boolean", int: "a number", float: "a number", type(None): "null"}
        got = kinds.get(type(args), f"a {type(args).__name__}")
        if args is not None:
            shown = repr(args)
            got += ": " + (shown if len(shown) <= 60 else shown[:57] + "...")
        raise SettingsError(f"args must be {_ARGS_HELP}; got {got}")
    if len(args) > len(ARG_ORDER):
        raise SettingsError(f"args has {len(args)} values, but the script takes at most {len(ARG_ORDER)} arguments. "
                            f"args must be {_ARGS_HELP}")  # fmt: skip
    if request and any(isinstance(a, dict) for a in args) and (len(args) != 1):
        raise SettingsError(
            f"args holds an object among {len(args)} values: the named form is one object alone. args must be "
            f"{_ARGS_HELP}"
        )
    return list(args)


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
    layers: int = 4
    resolution: int = 640
    true_cfg: float = 4.0
    normalize: bool = True

    @property
    def mode(self) -> _modes.Mode:
        return _modes.resolve(self.method)

    def image(self, which: str):
        """ "fg" / "bg" / "blend" -> the uploaded RGBA array or None."""
        return getattr(self, f"{which}_image")

    def prompt(self, which: str) -> str:
        return getattr(self, f"{which}_additional_prompt")

    @classmethod
    def from_args(cls, args, overrides: dict | None = None) -> Settings:
        """From the script's positional args, or a single dict (the named API form); ``overrides``
        (field -> value, from X/Y/Z plot axes) replace values of an enabled request."""
        args = check_args(args)
        if args and isinstance(args[0], dict):
            # the named form; the API fills the remaining positions with UI defaults
            values = dict(args[0])
        else:
            values = dict(zip(ARG_ORDER, args, strict=False))
        if overrides:
            values = {ALIASES.get(k, k): v for k, v in values.items()}
            values.update({k: v for k, v in overrides.items() if k != "enabled"})
        return cls.from_dict(values)

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
            if name in ("enabled", "output_origin", "normalize"):
                out[name] = _to_bool(name, value)
            elif name == "layers":
                out[name] = _to_int(name, value, *LAYERS_RANGE)
            elif name == "resolution":
                out[name] = _to_int(name, value, 640, 1024)
                if out[name] not in (640, 1024):
                    raise SettingsError(f"resolution must be 640 or 1024 (the model's two buckets), got {out[name]}")
            elif name == "true_cfg":
                out[name] = _to_float(name, value, *TRUE_CFG_RANGE)
            elif name in ("weight", "stop_at"):
                out[name] = _to_float(name, value, 0.0, 2.0 if name == "weight" else 1.0)
                if name == "stop_at" and out[name] < MIN_STOP_AT:
                    raise SettingsError(
                        f"stop_at (Stop At) must be at least {MIN_STOP_AT:g}, got {out[name]:g}: below that "
                        "LayerDiffuse would end within the first of the model's 1000 timesteps, before the first "
                        f"sampling step (at 0 it takes no part at all). Use a value in [{MIN_STOP_AT:g}, 1]; 1 keeps "
                        "it on to the end."
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
        if mode.apply == "decompose":
            del out[INFOTEXT_KEYS["weight"]], out[INFOTEXT_KEYS["stop_at"]], out[INFOTEXT_KEYS["resize_mode"]]
            out.update({INFOTEXT_KEYS[name]: getattr(self, name) for name in DECOMPOSE_FIELDS})
            return out
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


def _to_int(name, value, lo, hi) -> int:
    """A whole number in ``[lo, hi]``: an integer, or a float / text that is one ("4", 4.0)."""
    try:
        x = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        x = None
    if x is None or not x.is_integer():
        raise SettingsError(f"{name} must be a whole number between {lo} and {hi}, got {value!r}")
    if not lo <= x <= hi:
        raise SettingsError(f"{name} must be between {lo} and {hi}, got {int(x)}")
    return int(x)


def _to_resize_mode(value) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(_modes.RESIZE_MODES):
        return _modes.RESIZE_MODES[value]
    for m in _modes.RESIZE_MODES:
        if str(value).strip().lower() == m.lower():
            return m
    raise SettingsError(f"resize_mode must be one of {', '.join(_modes.RESIZE_MODES)}, got {value!r}")


# Layer images: the formats an upload may have, and at most this many pixels (read from the
# header before any pixel is decoded): a 4096x4096 RGBA image is 64 MB as uint8, 256 MB as
# the float32 copy the pipeline makes, which bounds the work one request can ask for.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
_FORMAT_ALIASES = {"MPO": "JPEG"}  # PIL names a JPEG with extra pictures (phone cameras) MPO
MAX_IMAGE_PIXELS = 4096 * 4096
_ACCEPTED = "PNG, JPEG or WebP"


def _check_pixels(name: str, width: int, height: int, kind: str = "a layer image") -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise SettingsError(
            f"{name} is {width}x{height} ({width * height / 1e6:.1f} MP), above the limit of "
            f"{MAX_IMAGE_PIXELS / 1e6:.1f} MP ({MAX_IMAGE_PIXELS} pixels, e.g. 4096x4096) for {kind}: "
            "scale it down to about the generation size and send it again."
        )


def check_init_image(index: int, width: int, height: int) -> None:
    """img2img init images: the host decoded them before any script ran; LayerDiffuse's own work
    on them (RGBA copies, the transparent encoder) is bounded like a layer image's."""
    _check_pixels(f"init image {index + 1}", width, height, "an img2img image LayerDiffuse encodes")


def _format_of(prefix: bytes) -> str | None:
    """The format PIL would say a file is, from its first bytes only (no plugin parses it)."""
    Image.init()
    for fmt in Image.ID:
        accept = Image.OPEN.get(fmt, (None, None))[1]
        try:
            if accept is not None and accept(prefix):
                return fmt
        except Exception:
            continue
    return None


def _open_base64(name: str, value: str) -> Image.Image:
    """A base64 / data URL image opened lazily (header only) and checked: format, pixels."""
    text = value.strip()
    if text.startswith("data:"):
        head, comma, text = text.partition(",")
        if not comma:
            raise SettingsError(
                f"{name} is a broken data URL: no comma after {head[:40]!r}. "
                "Send 'data:image/png;base64,<base64 data>' or the bare base64 text."
            )
        if not head.lower().endswith(";base64"):
            raise SettingsError(
                f"{name} is a data URL that is not base64 ({head[:40]!r}). "
                "Send 'data:image/png;base64,<base64 data>' or the bare base64 text."
            )
    text = "".join(text.split())  # line breaks some encoders insert
    if not text:
        raise SettingsError(f"{name} holds no image data (empty base64). Send a {_ACCEPTED} image as base64.")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SettingsError(
            f"{name} is not a base64-encoded image (invalid base64). Send a {_ACCEPTED} image "
            "as base64 or as a data URL (PNG with alpha recommended)."
        ) from None
    try:
        image = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)  # JPEG's opener also reads MPO
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise SettingsError(
            f"{name} is far above the limit of {MAX_IMAGE_PIXELS / 1e6:.1f} MP for a layer image "
            "(a decompression bomb, or a huge image): scale it down to about the generation size."
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        found = _format_of(raw[:16])
        if found is not None and found not in IMAGE_FORMATS and found not in _FORMAT_ALIASES:
            raise SettingsError(
                f"{name} is in {found} format; layer images must be {_ACCEPTED}. Convert it (PNG keeps "
                "alpha) and send it again."
            ) from None
        if found is not None:
            raise SettingsError(
                f"{name} is a damaged {_FORMAT_ALIASES.get(found, found)} file (its header cannot be read). "
                "Save the image again and send the whole file."
            ) from None
        raise SettingsError(
            f"{name} is not a base64-encoded image (the data is not a readable {_ACCEPTED} file). Send a "
            f"{_ACCEPTED} image as base64 or as a data URL (PNG with alpha recommended)."
        ) from None
    fmt = _FORMAT_ALIASES.get(image.format, image.format)
    if fmt not in IMAGE_FORMATS:  # formats= above makes this unreachable; kept as the rule itself
        raise SettingsError(f"{name} is in {image.format} format; layer images must be {_ACCEPTED}.")
    _check_pixels(name, *image.size)
    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise SettingsError(
            f"{name} is far above the limit of {MAX_IMAGE_PIXELS / 1e6:.1f} MP for a layer image: scale it down."
        ) from None
    except Exception as e:  # PIL's decoders raise OSError, ValueError, SyntaxError, struct.error, ...
        raise SettingsError(
            f"{name}: the {fmt} image could not be decoded, its data is damaged or truncated "
            f"({type(e).__name__}: {e}). Save it again and send the whole file."
        ) from None
    return image


def decode_image(name: str, value) -> np.ndarray:
    """A layer image from the UI (PIL / numpy / Gradio dict) or the API (base64, data URL) as uint8 RGBA.

    Base64 images must be PNG, JPEG or WebP (the decoded format is checked, not the data URL's
    type); every image is at most :data:`MAX_IMAGE_PIXELS`, checked from the header before
    the pixels are decoded. Alpha is kept (LA, palette and tRNS transparency included).
    """
    if isinstance(value, dict):  # gradio image editor values
        value = value.get("image", value.get("background", value.get("composite")))
    if isinstance(value, str):
        value = _open_base64(name, value)
    if isinstance(value, Image.Image):
        _check_pixels(name, *value.size)
        try:
            return pil_to_rgba(value)
        except (OSError, ValueError) as e:
            raise SettingsError(f"{name}: the image could not be read ({type(e).__name__}: {e}).") from None
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError):  # ragged nested lists
        raise SettingsError(
            f"{name} must be an RGB or RGBA image, got a {type(value).__name__} that is not one"
        ) from None
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.size == 0:
        raise SettingsError(f"{name} must be an RGB or RGBA image, got an array of shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise SettingsError(f"{name} must be an RGB or RGBA image of numbers, got an array of {arr.dtype}")
    _check_pixels(name, arr.shape[1], arr.shape[0])
    if arr.dtype != np.uint8:
        if not np.isfinite(arr).all():
            raise SettingsError(f"{name} holds NaN or infinite values: send an image with values in 0..1 or 0..255")
        arr = (
            (np.clip(arr.astype(np.float32), 0, 1) * 255).astype(np.uint8)
            if arr.max() <= 1.0
            else arr.clip(0, 255).astype(np.uint8)
        )
    if arr.shape[2] == 3:
        arr = np.concatenate([arr, np.full(arr.shape[:2] + (1,), 255, np.uint8)], axis=2)
    return arr
