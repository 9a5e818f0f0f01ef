"""DDPM noise schedules and the eps / v parameterisations, host-free (torch only).

One place per formula, shared by the trainer (``lib_layerdiffuse/training``) and free for
the WebUI side to use. Notation: ``abar_t`` = ``alphas_cumprod[t]``,
``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (Ho et al. 2020, Eq. 4).

* :func:`scaled_linear_alphas_cumprod`: SD1.5 / SDXL's training schedule.
* :func:`rescale_zero_terminal_snr`: Lin et al. 2024, "Common Diffusion Noise Schedules and
  Sample Steps are Flawed", §3.1 Algorithm 1, on ``alphas_cumprod``; the last value is then
  :data:`HOST_TERMINAL_ABAR` as AUTOMATIC1111 (dev), Forge2 and Forge Neo keep it, so that
  their sigma ``sqrt((1 - abar) / abar)`` stays finite; a trainer matching the host samples
  the schedule the host samples.
* v-prediction (Lin et al. 2024 §3.2, the ``v`` of Salimans & Ho 2022 §4):
  ``v = sqrt(abar) eps - sqrt(1 - abar) x_0``; from a predicted v,
  ``x_0 = sqrt(abar) x_t - sqrt(1 - abar) v`` and ``eps = sqrt(1 - abar) x_t + sqrt(abar) v``:
  no division, finite at ``abar = 0`` (zero terminal SNR) as everywhere else.
"""

from __future__ import annotations

import torch

NUM_TIMESTEPS = 1000
# the last alphas_cumprod the hosts set after the zero-terminal-SNR rescale (sigma ~ 4517 instead of inf)
HOST_TERMINAL_ABAR = 4.8973451890853435e-08
PREDICTIONS = ("eps", "v")


def scaled_linear_alphas_cumprod(n: int = NUM_TIMESTEPS, start: float = 0.00085, end: float = 0.012) -> torch.Tensor:
    """SD's ``alphas_cumprod`` (float64 math, float32 result), as ldm ``make_beta_schedule('linear')``."""
    betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor, terminal: float = HOST_TERMINAL_ABAR) -> torch.Tensor:
    """Lin et al. 2024 §3.1 Algorithm 1 on ``alphas_cumprod``: ``sqrt(abar)`` shifted so its
    last value is 0 and scaled so its first is unchanged, squared back; then the last value
    set to ``terminal`` (the hosts' :data:`HOST_TERMINAL_ABAR`; 0 gives the paper's exact
    schedule). Float64 math, the input's dtype out."""
    s = alphas_cumprod.double().sqrt()
    first, last = s[0].clone(), s[-1].clone()
    s = (s - last) * (first / (first - last))
    out = s**2
    out[-1] = terminal
    return out.to(alphas_cumprod.dtype)


def _per_row(abar: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``abar [B]`` (or a scalar) broadcast over ``like [B, ...]``, in float32 or wider."""
    a = abar.to(like.device, torch.promote_types(like.dtype, torch.float32))
    return a.view(-1, *([1] * (like.dim() - 1))) if a.dim() else a


def q_sample(x0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """Ho et al. 2020 Eq. 4: ``x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps`` (``abar`` per row)."""
    a = _per_row(abar, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def v_target(x0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024 §3.2: ``v = sqrt(abar) eps - sqrt(1 - abar) x_0`` (``abar`` per row)."""
    a = _per_row(abar, x0)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def target(prediction: str, x0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to output: ``eps`` (Ho et al. 2020 Eq. 14) or :func:`v_target`."""
    if prediction == "eps":
        return noise
    if prediction == "v":
        return v_target(x0, noise, abar)
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def x0_and_eps(prediction: str, x_t: torch.Tensor, output: torch.Tensor, abar: torch.Tensor):
    """``(x_0, eps)`` estimates from a UNet ``output`` at ``x_t``.

    v (Lin et al. 2024 §3.2): ``x_0 = sqrt(abar) x_t - sqrt(1 - abar) v``,
    ``eps = sqrt(1 - abar) x_t + sqrt(abar) v``: finite at every abar, 0 included.
    eps: ``x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)`` (Ho et al. 2020 Eq. 15), abar
    floored at :data:`HOST_TERMINAL_ABAR` so a zero-terminal-SNR schedule stays finite."""
    a = _per_row(abar, x_t)
    if prediction == "v":
        return a.sqrt() * x_t - (1 - a).sqrt() * output, (1 - a).sqrt() * x_t + a.sqrt() * output
    if prediction == "eps":
        return (x_t - (1 - a).sqrt() * output) / a.clamp_min(HOST_TERMINAL_ABAR).sqrt(), output
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
