"""Latent-transparency decoder and encoder (paper §3.1, Eq. 2 and Eq. 3), plain torch.

Parameter names and shapes are those of the official files (``UNet1024`` built from
diffusers blocks, and ``LatentTransparencyOffsetEncoder``), so the published
``*_vae_transparent_{decoder,encoder}.safetensors`` load with ``strict=True``. The blocks
are written here rather than imported from diffusers: its import paths moved between
releases and broke every port that relied on them.

Decoder layout (104 M params): conv_in at full size, seven down blocks at
(32, 32, 64, 128, 256, 512, 512) channels, the last three with self-attention, six
downsamples, a mid block, seven up blocks with skip connections and 4 output channels
(alpha, then straight RGB). The SD latent joins just before down block 3 (1/8 size).

Speed (issue 5): the 91 GroupNorms are :class:`~lib_layerdiffuse.fastnorm.FastGroupNorm`
(``nn.GroupNorm``'s parameters; a faster implementation on CUDA, ``nn.GroupNorm``'s own on
CPU; :func:`set_group_norm_mode` overrides), :func:`decode_rgba` batches views by memory
and can tile, and :func:`compile_decoder` wraps ``torch.compile`` on request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import rgba as _rgba
from .fastnorm import FastGroupNorm, set_group_norm_mode  # noqa: F401 - re-exported

log = logging.getLogger("layerdiffuse")

CHANNELS = (32, 32, 64, 128, 256, 512, 512)
ATTN_FROM = 4  # blocks 4, 5, 6 (256, 512, 512 channels) carry self-attention
GROUPS = 4
EPS = 1e-5
HEAD_DIM = 8  # channels per attention head
MULTIPLE = 64  # the decoder's six downsamples need sides that are multiples of 64


# ---------------------------------------------------------------------------------------
# Blocks (diffusers' names: ResnetBlock2D, Attention, Downsample2D, Upsample2D)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = FastGroupNorm(GROUPS, cin, eps=EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = FastGroupNorm(GROUPS, cout, eps=EPS)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(self.norm1(x, silu=True))
        h = self.conv2(self.norm2(h, silu=True))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class SelfAttention(nn.Module):
    """Spatial self-attention with its own GroupNorm and a residual connection."""

    def __init__(self, ch: int):
        super().__init__()
        self.heads = ch // HEAD_DIM
        self.group_norm = FastGroupNorm(GROUPS, ch, eps=EPS)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch), nn.Dropout(0.0)])

    def forward(self, x):
        b, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]

        def heads(y):
            return y.view(b, -1, self.heads, HEAD_DIM).transpose(1, 2)

        q, k, v = heads(self.to_q(t)), heads(self.to_k(t)), heads(self.to_v(t))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        o = self.to_out[0](o).transpose(1, 2).reshape(b, c, h, w)
        return o + x


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        dtype = x.dtype
        if dtype == torch.bfloat16:  # nearest upsampling lacks bf16 kernels on some builds
            x = x.float()
        x = F.interpolate(x, scale_factor=2.0, mode="nearest").to(dtype)
        return self.conv(x)


class DownBlock(nn.Module):
    def __init__(self, cin: int, cout: int, attention: bool, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin, cout), ResnetBlock(cout, cout)])
        if attention:
            self.attentions = nn.ModuleList([SelfAttention(cout), SelfAttention(cout)])
        self.downsamplers = nn.ModuleList([Downsample(cout)]) if downsample else None

    def forward(self, x):
        skips = []
        attns = getattr(self, "attentions", None)
        for i, resnet in enumerate(self.resnets):
            x = resnet(x)
            if attns is not None:
                x = attns[i](x)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    def __init__(self, cin: int, cprev: int, cout: int, attention: bool, upsample: bool):
        super().__init__()
        # resnet j sees the running state concatenated with skip (3 - 1 - j) of the mirrored down block
        self.resnets = nn.ModuleList(
            [ResnetBlock((cprev if j == 0 else cout) + (cin if j == 2 else cout), cout) for j in range(3)]
        )
        if attention:
            self.attentions = nn.ModuleList([SelfAttention(cout) for _ in range(3)])
        self.upsamplers = nn.ModuleList([Upsample(cout)]) if upsample else None

    def forward(self, x, skips: list):
        attns = getattr(self, "attentions", None)
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1))
            if attns is not None:
                x = attns[i](x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch), ResnetBlock(ch, ch)])
        self.attentions = nn.ModuleList([SelfAttention(ch)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


# ---------------------------------------------------------------------------------------
# The two models


class TransparentVAEDecoder(nn.Module):
    """The latent transparency decoder D of Eq. 3: ``[I_c, I_alpha] = D(I_hat, x_a)``.

    ``forward(pixel, latent)``: pixel is the normal VAE decode ``I_hat`` as RGB in [0, 1],
    ``[B, 3, H, W]`` with H, W multiples of 64; latent is the *unscaled* latent ``x_a``,
    ``[B, latent_channels, H/8, W/8]``. Returns the network's raw ``[B, 4, H, W]``, unclipped
    and in the order the weights were trained with: the channel meaning depends on the
    weights. The SD1.5/SDXL files give alpha, then straight RGB (use :func:`decode_rgba`);
    the Flux ``TransparentVAE.pth`` (``latent_channels=16``) gives R, G, B, then alpha, and its
    latent is the unscaled *and unshifted* Flux latent (use :func:`lib_layerdiffuse.flux.decode_rgba`).
    """

    def __init__(self, latent_channels: int = 4):
        super().__init__()
        c = CHANNELS
        n = len(c)
        self.latent_channels = latent_channels
        self.conv_in = nn.Conv2d(3, c[0], 3, padding=1)
        self.latent_conv_in = nn.Conv2d(latent_channels, c[2], 1)
        self.down_blocks = nn.ModuleList(
            [DownBlock(c[max(i - 1, 0)], c[i], i >= ATTN_FROM, i < n - 1) for i in range(n)]
        )
        self.mid_block = MidBlock(c[-1])
        r = c[::-1]
        self.up_blocks = nn.ModuleList(
            [UpBlock(r[min(i + 1, n - 1)], r[max(i - 1, 0)], r[i], i < n - ATTN_FROM, i < n - 1) for i in range(n)]
        )
        self.conv_norm_out = FastGroupNorm(GROUPS, c[0], eps=EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(c[0], 4, 3, padding=1)

    def forward(self, pixel: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(pixel)
        skips = [x]
        for i, block in enumerate(self.down_blocks):
            if i == 3:  # 1/8 size: the latent joins here, after the skip of this size was saved
                x = x + self.latent_conv_in(latent)
            x, s = block(x)
            skips += s
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x, skips)
        return self.conv_out(self.conv_norm_out(x, silu=True))  # conv_act's SiLU, fused


class TransparentVAEEncoder(nn.Module):
    """The latent transparency encoder E of Eq. 2: ``x_offset = E(I_c, I_alpha)``.

    ``forward(x)``: x is ``[B, 4, H, W]`` in [0, 1]; returns the network's raw latent offset
    ``[B, latent_channels, H/8, W/8]``, applied as ``mean + std * offset`` (see
    :func:`apply_offset`). The input channel order depends on the weights: the SD1.5/SDXL
    files take ``cat([alpha, padded_rgb])`` (see :func:`encode_offset`); the Flux
    ``TransparentVAE.pth`` (``latent_channels=16``) takes ``cat([padded_rgb, alpha])`` and its
    offset is used x300 (see :func:`lib_layerdiffuse.flux.encode_offset`).
    """

    def __init__(self, latent_channels: int = 4):
        super().__init__()
        self.latent_channels = latent_channels
        widths = (32, 32, 64, 64, 128, 128, 256, 256)
        layers: list[nn.Module] = []
        cin = 4
        for i, cout in enumerate(widths):
            # the first conv of each new width (after the first) halves the size
            stride = 2 if i in (2, 4, 6) else 1
            layers += [nn.Conv2d(cin, cout, 3, padding=1, stride=stride), nn.SiLU()]
            cin = cout
        layers.append(nn.Conv2d(cin, latent_channels, 3, padding=1))
        self.blocks = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


# ---------------------------------------------------------------------------------------
# Decoding with test-time augmentation

# The official order of the 8 views: (flip W, rot90 k over (H, W)).
VIEWS_8 = tuple((flip, k) for flip in (False, True) for k in range(4))
# Subsets for fewer passes; even counts are averaged (a median of two is their minimum).
VIEWS = {
    1: ((False, 0),),
    2: ((False, 0), (True, 0)),
    4: ((False, 0), (True, 1), (False, 2), (True, 3)),
    8: VIEWS_8,
}


def _view(x: torch.Tensor, flip: bool, k: int) -> torch.Tensor:
    if flip:
        x = torch.flip(x, dims=(3,))
    return torch.rot90(x, k=k, dims=(2, 3))


def _unview(x: torch.Tensor, flip: bool, k: int) -> torch.Tensor:
    x = torch.rot90(x, k=-k, dims=(2, 3))
    return torch.flip(x, dims=(3,)) if flip else x


def _pad_to_multiple(pixel: torch.Tensor, latent: torch.Tensor):
    """Replicate-pad pixel (and latent by 1/8 of it) up to multiples of 64, centred."""
    h, w = pixel.shape[-2:]
    ph, pw = -h % MULTIPLE, -w % MULTIPLE
    if ph == 0 and pw == 0:
        return pixel, latent, None
    top, left = (ph // 16) * 8, (pw // 16) * 8  # keep the split on the 8-px latent grid
    pad = (left, pw - left, top, ph - top)
    pixel = F.pad(pixel, pad, mode="replicate")
    latent = F.pad(latent, tuple(p // 8 for p in pad), mode="replicate")
    return pixel, latent, (top, left, h, w)


# Activation memory of one decoder forward, in elements per output pixel per view. From
# docs/performance.md (H100, fp16, 1024x1024): batch 1 peaks at 1.2 GB with 0.2 GB of weights
# (~1 KB/px), batch 8 at 6.6 GB (~0.77 KB/px for each further view); rounded up.
FIRST_VIEW_ELEMENTS = 500
EXTRA_VIEW_ELEMENTS = 400
DEFAULT_EXTRA_MEMORY_GB = 2.0


def available_memory(device) -> int | None:
    """Bytes this process may still allocate on a CUDA ``device``; None elsewhere.

    The device's free memory plus what torch has cached but not handed out, and no more than
    ``torch.cuda.set_per_process_memory_fraction`` leaves this process (where one is set).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    try:
        free, total = torch.cuda.mem_get_info(device)
        allocated = torch.cuda.memory_allocated(device)
        # memory torch has cached but not handed out is free for our tensors too
        free += torch.cuda.memory_reserved(device) - allocated
        fraction = torch.cuda.get_per_process_memory_fraction(device)
    except (RuntimeError, AssertionError, ValueError, AttributeError):
        return None
    if fraction < 1.0:
        free = min(free, int(total * fraction) - allocated)
    return max(free, 0)


