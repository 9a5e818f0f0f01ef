"""AUTOMATIC1111 (>= 1.10) adapter: the only module that imports A1111's ``modules``.

UNet changes are installed on ``p.sd_model.model.diffusion_model`` by the core (forward
hooks and module swaps; merged diffs with A1111's LoRA bookkeeping handled) and undone in
``p.close``. Errors that must stop a generation are raised from a wrapper on ``p.sample``
(A1111 swallows exceptions raised in script hooks).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from modules import devices, images, modelloader, paths, shared  # type: ignore

from ..pipeline import HostOps, LayerDiffuseError
from ..unet import detect_family
from ..weights import FILES, WeightFileError, read_header, sha256_of, verify_file
from .common import condition_encoder, posterior_moments, set_init_latent

log = logging.getLogger("layerdiffuse")
TAG = "layerdiffuse_rgba"  # attribute on our PIL images: their straight alpha, for the saved-file check


def models_dir() -> Path:
    folder = getattr(shared.cmd_opts, "layerdiffuse_models_dir", None) or os.path.join(paths.models_path, "layer_model")
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder)


def weight_path(name: str) -> Path:
    """The file's path, downloaded on first use (temporary name, checked, then renamed)."""
    info = FILES[name]
    folder = models_dir()
    path = folder / info.filename
    if path.is_file():
        return path
    part = folder / (info.filename + ".part")
    try:
        modelloader.load_file_from_url(info.url, model_dir=str(folder), file_name=part.name)
    except Exception as e:  # offline, proxy, HTTP errors: the user needs the manual route
        if part.exists():
            part.unlink()
        raise WeightFileError(
            f"LayerDiffuse needs {info.filename} and could not download it ({type(e).__name__}: {e}). "
            f"Download it from {info.url} and put it in {folder}."
        ) from None
    try:
        verify_file(part, info)  # keys and shapes always
        if info.sha256 and sha256_of(part) != info.sha256:
            raise WeightFileError(f"{info.filename}: downloaded file has the wrong SHA-256; it was deleted. Try again.")
    except WeightFileError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, path)
    return path


_STATE: dict = {}


def load_state(path) -> dict:
    """A UNet-side file (safetensors only), checked; the last one stays cached in RAM."""
    from safetensors.torch import load_file

    key = (str(path), os.path.getmtime(path))
    if key not in _STATE:
        read_header(path)  # integrity: truncated / not safetensors / pickle
        _STATE.clear()
        _STATE[key] = load_file(str(path))
    return _STATE[key]


def unet(p) -> torch.nn.Module:
    return p.sd_model.model.diffusion_model


def latent_scale(p) -> float:
    return float(p.sd_model.scale_factor)


def alphas_cumprod(p):
    return getattr(p.sd_model, "alphas_cumprod", None)


def encode_moments(p):
    """(mean, std) of the VAE posterior, unscaled, for RGB in [0, 1]: the encoder offset needs both."""
    return lambda rgb: posterior_moments(p.sd_model.first_stage_model, rgb)


def encode_condition(p):
    """Deterministic condition latent (posterior mean, scaled) for the SDXL layer modes."""
    return condition_encoder(encode_moments(p), latent_scale(p))


def ops(p) -> HostOps:
    dtype = torch.float16 if devices.device.type == "cuda" else torch.float32
    return HostOps(weight_path=weight_path, load_state=load_state, encode_moments=encode_moments(p),
                   device=devices.device, dtype=dtype)  # fmt: skip


def to_pil_rgba(rgba: np.ndarray):
    from ..rgba import to_pil

    im = to_pil(rgba)
    setattr(im, TAG, np.array(im)[..., 3])
    return im


def samples_format() -> str:
    return str(getattr(shared.opts, "samples_format", "png")).lower()


def save_extra(p, image, index: int, suffix: str, infotext: str):
    """Save one extra output like A1111 saves samples (respects the user's save settings)."""
    if not p.save_samples():
        return None
    fmt = "png" if image.mode == "RGBA" else samples_format()
    return images.save_image(image, p.outpath_samples, "", p.all_seeds[index], p.all_prompts[index], fmt,
                             info=infotext, p=p, suffix=suffix)  # fmt: skip


