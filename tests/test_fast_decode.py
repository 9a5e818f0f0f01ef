"""Fast decode: FastGroupNorm, memory-adaptive batching, compilation wrapper, tiling."""

import importlib.util
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tolerance import ROUNDING, assert_close_rel
from torch import nn

from lib_layerdiffuse import fastnorm, tiling
from lib_layerdiffuse import vae as V
from lib_layerdiffuse.fastnorm import FastGroupNorm, group_norm_plain, resolve_mode, set_group_norm_mode
from lib_layerdiffuse.vae import (
    CompiledDecoder,
    TransparentVAEDecoder,
    compile_decoder,
    decode_rgba,
    default_tile_size,
    default_views_per_batch,
)

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------
# FastGroupNorm


@pytest.mark.reference
@pytest.mark.parametrize("shape", [(2, 32, 16, 24), (1, 64, 33, 7), (3, 8, 5, 5), (2, 12, 40)])
@pytest.mark.parametrize("offset", [0.0, 20.0])
@pytest.mark.parametrize("affine", [True, False])
def test_plain_matches_nn_groupnorm_fp32(shape, offset, affine):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g) * 3 + offset
    ref = nn.GroupNorm(4, shape[1], eps=1e-5, affine=affine)
    fast = FastGroupNorm(4, shape[1], eps=1e-5, affine=affine, mode="plain")
    if affine:
        with torch.no_grad():
            ref.weight.normal_(generator=g)
            ref.bias.normal_(generator=g)
        fast.load_state_dict(ref.state_dict())
    with torch.no_grad():
        assert_close_rel(fast(x), ref(x))
        assert_close_rel(fast(x, silu=True), F.silu(ref(x)))


@pytest.mark.reference
def test_plain_half_uses_fp32_statistics(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 32, 16, 16, generator=g) * 0.5 + 8).half()
    w, b = torch.randn(32, generator=g).half(), torch.randn(32, generator=g).half()
    exact = F.group_norm(x.float(), 4, w.float(), b.float(), 1e-5)
    y = group_norm_plain(x, 4, w, b)
    assert y.dtype == torch.float16
    # mean/std = 16: half statistics would be off by ~|mean| * 2^-11 / std = 1e-2
    assert (y.float() - exact).abs().max() < 1e-2
    assert ((y.float() - exact).norm() / exact.norm()) < 2e-3
    monkeypatch.setattr(fastnorm, "_CHUNK_ELEMENTS", 0)  # per-group fp32 conversion
    torch.testing.assert_close(group_norm_plain(x, 4, w, b), y, atol=0, rtol=0)


def test_fastgroupnorm_is_a_groupnorm_with_the_same_keys():
    m = FastGroupNorm(4, 32, eps=1e-5)
    assert isinstance(m, nn.GroupNorm)
    assert list(m.state_dict()) == list(nn.GroupNorm(4, 32).state_dict()) == ["weight", "bias"]
    assert resolve_mode("auto", torch.device("cpu")) == "torch"
    assert resolve_mode("auto", torch.device("cuda")) == ("triton" if fastnorm.HAS_TRITON else "plain")
    assert resolve_mode("triton", torch.device("cpu")) == "plain"
    with pytest.raises(ValueError, match="mode"):
        FastGroupNorm(4, 32, mode="fused")


@pytest.mark.reference
def test_plain_norm_keeps_autograd():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 4, 4, generator=g, requires_grad=True)
    # a random projection: the gradient of square().sum() through a norm is ~0 (noise against noise)
    proj = torch.randn(2, 8, 4, 4, generator=g)
    m = FastGroupNorm(4, 8, mode="plain")
    ref = nn.GroupNorm(4, 8)
    (gx,) = torch.autograd.grad((m(x) * proj).sum(), x)
    (rx,) = torch.autograd.grad((ref(x) * proj).sum(), x)
    assert rx.abs().max() > 0.1
    assert_close_rel(gx, rx)


