"""Host-independent facts about the denoising UNet: its family, and the Stop At threshold."""

from __future__ import annotations

import torch
from torch import nn

from .schedules import HOST_TERMINAL_ABAR

ZERO_TERMINAL_ACP = 1e-6  # below this last alphas_cumprod a schedule has zero terminal SNR (SD's: ~0.0047)

# attn2 context width -> family: SD1.5 768, SD2 1024, SDXL 2048
_CONTEXT_FAMILY = {768: "sd15", 1024: "sd2", 2048: "sdxl"}


def detect_family(unet: nn.Module) -> str | None:
    """``"sd15"``, ``"sdxl"``, ``"sd2"`` or None, from an ldm/sgm UNet's parameter names and shapes.

    Reads the cross-attention context width (768 / 1024 / 2048); a UNet without
    cross-attention, or of another layout (Flux, SD3, ...), gives None.
    """
    for name, p in unet.named_parameters():
        if name.endswith("attn2.to_k.weight"):
            return _CONTEXT_FAMILY.get(p.shape[1])
    return None


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``sqrt((1 - acp) / acp)``, finite everywhere: a zero-terminal-SNR schedule (NoobAI v-pred and
    the like, schedules.rescale_zero_terminal_snr) ends at ``acp = 0``, an infinite sigma that would
    make the log-linear interpolation below inf or NaN (0 * inf) and switch LayerDiffuse off at the
    first step. It is floored where the hosts floor it (schedules.HOST_TERMINAL_ABAR: sigma ~ 4517)."""
    acp = alphas_cumprod.double().clamp(min=HOST_TERMINAL_ABAR, max=1.0)
    return (((1 - acp) / acp) ** 0.5).float()


def is_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> bool:
    """Whether a schedule ends at (nearly) zero SNR: SD's scaled-linear one ends at acp ~ 0.0047,
    the rescaled one (Lin et al. 2024) at 0 or the hosts' 4.9e-8."""
    return float(alphas_cumprod[-1]) < ZERO_TERMINAL_ACP


def percent_to_sigma(alphas_cumprod: torch.Tensor, percent: float) -> float:
    """Forge's ``predictor.percent_to_sigma`` computed from a model's ``alphas_cumprod``.

    p <= 0 gives a huge sigma (Stop At 0: never patched), p >= 1 gives 0 (patched to the
    end); otherwise the sigma at timestep ``(1 - p) * 999``, interpolated log-linearly
    between the discrete sigmas ``sqrt((1 - acp) / acp)``.
    """
    if percent <= 0.0:
        return 999999999.9
    if percent >= 1.0:
        return 0.0
    log_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod.detach().float().cpu()).log()
    t = min(max((1.0 - percent) * 999.0, 0.0), len(log_sigmas) - 1)
    lo, hi = int(t // 1), int(-(-t // 1))
    w = t - lo
    return float(((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]).exp())


def timestep_to_sigma(alphas_cumprod: torch.Tensor):
    """``t -> sigma`` for a discrete-time model: log-linear between the discrete sigmas, as
    the k-diffusion wrappers of A1111 map sigmas to timesteps (the inverse here)."""
    log_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod.detach().float().cpu()).log()

    def sigma_of(t) -> float:
        t = float(torch.as_tensor(t).detach().float().max().clamp(0, len(log_sigmas) - 1))
        lo, hi = int(t // 1), int(-(-t // 1))
        return float(((1 - (t - lo)) * log_sigmas[lo] + (t - lo) * log_sigmas[hi]).exp())

    return sigma_of
