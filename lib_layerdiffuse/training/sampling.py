"""Sample images of the UNet stages while they train (#16 item 5): a short deterministic
DDIM loop with the trained weights on a few of the batch's prompts, decoded by the frozen
VAE, saved as one grid PNG per sample step (rows: frames or samples).

The latents are decoded as RGB (an adjusted latent decodes to the image flattened on 50 %
grey, which shows what the model learned); the transparent decoder is the extension's job.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .. import rgba as core_rgba

SAMPLES = 2  # images per grid (the batch's first samples)


@torch.no_grad()
def ddim(eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], shape: tuple[int, ...],
         alphas_cumprod: torch.Tensor, steps: int, seed: int, device) -> torch.Tensor:  # fmt: skip
    """Deterministic DDIM (eta 0) from pure noise, ``steps`` evenly spaced timesteps 999 .. 0;
    ``eps_fn(x_t, t [B])`` predicts the noise. Returns the x_0 estimate."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(device)
    acp = alphas_cumprod.to(device, torch.float64)
    ts = torch.linspace(len(acp) - 1, 0, max(1, steps)).round().long().tolist()
    for i, t in enumerate(ts):
        a = acp[t]
        a_prev = acp[ts[i + 1]] if i + 1 < len(ts) else torch.ones((), dtype=torch.float64, device=device)
        eps = eps_fn(x, torch.full((shape[0],), t, device=device, dtype=torch.long)).double()
        x0 = (x.double() - (1 - a).sqrt() * eps) / a.sqrt()
        x = (a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps).float()
    return x


@torch.no_grad()
def decode_grid(vae, latents: torch.Tensor, scale: float, rows: int) -> np.ndarray:
    """``[rows * cols, 4, h, w]`` scaled latents -> one HxWx4 float grid (RGB, alpha 1)."""
    pixels = [vae.decode(z[None] / scale)[0].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() for z in latents]
    cols = len(pixels) // rows
    grid = np.concatenate(
        [np.concatenate(pixels[r * cols : (r + 1) * cols], axis=1) for r in range(rows)], axis=0
    ).astype(np.float32)
    return np.concatenate([grid, np.ones_like(grid[..., :1])], axis=2)


def save(path: Path, grid: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return core_rgba.write_png(path, grid)


def first(batch: dict, n: int = SAMPLES) -> dict:
    """The batch's first ``n`` samples (tensors and caption lists alike)."""
    return {k: v[:n] for k, v in batch.items()}