@pytest.mark.reference
@torch.no_grad()
def test_decoder_in_plain_mode_matches_official(decoder, reference):
    assert sum(isinstance(m, FastGroupNorm) for m in decoder.modules()) == 91
    try:
        set_group_norm_mode(decoder, "plain")
        out = decoder(reference["dec_pixel"], reference["dec_latent"])
        assert_close_rel(out, reference["dec_out"])
        tta = decode_rgba(decoder, reference["tta_pixel"], reference["tta_latent"], views_per_batch=4)
        assert_close_rel(tta, reference["tta_out"])
    finally:
        set_group_norm_mode(decoder, "auto")


TRITON_SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.nn.functional as F
    from lib_layerdiffuse import fastnorm as fn
    sys.path.insert(0, "tests")
    from tolerance import FP32
    assert fn.HAS_TRITON
    g = torch.Generator().manual_seed(0)
    for shape, silu in [((2, 32, 16, 24), False), ((1, 64, 33, 7), True), ((3, 8, 100, 50), True)]:
        x = torch.randn(shape, generator=g) * 3 + 5
        w, b = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
        ref = F.group_norm(x, 4, w, b, 1e-5)
        ref = F.silu(ref) if silu else ref
        y = fn.group_norm_triton(x, 4, w, b, 1e-5, silu, block=256)
        assert (y - ref).abs().max() <= FP32 * ref.abs().max(), (shape, (y - ref).abs().max())
        yh = fn.group_norm_triton(x.half(), 4, w, b, 1e-5, silu, block=256)
        assert yh.dtype == torch.float16 and (yh.float() - ref).abs().max() < 1e-2
    print("ok")
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed (CPU build)")
def test_triton_kernels_in_interpreter():
    """The Triton kernels' logic, run by Triton's CPU interpreter (the GPU run needs CUDA)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


@pytest.mark.skipif(not (torch.cuda.is_available() and fastnorm.HAS_TRITON), reason="needs CUDA and triton")
def test_triton_matches_nn_groupnorm_on_cuda():
    x = torch.randn(2, 64, 96, 80, device="cuda") * 2 + 3
    ref = nn.GroupNorm(4, 64).cuda()
    fast = FastGroupNorm(4, 64, mode="triton").cuda()
    fast.load_state_dict(ref.state_dict())
    with torch.no_grad():
        assert_close_rel(fast(x), ref(x))
        assert_close_rel(fast(x, silu=True), F.silu(ref(x)))


# ---------------------------------------------------------------------------------------
# Memory-adaptive batching


def test_views_per_batch_from_memory(monkeypatch):
    cpu = torch.device("cpu")
    assert default_views_per_batch(cpu, torch.float32, 1024, 1024, extra_memory_gb=100) == 1
    cuda = torch.device("cuda")
    monkeypatch.setattr(V, "available_memory", lambda d: 80 * 1024**3)
    # 1024^2 fp16: ~0.8 GB per extra view, so 2 GB allow 2 more
    assert default_views_per_batch(cuda, torch.float16, 1024, 1024) == 3
    assert default_views_per_batch(cuda, torch.float16, 1024, 1024, extra_memory_gb=6) == 8
    assert default_views_per_batch(cuda, torch.float16, 1024, 1024, extra_memory_gb=0) == 1
    assert default_views_per_batch(cuda, torch.float32, 1024, 1024) == 2
    assert default_views_per_batch(cuda, torch.float16, 512, 512) == 11
    monkeypatch.setattr(V, "available_memory", lambda d: 2 * 1024**3)  # small card: free memory rules
    assert default_views_per_batch(cuda, torch.float16, 1024, 1024) == 2  # 1 GB + 0.8 GB < 0.9 * 2 GB
    assert default_views_per_batch(cuda, torch.float16, 512, 512) == 8
    monkeypatch.setattr(V, "available_memory", lambda d: 1536 * 1024**2)
    assert default_views_per_batch(cuda, torch.float16, 1024, 1024) == 1
    monkeypatch.setattr(V, "available_memory", lambda d: None)
    assert default_views_per_batch(cuda, torch.float16, 1024, 1024) == 3


class CountingDecoder(nn.Module):
    """Stands in for the decoder: records batch sizes; output depends on pixel and latent."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.batches = []

    def forward(self, pixel, latent):
        self.batches.append(pixel.shape[0])
        lat = F.interpolate(latent[:, :1], size=pixel.shape[-2:], mode="nearest")
        # position-dependent, so a wrong un-view would show
        ramp = torch.linspace(0, 1, pixel.shape[-1])
        return torch.cat([pixel.mean(1, keepdim=True) * ramp, pixel], 1) * self.w + 0.1 * lat


