"""Extras step that keeps the transparency of images upscaled there (A1111, Forge2 and Neo alike).

How the three hosts run Extras (``modules/postprocessing.py``, ``modules/scripts_postprocessing.py``,
``scripts/postprocessing_upscale.py``, the same on all three for what is used here):

- ``run_postprocessing`` keeps RGBA and RGB inputs as they are (other modes become RGB there,
  before any step, so their alpha is gone), wraps the image in a ``PostprocessedImage`` and runs
  every step's ``process_firstpass``, then every step's ``process``, in one order: the
  ``postprocessing_operation_order`` option first, then the class attribute ``order`` (Upscale
  1000, GFPGAN 2000, CodeFormer 3000, A1111's training steps 4000 and up). The API's
  ``extra-single-image`` passes arguments to Upscale and the face restorers only.
- Upscale calls ``upscaler.scaler.upscale(image, scale, data_path)``, which returns sides
  rounded down to a multiple of 8 (the whole image stretched); "Scale to" with "Crop to fit"
  then centres that on a new RGB canvas of the target size (``pp.info["Postprocess crop to"]``).
  ESRGAN-like upscalers and the crop make the image RGB: the alpha is lost.

This step (order 3500: after Upscale and the face restorers, before the training steps) acts by
itself on images with transparency, unless Settings turns it off (``layerdiffuse_extras_alpha``).
Its first pass, which runs before any step's ``process``, swaps the image for its padded colour
(RGB) and keeps the alpha; the host's steps then upscale plain RGB with the user's upscaler(s)
and mode; its ``process`` puts the alpha back, resized and placed as the colour was
(:mod:`..upscale`). The result is RGBA, tagged like generated images (``common.TAG``) so that
``common.py``'s callbacks write PNG where the chosen format drops alpha, encode it as PNG in the
API and undo Forge2's stealth infotext. Images without transparency are left to the host.

Imported by ``scripts/layerdiffuse.py`` (the WebUI registers the class it finds there); it needs
the host's ``modules`` at import.
"""

from __future__ import annotations

import logging

from modules import scripts_postprocessing, shared  # type: ignore

from .. import upscale as U
from ..errors import Refusal, SettingsError
from ..options import BY_KEY, check
from .common import TAG

log = logging.getLogger("layerdiffuse")
OPTION = "layerdiffuse_extras_alpha"
_KEPT = "_layerdiffuse_alpha"  # attribute of the PostprocessedImage between the two passes
ROUNDING = 8  # Upscaler.upscale rounds both sides down to a multiple of 8


def crop_inner(source: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """The upscaled image's size before "Crop to fit" centred it on a ``size`` canvas: the host's
    scale ``max(W / w, H / h)`` and its rounding (``upscaler.py``), with the same float arithmetic."""
    (w, h), (tw, th) = source, size
    scale = max(tw / w, th / h)
    return int((w * scale) // ROUNDING * ROUNDING), int((h * scale) // ROUNDING * ROUNDING)


def _refresh_color_correction(rgb) -> None:
    """Neo's Upscale has a "Color Correction" box whose target is taken from the image in its own
    first pass, before ours: point it at the padded colour too, or the colours hidden under
    transparent pixels would be matched back into the visible ones. Other hosts have no such key."""
    try:
        from modules import scripts  # type: ignore

        for data in scripts.postprocessing_scripts_data:
            module = getattr(data, "module", None)
            cache, setup = getattr(module, "upscale_cache", None), getattr(module, "setup_color_correction", None)
            if isinstance(cache, dict) and "cc" in cache and callable(setup):
                cache["cc"] = setup(rgb)
    except Exception as e:  # only the colour correction is affected
        log.warning("LayerDiffuse: could not update the colour correction target: %s", e)


class LayerDiffuseExtrasAlpha(scripts_postprocessing.ScriptPostprocessing):
    name = "LayerDiffuse alpha"
    order = 3500
    extra_only = True  # A1111: not offered among the txt2img / img2img postprocessing steps

    def ui(self):
        return {}  # no arguments: the API gives none to extension steps; the switch is in Settings

    def process_firstpass(self, pp, **args):
        pp.__dict__.pop(_KEPT, None)
        try:  # the same check as every reader of the option (options.check): "false" is no boolean
            enabled = check(OPTION, getattr(shared.opts, OPTION, BY_KEY[OPTION].default))
        except SettingsError as e:  # before any step ran: the host's Extras fails with the reason
            raise Refusal(str(e)) from None
        if not enabled:
            return
        parts = U.split(pp.image)
        if parts is None:
            return
        pp.__dict__[_KEPT] = parts
        pp.image = parts.rgb
        _refresh_color_correction(parts.rgb)

    def process(self, pp, **args):
        parts = pp.__dict__.pop(_KEPT, None)
        if parts is None:
            return
        if pp.image is parts.rgb and parts.source.mode == "RGBA":  # no step changed it
            pp.image = parts.source
            return
        source = (parts.alpha.shape[1], parts.alpha.shape[0])
        size = pp.image.size
        inner = None
        if size != source and "Postprocess crop to" in pp.info:
            inner = crop_inner(source, size)
        elif not U.is_stretch(source, size, slack=ROUNDING):
            msg = (
                f"LayerDiffuse: a step before '{self.name}' resized the image from {source[0]}x{source[1]} to "
                f"{size[0]}x{size[1]} in a way it cannot follow; the image is returned without its alpha. Put "
                f"'{self.name}' right after Upscale in Settings > Postprocessing > operation order."
            )
            log.warning(msg)
            print(msg)
            return
        alpha = U.place_alpha(parts.alpha, size, inner)
        image = U.combine(pp.image, alpha)
        setattr(image, TAG, alpha)
        pp.image = image
        pp.info["LayerDiffuse alpha"] = "kept"
