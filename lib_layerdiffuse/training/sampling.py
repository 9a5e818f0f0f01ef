"""Sample images of the UNet stages while they train (#16 item 5): a short deterministic
DDIM loop with the trained weights on a few of the batch's prompts, decoded by the frozen
VAE, saved as one grid PNG per sample step (rows: frames or samples).

The latents are decoded as RGB (an adjusted latent decodes to the image flattened on 50 %
grey, which shows what the model learned). With ``--decoder FILE`` (a transparent decoder:
a ``--widths full`` vae-stage export or a published decoder file) the frames that carry
alpha are also decoded to RGBA as the extension does (:func:`lib_layerdiffuse.vae.decode_rgba`)
and saved beside the RGB grid as ``<name>_rgba.png``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .. import rgba as core_rgba
from .. import schedules
from .. import vae as core_vae
from .. import weights as core_weights
from ..errors import LayerDiffuseError
from .errors import TrainingError
from .finite import require_finite

SAMPLES = 2  # images per grid (the batch's first samples)


@torch.no_grad()
def ddim(model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], shape: tuple[int, ...],
         alphas_cumprod: torch.Tensor, steps: int, seed: int, device, prediction: str = "eps") -> torch.Tensor:  # fmt: skip
    """Deterministic DDIM (eta 0) from pure noise, ``steps`` evenly spaced timesteps 999 .. 0;
    ``model_fn(x_t, t [B])`` predicts ``prediction`` (eps or v), turned into the x_0 and eps
    estimates by :func:`lib_layerdiffuse.schedules.x0_and_eps` (finite at a zero-terminal-SNR
    schedule's last timestep). Returns the x_0 estimate."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(device)
    acp = alphas_cumprod.to(device, torch.float64)
    ts = torch.linspace(len(acp) - 1, 0, max(1, steps)).round().long().tolist()
    for i, t in enumerate(ts):
        a = acp[t]
        a_prev = acp[ts[i + 1]] if i + 1 < len(ts) else torch.ones((), dtype=torch.float64, device=device)
        out = model_fn(x, torch.full((shape[0],), t, device=device, dtype=torch.long)).double()
        x0, eps = schedules.x0_and_eps(prediction, x.double(), out, a)
        x = (a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps).float()
    return x


@torch.no_grad()
def decode(vae, latents: torch.Tensor, scale: float) -> torch.Tensor:
    """``[N, 4, h, w]`` scaled latents -> ``[N, 3, H, W]`` RGB in [0, 1], one at a time (memory)."""
    return torch.cat([vae.decode(z[None] / scale).float().clamp(0, 1) for z in latents])


def grid(images: torch.Tensor, rows: int) -> np.ndarray:
    """``[rows * cols, C, H, W]`` (C = 3: RGB, 4: RGBA) -> one HxWx4 float grid (RGB: alpha 1)."""
    pixels = list(images.float().permute(0, 2, 3, 1).cpu().numpy())
    cols = len(pixels) // rows
    out = np.concatenate(
        [np.concatenate(pixels[r * cols : (r + 1) * cols], axis=1) for r in range(rows)], axis=0
    ).astype(np.float32)
    return out if out.shape[2] == 4 else np.concatenate([out, np.ones_like(out[..., :1])], axis=2)


@torch.no_grad()
def decode_rgba(decoder, pixels: torch.Tensor, latents: torch.Tensor, scale: float) -> torch.Tensor:
    """The transparent decode of ``pixels`` (the frozen VAE's RGB of ``latents``) as the
    extension runs it (8 passes): ``[N, 4, H, W]`` straight RGB then alpha, in [0, 1]."""
    dev = next(decoder.parameters()).device
    out = core_vae.decode_rgba(decoder, pixels.to(dev), (latents / scale).to(dev))  # alpha first
    return torch.cat([out[:, 1:4], out[:, :1]], dim=1)


def load_decoder(path: str, info) -> torch.nn.Module | None:
    """``--decoder FILE`` at start-up: every rank checks the file's header (keys, shapes, dtypes:
    no tensor read), rank 0, the only one that samples, loads it; a file that is not a
    transparent decoder is a :class:`TrainingError` before any model loads."""
    hint = "give a transparent decoder: a vae-stage transparent_decoder.safetensors (--widths full) or a published one"
    try:
        if info.is_main:
            decoder = core_weights.load_decoder(path, info.device)
            require_finite(decoder, f"--decoder {path}")
            return decoder
        core_weights.check_module_file(core_vae.TransparentVAEDecoder, "decoder", path)
        return None
    except LayerDiffuseError as e:
        raise TrainingError(f"--decoder {path}: {e} ({hint})") from None


def save(path: Path, grid: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return core_rgba.write_png(path, grid)


def rgba_path(path: Path) -> Path:
    """Where the RGBA grid of a sample step goes: beside the RGB one."""
    return path.with_name(f"{path.stem}_rgba{path.suffix}")


def first(batch: dict, n: int = SAMPLES) -> dict:
    """The batch's first ``n`` samples (tensors and caption lists alike)."""
    return {k: v[:n] for k, v in batch.items()}