@pytest.mark.reference
@pytest.mark.parametrize(("per", "batches"), [(1, [1] * 8), (3, [2] * 4), (4, [4, 4]), (8, [4, 4])])
def test_views_are_chunked_evenly(per, batches):
    d = CountingDecoder()
    g = torch.Generator().manual_seed(1)
    pixel, latent = torch.rand(1, 3, 64, 64, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    expected = decode_rgba(d, pixel, latent, views_per_batch=1)
    d.batches.clear()
    torch.testing.assert_close(decode_rgba(d, pixel, latent, views_per_batch=per), expected, atol=0, rtol=0)
    assert d.batches == batches


def test_decode_rgba_takes_the_memory_keyword(monkeypatch):
    seen = {}
    real = V.default_views_per_batch

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)

    monkeypatch.setattr(V, "default_views_per_batch", spy)
    decode_rgba(CountingDecoder(), torch.rand(1, 3, 64, 64), torch.rand(1, 4, 8, 8), extra_memory_gb=5)
    assert seen["extra_memory_gb"] == 5


# ---------------------------------------------------------------------------------------
# Compilation (torch.compile's "eager" backend: tracing only, no C++ build in the tests)


def test_compile_decoder_logs_once_per_shape(caplog):
    d = CountingDecoder()
    assert compile_decoder(d, enabled=False) is d
    c = compile_decoder(d, backend="eager")
    assert isinstance(c, CompiledDecoder)
    g = torch.Generator().manual_seed(2)
    pixel, latent = torch.rand(1, 3, 64, 128, generator=g), torch.randn(1, 4, 8, 16, generator=g)
    with caplog.at_level(logging.INFO, logger="layerdiffuse"):
        out = decode_rgba(c, pixel, latent)
    torch.testing.assert_close(out, decode_rgba(d, pixel, latent), atol=1e-6, rtol=0)
    msgs = [r.getMessage() for r in caplog.records if "compiled" in r.getMessage()]
    # 8 views on CPU, one per forward, in two shapes (64x128 and, rotated, 128x64)
    assert len(msgs) == 2 and len(c.compile_seconds) == 2
    assert any("1x3x64x128" in m for m in msgs) and any("1x3x128x64" in m for m in msgs)


# ---------------------------------------------------------------------------------------
# Tiling


@pytest.mark.parametrize(
    ("size", "tile", "overlap"), [(256, 128, None), (192, 128, 32), (2048, 1024, 256), (200, 64, 16)]
)
def test_tile_plan_covers_on_the_latent_grid(size, tile, overlap):
    starts = tiling.tile_plan(size, tile, overlap)
    ov = tiling.default_overlap(tile) if overlap is None else overlap
    assert starts[0] == 0 and starts[-1] + tile == size
    assert all(s % 8 == 0 for s in starts)
    assert all(b - a <= tile - ov + 8 for a, b in zip(starts, starts[1:], strict=False))
    assert tiling.tile_plan(size, size + 64) == [0]


@pytest.mark.reference
def test_tiled_blend_is_a_partition_of_unity():
    """A per-pixel decode comes back exactly: only the blending is under test."""

    def pointwise(p, lat):
        return torch.cat([p.mean(1, keepdim=True), p], 1) + F.interpolate(lat[:, :1], scale_factor=8.0)

    g = torch.Generator().manual_seed(5)
    pixel, latent = torch.rand(2, 3, 256, 192, generator=g), torch.randn(2, 4, 32, 24, generator=g)
    out = tiling.decode_tiled(pointwise, pixel, latent, 128, 32)
    assert_close_rel(out, pointwise(pixel, latent), ROUNDING)


