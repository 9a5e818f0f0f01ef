"""The checkpoints people run today (#23): zero-terminal-SNR schedules and Stop At, the degenerate-alpha
rule. The hosts' side of these is tested on their stand-ins (tests/test_extension_a1111.py for A1111,
tests/test_hosts_forge.py for Forge2 and Neo)."""

import math

import numpy as np
import pytest
import torch

from lib_layerdiffuse import pipeline, unet
from lib_layerdiffuse.schedules import HOST_TERMINAL_ABAR, rescale_zero_terminal_snr, scaled_linear_alphas_cumprod

STOP_ATS = [round(0.05 + 0.01 * k, 2) for k in range(96)]  # 0.05 ... 1.0


@pytest.mark.parametrize("terminal", [0.0, HOST_TERMINAL_ABAR])
def test_every_stop_at_gives_a_finite_sigma_on_a_zero_terminal_snr_schedule(terminal):
    acp = rescale_zero_terminal_snr(scaled_linear_alphas_cumprod(), terminal=terminal)
    assert float(acp[-1]) == float(torch.tensor(terminal, dtype=torch.float32))
    sigmas = [unet.percent_to_sigma(acp, s) for s in STOP_ATS]
    assert all(math.isfinite(s) for s in sigmas)
    assert sigmas[-1] == 0.0  # Stop At 1: on to the end
    assert all(a > b for a, b in zip(sigmas, sigmas[1:], strict=False))  # later Stop At, lower threshold
    # the first txt2img step (timestep 999) is above every threshold: LayerDiffuse takes part in it
    sigma_of = unet.timestep_to_sigma(acp)
    first = sigma_of(torch.tensor([999.0, 999.0]))
    assert math.isfinite(first) and all(first > s for s in sigmas)
    assert all(math.isfinite(sigma_of(t)) for t in (0.0, 500.5, 998.5, 999.0))


def test_the_terminal_sigma_is_the_hosts():
    """An exact 0 is read as the hosts keep it (sigma about 4517, not inf)."""
    acp = rescale_zero_terminal_snr(scaled_linear_alphas_cumprod(), terminal=0.0)
    host = rescale_zero_terminal_snr(scaled_linear_alphas_cumprod())
    assert unet.timestep_to_sigma(acp)(999) == pytest.approx(unet.timestep_to_sigma(host)(999), rel=1e-5)
    assert 4000 < unet.timestep_to_sigma(acp)(999) < 5000


def test_zero_terminal_snr_detection():
    assert unet.is_zero_terminal_snr(rescale_zero_terminal_snr(scaled_linear_alphas_cumprod()))
    assert unet.is_zero_terminal_snr(rescale_zero_terminal_snr(scaled_linear_alphas_cumprod(), terminal=0.0))
    assert not unet.is_zero_terminal_snr(scaled_linear_alphas_cumprod())


def alpha_of(fraction_opaque: float, fraction_clear: float, size=200) -> np.ndarray:
    """An alpha plane with the given fractions of 255 and 0 pixels; the rest half transparent."""
    a = np.full(size * size, 0.5, np.float32)
    n_opaque, n_clear = round(fraction_opaque * a.size), round(fraction_clear * a.size)
    a[:n_opaque] = 1.0
    a[n_opaque : n_opaque + n_clear] = 0.0
    return a.reshape(size, size)


@pytest.mark.parametrize(
    "alpha,state",
    [
        (np.ones((64, 64), np.float32), "opaque"),
        (np.zeros((64, 64), np.float32), "empty"),
        (np.full((64, 64), 250 / 255, np.float32), "opaque"),  # nearly opaque everywhere
        (np.full((64, 64), 5 / 255, np.float32), "empty"),
        (alpha_of(0.996, 0.0), "opaque"),
        (alpha_of(0.0, 0.996), "empty"),
        (alpha_of(0.994, 0.0), None),  # a subject with 0.6% of the frame around it
        (alpha_of(0.0, 0.994), None),  # a small subject: 0.6% of the frame
        (alpha_of(0.5, 0.5), None),
        (np.full((64, 64), 249 / 255, np.float32), None),
    ],
)
def test_alpha_state(alpha, state):
    assert pipeline.alpha_state(alpha) == state