def install_api_png():
    """API responses encode images per the output format (jpg/webp drop alpha): ours go as PNG."""
    try:
        from modules.api import api  # type: ignore
    except Exception:  # API not loaded
        return
    original = api.encode_pil_to_base64
    if getattr(original, "_layerdiffuse", False):
        return

    def encode(image):
        if getattr(image, TAG, None) is not None and samples_format() != "png":
            import base64
            import io

            from PIL import PngImagePlugin

            info = PngImagePlugin.PngInfo()
            if isinstance(image.info.get("parameters"), str):
                info.add_text("parameters", image.info["parameters"])
            with io.BytesIO() as out:
                image.save(out, format="PNG", pnginfo=info)
                return base64.b64encode(out.getvalue())
        return original(image)

    encode._layerdiffuse = True
    api.encode_pil_to_base64 = encode


def check_saved(params):
    """on_image_saved: the file on disk must be RGBA with our alpha; else warn with the fix.

    When the user's format drops alpha (jpg, webp), a PNG copy is written beside the file.
    """
    from ..rgba import write_png

    alpha = getattr(params.image, TAG, None)
    if alpha is None:
        return
    path = Path(params.filename)
    if not path.is_absolute():
        path = Path(paths.data_path) / path
    if path.suffix.lower() != ".png":
        png = path.with_suffix(".png")
        text = params.pnginfo.get("parameters") if isinstance(getattr(params, "pnginfo", None), dict) else None
        write_png(png, params.image.convert("RGBA"), parameters=text)
        log.warning(
            "LayerDiffuse: %s cannot hold alpha; the transparent image was also saved as %s", path.name, png.name
        )
        path = png
    from PIL import Image

    try:
        with Image.open(path) as im:
            ok = im.mode == "RGBA" and np.array_equal(np.array(im)[..., 3], alpha)
            mode = im.mode
    except OSError as e:
        log.warning("LayerDiffuse: could not re-open %s to check its alpha: %s", path, e)
        return
    if not ok:
        msg = (
            f"LayerDiffuse: the saved file {path} lost the transparency (mode {mode}). "
            "Another extension or a setting rewrote the image before saving; save as PNG and disable options that "
            "hide data in the alpha channel."
        )
        log.warning(msg)
        print(msg)


def family(p) -> str | None:
    return detect_family(unet(p))


def begin_sampling(p, gen, x):
    """process_before_every_sampling: install the mode for this pass (first or hires).

    A failure here must not let sampling run unpatched (A1111 only logs hook exceptions):
    a pre-hook on the UNet then raises it during sampling, so the request fails visibly.
    """
    model = unet(p)
    try:
        gen.begin_sampling(model, x.shape, alphas_cumprod(p), encode_condition=encode_condition(p))
        capture_samples(p, gen)
        if getattr(gen, "init_rgba", None) and x is getattr(p, "init_latent", None):
            offset_init_latent(p, gen)
    except Exception as e:
        gen.close()
        message = str(e).removeprefix("LayerDiffuse: ")
        log.error("LayerDiffuse: %s", message)

        def abort(module, args):
            raise LayerDiffuseError(f"LayerDiffuse: {message}")

        handle = model.register_forward_pre_hook(abort)
        original_close = p.close

        def close():
            handle.remove()
            original_close()

        p.close = close


def offset_init_latent(p, gen):
    """img2img: the init latent with the transparent-encoder offset (``mean + std * offset``), every init image."""
    if getattr(p, "paste_to", None) is not None:
        log.warning("LayerDiffuse: 'Inpaint only masked' keeps the plain init latent (no transparency offset)")
        return
    rgba = [np.asarray(images.resize_image(p.resize_mode, im, p.width, p.height), dtype=np.float32) / 255.0
            for im in gen.init_rgba]  # fmt: skip
    latent = gen.encode_init(rgba)
    if latent is None:
        return
    set_init_latent(p, latent * latent_scale(p), log)


def capture_samples(p, gen):
    """Keep the sampler's result latent: after hires fix A1111 hands post_sample decoded images only."""
    sampler = getattr(p, "sampler", None)
    if sampler is None:
        return
    for name in ("sample", "sample_img2img"):
        original = getattr(sampler, name, None)
        if original is None or getattr(original, "_layerdiffuse", False):
            continue

        def wrapped(*args, _original=original, **kwargs):
            samples = _original(*args, **kwargs)
            gen.sampled = samples
            return samples

        wrapped._layerdiffuse = True
        setattr(sampler, name, wrapped)


def final_latents(p, gen, samples):
    """post_sample: the final latent batch (the captured one when the host already decoded)."""
    if getattr(samples, "already_decoded", False):
        return getattr(gen, "sampled", None)
    return samples
