"""The WebUI settings of LayerDiffuse (Settings > LayerDiffuse): one table that the host's
settings page, the infotext and the pipeline all read.

These are machine choices (speed, memory, files), not per-image arguments: they live in the
host's options (``shared.opts``, ``override_settings`` in the API) rather than in the script's
arguments. Those that change the output are written to the infotext under
``layerdiffusion_*`` keys when they differ from the official behaviour, and paste back.
"""

from __future__ import annotations

import numbers
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from .errors import SettingsError
from .vae import MULTIPLE, VIEWS

SECTION = ("layerdiffuse", "LayerDiffuse")
TILING = ("auto", "always", "never")


@dataclass(frozen=True)
class Option:
    key: str  # the host's option name (shared.opts)
    label: str
    default: object
    kind: str  # "radio", "slider", "checkbox" or "text": the control on the settings page
    choices: tuple = ()
    minimum: float = 0
    maximum: float = 0
    step: float = 1
    infotext: str | None = None  # the infotext key it pastes back from
    help: str = ""


OPTIONS = (
    Option("layerdiffuse_decode_passes", "Transparent decode passes", 8, "radio", choices=(8, 4, 2, 1),
           infotext="layerdiffusion_passes",
           help="8 = the official test-time augmentation (flips x rotations, median); 4, 2 or 1 are about 2x, "
                "4x, 8x faster with slightly noisier edges."),
    Option("layerdiffuse_tiling", "Tiled transparent decode", "auto", "radio", choices=TILING,
           infotext="layerdiffusion_tiling",
           help="auto: tiles only when a one-view pass would not fit the GPU memory this process may use; "
                "always: tiles larger images at the tile size; never: the whole image at once (official)."),
    Option("layerdiffuse_tile_size", "Tile size (pixels)", 1024, "slider", minimum=256, maximum=4096, step=MULTIPLE,
           infotext="layerdiffusion_tile_size",
           help="The largest tile side; auto uses a smaller one where memory requires."),
    Option("layerdiffuse_extra_memory_gb", "GPU memory for decoding views in batches (GB)", 2.0, "slider",
           minimum=0.0, maximum=64.0, step=0.5,
           help="Activations above one view's pass; more batches views together (faster on large GPUs)."),
    Option("layerdiffuse_compile", "Compile the transparent decoder (torch.compile)", False, "checkbox",
           help="Faster decodes after a slow first one per image size (about a minute on a GPU)."),
    Option("layerdiffuse_keep_models", "Keep the transparent decoder and encoder in memory between generations",
           True, "checkbox", help="Off: they are released after each generation and loaded again next time."),
    Option("layerdiffuse_previews", "Save and show checkerboard previews", True, "checkbox"),
    Option("layerdiffuse_save_psd", "Save a layered PSD of each multi-layer result", True, "checkbox",
           help="Beside the group's images: Background, Foreground (with alpha) and Blended (hidden) as layers "
                "of one -layers.psd file that Photoshop, Krita, GIMP and Photopea open."),
    Option("layerdiffuse_background_hint", "Add ', simple grey background' to the prompts of the transparent methods",
           False, "checkbox", infotext="layerdiffusion_background_hint",
           help="Only the frames that are decoded to transparency (the foreground); helps on fine-tunes far from "
                "SDXL base / SD1.5 (Illustrious, NoobAI, Pony), where the layer otherwise comes out opaque or "
                "empty."),
    Option("layerdiffuse_extras_alpha", "Extras: upscale images that have alpha keeping their transparency", True,
           "checkbox"),
    Option("layerdiffuse_models_dir", "Folder of the LayerDiffuse weight files", "", "text",
           help="Empty: models/layer_model (or --layerdiffuse-models-dir). A folder named here must exist; "
                "LayerDiffuse does not create it."),
)  # fmt: skip
BY_KEY = {o.key: o for o in OPTIONS}


@dataclass(frozen=True)
class DecodeOptions:
    """The settings one generation uses (read once, when it starts)."""

    passes: int = 8
    tiling: str = "auto"
    tile_size: int = 1024
    extra_memory_gb: float = 2.0
    compile: bool = False
    keep_models: bool = True
    previews: bool = True
    save_psd: bool = True
    models_dir: str = ""
    background_hint: bool = False

    @classmethod
    def read(cls, get: Callable[[str, object], object]) -> DecodeOptions:
        """From the host's options (``get(key, default)``), each through :func:`check`: values that
        reached the options unchecked (``config.json``, a host without the set-time check) are
        refused here, by name, before the generation starts."""
        return cls(**{name: check(key, get(key, BY_KEY[key].default)) for name, key in _FIELDS.items()})

    def infotext(self, tile_used: int | None) -> dict:
        """What differs from the official decode, under the keys that paste back."""
        out = {}
        if self.passes != 8:
            out["layerdiffusion_passes"] = self.passes
        if tile_used is not None:
            out["layerdiffusion_tiling"] = "always"  # pasting reproduces the tiles on any machine
            out["layerdiffusion_tile_size"] = tile_used
        if self.background_hint:  # pasting turns it on again; the pasted prompt is not given it twice
            out["layerdiffusion_background_hint"] = True
        return out


