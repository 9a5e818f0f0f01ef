"""AUTOMATIC1111 (>= 1.10) adapter: the model side of :class:`pipeline.Host` on A1111's objects.

UNet changes go onto ``p.sd_model.model.diffusion_model`` through the core's
:class:`session.ModuleBackend` (forward hooks and module swaps; merged diffs with A1111's
LoRA bookkeeping handled), undone after sampling and in ``p.close``. What A1111 shares
with Forge (files, saving, ``p`` wiring) is in :mod:`.common`.
"""

from __future__ import annotations

import torch

from ..session import ModuleBackend
from ..unet import detect_family, is_zero_terminal_snr, percent_to_sigma, timestep_to_sigma
from .common import SamplerCapture, WebUIHost, place_infotext, posterior_moments, raw_decode


class A1111Backend(ModuleBackend):
    """:class:`ModuleBackend` that also keeps the sampler's result (:class:`.common.SamplerCapture`)."""

    def __init__(self, p):
        model = p.sd_model
        super().__init__(model.model.diffusion_model, timestep_to_sigma(model.alphas_cumprod))
        self.capture = SamplerCapture(getattr(p, "sampler", None))

    def install(self, session) -> None:
        super().install(session)
        self.capture.install(session)

    def restore(self) -> None:
        self.capture.restore()
        super().restore()


class A1111Host(WebUIHost):
    name = "AUTOMATIC1111 WebUI"

    def family(self, p) -> str | None:
        return detect_family(p.sd_model.model.diffusion_model)

    def prediction(self, p) -> str:
        """A1111 sets ``parameterization`` on every model: ``"v"`` for SD2-v and for an SDXL checkpoint
        loaded with a v-prediction config (sgm ``VScaling``, modules/sd_models_xl.py); else ``"eps"``."""
        return "v" if getattr(p.sd_model, "parameterization", "eps") == "v" else "eps"

    def zero_terminal_snr(self, p) -> bool:
        """A1111 rescales ``sd_model.alphas_cumprod`` itself (Settings > Sampler parameters > Noise
        schedule: Zero Terminal SNR) before sampling: read from the schedule it samples."""
        return is_zero_terminal_snr(p.sd_model.alphas_cumprod)

    def unet_backend(self, p) -> A1111Backend:
        return A1111Backend(p)

    def percent_to_sigma(self, p, percent: float) -> float:
        return percent_to_sigma(p.sd_model.alphas_cumprod, percent)

    def device_dtype(self, p):
        from modules import devices  # type: ignore

        return devices.device, torch.float16 if devices.device.type == "cuda" else torch.float32

    def latent_format(self, p) -> tuple[float, float]:
        return float(p.sd_model.scale_factor), 0.0

    def vae_moments(self, p, rgb):
        return posterior_moments(p.sd_model.first_stage_model, rgb)

    def vae_decode(self, p, latent):
        return raw_decode(p.sd_model.first_stage_model, latent)

    def low_vram(self) -> bool:
        from modules import shared  # type: ignore

        return bool(getattr(shared.cmd_opts, "lowvram", False) or getattr(shared.cmd_opts, "medvram", False))

    def show_preview(self, processed, image, info: str) -> None:
        """A1111 shows ``processed.images`` with ``processed.infotexts`` by index."""
        place_infotext(processed, len(processed.images), info)
        processed.images.append(image)


HOST = A1111Host()
