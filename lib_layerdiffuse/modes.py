"""The one mode table. The UI, the infotext parser, validation and the pipeline all read it.

Labels are the official extension's, so its infotexts and API clients keep working; the
six SDXL labels had no ``(SDXL) `` prefix before March 2024 and still resolve.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SettingsError

FLUX_VAE_FILE = "TransparentVAE"  # weights.FILES stem: decoder and encoder in one file

FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL", "flux": "FLUX.1-dev", "qwen_layered": "Qwen-Image-Layered"}
_PREFIX = {"sd15": "(SD1.5)", "sdxl": "(SDXL)", "flux": "(FLUX)", "qwen_layered": "(Qwen-Image-Layered)"}
QWEN_IMAGE = "Qwen-Image"  # plain Qwen-Image (no layered weights): a family with no method


@dataclass(frozen=True)
class Mode:
    key: str  # the official enum name
    label: str  # the official dropdown label
    family: str  # "sd15" | "sdxl" | "flux" | "qwen_layered"
    unet_file: str  # weight file stem of the UNet side
    # "attention_sharing" | "lora" | "diff" | "host_lora" (a LoRA file through the host's own loader) |
    # "decompose" (img2img: the init image into RGBA layers by the loaded model; no UNet patch, no file)
    apply: str
    frames: tuple[str, ...]  # what each image of a group is, in batch order
    decode: tuple[int, ...] = ()  # indices within a group that get an RGBA decode
    inputs: tuple[str, ...] = ()  # required layer images: "fg", "bg", "blend"
    control: str | None = None  # SD1.5: the layer image fed to the control encoder
    concat: tuple[str, ...] = ()  # SDXL: layer images concatenated after the noisy latent, in order
    prompts: tuple[str, ...] = ()  # per-frame additional prompts ("fg"/"bg"/"blend"), frame order

    @property
    def group(self) -> int:
        """Images per group: the batch size must be a multiple of this."""
        return len(self.frames)

    @property
    def decoder_file(self) -> str | None:
        if not self.decode:
            return None
        return {"sd15": "layer_sd15_vae_transparent_decoder", "flux": FLUX_VAE_FILE}.get(
            self.family, "vae_transparent_decoder"
        )

    @property
    def encoder_file(self) -> str | None:
        """img2img: the modes that decode RGBA also encode RGBA init images."""
        if not self.decode:
            return None
        return {"sd15": "layer_sd15_vae_transparent_encoder", "flux": FLUX_VAE_FILE}.get(
            self.family, "vae_transparent_encoder"
        )

    @property
    def latent_channels(self) -> int:
        return 16 if self.family == "flux" else 4

    @property
    def uses_weight(self) -> bool:
        return self.apply in ("lora", "diff", "host_lora")

    @property
    def uses_resize(self) -> bool:
        return bool(self.inputs)

    @property
    def concat_channels(self) -> int:
        return 4 * len(self.concat)

    @property
    def family_name(self) -> str:
        return FAMILY_NAMES[self.family]

    def is_decoded(self, index: int) -> bool:
        """Whether image ``index`` of the batch (global index) gets an RGBA decode."""
        return index % self.group in self.decode

    def frame_name(self, index: int) -> str:
        return self.frames[index % self.group]


MODES: tuple[Mode, ...] = (
    Mode("FG_ONLY_ATTN_SD15", "(SD1.5) Only Generate Transparent Image (Attention Injection)", "sd15",
         "layer_sd15_transparent_attn", "attention_sharing", ("foreground",), decode=(0,)),
    Mode("FG_TO_BG_SD15", "(SD1.5) From Foreground to Background (need batch size 2)", "sd15",
         "layer_sd15_fg2bg", "attention_sharing", ("background", "blended"),
         inputs=("fg",), control="fg", prompts=("bg", "blend")),
    Mode("BG_TO_FG_SD15", "(SD1.5) From Background to Foreground (need batch size 2)", "sd15",
         "layer_sd15_bg2fg", "attention_sharing", ("foreground", "blended"), decode=(0,),
         inputs=("bg",), control="bg", prompts=("fg", "blend")),
    Mode("JOINT_SD15", "(SD1.5) Generate Everything Together (need batch size 3)", "sd15",
         "layer_sd15_joint", "attention_sharing", ("foreground", "background", "blended"), decode=(0,),
         prompts=("fg", "bg", "blend")),
    Mode("FG_ONLY_ATTN", "(SDXL) Only Generate Transparent Image (Attention Injection)", "sdxl",
         "layer_xl_transparent_attn", "lora", ("foreground",), decode=(0,)),
    Mode("FG_ONLY_CONV", "(SDXL) Only Generate Transparent Image (Conv Injection)", "sdxl",
         "layer_xl_transparent_conv", "diff", ("foreground",), decode=(0,)),
    Mode("FG_TO_BLEND", "(SDXL) From Foreground to Blending", "sdxl",
         "layer_xl_fg2ble", "diff", ("blended",), inputs=("fg",), concat=("fg",)),
    Mode("FG_BLEND_TO_BG", "(SDXL) From Foreground and Blending to Background", "sdxl",
         "layer_xl_fgble2bg", "diff", ("background",), inputs=("fg", "blend"), concat=("fg", "blend")),
    Mode("BG_TO_BLEND", "(SDXL) From Background to Blending", "sdxl",
         "layer_xl_bg2ble", "diff", ("blended",), inputs=("bg",), concat=("bg",)),
    Mode("BG_BLEND_TO_FG", "(SDXL) From Background and Blending to Foreground", "sdxl",
         "layer_xl_bgble2fg", "diff", ("foreground",), decode=(0,), inputs=("bg", "blend"), concat=("bg", "blend")),
    # the Flux version of LayerDiffuse (RedAIGC): a LoRA the host loads, a 16-channel transparent VAE
    Mode("FG_ONLY_FLUX", "(FLUX) Only Generate Transparent Image", "flux",
         "layerlora", "host_lora", ("foreground",), decode=(0,)),
    # Qwen-Image-Layered (Forge Neo, img2img): one input image -> RGBA layers; the batch's one image
    # is the layers recomposed, the layers are extra outputs (lib_layerdiffuse/decompose.py)
    Mode("DECOMPOSE_QWEN_LAYERED", "(Qwen-Image-Layered) Decompose Into Layers", "qwen_layered",
         "", "decompose", ("recomposed",)),
)  # fmt: skip

DEFAULT = MODES[4]  # SDXL attention injection, as the official
LABELS = [m.label for m in MODES]
INPUT_NAMES = {"fg": "Foreground", "bg": "Background", "blend": "Blending"}
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
DEFAULT_RESIZE = "Crop and Resize"

_LOOKUP: dict[str, Mode] = {}
for _m in MODES:
    _LOOKUP[_m.label] = _m
    _LOOKUP[_m.key] = _m
    if _m.family == "sdxl":  # pre-March-2024 labels
        _LOOKUP[_m.label.removeprefix("(SDXL) ")] = _m

# each family's "only transparent" method: the Method a new accordion (and an API request
# without one) gets for the loaded model, so ticking the box and pressing Generate just works
FAMILY_DEFAULTS = {
    "sd15": _LOOKUP["FG_ONLY_ATTN_SD15"],
    "sdxl": DEFAULT,
    "flux": _LOOKUP["FG_ONLY_FLUX"],
    "qwen_layered": _LOOKUP["DECOMPOSE_QWEN_LAYERED"],
}


def resolve(name: str) -> Mode:
    """A mode by label (current or legacy) or enum name; a clear error otherwise."""
    mode = _LOOKUP.get(str(name).strip())
    if mode is None:
        raise SettingsError(f"Unknown LayerDiffuse method {name!r}. Valid methods: " + "; ".join(LABELS))
    return mode


def default_for(family: str | None) -> Mode:
    """The default method for a model family; the official default (SDXL) where LayerDiffuse has no
    method for it (that family is then refused by :func:`check_family` with its reason)."""
    return FAMILY_DEFAULTS.get(family or "", DEFAULT)


def follow_family(current: str, family: str | None) -> str | None:
    """The Method after the checkpoint changes to one of ``family``: a family's default method
    moves to this family's (the one it shows would be refused on the new model); any other method
    (a layer method the user picked) stays. None: leave it as it is."""
    if family not in FAMILY_DEFAULTS or current not in {m.label for m in FAMILY_DEFAULTS.values()}:
        return None
    label = default_for(family).label
    return label if label != current else None


def check_batch(mode: Mode, batch_size: int) -> None:
    if batch_size % mode.group:
        raise SettingsError(
            f"'{mode.label}' generates groups of {mode.group} images ({', '.join(mode.frames)}): "
            f"the batch size must be a multiple of {mode.group}, but it is {batch_size}. "
            f"Set Batch size to {max(mode.group, batch_size - batch_size % mode.group)}."
        )


def check_family(mode: Mode, model_family: str | None) -> None:
    """Refuse an SD1.5 mode on an SDXL model and the reverse, before any weight is touched."""
    if model_family == mode.family:
        return
    found = FAMILY_NAMES.get(model_family or "", model_family or "an unrecognised architecture")
    article = "an" if mode.family_name[0] in "AEIOS" else "a"  # "an SD1.5", "an SDXL", "a FLUX.1-dev"
    if model_family == QWEN_IMAGE:
        raise SettingsError(
            f"'{mode.label}' needs {article} {mode.family_name} checkpoint, but the loaded model is plain Qwen-Image "
            "(its file has no time_text_embed.addition_t_embedding.weight). LayerDiffuse has no method for Qwen-Image; "
            "to split an image into layers, load the Qwen-Image-Layered checkpoint (e.g. "
            "qwen_image_layered_bf16.safetensors) and use '(Qwen-Image-Layered) Decompose Into Layers' in img2img."
        )
    raise SettingsError(
        f"'{mode.label}' needs {article} {mode.family_name} checkpoint, but the loaded model is {found}. "
        f"Load {article} {mode.family_name} checkpoint or pick a {_PREFIX[model_family]} method that matches {found}."
        if model_family in FAMILY_NAMES
        else f"'{mode.label}' needs {article} {mode.family_name} checkpoint, but the loaded model is {found}. "
        f"LayerDiffuse supports SD1.5, SDXL and FLUX.1-dev models (FLUX on Forge2 and Forge Neo) and "
        "Qwen-Image-Layered (Forge Neo, img2img)."
    )