_FIELDS = {  # DecodeOptions field -> option key
    "passes": "layerdiffuse_decode_passes",
    **{name: f"layerdiffuse_{name}" for name in ("tiling", "tile_size", "extra_memory_gb", "compile", "keep_models",
                                                 "previews", "save_psd", "models_dir", "background_hint")},
}  # fmt: skip
assert set(VIEWS) == set(BY_KEY["layerdiffuse_decode_passes"].choices)
assert all(isinstance(c, type(o.default)) for o in OPTIONS for c in o.choices)  # check() relies on it


# -- the one check of every option value ------------------------------------------------------
#
# Values reach the options from the settings page, ``/sdapi/v1/options``, ``override_settings``
# (both stored as sent: a JSON ``true`` or ``2.5`` arrives as is) and ``config.json``. Each value
# is checked by the type of its row's default: booleans take JSON booleans only (the text "false"
# is refused, not read as true), whole numbers take integers and integral floats (8.0 is 8; a
# slider may send floats) but not booleans or 2.5, numbers take int or float, text choices take
# one of the choices, and the folder is a path to an existing folder (see check_folder).


def check(key: str, value):
    """``value`` of the option ``key`` as the generation uses it; raises :class:`SettingsError`
    naming the option when it has the wrong type or lies outside the row's choices or range."""
    option = BY_KEY[key]
    if option.kind == "text":
        return check_folder(key, value)
    if isinstance(option.default, bool):
        return _boolean(option, value)
    if isinstance(option.default, str):
        return _text(option, value)
    if isinstance(option.default, int):
        return _whole(option, value)
    return _real(option, value)


def _where(option: Option) -> str:
    return f" (Settings > LayerDiffuse > {option.label})"


def _boolean(option: Option, value) -> bool:
    if not isinstance(value, bool):
        raise SettingsError(f"{option.key} must be true or false (a JSON boolean), got {value!r}{_where(option)}")
    return value


def _text(option: Option, value) -> str:
    if not isinstance(value, str) or value not in option.choices:
        raise SettingsError(f"{option.key} must be one of {', '.join(option.choices)}, got {value!r}{_where(option)}")
    return value


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def _whole(option: Option, value) -> int:
    whole = _is_number(value) and float(value).is_integer()  # False for 2.5, nan and inf
    if option.choices:
        if not whole or int(value) not in option.choices:
            raise SettingsError(
                f"{option.key} must be one of {', '.join(map(str, option.choices))}, got {value!r}{_where(option)}"
            )
        return int(value)
    if not _is_number(value):
        raise SettingsError(f"{option.key} must be a number, got {value!r}{_where(option)}")
    if not whole:
        raise SettingsError(f"{option.key} must be a whole number, got {value!r}{_where(option)}")
    number = int(value)
    _in_range(option, number)
    if number % option.step:
        raise SettingsError(f"{option.key} must be a multiple of {option.step:g}, got {number}{_where(option)}")
    return number


def _real(option: Option, value) -> float:
    if not _is_number(value):
        raise SettingsError(f"{option.key} must be a number, got {value!r}{_where(option)}")
    number = float(value)
    _in_range(option, number)  # NaN is in no range
    return number


def _in_range(option: Option, number) -> None:
    if not option.minimum <= number <= option.maximum:
        raise SettingsError(
            f"{option.key} must be between {option.minimum:g} and {option.maximum:g}, got {number!r}{_where(option)}"
        )


def check_folder(key: str, value) -> str:
    """The weight-folder setting: text; empty (or spaces) means the default folder, which the host
    creates; anything else must name a folder that exists. LayerDiffuse never creates a folder named
    here: a typo or a number (``12345``) would otherwise become a new folder in the WebUI's working
    directory, which relative paths are relative to."""
    option = BY_KEY[key]
    if not isinstance(value, str):
        raise SettingsError(f"{key} must be text, the path of a folder, got {value!r}{_where(option)}")
    if "\0" in value:
        raise SettingsError(f"{key} holds a NUL character: {value!r} is no folder path{_where(option)}")
    text = value.strip()
    if not text:
        return ""
    where = repr(text) if os.path.abspath(text) == text else f"{text!r} ({os.path.abspath(text)})"
    correct = f"correct the path in Settings > LayerDiffuse > {option.label} (empty: the default folder)"
    try:
        st = os.stat(text)
    except FileNotFoundError:
        raise SettingsError(
            f"{key}: the folder {where} does not exist. Create it (LayerDiffuse creates only its default folder, "
            f"models/layer_model), or {correct}"
        ) from None
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise SettingsError(f"{key}: {where} cannot be used as a folder ({reason}): {correct}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise SettingsError(f"{key}: {where} is a file, not a folder: {correct}")
    return text