@torch.no_grad()
def test_tiled_decode_error_against_whole(decoder):
    """256x192 in 128-px tiles (3 x 2, overlap 32) against the whole decode, one pass.

    Random weights and inputs: the figures are a proxy for real ones; printed for the report.
    """
    g = torch.Generator().manual_seed(11)
    # a smooth image, as a VAE decode is (noise would make every tile boundary an edge)
    pixel = F.interpolate(torch.rand(1, 3, 8, 6, generator=g), size=(256, 192), mode="bilinear")
    latent = F.interpolate(torch.randn(1, 4, 4, 3, generator=g), size=(32, 24), mode="bilinear")
    whole = decode_rgba(decoder, pixel, latent, passes=1)
    tiled = decode_rgba(decoder, pixel, latent, passes=1, tile_size=128, tile_overlap=32)
    assert tiled.shape == whole.shape and tiled.dtype == torch.float32
    assert tiled.min() >= 0 and tiled.max() <= 1
    err = (tiled - whole).abs()
    print(
        f"\ntiling 256x192/128: alpha mean {err[:, 0].mean():.4f} max {err[:, 0].max():.4f}, rgb mean {err[:, 1:].mean():.4f}"
    )
    assert err.mean() < 0.2
    with pytest.raises(ValueError, match="tile_size"):
        decode_rgba(decoder, pixel, latent, passes=1, tile_size=100)


@pytest.mark.reference
def test_one_tile_is_the_whole_decode():
    d = CountingDecoder()
    pixel, latent = torch.rand(1, 3, 128, 64), torch.randn(1, 4, 16, 8)
    whole = decode_rgba(d, pixel, latent)
    torch.testing.assert_close(decode_rgba(d, pixel, latent, tile_size=128), whole, atol=0, rtol=0)
    torch.testing.assert_close(decode_rgba(d, pixel, latent, tile_size="auto"), whole, atol=0, rtol=0)  # CPU: none


def test_tiles_of_odd_sizes_and_batches():
    d = CountingDecoder()
    pixel, latent = torch.rand(2, 3, 200, 72), torch.randn(2, 4, 25, 9)
    out = decode_rgba(d, pixel, latent, passes=2, tile_size=128, tile_overlap=16)
    assert out.shape == (2, 4, 200, 72) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1 and torch.isfinite(out).all()
    # the RGB channels of the stand-in are the input: blending must give it back
    torch.testing.assert_close(out[:, 1:], (pixel + 0.1 * F.interpolate(latent[:, :1], scale_factor=8.0)).clip(0, 1))


def test_auto_tile_size(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_tile_size(cpu, torch.float32, 4096, 4096) is None
    monkeypatch.setattr(V, "available_memory", lambda d: 24 * 1024**3)
    assert default_tile_size(cuda, torch.float16, 2048, 2048) is None  # fits: exact decode
    monkeypatch.setattr(V, "available_memory", lambda d: 3 * 1024**3)
    t = default_tile_size(cuda, torch.float16, 2048, 2048)
    assert t is not None and t % 64 == 0 and 500 * 2 * t * t <= 0.9 * 3 * 1024**3


def test_decoder_keys_unchanged():
    with torch.device("meta"):
        m = TransparentVAEDecoder()
    sd = m.state_dict()
    assert len(sd) == 538
    assert all(not k.endswith("mode") for k in sd)


def test_available_memory_respects_the_per_process_fraction(monkeypatch):
    """``auto`` reads what this process may use: free memory, capped by a per-process fraction."""
    gb = 1024**3
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (60 * gb, 80 * gb))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 2 * gb)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 3 * gb)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)
    assert V.available_memory("cuda:0") == 61 * gb  # free + cached-but-unused
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 0.1)  # 8 GB for this process
    assert V.available_memory("cuda:0") == 6 * gb
    assert V.available_memory("cpu") is None
    # a 2048x2048 fp16 one-view pass needs ~4 GB: it fits in 6 GB, not in 2 GB, so auto tiles there
    assert V.default_tile_size("cuda:0", torch.float16, 2048, 2048) is None
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 0.05)
    assert V.default_tile_size("cuda:0", torch.float16, 2048, 2048) == 1344
    # injected on CPU: 0.9 GB / (500 elements x 4 bytes per pixel) = 483k pixels, 695 px square, 640 by 64s
    assert V.default_tile_size("cpu", torch.float32, 2048, 2048, free_memory=gb) == 640
