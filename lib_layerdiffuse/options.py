"""The WebUI settings of LayerDiffuse (Settings > LayerDiffuse): one table that the host's
settings page, the infotext and the pipeline all read.

These are machine choices (speed, memory, files), not per-image arguments: they live in the
host's options (``shared.opts``, ``override_settings`` in the API) rather than in the script's
arguments. Those that change the output are written to the infotext under
``layerdiffusion_*`` keys when they differ from the official behaviour, and paste back.
"""

from __future__ import annotations

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
    Option("layerdiffuse_extras_alpha", "Extras: upscale images that have alpha keeping their transparency", True,
           "checkbox"),
    Option("layerdiffuse_models_dir", "Folder of the LayerDiffuse weight files", "", "text",
           help="Empty: models/layer_model (or --layerdiffuse-models-dir)."),
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
    models_dir: str = ""

    @classmethod
    def read(cls, get: Callable[[str, object], object]) -> DecodeOptions:
        """From the host's options (``get(key, default)``), checked: ``override_settings`` in the
        API sets options without checking them, so a bad value is refused here, by name."""
        v = {name: get(f"layerdiffuse_{name}", BY_KEY[f"layerdiffuse_{name}"].default) for name in _NAMES}
        key = "layerdiffuse_decode_passes"  # the one option whose name is not layerdiffuse_<field>
        v["passes"] = _choice(key, get(key, BY_KEY[key].default), int)
        v["tiling"] = _choice("layerdiffuse_tiling", v["tiling"], str)
        v["tile_size"] = _number("layerdiffuse_tile_size", v["tile_size"], int)
        if v["tile_size"] % MULTIPLE:
            raise SettingsError(f"layerdiffuse_tile_size must be a multiple of {MULTIPLE}, got {v['tile_size']}")
        v["extra_memory_gb"] = _number("layerdiffuse_extra_memory_gb", v["extra_memory_gb"], float)
        for name in ("compile", "keep_models", "previews"):
            if not isinstance(v[name], bool):
                raise SettingsError(f"layerdiffuse_{name} must be true or false, got {v[name]!r}")
        v["models_dir"] = str(v["models_dir"] or "")
        return cls(**v)

    def infotext(self, tile_used: int | None) -> dict:
        """What differs from the official decode, under the keys that paste back."""
        out = {}
        if self.passes != 8:
            out["layerdiffusion_passes"] = self.passes
        if tile_used is not None:
            out["layerdiffusion_tiling"] = "always"  # pasting reproduces the tiles on any machine
            out["layerdiffusion_tile_size"] = tile_used
        return out


_NAMES = ("tiling", "tile_size", "extra_memory_gb", "compile", "keep_models", "previews", "models_dir")
assert set(VIEWS) == set(BY_KEY["layerdiffuse_decode_passes"].choices)


def _choice(key: str, value, kind):
    option = BY_KEY[key]
    try:
        value = kind(value)
    except (TypeError, ValueError):
        pass
    if value not in option.choices:
        raise SettingsError(f"{key} must be one of {', '.join(map(str, option.choices))}, got {value!r}")
    return value


def _number(key: str, value, kind):
    option = BY_KEY[key]
    try:
        if isinstance(value, bool):
            raise TypeError
        number = kind(float(value)) if kind is int and float(value).is_integer() else kind(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{key} must be a number, got {value!r}") from None
    if not option.minimum <= number <= option.maximum:
        raise SettingsError(f"{key} must be between {option.minimum:g} and {option.maximum:g}, got {number!r}")
    return number
