"""Transparent decoder / encoder: layout, parity with the official numbers, TTA, padding."""

import numpy as np
import pytest
import torch
from tolerance import assert_close_rel
from weightgen import manifest_shapes

from lib_layerdiffuse import rgba as R
from lib_layerdiffuse.vae import (
    VIEWS,
    TransparentVAEDecoder,
    TransparentVAEEncoder,
    apply_offset,
    apply_offset_to_posterior,
    decode_rgba,
    encode_offset,
)


def shapes(module):
    return {k: list(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", ["vae_transparent_decoder", "layer_sd15_vae_transparent_decoder"])
def test_decoder_layout_equals_manifest(name):
    with torch.device("meta"):
        m = TransparentVAEDecoder()
    assert shapes(m) == manifest_shapes(name)
    assert len(shapes(m)) == 538
    assert sum(p.numel() for p in m.parameters()) == 104_104_804


@pytest.mark.parametrize("name", ["vae_transparent_encoder", "layer_sd15_vae_transparent_encoder"])
def test_encoder_layout_equals_manifest(name):
    m = TransparentVAEEncoder()
    assert shapes(m) == manifest_shapes(name)
    assert sum(p.numel() for p in m.parameters()) == 1_181_764


@pytest.mark.reference
def test_decoder_forward_matches_official(decoder, reference):
    with torch.no_grad():
        out = decoder(reference["dec_pixel"], reference["dec_latent"])
    assert out.shape == reference["dec_out"].shape
    assert_close_rel(out, reference["dec_out"])


@pytest.mark.reference
@pytest.mark.parametrize("per", [1, 3, 8])
def test_decode_rgba_matches_official_tta(decoder, reference, per):
    out = decode_rgba(decoder, reference["tta_pixel"], reference["tta_latent"], views_per_batch=per)
    assert_close_rel(out, reference["tta_out"])


@pytest.mark.reference
def test_decode_png_matches_official(decoder, reference):
    pixel = reference["decode_pixel_u8"].permute(2, 0, 1)[None].float() / 255.0
    y = decode_rgba(decoder, pixel, reference["tta_latent"])[0]
    rgba = R.from_decoder(y)
    png = R.to_uint8(rgba)
    # truncation to 8 bits can flip a level where the float differs by ~1e-6
    assert np.abs(png.astype(int) - reference["decode_png_u8"].numpy().astype(int)).max() <= 1
    vis = R.to_uint8(R.checkerboard_preview(rgba))
    assert np.abs(vis.astype(int) - reference["decode_vis_u8"].numpy().astype(int)).max() <= 1


@pytest.mark.reference
def test_encoder_matches_official(encoder, reference):
    with torch.no_grad():
        out = encoder(reference["enc_x"])
    assert_close_rel(out, reference["enc_out"])


@pytest.mark.reference
@pytest.mark.parametrize("as_float", [False, True])
def test_encode_offset_matches_official(encoder, reference, as_float):
    img = reference["enc_rgba_u8"].numpy()
    if as_float:
        img = img.astype(np.float32) / 255.0
    assert_close_rel(encode_offset(encoder, img), reference["encode_out"])


@pytest.mark.reference
def test_encode_offset_accepts_tensor_batch(encoder, reference):
    img = reference["enc_rgba_u8"].float() / 255.0
    batch = torch.stack([img.permute(2, 0, 1), img.flip(1).permute(2, 0, 1)])
    out = encode_offset(encoder, batch)
    assert out.shape == (2, 4, 8, 8)
    assert_close_rel(out[:1], reference["encode_out"])
    assert not torch.allclose(out[0], out[1])


def sequential_official(decoder, pixel, latent):
    """The official scheme written out: 8 batch-1 passes, clip, undo, lower median."""
    results = []
    for flip in (False, True):
        for k in range(4):
            p, l_ = pixel, latent
            if flip:
                p, l_ = p.flip(3), l_.flip(3)
            y = decoder(p.rot90(k, (2, 3)), l_.rot90(k, (2, 3))).clip(0, 1).rot90(-k, (2, 3))
            results.append(y.flip(3) if flip else y)
    return torch.stack(results).median(dim=0).values


@pytest.mark.reference
@torch.no_grad()
def test_batched_equals_sequential_multi_image(decoder):
    g = torch.Generator().manual_seed(7)
    pixel = torch.rand(2, 3, 64, 128, generator=g)
    latent = torch.randn(2, 4, 8, 16, generator=g)
    expected = torch.cat([sequential_official(decoder, pixel[i : i + 1], latent[i : i + 1]) for i in range(2)])
    for per in (1, 5, 16):
        out = decode_rgba(decoder, pixel, latent, views_per_batch=per)
        # batched and single-view convolutions take other kernels; a wrong view order moves ~1e-1
        assert_close_rel(out, expected)


@pytest.mark.parametrize("hw", [(8, 8), (72, 40), (40, 136), (64, 64)])
@torch.no_grad()
def test_any_multiple_of_8(decoder, hw):
    h, w = hw
    g = torch.Generator().manual_seed(h * 1000 + w)
    pixel = torch.rand(2, 3, h, w, generator=g)
    latent = torch.randn(2, 4, h // 8, w // 8, generator=g)
    out = decode_rgba(decoder, pixel, latent, passes=2)
    assert out.shape == (2, 4, h, w)
    assert out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert torch.isfinite(out).all()


@pytest.mark.reference
@torch.no_grad()
def test_padding_is_identity_at_multiples_of_64(decoder):
    g = torch.Generator().manual_seed(3)
    pixel = torch.rand(1, 3, 128, 64, generator=g)
    latent = torch.randn(1, 4, 16, 8, generator=g)
    out = decode_rgba(decoder, pixel, latent, augment=False)
    torch.testing.assert_close(out, decoder(pixel, latent).clip(0, 1), atol=0, rtol=0)


@pytest.mark.reference
@torch.no_grad()
def test_padding_crops_back_the_padded_decode(decoder):
    """A 72x40 decode is the centre crop of the decode of its replicate-padded 128x64 version."""
    g = torch.Generator().manual_seed(4)
    pixel = torch.rand(1, 3, 72, 40, generator=g)
    latent = torch.randn(1, 4, 9, 5, generator=g)
    out = decode_rgba(decoder, pixel, latent, augment=False)
    top, left = 24, 8  # (128-72)//16*8, (64-40)//16*8
    pp = torch.nn.functional.pad(pixel, (left, 64 - 40 - left, top, 128 - 72 - top), mode="replicate")
    pl = torch.nn.functional.pad(latent, (1, 2, 3, 4), mode="replicate")
    full = decoder(pp, pl).clip(0, 1)
    torch.testing.assert_close(out, full[..., top : top + 72, left : left + 40], atol=1e-6, rtol=0)


@pytest.mark.reference
@torch.no_grad()
def test_fewer_passes(decoder, reference):
    pixel, latent = reference["tta_pixel"], reference["tta_latent"]
    one = decode_rgba(decoder, pixel, latent, passes=1)
    torch.testing.assert_close(one, decoder(pixel, latent).clip(0, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(decode_rgba(decoder, pixel, latent, augment=False), one, atol=0, rtol=0)
    two = decode_rgba(decoder, pixel, latent, passes=2)
    flipped = decoder(pixel.flip(3), latent.flip(3)).clip(0, 1).flip(3)
    torch.testing.assert_close(two, (one + flipped) / 2, atol=1e-6, rtol=0)
    four = decode_rgba(decoder, pixel, latent, passes=4)
    assert four.shape == one.shape and len(VIEWS[4]) == 4
    with pytest.raises(ValueError, match="passes"):
        decode_rgba(decoder, pixel, latent, passes=3)


def test_decode_rejects_bad_shapes(decoder):
    with pytest.raises(ValueError, match="multiple of 8"):
        decode_rgba(decoder, torch.rand(1, 3, 60, 64), torch.rand(1, 4, 7, 8))
    with pytest.raises(ValueError, match="latent must be"):
        decode_rgba(decoder, torch.rand(1, 3, 64, 64), torch.rand(1, 4, 16, 16))
    with pytest.raises(ValueError, match="RGB"):
        decode_rgba(decoder, torch.rand(1, 4, 64, 64), torch.rand(1, 4, 8, 8))


@torch.no_grad()
def test_encoder_shapes_odd_sizes(encoder):
    for h, w in [(8, 8), (72, 40), (136, 200)]:
        img = np.random.default_rng(h + w).random((h, w, 4), dtype=np.float32)
        assert encode_offset(encoder, img).shape == (1, 4, h // 8, w // 8)


def test_apply_offset():
    mean, std, off = torch.randn(2, 4, 3, 3), torch.rand(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(apply_offset(mean, std, off), mean + std * off)

    class Posterior:
        def __init__(self):
            self.mean, self.std = mean, std

    torch.testing.assert_close(apply_offset_to_posterior(Posterior(), off), mean + std * off)