def default_views_per_batch(
    device: torch.device,
    dtype: torch.dtype,
    height: int,
    width: int,
    *,
    extra_memory_gb: float | None = None,
    free_memory: int | None = None,
) -> int:
    """How many views one decoder forward takes by default.

    CPU: 1 (the decode is compute-bound there and batching is slower, docs/performance.md).
    CUDA: as many as fit in ``extra_memory_gb`` (default 2 GB) of activations above a
    batch-1 pass (measured ~0.77 KB per pixel per extra view at fp16), and never more
    than 90% of the memory this process may use allows (:func:`available_memory`, or
    ``free_memory`` bytes when given).
    """
    device = torch.device(device)
    if device.type != "cuda" and free_memory is None:
        return 1
    itemsize = torch.empty((), dtype=dtype).element_size()
    first = FIRST_VIEW_ELEMENTS * itemsize * height * width
    per_view = EXTRA_VIEW_ELEMENTS * itemsize * height * width
    gb = DEFAULT_EXTRA_MEMORY_GB if extra_memory_gb is None else extra_memory_gb
    budget = int(gb * 1024**3)
    free = free_memory if free_memory is not None else available_memory(device)
    if free is not None:
        budget = min(budget, int(free * 0.9) - first)
    return max(1, 1 + budget // max(per_view, 1))


def default_tile_size(
    device: torch.device, dtype: torch.dtype, height: int, width: int, free_memory: int | None = None
) -> int | None:
    """Tile side for ``tile_size="auto"``: None (no tiling) while a batch-1 pass fits.

    The largest multiple of 64 whose batch-1 pass fits in 90% of the memory this process may
    use on a CUDA device (:func:`available_memory`), or of ``free_memory`` bytes when given
    (any device); otherwise None (host memory is not the limit on CPUs).
    """
    free = free_memory if free_memory is not None else available_memory(device)
    if free is None:
        return None
    itemsize = torch.empty((), dtype=dtype).element_size()
    fits_px = int(free * 0.9) // (FIRST_VIEW_ELEMENTS * itemsize)
    if height * width <= fits_px:
        return None
    return max(MULTIPLE, int(fits_px**0.5) // MULTIPLE * MULTIPLE)


def _run_views(decoder, pixel, latent, views, per, callback=None):
    """Decode each (image, view), ``per`` per forward; returns [B, V, 4, H, W] (clipped, unviewed).

    ``callback(done, total)`` runs after each forward with the (image, view) jobs done so far."""
    b = pixel.shape[0]
    outs: list = [[None] * len(views) for _ in range(b)]
    done, total = 0, b * len(views)
    # Views with odd k have H and W swapped, so they batch only with each other.
    for parity in (0, 1):
        jobs = [(i, v) for v in range(len(views)) if views[v][1] % 2 == parity for i in range(b)]
        if not jobs:
            continue
        # equal chunks: 4 jobs at per=3 run as 2 + 2, same forwards, lower peak
        n_chunks = -(-len(jobs) // per)
        size = -(-len(jobs) // n_chunks)
        for start in range(0, len(jobs), size):
            chunk = jobs[start : start + size]
            feed_p = torch.cat([_view(pixel[i : i + 1], *views[v]) for i, v in chunk])
            feed_l = torch.cat([_view(latent[i : i + 1], *views[v]) for i, v in chunk])
            y = decoder(feed_p, feed_l).clip(0, 1)
            for (i, v), yi in zip(chunk, y.split(1), strict=True):
                outs[i][v] = _unview(yi, *views[v])
            del y, feed_p, feed_l
            done += len(chunk)
            if callback is not None:
                callback(done, total)
    return torch.stack([torch.cat(o) for o in outs])


def _channels_last_on_cpu(decoder, device) -> None:
    """On CPU, channels-last convolutions make a batch-1 pass about 1.4x faster (oneDNN); on
    GPUs they are slower (docs/performance.md). Converts the decoder's weights once, in place; the
    result differs from the contiguous layout by float rounding only (~5e-6)."""
    conv = getattr(decoder, "conv_in", None)
    if torch.device(device).type != "cpu" or conv is None:
        return
    if not conv.weight.is_contiguous(memory_format=torch.channels_last):
        decoder.to(memory_format=torch.channels_last)


def _combine(stacked: torch.Tensor, n: int) -> torch.Tensor:
    if n == 1:
        return stacked[:, 0]
    if n == 8:
        return stacked.median(dim=1).values
    return stacked.float().mean(dim=1)


@torch.no_grad()
def decode_rgba(
    decoder: TransparentVAEDecoder,
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
    """RGBA from the normal decode and its latent (Eq. 3), with test-time augmentation.

    pixel: ``[B, 3, H, W]`` RGB in [0, 1] (the host's VAE decode); latent: the unscaled
    ``[B, 4, H/8, W/8]``. H and W must be multiples of 8; other than multiples of 64 they
    are replicate-padded for the network and cropped back. Returns float32
    ``[B, 4, H, W]`` in [0, 1]: channel 0 alpha, 1..3 straight RGB.

    ``augment=True`` is the official scheme: 8 views (flip x rot90), each clipped to [0, 1]
    and mapped back, combined with the lower median (``torch.median``). ``passes`` picks
    1, 2, 4 or 8 views (fewer passes are averaged).

    Views of several images run batched, ``views_per_batch`` per forward; the result
    equals the one-at-a-time scheme. By default (:func:`default_views_per_batch`) that is
    1 on CPU and, on CUDA, as many as ``extra_memory_gb`` (default 2 GB) of activations
    above a batch-1 pass allow, bounded by the free memory.

    ``tile_size``: None (default) decodes the whole image at once, as the official does.
    An int (a multiple of 64) decodes overlapping tiles of that side, each with the full
    augmentation, blended with feathered weights over ``tile_overlap`` pixels (default a
    quarter of the tile, a multiple of 8); this differs from the whole decode (the network
    sees the whole image through its attention layers; see tests/test_fast_decode.py for
    the error). ``"auto"`` tiles only where a batch-1 pass would not fit the free CUDA
    memory (:func:`default_tile_size`).

    ``callback(done, total)``, if given, runs after every decoder forward with the passes
    (image x view x tile) done so far and in all: for progress, and an exception it raises
    stops the decode (an interrupt).
    """
    if pixel.ndim != 4 or pixel.shape[1] != 3:
        raise ValueError(f"pixel must be [B, 3, H, W] RGB, got {tuple(pixel.shape)}")
    b, _, h, w = pixel.shape
    if h % 8 or w % 8:
        raise ValueError(f"image size {w}x{h} is not a multiple of 8; LayerDiffuse needs multiples of 8")
    lc = getattr(decoder, "latent_channels", 4)  # 16 for the Flux decoder (lib_layerdiffuse/flux.py)
    if tuple(latent.shape) != (b, lc, h // 8, w // 8):
        raise ValueError(
            f"latent must be [{b}, {lc}, {h // 8}, {w // 8}] for a {w}x{h} image, got {tuple(latent.shape)}"
        )
    n = passes if passes is not None else (8 if augment else 1)
    if n not in VIEWS:
        raise ValueError(f"passes must be one of {sorted(VIEWS)}, got {passes!r}")
    views = VIEWS[n]

    param = next(decoder.parameters())
    pixel = pixel.to(param.device, param.dtype)
    latent = latent.to(param.device, param.dtype)

    if tile_size == "auto":
        tile_size = default_tile_size(param.device, param.dtype, h + -h % MULTIPLE, w + -w % MULTIPLE)
    if tile_size is not None:
        from .tiling import decode_tiled, tile_plan

        if not isinstance(tile_size, int) or tile_size <= 0 or tile_size % MULTIPLE:
            raise ValueError(f"tile_size must be a positive multiple of {MULTIPLE}, 'auto' or None, got {tile_size!r}")
        tiles = len(tile_plan(h, tile_size, tile_overlap)) * len(tile_plan(w, tile_size, tile_overlap))
        if tiles > 1:
            kw = {"passes": n, "views_per_batch": views_per_batch, "extra_memory_gb": extra_memory_gb}
            finished = [0]  # passes of the tiles already decoded

            def tile_callback(done: int, total: int) -> None:
                if callback is not None:
                    callback(finished[0] + done, total * tiles)
                if done == total:
                    finished[0] += total

            return decode_tiled(
                lambda p, lat: decode_rgba(decoder, p, lat, callback=tile_callback, **kw),
                pixel, latent, tile_size, tile_overlap,
            )  # fmt: skip

    pixel, latent, crop = _pad_to_multiple(pixel, latent)
    _channels_last_on_cpu(decoder, param.device)
    per = views_per_batch or default_views_per_batch(
        param.device, param.dtype, *pixel.shape[-2:], extra_memory_gb=extra_memory_gb
    )
    result = _combine(_run_views(decoder, pixel, latent, views, per, callback), n)
    if crop is not None:
        top, left, h0, w0 = crop
        result = result[..., top : top + h0, left : left + w0]
    return result.float().clip(0, 1)


# ---------------------------------------------------------------------------------------
# Optional compilation


class CompiledDecoder:
    """A decoder run through ``torch.compile``; callable like the decoder, for :func:`decode_rgba`.

    Compilation happens on the first call of each input shape (one graph per shape,
    ``dynamic=False``: the decoder's cost is in fixed-shape convolutions); that first call's
    time is logged once per shape, so the cost is visible in the host's log.
    """

    def __init__(self, decoder: nn.Module, **compile_kwargs):
        self.decoder = decoder
        compile_kwargs.setdefault("dynamic", False)
        self._compiled = torch.compile(decoder, **compile_kwargs)
        self.compile_seconds: dict[tuple, float] = {}

    def parameters(self, recurse: bool = True):
        return self.decoder.parameters(recurse)

    @property
    def latent_channels(self) -> int:
        return getattr(self.decoder, "latent_channels", 4)

    def __call__(self, pixel: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        key = (tuple(pixel.shape), pixel.dtype, str(pixel.device))
        if key in self.compile_seconds:
            return self._compiled(pixel, latent)
        t = time.perf_counter()
        out = self._compiled(pixel, latent)
        if pixel.device.type == "cuda":
            torch.cuda.synchronize(pixel.device)
        self.compile_seconds[key] = dt = time.perf_counter() - t
        log.info("transparent decoder compiled for %s %s in %.1f s", "x".join(map(str, key[0])), key[1], dt)
        return out


def compile_decoder(decoder: nn.Module, enabled: bool = True, **compile_kwargs):
    """The decoder compiled with ``torch.compile`` when ``enabled`` and the host supports it.

    Off unless asked (compiling the full decoder took 78 s per shape on an H100 for a
    3.1x faster batched pass, docs/performance.md). Returns the decoder itself when disabled or
    where ``torch.compile`` is missing; otherwise a :class:`CompiledDecoder`.
    """
    if not enabled or not hasattr(torch, "compile"):
        return decoder
    return CompiledDecoder(decoder, **compile_kwargs)


# ---------------------------------------------------------------------------------------
# Encoding


def _as_rgba_list(rgba) -> list[np.ndarray]:
    """Accept HxWx4 numpy (uint8 or float in [0, 1]), a list of them, or a [B, 4, H, W] tensor."""
    if isinstance(rgba, torch.Tensor):
        if rgba.ndim == 3:
            rgba = rgba[None]
        if rgba.ndim != 4 or rgba.shape[1] != 4:
            raise ValueError(f"RGBA tensor must be [B, 4, H, W], got {tuple(rgba.shape)}")
        return [x.permute(1, 2, 0).float().cpu().numpy() for x in rgba]
    if isinstance(rgba, np.ndarray) and rgba.ndim == 3:
        rgba = [rgba]
    out = []
    for x in rgba:
        x = np.asarray(x)
        if x.ndim != 3 or x.shape[2] != 4:
            raise ValueError(f"RGBA image must be HxWx4, got shape {x.shape}")
        out.append(x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32))
    return out


@torch.no_grad()
def encode_offset(encoder: TransparentVAEEncoder, rgba) -> torch.Tensor:
    """Latent offset of transparent images (Eq. 2: ``x_eps = E(I_c, I_alpha)``).

    rgba: one HxWx4 image or a list of them (uint8, or float32 in [0, 1], alpha last), or
    a ``[B, 4, H, W]`` RGBA tensor in [0, 1]. The RGB of undefined (transparent) pixels is
    padded with :func:`lib_layerdiffuse.rgba.pad_rgb`, as the models were trained, and the
    encoder sees ``cat([alpha, padded_rgb])``. Returns ``[B, 4, H/8, W/8]`` on the
    encoder's device and dtype; apply it with :func:`apply_offset`.
    """
    images = _as_rgba_list(rgba)
    feed = np.stack([np.concatenate([x[..., 3:], _rgba.pad_rgb(x)], axis=2) for x in images])
    param = next(encoder.parameters())
    feed = torch.from_numpy(feed).movedim(-1, 1).to(param.device, param.dtype)
    return encoder(feed)


def apply_offset(mean: torch.Tensor, std: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The adjusted latent ``x_a = mean + std * offset`` (Eq. 2's x_eps folded in).

    The published encoders output the offset in units of the VAE posterior's std: the
    host's ``posterior.sample()`` (mean + std * noise) is replaced by this deterministic
    sample, in the *unscaled* latent space (scale by the VAE's factor afterwards).
    """
    offset = offset.to(mean.device, mean.dtype)
    return mean + std.to(mean.dtype) * offset


def apply_offset_to_posterior(posterior, offset: torch.Tensor) -> torch.Tensor:
    """:func:`apply_offset` for an object with ``.mean`` and ``.std`` (ldm / diffusers posteriors)."""
    return apply_offset(posterior.mean, posterior.std, offset)
