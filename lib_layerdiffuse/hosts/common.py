"""Small pieces both host adapters use: the SD VAE posterior of RGB images."""

from __future__ import annotations

import torch


def posterior_moments(first_stage, rgb: torch.Tensor):
    """(mean, std) of an ldm/sgm AutoencoderKL posterior, unscaled, for RGB in [0, 1].

    Read from the encoder and quant_conv directly: the hosts' encode functions return a
    sample (random) or a scaled latent, while the transparent offset needs mean and std.
    """
    param = next(first_stage.parameters())
    with torch.no_grad():
        h = first_stage.encoder((rgb * 2 - 1).to(param.device, param.dtype))
        quant_conv = getattr(first_stage, "quant_conv", None)
        moments = quant_conv(h) if quant_conv is not None else h
        mean, logvar = moments.float().chunk(2, dim=1)
    return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))


def condition_encoder(moments, scale: float, shift: float = 0.0):
    """Deterministic condition latent (posterior mean, into diffusion space) for the SDXL layer modes."""

    def run(rgb):
        mean, _ = moments(rgb)
        return (mean - shift) * scale

    return run


def set_init_latent(p, latent: torch.Tensor, log) -> None:
    """img2img: put the offset init latent (diffusion space, 1 or B rows) in ``p.init_latent``.

    Inpaint: the masked area keeps what the host put there (``p.mask`` / ``p.nmask``), so
    the untouched area gets the transparent offset. A shape the host does not expect leaves
    the plain init latent, with a warning.
    """
    latent = latent.to(p.init_latent.device, p.init_latent.dtype)
    if latent.shape[0] == 1:
        latent = latent.repeat(p.init_latent.shape[0], 1, 1, 1)
    if latent.shape != p.init_latent.shape:
        log.warning(
            "LayerDiffuse: init latent %s != %s; offset skipped", tuple(latent.shape), tuple(p.init_latent.shape)
        )
        return
    if getattr(p, "mask", None) is not None:
        latent = latent * p.mask + p.init_latent * p.nmask
    p.init_latent = latent
