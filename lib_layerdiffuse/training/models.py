"""Trainable modules of the latent-transparency VAE stage (paper §3.1).

``TrainEncoder`` / ``TrainDecoder`` are the core's :class:`~lib_layerdiffuse.vae.TransparentVAEEncoder`
and :class:`~lib_layerdiffuse.vae.TransparentVAEDecoder` with their widths made
configurable: same blocks, same forward, same parameter names. At the default (full)
widths their ``state_dict`` is exactly the official key/shape layout, so an export loads
with ``weights.load_encoder`` / ``load_decoder`` (strict). Smaller widths exist only so
that the training mechanics can be tested on a CPU in seconds.

Also here: the 5-layer PatchGAN discriminator of Eq. 5 and a tiny KL VAE (4 latent
channels, /8) that stands in for the frozen SD VAE where none can be downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import vae as core
from ..fastnorm import FastGroupNorm

FULL_ENCODER_WIDTHS = (32, 32, 64, 64, 128, 128, 256, 256)
FULL_DECODER_CHANNELS = core.CHANNELS
# Tiny widths for tests: 4 decoder levels (3 downsamples, so any multiple of 8 works and
# the latent still joins at 1/8 size) with attention at the 1/8 level.
TINY_ENCODER_WIDTHS = (8, 8, 8, 8, 16, 16, 16, 16)
TINY_DECODER_CHANNELS = (8, 8, 16, 16)
# Small: short CPU runs that reach a meaningful PSNR (5 levels: sides multiple of 16).
SMALL_ENCODER_WIDTHS = (16, 16, 32, 32, 64, 64, 64, 64)
SMALL_DECODER_CHANNELS = (16, 16, 32, 32, 64)


@dataclass(frozen=True)
class Widths:
    encoder: tuple[int, ...] = FULL_ENCODER_WIDTHS
    decoder: tuple[int, ...] = FULL_DECODER_CHANNELS
    decoder_attn_from: int = core.ATTN_FROM

    @property
    def is_full(self) -> bool:
        return self == Widths()

    @property
    def multiple(self) -> int:
        """Image sides must be multiples of this (the decoder's downsamples)."""
        return 2 ** (len(self.decoder) - 1)

    def as_dict(self) -> dict:
        return {
            "encoder": list(self.encoder),
            "decoder": list(self.decoder),
            "decoder_attn_from": self.decoder_attn_from,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Widths:
        return cls(tuple(d["encoder"]), tuple(d["decoder"]), int(d["decoder_attn_from"]))

    @classmethod
    def named(cls, name: str) -> Widths:
        if name == "full":
            return cls()
        if name == "tiny":
            return cls(TINY_ENCODER_WIDTHS, TINY_DECODER_CHANNELS, 3)
        if name == "small":
            return cls(SMALL_ENCODER_WIDTHS, SMALL_DECODER_CHANNELS, 4)
        raise ValueError(f"unknown width preset {name!r}: 'full' (the official shapes), 'small' or 'tiny' (tests)")


class TrainEncoder(core.TransparentVAEEncoder):
    """The offset encoder E with configurable widths; ``forward`` is the core's.

    The last conv is zero-initialised, as in the official encoder, so training starts at
    a zero offset (the frozen VAE's own latent).
    """

    def __init__(self, widths: tuple[int, ...] = FULL_ENCODER_WIDTHS):
        nn.Module.__init__(self)  # the core __init__ hard-codes the widths
        if len(widths) != 8:
            raise ValueError(f"the encoder has 8 conv widths (three of them stride 2), got {widths}")
        layers: list[nn.Module] = []
        cin = 4
        for i, cout in enumerate(widths):
            layers += [nn.Conv2d(cin, cout, 3, padding=1, stride=2 if i in (2, 4, 6) else 1), nn.SiLU()]
            cin = cout
        last = nn.Conv2d(cin, 4, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.blocks = nn.Sequential(*layers)

    @property
    def last_conv(self) -> nn.Conv2d:
        return self.blocks[-1]


class TrainDecoder(core.TransparentVAEDecoder):
    """The decoder D with configurable channels; ``forward(pixel, latent)`` is the core's.

    ``latent_conv_in`` is zero-initialised as in the official model, so D starts from the
    pixel path alone. Sides must be multiples of ``2 ** (len(channels) - 1)``. Only the
    top-level layers are built here (mirroring the core's ``__init__``, which takes no
    widths); the blocks and ``forward`` are the core's, and a test checks that the full
    widths give the core's keys, shapes and outputs.
    """

    def __init__(self, channels: tuple[int, ...] = FULL_DECODER_CHANNELS, attn_from: int = core.ATTN_FROM):
        nn.Module.__init__(self)
        c = tuple(channels)
        n = len(c)
        if n < 4:
            raise ValueError("the decoder needs at least 4 levels: the latent joins before level 3 (1/8 size)")
        if any(ch % core.HEAD_DIM for ch in c[attn_from:]) or any(ch % core.GROUPS for ch in c):
            raise ValueError(f"channels {c} must be multiples of {core.GROUPS} (and of {core.HEAD_DIM} with attention)")
        self.conv_in = nn.Conv2d(3, c[0], 3, padding=1)
        self.latent_conv_in = nn.Conv2d(4, c[2], 1)
        nn.init.zeros_(self.latent_conv_in.weight)
        nn.init.zeros_(self.latent_conv_in.bias)
        self.down_blocks = nn.ModuleList(
            [core.DownBlock(c[max(i - 1, 0)], c[i], i >= attn_from, i < n - 1) for i in range(n)]
        )
        self.mid_block = core.MidBlock(c[-1])
        r = c[::-1]
        self.up_blocks = nn.ModuleList(
            [core.UpBlock(r[min(i + 1, n - 1)], r[max(i - 1, 0)], r[i], i < n - attn_from, i < n - 1) for i in range(n)]
        )
        # the core's forward calls conv_norm_out(x, silu=True): the core's own norm class
        self.conv_norm_out = FastGroupNorm(core.GROUPS, c[0], eps=core.EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(c[0], 4, 3, padding=1)


class PatchDiscriminator(nn.Module):
    """The 5-layer PatchGAN of Eq. 5 (pix2pix ``NLayerDiscriminator``, n_layers=3).

    Input: ``[B, 4, H, W]`` = [alpha, RGB] in the paper's units (colour in [-1, 1], alpha
    in [0, 1]). Five 4x4 convs (strides 2, 2, 2, 1, 1) give one logit per patch.
    GroupNorm replaces pix2pix's BatchNorm: it is per sample, so a DDP step on N ranks
    equals one step on the combined batch, with no SyncBatchNorm.
    """

    def __init__(self, in_ch: int = 4, ndf: int = 64):
        super().__init__()
        chans = [ndf, ndf * 2, ndf * 4, ndf * 8]
        layers: list[nn.Module] = [nn.Conv2d(in_ch, chans[0], 4, 2, 1), nn.LeakyReLU(0.2)]
        for i in (1, 2, 3):
            stride = 2 if i < 3 else 1
            layers += [
                nn.Conv2d(chans[i - 1], chans[i], 4, stride, 1, bias=False),
                nn.GroupNorm(min(32, chans[i] // 4), chans[i]),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(chans[-1], 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TinyKLVAE(nn.Module):
    """A small KL autoencoder (4 latent channels, /8) standing in for the frozen SD VAE.

    The frozen-VAE contract the trainer uses (also met by :class:`SDVAEAdapter`):
    ``encode(rgb01) -> (mean, std)`` of the posterior in *unscaled* latent space, and
    ``decode(latent) -> rgb01``; images are ``[B, 3, H, W]`` in [0, 1]. Internally it works
    in [-1, 1] like SD's VAE.
    """

    def __init__(self, width: int = 32):
        super().__init__()
        w = width

        def block(cin, cout, stride=1):
            return [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(4, cout), nn.SiLU()]

        self.enc = nn.Sequential(
            *block(3, w), *block(w, w, 2), *block(w, 2 * w), *block(2 * w, 2 * w, 2),
            *block(2 * w, 2 * w), *block(2 * w, 2 * w, 2), *block(2 * w, 2 * w),
            nn.Conv2d(2 * w, 8, 3, 1, 1),
        )  # fmt: skip
        self.dec_in = nn.Sequential(*block(4, 2 * w), *block(2 * w, 2 * w))
        self.dec_up = nn.ModuleList([nn.Sequential(*block(2 * w, 2 * w), *block(2 * w, 2 * w)),
                                     nn.Sequential(*block(2 * w, w), *block(w, w)),
                                     nn.Sequential(*block(w, w), *block(w, w))])  # fmt: skip
        self.dec_out = nn.Conv2d(w, 3, 3, 1, 1)

    def forward(self, rgb01: torch.Tensor, noise: torch.Tensor, kl_weight: float = 1e-6):
        """The pre-training loss (a forward, so that DDP can wrap the pre-training too)."""
        return kl_vae_loss(self, rgb01, noise, kl_weight)

    def moments(self, rgb01: torch.Tensor):
        h = self.enc(rgb01 * 2 - 1)
        mean, logvar = h.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)  # SD's DiagonalGaussianDistribution clamp
        return mean, logvar

    def encode(self, rgb01: torch.Tensor):
        mean, logvar = self.moments(rgb01)
        return mean, torch.exp(0.5 * logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.dec_in(z)
        for up in self.dec_up:
            h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return (self.dec_out(h) + 1) / 2


def kl_vae_loss(vae: TinyKLVAE, rgb01: torch.Tensor, noise: torch.Tensor, kl_weight: float = 1e-6):
    """Pre-training loss of the stand-in VAE: MSE of a posterior sample's decode + weighted KL (as LDM)."""
    mean, logvar = vae.moments(rgb01)
    z = mean + torch.exp(0.5 * logvar) * noise
    rec = F.mse_loss(vae.decode(z), rgb01)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()
    return rec + kl_weight * kl, rec


class SDVAEAdapter(nn.Module):
    """The frozen-VAE contract over a real SD/SDXL ``AutoencoderKL`` (ldm or diffusers style).

    ``encode`` returns the posterior's mean and std (unscaled latent; no scaling factor),
    ``decode`` returns RGB in [0, 1] units, unclamped (the trainer clamps what D sees, as
    the WebUIs do, but keeps the identity loss's gradient).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def encode(self, rgb01: torch.Tensor):
        post = self.model.encode(rgb01 * 2 - 1)
        post = getattr(post, "latent_dist", post)  # diffusers wraps the posterior
        return post.mean, post.std

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        out = self.model.decode(z)
        out = getattr(out, "sample", out)
        return (out + 1) / 2
