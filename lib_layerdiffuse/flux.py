"""LayerDiffuse for FLUX.1 (the Flux version's ``TransparentVAE.pth``): decode and encode.

The Flux transparent VAE is the SD one with a 16-channel latent
(``vae.TransparentVAEDecoder(latent_channels=16)``, ``vae.TransparentVAEEncoder(latent_channels=16)``,
loaded by ``weights.load_flux_vae``). What differs from SD1.5/SDXL, as the Flux reference does it:

- the decoder sees the host VAE's decode mapped ``x * 0.5 + 0.5`` *without* clipping, and the
  unscaled, unshifted latent ``z / scale + shift``; it outputs R, G, B, alpha (alpha last);
- the offset encoder sees ``cat([padded RGB, alpha])`` (alpha last) and its output is used
  x300; the VAE encodes ``(rgb * 2 - 1) * alpha``; the offset is applied as
  ``mean + std * offset`` in unscaled space, then scaled and shifted.

Everything here returns the project's convention (alpha first), and the decode is
:func:`lib_layerdiffuse.vae.decode_rgba` itself (same TTA, batching, tiling and callbacks).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from . import rgba as _rgba
from . import vae as _vae

LATENT_CHANNELS = 16
SCALE = 0.3611  # FLUX.1 VAE scaling_factor
SHIFT = 0.1159  # FLUX.1 VAE shift_factor
OFFSET_SCALE = 300.0  # the Flux reference multiplies the encoder's output by this before use
ALPHA_FIRST = (3, 0, 1, 2)  # Flux decoder channels (R, G, B, alpha) -> (alpha, R, G, B)


class AlphaFirst:
    """A Flux decoder (or a :class:`~lib_layerdiffuse.vae.CompiledDecoder` of one) seen by
    :func:`lib_layerdiffuse.vae.decode_rgba`: its R, G, B, alpha output reordered to alpha first.

    The reorder is per channel, so it commutes with the per-view clip, the un-rotation and the
    median: the result equals reordering the finished decode.
    """

    def __init__(self, decoder):
        self.decoder = decoder

    @property
    def latent_channels(self) -> int:
        return getattr(self.decoder, "latent_channels", LATENT_CHANNELS)

    @property
    def conv_in(self):  # lets decode_rgba pick channels-last on CPU as for the SD decoder
        return getattr(self.decoder, "conv_in", None)

    def parameters(self, recurse: bool = True):
        return self.decoder.parameters(recurse)

    def to(self, *args, **kwargs):
        self.decoder.to(*args, **kwargs)
        return self

    def __call__(self, pixel: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        return self.decoder(pixel, latent)[:, list(ALPHA_FIRST)]


def to_pixel(decoded: torch.Tensor) -> torch.Tensor:
    """The decoder's pixel input from the host VAE's raw decode (about [-1, 1]): ``x * 0.5 + 0.5``,
    deliberately not clipped (the Flux decoder was trained on the VAE's overshoot as it comes)."""
    return decoded.float() * 0.5 + 0.5


def unscale_latent(z: torch.Tensor, scale: float = SCALE, shift: float = SHIFT) -> torch.Tensor:
    """Diffusion-space latent -> the VAE's own latent: ``z / scale + shift`` (the decoder's input)."""
    return z / scale + shift


def scale_latent(x: torch.Tensor, scale: float = SCALE, shift: float = SHIFT) -> torch.Tensor:
    """The VAE's own latent -> diffusion space: ``(x - shift) * scale``."""
    return (x - shift) * scale


@torch.no_grad()
def decode_rgba(
    decoder,
    pixel: torch.Tensor,
    latent: torch.Tensor,
    augment: bool = True,
    *,
    passes: int | None = None,
    views_per_batch: int | None = None,
    extra_memory_gb: float | None = None,
    tile_size: int | str | None = None,
    tile_overlap: int | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """RGBA of Flux images from the Flux transparent decoder (paper Eq. 3), alpha first.

    pixel: the host VAE's raw decode mapped ``x * 0.5 + 0.5`` (:func:`to_pixel`), *not*
    clipped, ``[B, 3, H, W]``; latent: the unscaled, unshifted 16-channel latent
    (:func:`unscale_latent`), ``[B, 16, H/8, W/8]``. Returns float32 ``[B, 4, H, W]`` in
    [0, 1]: channel 0 alpha, 1..3 straight RGB.

    ``augment=True`` is the reference's 8-view TTA (flip x rot90, each view clipped to [0, 1],
    lower median). ``passes``, ``views_per_batch``, ``extra_memory_gb``, ``tile_size``
    (including ``"auto"``), ``tile_overlap`` and ``callback`` work as in
    :func:`lib_layerdiffuse.vae.decode_rgba`, which runs the decode.
    """
    lc = getattr(decoder, "latent_channels", None)
    if lc != LATENT_CHANNELS:
        raise ValueError(f"flux.decode_rgba needs the Flux transparent decoder (16 latent channels), got one with {lc}")
    return _vae.decode_rgba(
        AlphaFirst(decoder),
        pixel,
        latent,
        augment,
        passes=passes,
        views_per_batch=views_per_batch,
        extra_memory_gb=extra_memory_gb,
        tile_size=tile_size,
        tile_overlap=tile_overlap,
        callback=callback,
    )


@torch.no_grad()
def encode_offset(encoder, rgba) -> torch.Tensor:
    """Latent offset of transparent images for Flux img2img (paper Eq. 2), x300 included.

    rgba: one HxWx4 image or a list of them (float32 in [0, 1] or uint8, alpha last), or a
    ``[B, 4, H, W]`` tensor, as :func:`lib_layerdiffuse.vae.encode_offset` takes them. The
    encoder sees ``cat([padded_rgb, alpha])`` (alpha last; :func:`lib_layerdiffuse.rgba.pad_rgb`
    in float). Returns ``[B, 16, H/8, W/8]`` on the encoder's device and dtype; apply it with
    :func:`apply_offset`.
    """
    images = _vae._as_rgba_list(rgba)
    feed = np.stack([np.concatenate([_rgba.pad_rgb(x), x[..., 3:]], axis=2) for x in images])
    param = next(encoder.parameters())
    # contiguous NCHW as the reference feeds it: another memory layout rounds differently, ~1e-4 after x300
    feed = torch.from_numpy(feed).movedim(-1, 1).contiguous().to(param.device, param.dtype)
    return encoder(feed) * OFFSET_SCALE


def vae_input(rgba) -> torch.Tensor:
    """What the host's Flux VAE encodes for a transparent init image: ``(rgb * 2 - 1) * alpha``.

    The original (unpadded) RGB in [-1, 1], multiplied by its own image's alpha: float32
    ``[B, 3, H, W]`` on the CPU. (The reference broadcasts a batch's alphas against every
    image, which is right only for batch 1; here each image gets its own.)
    """
    images = _vae._as_rgba_list(rgba)
    x = torch.from_numpy(np.stack(images)).movedim(-1, 1)
    return (x[:, :3] * 2.0 - 1.0) * x[:, 3:4]


def apply_offset(
    mean: torch.Tensor, std: torch.Tensor, offset: torch.Tensor, scale: float = SCALE, shift: float = SHIFT
) -> torch.Tensor:
    """The diffusion-space init latent of a transparent image: ``((mean + std * offset) - shift) * scale``.

    Paper Eq. 2 as the Flux reference applies it: the VAE posterior (``mean``, ``std`` of the
    encoded :func:`vae_input`) is sampled deterministically at ``offset`` (from
    :func:`encode_offset`, x300 included) in the unscaled latent space, then mapped to
    diffusion space with the host's scale and shift (FLUX.1: 0.3611, 0.1159).
    """
    return scale_latent(_vae.apply_offset(mean, std, offset), scale, shift)
