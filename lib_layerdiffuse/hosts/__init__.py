"""Host detection by import probing. Only this package touches a WebUI's API.

``detect()`` returns the host id: "a1111", "forge2", "neo", "forge1" or "unknown";
``adapter()`` hands the script the :class:`pipeline.Host` of the running WebUI, or None
where it is not supported (then :func:`unsupported_message` says why).
"""

from __future__ import annotations

import importlib.util

SUPPORTED = ("a1111", "forge2", "neo")
NAMES = {
    "a1111": "AUTOMATIC1111 WebUI",
    "forge2": "Forge (2024 backend)",
    "neo": "Forge Neo",
    "forge1": "Forge1-style host (reForge / Forge Classic)",
    "unknown": "an unrecognised WebUI",
}


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def detect() -> str:
    if _has("backend.patcher.unet"):
        try:
            from modules_forge import forge_version  # type: ignore

            if "neo" in str(getattr(forge_version, "version", "")).lower():
                return "neo"
        except ImportError:
            pass
        return "neo" if _has("modules_forge.packages.comfy") else "forge2"  # only Neo vendors ComfyUI
    if _has("modules_forge.unet_patcher") or _has("ldm_patched"):
        return "forge1"
    if _has("modules.scripts") and _has("modules.processing"):
        return "a1111"
    return "unknown"


def unsupported_message(host: str) -> str:
    return (
        f"LayerDiffuse does not support {NAMES.get(host, host)} yet. "
        "Supported: AUTOMATIC1111 WebUI 1.10 or newer, Forge (2024 backend, 2.0) and Forge Neo."
    )


def adapter(host: str | None = None):
    """The running WebUI's adapter (a :class:`pipeline.Host`), or None for unsupported hosts."""
    host = host or detect()
    if host == "a1111":
        from .a1111 import HOST

        return HOST
    if host in ("forge2", "neo"):  # one adapter, per-host differences inside
        from .forge import HOST

        return HOST
    return None


def refuse(p, message: str) -> None:
    """Make the generation fail with ``message``: raised from ``p.sample``, which every host
    calls directly (exceptions raised in script hooks are only logged)."""
    from ..errors import Refusal

    print(f"LayerDiffuse: {message}")

    def sample(*args, **kwargs):
        raise Refusal(message)

    p.sample = sample


def family_of_checkpoint(header: dict) -> str | None:
    """The model family from a checkpoint's safetensors header (key -> (shape, dtype)): "sd15",
    "sdxl", "sd2" by the UNet's cross-attention width (as :func:`unet.detect_family` reads a
    loaded UNet), "flux" (FLUX.1-dev: it has the guidance embedder) or "FLUX.1-schnell",
    "qwen_layered" or "Qwen-Image" (:func:`qwen_family`); None where it cannot be told (a VAE, a
    text encoder, another architecture)."""
    from ..unet import _CONTEXT_FAMILY

    keys = list(header)
    qwen = qwen_family(keys)
    if qwen is not None:
        return qwen
    if any(k.startswith("double_blocks.") or ".double_blocks." in k for k in keys):
        return "flux" if any(k.startswith("guidance_in.") or ".guidance_in." in k for k in keys) else "FLUX.1-schnell"
    for key, (shape, _dtype) in header.items():
        if key.endswith("attn2.to_k.weight") and len(shape) == 2:
            return _CONTEXT_FAMILY.get(shape[1])
    return None


def qwen_family(keys) -> str | None:
    """ "qwen_layered" for a Qwen-Image-Layered transformer (it alone has the addition timestep embedding),
    "Qwen-Image" for another Qwen-Image one (Forge Neo's own test: ``txt_norm.weight``; any prefix, e.g.
    ComfyUI's ``model.diffusion_model.``), None otherwise."""
    from ..modes import QWEN_IMAGE
    from ..qwen_layered import ADDITION_KEY

    keys = list(keys)
    if any(k == ADDITION_KEY or k.endswith("." + ADDITION_KEY) for k in keys):
        return "qwen_layered"
    if any(k == "txt_norm.weight" or k.endswith(".txt_norm.weight") for k in keys) and any(
        k.endswith("img_in.weight") for k in keys
    ):
        return QWEN_IMAGE
    return None


def checkpoint_family(title: str | None = None) -> str | None:
    """The family of the checkpoint the WebUI has selected (``opts.sd_model_checkpoint``), or of
    the one ``title`` names, from its file's header only: nothing is loaded, so it holds while
    the host is still loading the model (or has not yet: Forge loads at the first generation).
    None for anything it cannot read (a GGUF or diffusers model, a missing file)."""
    from ..errors import WeightFileError
    from ..weights import read_header

    try:
        from modules import sd_models, shared  # type: ignore

        title = title or getattr(shared.opts, "sd_model_checkpoint", None)
        info = sd_models.get_closet_checkpoint_match(title) if title else None
        path = getattr(info, "filename", None)
        return family_of_checkpoint(read_header(path)) if path else None
    except (ImportError, AttributeError, OSError, WeightFileError):
        return None
