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
